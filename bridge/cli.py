"""``hfmb``: plan, import, export and verify HF ⇄ Megatron-Core conversions from the shell.

Every command runs on every rank under ``torchrun`` (rank 0 prints the report), or as one plain
process; a plain process asked for more than one rank (``--tp 2``…) starts that many local ranks
itself (gloo on CPU, NCCL on GPUs) so that a conversion needs no launcher on one machine.

Exit status: 0 success, 1 a check failed (plan problems, verify thresholds, folder differences),
2 bad input (unreadable or mismatched checkpoint, unsupported config, refused output folder).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import logging
import math
import os
import re
import shutil
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

OK, CHECK_FAILED, BAD_INPUT = 0, 1, 2
DTYPES = ("float32", "bfloat16", "float16")

EXAMPLES = {
    "plan": """examples:
  hfmb plan meta-llama/Llama-3.2-1B --tp 2 --pp 2
  hfmb plan ./my-hf-model                     # TP=PP=1
No weights move: prints the architecture, the derived Megatron config and every HF tensor →
Megatron parameter with its mapping kind, shapes and ranks, and warns of NaN/Inf values (each tensor
is read once, streaming, to count them). Exits 1 on missing, unused, wrongly shaped, non-float or
unmapped tensors.""",
    "import": """examples:
  hfmb import ./my-hf-model ./ckpt --tp 2 --pp 2 --dtype bfloat16
  hfmb import ./my-hf-model ./ckpt --max-memory 8GB     # a checkpoint larger than this machine's RAM
  torchrun --nproc-per-node=8 -m bridge import ./my-hf-model ./ckpt --tp 4 --pp 2
Writes a Megatron-Core distributed checkpoint in Megatron-LM's layout (iteration "release"), plus
hf_config/ and bridge.json so that `hfmb export` needs no HF folder. Written atomically.
As one process (no torchrun) it streams tensor by tensor within --max-memory (default 4GB): the
checkpoint does not depend on the layout, so it loads at any TP/PP (--tp only sets the vocabulary
padding that layout needs). Under torchrun with several ranks, or with --in-memory, each rank builds
its shards of the model and they save together.""",
    "export": """examples:
  hfmb export ./ckpt ./hf-out --dtype bfloat16 --max-shard-size 2GB
  hfmb export ./ckpt ./hf-out --max-memory 8GB          # stream within 8GB, whatever the model size
  torchrun --nproc-per-node=4 -m bridge export ./ckpt ./hf-out --tp 2 --pp 2 --overwrite
As one process (no torchrun) it streams a few tensors at a time within --max-memory (default 4GB;
shards are capped to a quarter of it) from a checkpoint saved at any layout; under torchrun with several
ranks, or with --in-memory, the model is loaded at --tp/--pp (which may differ from the saved ones).
The folder is written beside the target and renamed into place only after transformers loaded it
with an empty load report (when streaming, if the weights fit half of --max-memory); an existing
non-empty target is refused unless --overwrite.""",
    "verify": """examples:
  hfmb verify ./my-hf-model --tp 2 --pp 2            # convert, then compare forwards
  hfmb verify ./my-hf-model ./ckpt --tp 2            # compare with a Megatron checkpoint
  hfmb verify ./my-hf-model ./hf-out                 # two HF folders, tensor by tensor
Runs the same tokens through transformers and Megatron-Core in fp32 and prints per-layer hidden
state differences, logits max abs diff, top-1 / top-5 agreement and KL(p_hf || p_megatron).
Fails (exit 1) when logits max abs diff > --max-logits-diff (default 1e-4), top-1 agreement
< --min-top1 (default 100%), or the largest per-token KL > --max-kl (default 1e-6); top-5 and
hidden states fail only when --min-top5 / --max-hidden-diff are given. Two HF folders must be
identical bit for bit (names, dtypes, shapes, bytes) and the second must load in transformers
with an empty load report.""",
}


# ---------------------------------------------------------------- arguments


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hfmb",
        description="Hugging Face ⇄ Megatron-Core checkpoint bridge. Run under torchrun for several ranks, or as one "
        "process (which starts the local ranks --tp/--pp need itself).",
        epilog="\n\n".join(EXAMPLES.values()) + "\n\nexit status: 0 ok, 1 a check failed, 2 bad input (set HFMB_TRACEBACK=1 for its traceback)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and the report")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{plan,import,export,verify}")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help, epilog=EXAMPLES[name], formatter_class=argparse.RawDescriptionHelpFormatter)
        sub.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="only warnings and the report")
        return sub

    plan = command("plan", "show how an HF checkpoint maps onto Megatron-Core at these parallel sizes (no weights move)")
    plan.add_argument("hf", help="HF checkpoint folder or Hub repo id")
    _parallel_args(plan)

    imp = command("import", "HF checkpoint → Megatron-Core distributed checkpoint")
    imp.add_argument("hf", help="HF checkpoint folder or Hub repo id")
    imp.add_argument("out", type=Path, help="checkpoint root to write")
    _parallel_args(imp)
    imp.add_argument("--dtype", choices=DTYPES, help="parameter dtype (default: the HF config's)")
    imp.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint at OUT")
    _memory_args(imp)

    exp = command("export", "Megatron-Core checkpoint (from `hfmb import`) → HF folder")
    exp.add_argument("ckpt", type=Path, help="checkpoint root written by `hfmb import` (or a training run resumed from one)")
    exp.add_argument("out", type=Path, help="HF folder to write")
    _parallel_args(exp)
    exp.add_argument("--iteration", type=_iteration, default="latest", help="which saved iteration: a number, 'release' or 'latest' (default)")
    exp.add_argument("--dtype", choices=DTYPES, help="dtype of the written tensors (default: each tensor's dtype in the original HF checkpoint)")
    exp.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB, 500MB (default 5GB)")
    exp.add_argument("--overwrite", action="store_true", help="replace an existing HF folder at OUT")
    exp.add_argument("--skip-load-check", action="store_true", help="do not load the result in transformers before publishing it")
    _memory_args(exp)

    ver = command("verify", "compare Megatron-Core's forward with transformers', or two HF folders")
    ver.add_argument("hf", help="reference HF checkpoint folder or Hub repo id")
    ver.add_argument("other", nargs="?", type=Path, help="a Megatron checkpoint root or a second HF folder (default: convert HF)")
    _parallel_args(ver)
    ver.add_argument("--iteration", type=_iteration, default="latest", help="with a Megatron checkpoint: which saved iteration (default: latest)")
    ver.add_argument("--batch-size", type=int, default=2, help="sequences of random token ids (default 2)")
    ver.add_argument("--seq-len", type=int, default=32, help="tokens per sequence (default 32)")
    ver.add_argument("--seed", type=int, default=0, help="seed of the random token ids (default 0)")
    ver.add_argument("--prompt", action="append", help="use this text instead of random ids (repeatable; cut to the shortest)")
    ver.add_argument("--max-logits-diff", type=float, default=1e-4, help="largest allowed logits max abs diff (default 1e-4)")
    ver.add_argument("--min-top1", type=float, default=100.0, help="smallest allowed top-1 agreement in %% (default 100)")
    ver.add_argument("--max-kl", type=float, default=1e-6, help="largest allowed per-token KL(p_hf || p_megatron) (default 1e-6)")
    ver.add_argument("--min-top5", type=float, help="smallest allowed top-5 agreement in %% (default: reported only)")
    ver.add_argument("--max-hidden-diff", type=float, help="largest allowed per-layer hidden-state max abs diff (default: reported only)")
    return parser


def _iteration(text: str) -> int | str | None:
    """An ``--iteration``: a number, ``release`` (None) or ``latest`` (what the tracker file names)."""
    if text in ("latest", "release"):
        return None if text == "release" else text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither an iteration number nor 'release'") from None


def _memory_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("memory")
    group.add_argument(
        "--max-memory",
        type=_size,
        help="stream tensor by tensor in one process, using at most this much memory beyond the program itself, e.g. 4GB, 500MB "
        "(default 4GB when run as one process)",
    )
    group.add_argument("--in-memory", action="store_true", help="build the whole model at --tp/--pp instead of streaming (the default under torchrun)")


def _size(text: str) -> str:
    from bridge.hf.writer import parse_size

    try:
        parse_size(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def _streams(args: argparse.Namespace) -> bool:
    """Whether this import/export streams: one process (plain, or a torchrun world of one) unless --in-memory."""
    if args.command not in ("import", "export") or args.in_memory:
        return False
    return int(os.environ.get("WORLD_SIZE", "1")) == 1


def _parallel_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("parallelism")
    group.add_argument("--tp", type=int, default=1, help="tensor-parallel size (default 1)")
    group.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (default 1)")
    group.add_argument("--vpp", type=int, help="virtual pipeline stages per rank (needs --pp > 1)")
    group.add_argument("--ep", type=int, default=1, help="expert-parallel size for MoE models (default 1)")
    group.add_argument("--nproc", type=int, help="ranks to start when not under torchrun (default: the smallest world the sizes need)")


# ---------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the command; the return value is the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "in_memory", False) and args.max_memory is not None:
        parser.error("--max-memory streams the conversion; it cannot be combined with --in-memory")
    if getattr(args, "max_memory", None) is not None and not _streams(args):
        parser.error("--max-memory streams in one process: run without torchrun (the checkpoint loads at any TP/PP)")
    world = 1 if _streams(args) else _world_needed(args)
    if "RANK" not in os.environ and (args.nproc or world) > 1:
        return _spawn(args, args.nproc or world)
    return run_command(args)


def _world_needed(args: argparse.Namespace) -> int:
    """The smallest world both the dense (tp×pp) and the expert (tp×ep×pp) layouts divide."""
    return math.lcm(args.tp * args.pp, args.tp * args.ep * args.pp)


def _spawn(args: argparse.Namespace, world: int) -> int:
    from bridge.runtime.local_launch import run_distributed

    print(f"hfmb: starting {world} local ranks (use torchrun for several machines)", file=sys.stderr)
    # The children import Megatron-Core afresh: keep its notices about optional packages out of the report.
    quiet = ",".join(f"ignore:{text}:UserWarning" for text in _IMPORT_NOTICES)
    os.environ["PYTHONWARNINGS"] = ",".join(filter(None, [os.environ.get("PYTHONWARNINGS"), quiet]))
    try:
        codes = run_distributed(_spawned, world, args, timeout=24 * 3600)
    except RuntimeError as err:
        print(f"hfmb {args.command}: a rank failed: {err}", file=sys.stderr)
        return CHECK_FAILED
    return codes[0]


def _spawned(args: argparse.Namespace) -> int:
    return run_command(args)


_IMPORT_NOTICES = ("Transformer Engine and Apex are not installed", "Apex is not installed", "full scope is deprecated")

KNOWN_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, NotADirectoryError)


def run_command(args: argparse.Namespace) -> int:
    """Run one parsed command on this rank (all ranks call it). Leaves no parallel state behind."""
    import torch.distributed as dist

    _configure_logging(args.quiet)
    created_group = not dist.is_initialized()
    try:
        return COMMANDS[args.command](args)
    except BaseException as err:
        message = _bad_input_message(err, args)
        if message is None or os.environ.get("HFMB_TRACEBACK"):
            raise
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(f"hfmb {args.command}: error: {message}", file=sys.stderr)
        return BAD_INPUT
    finally:
        _teardown(created_group)


def _bad_input_message(err: BaseException, args: argparse.Namespace) -> str | None:
    """The one line a bad input gets (exit 2), or None for an error that keeps its traceback.

    A full disk or a folder this process may not write is bad input too, however deep a library
    wrapped its OSError (torch's checkpoint writer, ``torch.save``): the line names the path.
    """
    from bridge.runtime.write_errors import cause, describe

    if isinstance(err, KNOWN_ERRORS):
        return str(err)
    if isinstance(err, (KeyboardInterrupt, SystemExit)):
        return None
    found = cause(err)
    return None if found is None else describe(found, getattr(args, "out", None))


def _teardown(created_group: bool) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if created_group and dist.is_initialized():
        dist.destroy_process_group()


def _configure_logging(quiet: bool) -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    logging.getLogger("bridge").setLevel(logging.WARNING if quiet or rank != 0 else logging.INFO)
    # Megatron-Core / DCP / transformers notices that say nothing about the conversion.
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine|TransformerEngine).*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*torch.distributed.checkpoint.*")


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def _out(text: str = "") -> None:
    """The command's report: stdout, rank 0 only."""
    if _rank() == 0:
        print(text, flush=True)


@contextlib.contextmanager
def _ticker(desc: str) -> Iterator[None]:
    """An elapsed-time bar on rank 0 for a step that reports no progress of its own (shown after 2 s)."""
    from tqdm import tqdm

    bar = tqdm(desc=desc, total=None, bar_format="{desc}: {elapsed}", delay=2.0, disable=_rank() != 0 or not sys.stderr.isatty(), file=sys.stderr)
    stop = threading.Event()

    def tick() -> None:
        while not stop.wait(0.5):
            bar.refresh()

    thread = threading.Thread(target=tick, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        bar.close()


def _dtype(name: str | None):
    import torch

    return getattr(torch, name) if name else None


def _layout(sizes: dict[str, Any]) -> str:
    """``tp=2 pp=2 vpp=1 ep=1`` from parsed arguments or a checkpoint's ``saved_with``."""
    return " ".join(f"{key}={sizes.get(key) or 1}" for key in ("tp", "pp", "vpp", "ep"))


def _sizes(args: argparse.Namespace) -> dict[str, Any]:
    sizes: dict[str, Any] = {"tp": args.tp, "pp": args.pp, "vpp": args.vpp}
    if args.ep != 1:
        sizes["ep"] = args.ep
    return sizes


def _agree(step: Callable[[], None]) -> None:
    """Run ``step`` on rank 0 and raise its error on every rank (so that no rank waits for one that gave up)."""
    import torch.distributed as dist

    from bridge.megatron.parallel import init_distributed
    from bridge.runtime.rank_errors import raise_everywhere

    init_distributed()
    error: Exception | None = None
    if dist.get_rank() == 0:
        try:
            step()
        except Exception as err:
            error = err
    raise_everywhere(error, src=0)


def _claim_target(claim: contextlib.ExitStack, out: Path, overwrite: bool, kind, check_first: Callable[[], None] | None = None):
    """Rank 0 claims ``out`` for the command's length (``bridge.hf.output_folder``); every rank raises a refusal.

    Returns the claimed ``OutputTarget`` on rank 0, None elsewhere. ``check_first`` runs before the claim.
    """
    from bridge.hf.output_folder import claimed_target

    target: list = [None]

    def step() -> None:
        if check_first is not None:
            check_first()
        target[0] = claim.enter_context(claimed_target(out, overwrite=overwrite, kind=kind))

    _agree(step)
    return target[0]


def _vocab_divisor(padded_vocab: int, tp: int) -> int:
    """``make_vocab_size_divisible_by`` that gives exactly ``padded_vocab`` rows at this TP size."""
    from bridge.megatron.checkpoint import MegatronCheckpointError

    if padded_vocab % tp:
        raise MegatronCheckpointError(f"the checkpoint's padded vocabulary ({padded_vocab} rows) cannot be split over tp={tp}")
    return padded_vocab // tp


# ---------------------------------------------------------------- plan


def cmd_plan(args: argparse.Namespace) -> int:
    import torch
    import torch.distributed as dist

    from bridge import AutoBridge

    from bridge.runtime import cpu_mode
    from bridge.hf.reader import non_float_weights
    from bridge.engine.transfer import NOT_FLOAT, count_nonfinite_weights
    from bridge.mappings import MappingError

    bridge = AutoBridge.from_hf_pretrained(args.hf)
    # Shapes only: on CPU the model is built on the meta device (nothing allocated or initialised).
    # On GPUs Megatron-Core allocates on the device itself, so the plan builds the real (empty) shards.
    with contextlib.nullcontext() if cpu_mode.cuda_available() else torch.device("meta"):
        model = bridge.to_megatron_model(**_sizes(args), load_weights=False)
    _out(_describe_model(bridge, model, args))
    try:
        plan = bridge.plan(model)
    except MappingError as err:
        _out(f"\nPLAN FAILED: {err}")
        return CHECK_FAILED
    held: list = [None] * dist.get_world_size()  # rank → the global names of the parameters it holds
    dist.all_gather_object(held, set(plan.local))
    expected = plan.expected_hf_shapes()
    nonfinite = count_nonfinite_weights(plan, bridge.reader)
    if dist.get_rank() != 0:
        return OK
    on_disk = bridge.reader.shapes()
    ignore = [re.compile(pattern) for pattern in bridge.model_bridge.hf_ignore]
    problems = []
    rows = []
    for entry in plan.entries:
        mapping = plan.mapping(entry)
        ranks = [rank for rank, names in enumerate(held) if entry.name in names]
        stage = f"pp{entry.pp_rank}" + (f".vp{entry.vp_stage}" if args.vpp else "")
        split = "" if args.tp == 1 else ("(tp-split)" if mapping.tp_sharded else "(replicated)")
        kind = entry.kind + (" (load only)" if mapping.load_only else "")
        for hf_name in mapping.hf_names:
            shape = on_disk.get(hf_name)
            mark = ""
            if shape is None:
                mark = "MISSING"
            elif hf_name in expected and shape != expected[hf_name]:
                mark = f"SHAPE (needs {list(expected[hf_name])})"
            rows.append((hf_name, _shape(shape), entry.name, kind, f"{_shape(entry.local_shape)} {split}".rstrip(), f"{stage} ranks {_ranges(ranks)}", mark))
    missing = sorted(name for name in expected if name not in on_disk)
    unused = sorted(name for name in on_disk if name not in expected and not any(p.fullmatch(name) for p in ignore))
    wrong = sorted(name for name in expected if name in on_disk and on_disk[name] != expected[name])
    ignored = sorted(name for name in on_disk if name not in expected and any(p.fullmatch(name) for p in ignore))
    if missing:
        problems.append(f"missing HF tensors (the model needs them): {', '.join(missing)}")
    if unused:
        problems.append(f"unused HF tensors (no mapping reads them): {', '.join(unused)}")
    if wrong:
        problems.append("wrongly shaped HF tensors: " + "; ".join(f"{n} is {list(on_disk[n])}, needs {list(expected[n])}" for n in wrong))
    if not_float := non_float_weights(bridge.reader, expected):
        problems.append(f"{NOT_FLOAT}: " + "; ".join(not_float))
    _out("")
    _out(_table(("HF tensor", "HF shape", "Megatron parameter", "kind", "shape per rank", "held by", ""), rows))
    if ignored:
        _out(f"\nignored (not weights): {', '.join(ignored)}")
    _out_nonfinite(nonfinite)
    if problems:
        _out("\nPLAN FAILED:\n  " + "\n  ".join(problems))
        return CHECK_FAILED
    _out(f"\nplan OK: {len(on_disk) - len(ignored)} HF tensors → {len(plan.entries)} Megatron parameters on {len(held)} rank(s)")
    return OK


def _out_nonfinite(counts: dict) -> None:
    """A warning line per HF tensor holding NaN/Inf (``NonFinite`` counts): not a failure, but the forward check
    may never touch them (an embedding row no verify prompt uses)."""
    for name, count in sorted(counts.items()):
        _out(f"WARNING: {name} holds {count.nan:,} NaN and {count.inf:,} Inf of {count.total:,} values")


def _describe_model(bridge, model, args: argparse.Namespace) -> str:
    import torch.distributed as dist

    config = model[0].config
    kwargs = bridge.model_bridge.transformer_config_kwargs()
    lines = [
        f"architecture: {bridge.model_bridge.architecture} ({type(bridge.model_bridge).__name__}), model_type {bridge.hf_config.model_type}",
        f"source: {bridge.hf_folder}",
        f"parallel: {_layout(vars(args))} on {dist.get_world_size()} rank(s) (dp={dist.get_world_size() // (args.tp * args.pp)})",
        f"vocabulary: {bridge.model_bridge.vocab_size} (HF) → {model[0].vocab_size} (padded for Megatron), tied embeddings: {bridge.model_bridge.tie_word_embeddings}",
        f"params dtype: {config.params_dtype}",
        "Megatron TransformerConfig:",
    ]
    for key in kwargs:
        value = getattr(config, key, kwargs[key])
        lines.append(f"  {key} = {getattr(value, '__name__', value)}")
    for key, value in bridge.model_bridge.gpt_model_kwargs().items():
        lines.append(f"  GPTModel.{key} = {value}")
    return "\n".join(lines)


def _shape(shape) -> str:
    return "-" if shape is None else "[" + ", ".join(str(d) for d in shape) + "]"


def _ranges(ranks: list[int]) -> str:
    """``[0, 1, 2, 5]`` → ``"0-2,5"``."""
    runs: list[list[int]] = []
    for rank in ranks:
        if runs and rank == runs[-1][-1] + 1:
            runs[-1].append(rank)
        else:
            runs.append([rank])
    return ",".join(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}" for run in runs) or "-"


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(header, widths)).rstrip()]
    lines.append("  ".join("-" * width for width in widths).rstrip())
    lines += ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------- import


def cmd_import(args: argparse.Namespace) -> int:
    with contextlib.ExitStack() as claim:
        return _import(args, claim)


def _import(args: argparse.Namespace, claim: contextlib.ExitStack) -> int:
    import torch.distributed as dist

    from bridge import AutoBridge

    from bridge.hf import metadata as export_metadata

    from bridge.megatron import checkpoint as mc
    from bridge.hf.output_folder import MEGATRON_CHECKPOINT
    from bridge.engine.transfer import count_nonfinite_weights

    target = _claim_target(claim, args.out, args.overwrite, MEGATRON_CHECKPOINT)
    out = args.out.absolute()
    start = time.time()
    bridge = AutoBridge.from_hf_pretrained(args.hf, dtype=_dtype(args.dtype))
    streams = _streams(args)
    model = None if streams else bridge.to_megatron_model(**_sizes(args))
    tmp: list[Any] = [target.temp_path() if target is not None else None]
    if not streams:
        dist.broadcast_object_list(tmp, src=0)
    root = Path(tmp[0])
    padded_vocab = [None if model is None else model[0].vocab_size]
    nonfinite: dict = {}  # HF tensor → its NaN/Inf counts, for the report

    def finish() -> None:
        info = {
            "architecture": bridge.model_bridge.architecture,
            "source": str(args.hf),
            "source_folder": str(Path(bridge.hf_folder).absolute()),
            "saved_with": {**_sizes(args), "world_size": dist.get_world_size()},
            "params_dtype": export_metadata.dtype_name(bridge.dtype),
            "vocab_size": bridge.model_bridge.vocab_size,
            "padded_vocab_size": padded_vocab[0],
            "tie_word_embeddings": bridge.model_bridge.tie_word_embeddings,
            "hf_dtypes": {name: export_metadata.dtype_name(d) for name, d in sorted(bridge.reader.dtypes().items())},
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        mc.write_source_info(root, bridge.hf_folder, export_metadata.side_files(bridge.hf_folder, bridge.hf_config), info)
        target.publish(root)

    try:
        if streams:
            from bridge.megatron.streaming_checkpoint import DEFAULT_MAX_MEMORY, import_checkpoint

            budget = args.max_memory or DEFAULT_MAX_MEMORY
            padded_vocab[0] = import_checkpoint(bridge, root, max_memory=budget, vocab_divisible_by=128 * args.tp, nonfinite=nonfinite)
            how = f"streamed in one process within --max-memory {budget}, loads at any layout (vocabulary padded for tp={args.tp})"
        else:
            state = mc.model_state_dict(model)
            state.update(checkpoint_version=3.0, iteration=0)  # as Megatron-LM's save_checkpoint stores them
            with _ticker("saving Megatron checkpoint"):
                mc.save_checkpoint(root, state)
            nonfinite = count_nonfinite_weights(bridge.plan(model), bridge.reader)
            how = f"at {_layout(vars(args))} on {dist.get_world_size()} rank(s)"
        _agree(finish)
    except BaseException:
        if _rank() == 0:
            shutil.rmtree(root, ignore_errors=True)
        raise
    params = sum(math.prod(shape) for shape in bridge.reader.shapes().values())
    _out(
        f"imported {bridge.model_bridge.architecture} from {args.hf} → {out}\n"
        f"  {params:,} parameters {how}, "
        f"dtype {bridge.dtype}, {time.time() - start:.1f}s\n"
        f"  Megatron-LM resumes from it with --load {out} (iteration 'release'); `hfmb export {out} OUT` turns it back into HF"
    )
    _out_nonfinite(nonfinite)
    return OK


# ---------------------------------------------------------------- export


def cmd_export(args: argparse.Namespace) -> int:
    with contextlib.ExitStack() as claim:
        return _export(args, claim)


def _export(args: argparse.Namespace, claim: contextlib.ExitStack) -> int:
    from bridge import AutoBridge
    from bridge.hf import metadata as export_metadata
    from bridge.megatron import checkpoint as mc
    from bridge.hf.writer import parse_size
    from bridge.hf.output_folder import HF_MODEL_FOLDER, OutputFolderError, real_target
    from bridge.checks.verify import check_loads_in_transformers

    ckpt, out = args.ckpt.absolute(), args.out.absolute()
    parse_size(args.max_shard_size)  # a typo fails before anything runs

    def check_sources() -> None:
        mc.read_source_info(ckpt)
        real_ckpt, real_out = ckpt.resolve(), real_target(out)  # through symbolic links too
        if real_out == real_ckpt or real_out in real_ckpt.parents or real_ckpt in real_out.parents:
            raise OutputFolderError(f"the output {out} overlaps the checkpoint {ckpt}")

    _claim_target(claim, out, args.overwrite, HF_MODEL_FOLDER, check_sources)
    start = time.time()
    info = mc.read_source_info(ckpt)
    model_dtype = _dtype(info["params_dtype"])
    bridge = AutoBridge.from_hf_pretrained(mc.hf_config_folder(ckpt), dtype=model_dtype)
    out_dtype = _dtype(args.dtype)
    source_dtypes = {name: _dtype(d) for name, d in info.get("hf_dtypes", {}).items()}
    hf_folder = mc.hf_config_folder(ckpt)
    config = export_metadata.export_config(hf_folder, bridge.hf_config, out_dtype)
    side = export_metadata.side_files(hf_folder, bridge.hf_config)
    check = None if args.skip_load_check else check_loads_in_transformers
    target_dtype = lambda name, dtype: out_dtype or source_dtypes.get(name, dtype)  # noqa: E731
    if _streams(args):
        checked = _stream_hf_folder(bridge, ckpt, info, target_dtype, config, side, check, args)
        how = f"streamed within --max-memory {args.max_memory or 'the default 4GB'}"
    else:
        model = _load_checkpoint_model(bridge, ckpt, info, args)
        _write_hf_folder(bridge, model, out, target_dtype, config, side, check, args)
        checked, how = check is not None, f"read at {_layout(vars(args))}"
    if _rank() == 0:
        index = export_metadata.read_json(out / "model.safetensors.index.json")
        shards = sorted(set(index["weight_map"].values()))
        saved = info.get("saved_with", {})
        _out(
            f"exported {ckpt} (saved at {_layout(saved)}) → {out}\n"
            f"  {how}; {len(index['weight_map'])} tensors in {len(shards)} shard(s), "
            f"dtype {config.get('dtype')}, {time.time() - start:.1f}s\n"
            + ("  transformers load report: empty (no missing, unexpected or mismatched keys)" if checked else "  transformers load check skipped")
        )
    return OK


def _stream_hf_folder(bridge, ckpt: Path, info: dict, target_dtype, config: dict, side: dict, check, args: argparse.Namespace) -> bool:
    """The bounded-memory export (one process); returns whether transformers' load check ran."""
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

    from bridge.megatron import checkpoint as mc
    from bridge.megatron.streaming_checkpoint import DEFAULT_MAX_MEMORY, export_hf_folder

    try:
        return export_hf_folder(
            bridge,
            ckpt,
            args.out.absolute(),
            padded_vocab_size=int(info["padded_vocab_size"]),
            iteration=args.iteration,
            max_memory=args.max_memory or DEFAULT_MAX_MEMORY,
            max_shard_size=args.max_shard_size,
            overwrite=args.overwrite,
            target_dtype=target_dtype,
            config=config,
            side_files=side,
            check=check,
        )
    except CheckpointException as err:  # dist_checkpointing's read errors: say what did not fit
        lines = str(err).strip().splitlines() or [type(err).__name__]
        raise mc.MegatronCheckpointError(f"cannot read {ckpt} as the {bridge.model_bridge.architecture} model its hf_config/config.json describes: {lines[-1]}") from err


def _load_checkpoint_model(bridge, ckpt: Path, info: dict, args: argparse.Namespace) -> list:
    """Build the model at ``args``' parallel sizes (same padded vocabulary as the checkpoint) and load ``ckpt`` into it."""
    from bridge.megatron import checkpoint as mc

    divisor = _vocab_divisor(int(info["padded_vocab_size"]), args.tp)
    model = bridge.to_megatron_model(**_sizes(args), load_weights=False, make_vocab_size_divisible_by=divisor)
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

    try:
        with _ticker("loading Megatron checkpoint"):
            mc.load_model(ckpt, model, getattr(args, "iteration", "latest"))
    except mc.MegatronCheckpointError:
        raise
    except (Exception, CheckpointException) as err:  # dist_checkpointing's errors: say what did not fit
        lines = str(err).strip().splitlines() or [type(err).__name__]
        raise mc.MegatronCheckpointError(
            f"cannot load {ckpt} into the {bridge.model_bridge.architecture} model its hf_config/config.json describes "
            f"(at {_layout(vars(args))}): {lines[-1]}"
        ) from err
    return model


def _write_hf_folder(bridge, model, out: Path, target_dtype, config: dict, side: dict, check, args) -> None:
    """Stream the model into an HF folder, written by the ranks that hold it; all ranks call, and all raise any rank's error."""
    from bridge.engine.folder_export import write_hf_folder

    def ticking_check(folder: Path) -> None:
        with _ticker("checking the folder (loading it in transformers)"):
            check(folder)

    write_hf_folder(
        bridge.plan(model),
        out,
        config=config,
        side_files=side,
        target_dtype=target_dtype,
        check=ticking_check if check else None,
        max_shard_size=args.max_shard_size,
        overwrite=args.overwrite,
    )


# ---------------------------------------------------------------- verify


def cmd_verify(args: argparse.Namespace) -> int:
    from bridge.megatron import checkpoint as mc

    if args.other is not None and not mc.is_checkpoint(args.other):
        return _on_rank0(lambda: _verify_folders(args))
    return _verify_forward(args)


def _on_rank0(fn: Callable[[], int]) -> int:
    """``fn()`` on rank 0 only (the other ranks of a torchrun world wait for its exit status)."""
    import torch.distributed as dist

    from bridge.runtime.rank_errors import raise_everywhere

    if not dist.is_initialized():
        return fn()
    code: list[Any] = [None]
    error: Exception | None = None
    if dist.get_rank() == 0:
        try:
            code = [fn()]
        except Exception as err:
            error = err
    raise_everywhere(error, src=0)
    dist.broadcast_object_list(code, src=0)
    return code[0]


def _verify_folders(args: argparse.Namespace) -> int:
    from bridge.hf.metadata import config_differences, read_json
    from bridge.hf.reader import CheckpointError, resolve_hf_folder
    from bridge.checks.verify import compare_hf_folders, load_hf_tensors, transformers_load_report

    expected, actual = resolve_hf_folder(args.hf), args.other
    if not (actual / "config.json").is_file():
        raise CheckpointError(f"{actual} is neither a Megatron checkpoint (no latest_checkpointed_iteration.txt) nor an HF folder (no config.json)")
    _out(f"hfmb verify: {expected}  vs  {actual} (tensor by tensor, bit for bit)")
    with _ticker("comparing tensors"):
        differences = compare_hf_folders(expected, actual)
    count = len(load_hf_tensors(expected))
    config_diffs = _semantic_config_differences(expected, actual) + config_differences(
        {k: v for k, v in read_json(expected / "config.json").items() if k == "architectures"},
        {k: v for k, v in read_json(actual / "config.json").items() if k == "architectures"},
    )
    with _ticker("loading the second folder in transformers"):
        load_report = {k: v for k, v in transformers_load_report(actual).items() if v}
    _out(f"tensors: {count} in the first folder, {count - len([d for d in differences if not d.startswith('extra')])} identical in the second")
    for line in differences[:50]:
        _out(f"  DIFFERENT {line}")
    if len(differences) > 50:
        _out(f"  … and {len(differences) - 50} more")
    _out("config: " + ("same model config" if not config_diffs else f"{len(config_diffs)} differences"))
    for line in config_diffs:
        _out(f"  DIFFERENT {line}")
    _out("transformers load report of the second folder: " + ("empty" if not load_report else str(load_report)))
    failed = bool(differences or config_diffs or load_report)
    _out("VERIFY FAILED" if failed else "VERIFY PASSED")
    return CHECK_FAILED if failed else OK


def _semantic_config_differences(a: Path, b: Path) -> list[str]:
    """Differences between two configs as transformers reads them (old and new key spellings are the same setting)."""
    from transformers import AutoConfig

    from bridge.hf.metadata import config_differences

    return config_differences(AutoConfig.from_pretrained(a).to_dict(), AutoConfig.from_pretrained(b).to_dict())


def _tokens(args: argparse.Namespace, bridge):
    import torch

    if args.prompt:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(bridge.hf_folder)
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


def _verify_forward(args: argparse.Namespace) -> int:
    import torch
    import torch.distributed as dist

    from bridge import AutoBridge

    from bridge.megatron import checkpoint as mc
    from bridge.hf.metadata import ConfigMismatchError
    from bridge.checks.verify import Thresholds, compare_outputs, hf_reference, megatron_outputs

    bridge = AutoBridge.from_hf_pretrained(args.hf, dtype=torch.float32)
    tokens, token_text = _tokens(args, bridge)
    if args.other is not None:
        ckpt = args.other.absolute()
        info = mc.read_source_info(ckpt)
        diffs = _semantic_config_differences(Path(bridge.hf_folder), mc.hf_config_folder(ckpt))
        if diffs:
            raise ConfigMismatchError(f"the checkpoint {ckpt} was made from a different config than {args.hf}: " + "; ".join(diffs))
        model = _load_checkpoint_model(bridge, ckpt, info, args)
        saved = info.get("saved_with", {})
        what = f"Megatron checkpoint {ckpt} (saved at {_layout(saved)}, {info.get('params_dtype')})"
    else:
        model = bridge.to_megatron_model(**_sizes(args))
        what = "the checkpoint converted to Megatron-Core in memory"
    reference: list = []

    def run_reference() -> None:
        with _ticker("transformers forward"):
            reference.extend(hf_reference(bridge.hf_folder, tokens))

    _agree(run_reference)
    with _ticker("Megatron-Core forward"):
        logits, hidden = megatron_outputs(model, tokens, bridge.model_bridge.vocab_size)

    def report() -> int:
        hf_logits, hf_hidden, load_info = reference
        thresholds = Thresholds(
            max_logits_diff=args.max_logits_diff,
            min_top1=args.min_top1 / 100,
            max_kl=args.max_kl,
            min_top5=None if args.min_top5 is None else args.min_top5 / 100,
            max_hidden_diff=args.max_hidden_diff,
        )
        report = compare_outputs(hf_logits, logits, hf_hidden, hidden)
        failures = report.failures(thresholds)
        load_problems = {k: v for k, v in load_info.items() if v}
        if load_problems:
            failures.append(f"transformers does not load {args.hf} cleanly: {load_problems}")
        _out(f"hfmb verify: transformers ({bridge.hf_folder}) vs {what}")
        _out(f"Megatron-Core at {_layout(vars(args))} on {dist.get_world_size()} rank(s); both in float32")
        _out(f"tokens: {token_text}\n")
        _out(report.format(thresholds))
        _out("\ntransformers load report of the reference: " + ("empty" if not load_problems else str(load_problems)))
        if failures:
            _out("VERIFY FAILED: " + "; ".join(failures))
            return CHECK_FAILED
        _out("VERIFY PASSED")
        return OK

    return _on_rank0(report)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "plan": cmd_plan,
    "import": cmd_import,
    "export": cmd_export,
    "verify": cmd_verify,
}


if __name__ == "__main__":
    sys.exit(main())
