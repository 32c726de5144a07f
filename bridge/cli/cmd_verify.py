"""``hfmb verify``: Megatron-Core's forward against transformers' on the same tokens, or two HF folders bit for bit."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from bridge.cli.common import CHECK_FAILED, OK, add_parallel_args, iteration, parallel_sizes, report
from bridge.runtime.progress import elapsed_bar

SUMMARY = "compare Megatron-Core's forward with transformers', or two HF folders"
EXAMPLES = """examples:
  hfmb verify ./my-hf-model --tp 2 --pp 2            # convert, then compare forwards
  hfmb verify ./my-hf-model ./ckpt --tp 2            # compare with a Megatron checkpoint
  hfmb verify ./my-hf-model ./lora-ckpt              # a LoRA training checkpoint against peft on transformers
  hfmb verify ./my-hf-model ./hf-out                 # two HF folders, tensor by tensor
Runs the same tokens through transformers and Megatron-Core in fp32 and prints per-layer hidden
state differences, logits max abs diff, top-1 / top-5 agreement and KL(p_hf || p_megatron).
Fails (exit 1) when logits max abs diff > --max-logits-diff (default 1e-4), top-1 agreement
< --min-top1 (default 100%), or the largest per-token KL > --max-kl (default 1e-6); top-5 and
hidden states fail only when --min-top5 / --max-hidden-diff are given. Two HF folders must be
identical bit for bit (names, dtypes, shapes, bytes) and the second must load in transformers
with an empty load report."""


def add_parser(commands, command) -> None:
    ver = command("verify", SUMMARY, EXAMPLES)
    ver.add_argument("hf", help="reference HF checkpoint folder or Hub repo id")
    ver.add_argument("other", nargs="?", type=Path, help="a Megatron checkpoint root or a second HF folder (default: convert HF)")
    add_parallel_args(ver)
    ver.add_argument(
        "--iteration", type=iteration, default="latest", help="with a Megatron checkpoint: which saved iteration (default: latest)"
    )
    ver.add_argument("--batch-size", type=int, default=2, help="sequences of random token ids (default 2)")
    ver.add_argument("--seq-len", type=int, default=32, help="tokens per sequence (default 32)")
    ver.add_argument("--seed", type=int, default=0, help="seed of the random token ids (default 0)")
    ver.add_argument("--prompt", action="append", help="use this text instead of random ids (repeatable; cut to the shortest)")
    ver.add_argument("--max-logits-diff", type=float, default=1e-4, help="largest allowed logits max abs diff (default 1e-4)")
    ver.add_argument("--min-top1", type=float, default=100.0, help="smallest allowed top-1 agreement in %% (default 100)")
    ver.add_argument("--max-kl", type=float, default=1e-6, help="largest allowed per-token KL(p_hf || p_megatron) (default 1e-6)")
    ver.add_argument("--min-top5", type=float, help="smallest allowed top-5 agreement in %% (default: reported only)")
    ver.add_argument("--max-hidden-diff", type=float, help="largest allowed per-layer hidden-state max abs diff (default: reported only)")


def run(args: argparse.Namespace) -> int:
    from bridge.megatron import checkpoint as mc

    if args.other is not None and not mc.is_checkpoint(args.other):
        return _exit_status_of(lambda: _verify_folders(args))
    return _verify_forward(args)


def _exit_status_of(check) -> int:
    """``check()`` on rank 0 alone; every rank returns its exit status (and raises its error)."""
    from bridge.megatron.parallel import init_distributed
    from bridge.runtime.rank_errors import on_rank0

    init_distributed()
    return on_rank0(check)


def _verify_folders(args: argparse.Namespace) -> int:
    from bridge.checks.verify import compare_hf_folders, load_hf_tensors, transformers_load_report
    from bridge.hf.folder import CheckpointError, resolve_hf_folder
    from bridge.hf.metadata import config_differences, read_json

    expected, actual = resolve_hf_folder(args.hf), args.other
    if not (actual / "config.json").is_file():
        raise CheckpointError(
            f"{actual} is neither a Megatron checkpoint (no latest_checkpointed_iteration.txt) nor an HF folder (no config.json)"
        )
    report(f"hfmb verify: {expected}  vs  {actual} (tensor by tensor, bit for bit)")
    with elapsed_bar("comparing tensors"):
        differences = compare_hf_folders(expected, actual)
    count = len(load_hf_tensors(expected))
    config_diffs = _semantic_config_differences(expected, actual) + config_differences(
        {k: v for k, v in read_json(expected / "config.json").items() if k == "architectures"},
        {k: v for k, v in read_json(actual / "config.json").items() if k == "architectures"},
    )
    with elapsed_bar("loading the second folder in transformers"):
        load_report = {k: v for k, v in transformers_load_report(actual).items() if v}
    report(
        f"tensors: {count} in the first folder, "
        f"{count - len([d for d in differences if not d.startswith('extra')])} identical in the second"
    )
    summary = summarise_differences(differences)
    for line in summary[:50]:
        report(f"  DIFFERENT {line}")
    if len(summary) > 50:
        report(f"  … and {len(summary) - 50} more")
    report("config: " + ("same model config" if not config_diffs else f"{len(config_diffs)} differences"))
    for line in config_diffs:
        report(f"  DIFFERENT {line}")
    report("transformers load report of the second folder: " + ("empty" if not load_report else str(load_report)))
    failed = bool(differences or config_diffs or load_report)
    report("VERIFY FAILED" if failed else "VERIFY PASSED")
    return CHECK_FAILED if failed else OK


_DTYPE_ONLY = re.compile(r"^(?P<name>\S+): torch\.(?P<a>\w+)(?P<shape>\[[^]]*\]) vs torch\.(?P<b>\w+)(?P=shape)$")
_MISSING_OR_EXTRA = re.compile(r"^(?P<kind>missing|extra) (?P<name>\S+)$")


def summarise_differences(differences: list[str]) -> list[str]:
    """``compare_tensors``' lines with the repetitive kinds folded: one line per dtype pair, one for missing, one for extra.

    An export with ``--dtype float32`` differs from its bf16 source in every tensor, and only in dtype:
    that is one line ("50 tensors differ only in dtype (bfloat16 vs float32), e.g. …"), not fifty.
    """
    groups: dict[tuple[str, ...], list[str]] = {}
    others = []
    for line in differences:
        if match := _DTYPE_ONLY.match(line):
            groups.setdefault(("dtype", match["a"], match["b"]), []).append(match["name"])
        elif match := _MISSING_OR_EXTRA.match(line):
            groups.setdefault((match["kind"],), []).append(match["name"])
        else:
            others.append(line)
    return [_folded(key, names) for key, names in groups.items()] + others


def _folded(key: tuple[str, ...], names: list[str]) -> str:
    kind, many, example = key[0], len(names) > 1, f", e.g. {names[0]}"
    if kind == "dtype":
        pair = f"({key[1]} vs {key[2]})"
        return f"{len(names)} tensors differ only in dtype {pair}{example}" if many else f"{names[0]}: differs only in dtype {pair}"
    if kind == "missing":
        return f"{len(names)} tensors missing from the second folder{example}" if many else f"missing {names[0]}"
    return f"{len(names)} tensors only in the second folder{example}" if many else f"extra {names[0]}"


def _semantic_config_differences(a: Path, b: Path) -> list[str]:
    """Differences between two configs as transformers reads them (old and new key spellings are the same setting)."""
    from transformers import AutoConfig

    from bridge.hf.metadata import config_differences

    return config_differences(AutoConfig.from_pretrained(a).to_dict(), AutoConfig.from_pretrained(b).to_dict())


def _tokens(args: argparse.Namespace, bridge):
    import torch

    if args.prompt:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(bridge.hf_folder)
        except (OSError, ValueError, TypeError) as err:  # transformers' words for "no tokenizer files here"
            raise ValueError(f"--prompt needs a tokenizer, and {bridge.hf_folder} has none that transformers can load ({err})") from err
        ids = [tokenizer(text)["input_ids"] for text in args.prompt]
        length = min(len(i) for i in ids)
        if length == 0:
            raise ValueError("a --prompt gave no tokens")
        return torch.tensor([i[:length] for i in ids], dtype=torch.long), f"{len(ids)} prompt(s) cut to {length} tokens"
    if args.batch_size < 1 or args.seq_len < 1:
        raise ValueError("--batch-size and --seq-len must be at least 1")
    limit = getattr(bridge.hf_config, "max_position_embeddings", None)
    if limit is not None and args.seq_len > limit:
        raise ValueError(f"--seq-len {args.seq_len} is longer than max_position_embeddings={limit}")
    generator = torch.Generator().manual_seed(args.seed)
    tokens = torch.randint(0, bridge.model_bridge.vocab_size, (args.batch_size, args.seq_len), generator=generator)
    return tokens, f"{args.batch_size} × {args.seq_len} random token ids (seed {args.seed})"


def _lora_model_and_reference(args: argparse.Namespace, bridge, tokens):
    """A LoRA training checkpoint: its adapters on the base rebuilt from ``args.hf`` in this process, and the reference
    of ``peft`` on transformers with those adapters (written as the PEFT folder ``hfmb export --adapter`` writes)."""
    import tempfile

    import torch
    import torch.distributed as dist

    from bridge.checks.verify import peft_reference
    from bridge.lora import save_peft_adapter
    from bridge.megatron.parallel import init_distributed
    from bridge.training.lora_checkpoint import load_lora_checkpoint

    init_distributed()
    if dist.get_world_size() > 1:
        raise ValueError("a LoRA checkpoint is verified in one process (its adapters go onto the base at TP=PP=1): drop --tp/--pp")
    lora_bridge, model = load_lora_checkpoint(args.other, args.iteration, base=bridge.hf_folder, dtype=torch.float32)
    with tempfile.TemporaryDirectory(prefix="hfmb-verify-") as tmp:
        save_peft_adapter(model, lora_bridge, Path(tmp) / "adapter")
        with elapsed_bar("peft forward"):
            reference = peft_reference(bridge.hf_folder, Path(tmp) / "adapter", tokens)
    what = f"the LoRA checkpoint {args.other.absolute()} (its adapters on the base, float32)"
    return model, what, lambda: reference


def _verify_forward(args: argparse.Namespace) -> int:
    import torch
    import torch.distributed as dist

    from bridge import AutoBridge
    from bridge.checks.verify import Thresholds, compare_outputs, hf_reference, megatron_outputs
    from bridge.conversions import load_megatron_checkpoint, sizes_text
    from bridge.hf.metadata import ConfigMismatchError
    from bridge.megatron import checkpoint as mc
    from bridge.megatron.foreign_checkpoint import checkpoint_record
    from bridge.runtime.rank_errors import on_rank0
    from bridge.training.lora_checkpoint import saved_lora_record

    bridge = AutoBridge.from_hf_pretrained(args.hf, dtype=torch.float32)
    tokens, token_text = _tokens(args, bridge)
    reference_of = lambda: hf_reference(bridge.hf_folder, tokens)  # noqa: E731
    reference_text = f"transformers ({bridge.hf_folder})"
    if args.other is not None and saved_lora_record(args.other, args.iteration) is not None:
        model, what, reference_of = _lora_model_and_reference(args, bridge, tokens)
        reference_text = f"peft on transformers ({bridge.hf_folder} + the checkpoint's adapters)"
    elif args.other is not None:
        ckpt = args.other.absolute()
        # A checkpoint written elsewhere has no record of its HF config: the reference folder is it.
        own_record = (ckpt / mc.SOURCE_INFO).exists()
        info, config_folder = checkpoint_record(ckpt, None if own_record else Path(bridge.hf_folder), args.iteration)
        diffs = _semantic_config_differences(Path(bridge.hf_folder), config_folder)
        if diffs:
            raise ConfigMismatchError(f"the checkpoint {ckpt} was made from a different config than {args.hf}: " + "; ".join(diffs))
        model = load_megatron_checkpoint(bridge, ckpt, info, parallel_sizes(args), args.iteration)
        saved = info.get("saved_with", {})
        what = f"Megatron checkpoint {ckpt} (saved at {sizes_text(saved)}, {info.get('params_dtype')})"
    else:
        sizes = parallel_sizes(args)
        model = bridge.to_megatron_model(tp=sizes.tp, pp=sizes.pp, vpp=sizes.vpp, ep=sizes.ep)
        what = "the checkpoint converted to Megatron-Core in memory"
    reference: list = []

    def run_reference() -> None:
        with elapsed_bar("transformers forward"):
            reference.extend(reference_of())

    on_rank0(run_reference, share=False)
    with elapsed_bar("Megatron-Core forward"):
        logits, hidden = megatron_outputs(model, tokens, bridge.model_bridge.vocab_size)

    def report_on_rank0() -> int:
        hf_logits, hf_hidden, load_info = reference
        thresholds = Thresholds(
            max_logits_diff=args.max_logits_diff,
            min_top1=args.min_top1 / 100,
            max_kl=args.max_kl,
            min_top5=None if args.min_top5 is None else args.min_top5 / 100,
            max_hidden_diff=args.max_hidden_diff,
        )
        comparison = compare_outputs(hf_logits, logits, hf_hidden, hidden)
        failures = comparison.failures(thresholds)
        load_problems = {k: v for k, v in load_info.items() if v}
        if load_problems:
            failures.append(f"transformers does not load {args.hf} cleanly: {load_problems}")
        report(f"hfmb verify: {reference_text} vs {what}")
        report(f"Megatron-Core at {sizes_text(parallel_sizes(args))} on {dist.get_world_size()} rank(s); both in float32")
        report(f"tokens: {token_text}\n")
        report(comparison.format(thresholds))
        report("\ntransformers load report of the reference: " + ("empty" if not load_problems else str(load_problems)))
        if failures:
            report("VERIFY FAILED: " + "; ".join(failures))
            return CHECK_FAILED
        report("VERIFY PASSED")
        return OK

    return _exit_status_of(report_on_rank0)
