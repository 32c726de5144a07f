"""Convert an HF checkpoint to Megatron-Core, train it with Megatron-Core's engine, export it back to HF.

    torchrun --nproc-per-node=4 examples/convert_and_train.py --tp 2 --pp 2 --train-iters 40

Without ``--hf-model`` it builds a tiny Llama checkpoint and a small two-corpus blend in
``--workdir`` (no network). DP = world size / (tp × pp); bf16 on a GPU, fp32 on CPU.
``--save DIR --load DIR`` makes a run resumable (also at another TP/PP; a rerun resumes, and a
``--save`` holding an earlier run's checkpoint is refused without ``--load``). Its checkpoints carry
the provenance ``hfmb export`` needs (``bridge.json``, ``hf_config/``). At the end the model is
exported with ``save_hf_pretrained``, reloaded with transformers and asked to continue a prompt.

LoRA: ``--lora-rank 8 [--lora-alpha 16] [--lora-targets q_proj,v_proj]`` (MoE experts: ``--lora-target-parameters
experts.gate_up_proj,experts.down_proj``) freezes the converted base and trains adapters on it (only they
reach DDP and the optimizer). Checkpoints then hold the adapters and
their optimizer state, not the base (a resume rebuilds it from ``--hf-model``; the same ``--lora-*``
options are needed). At the end the adapter is written as a PEFT folder (``--export-adapter``, default
``<workdir>/lora_adapter``) and the merged model (``W + (alpha/r)·B·A``) to ``--export``; both are
reloaded (peft on the base model, transformers) and continue the same prompt.
Your own corpus: ``python -m bridge.training.data --input corpus.jsonl --tokenizer MODEL
--output-prefix data/corpus``, then ``--data-path data/corpus``.
"""

from __future__ import annotations

import argparse
import logging
import math
import re
import sys
import warnings

# Megatron-Core's notices about optional packages (Apex, Transformer Engine) and deprecated
# collectives it calls say nothing about this run; keep them out of its output.
warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine|TransformerEngine).*")
warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
from pathlib import Path

import torch
import torch.distributed as dist

from bridge import AutoBridge
from bridge.lora import LoraConfig, LoraError, adapter_plan, save_merged_hf_pretrained, save_peft_adapter
from bridge.megatron import checkpoint as megatron_checkpoint
from bridge.megatron.parallel import init_distributed
from bridge.model_bridge import UnsupportedArchitectureError
from bridge.runtime import cpu_mode
from bridge.training import (
    TrainingConfig,
    add_lora_arguments,
    build_gpt_dataset,
    build_train_iterators,
    load_tokenizer,
    load_train_state,
    lora_config_from_args,
    make_forward_step,
    prepare_demo,
    save_train_state,
    setup_model_and_optimizer,
    train,
)
from bridge.training.setup import LR_DECAY_STYLES


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-model", help="HF folder or Hub id (default: a tiny demo Llama built in --workdir)")
    p.add_argument("--workdir", type=Path, default=Path("convert_and_train_out"), help="demo model, corpus and default outputs")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--vpp", type=int, default=None, help="virtual pipeline stages per rank (interleaved 1F1B)")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel size (MoE models)")
    p.add_argument(
        "--mtp",
        action="store_true",
        help="train the checkpoint's multi-token-prediction layers too (Megatron-Core's MTP block; DeepSeek-V3, GLM-4.5)",
    )
    p.add_argument("--etp", type=int, default=None, help="expert tensor-parallel size (default: --tp)")
    p.add_argument(
        "--sequence-parallel",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="split activations along the sequence over TP (default: on for MoE models at TP > 1, as Megatron-Core needs)",
    )
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--global-batch-size", type=int, default=8)
    p.add_argument("--seq-length", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--min-lr", type=float, default=3e-4)
    p.add_argument("--lr-warmup-iters", type=int, default=2)
    p.add_argument(
        "--lr-decay-iters",
        type=int,
        default=None,
        help="default: --train-iters (set it to extend a run later: a resume must keep the schedule)",
    )
    p.add_argument("--lr-decay-style", choices=LR_DECAY_STYLES, default="cosine")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--clip-grad", type=float, default=1.0)
    p.add_argument("--no-distributed-optimizer", action="store_true")
    p.add_argument("--train-iters", type=int, default=40)
    p.add_argument("--log-interval", type=int, default=5)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument(
        "--data-path", nargs="+", help="Megatron-LM blend: 'prefix' or 'weight prefix weight prefix ...' (default: the demo corpus)"
    )
    p.add_argument("--save", type=Path, help="checkpoint folder (Megatron-LM layout)")
    p.add_argument("--save-interval", type=int, default=0, help="also save every N iterations (0: only at the end)")
    p.add_argument("--load", type=Path, help="resume from this checkpoint folder when it holds one")
    p.add_argument(
        "--export", type=Path, help="HF output folder; with LoRA the merged model (default: <workdir>/hf_export, replaced in demo runs)"
    )
    p.add_argument("--export-adapter", type=Path, help="with LoRA: the PEFT adapter folder (default: <workdir>/lora_adapter)")
    p.add_argument("--overwrite-export", action="store_true", help="replace an existing export (and adapter) folder")
    p.add_argument("--generate-tokens", type=int, default=8)
    add_lora_arguments(p)
    args = p.parse_args()
    try:
        args.lora = lora_config_from_args(args)
    except LoraError as err:
        p.error(str(err))
    if args.export_adapter and args.lora is None:
        p.error("--export-adapter needs --lora-rank")
    if args.hf_model and not args.data_path:
        p.error("--hf-model needs --data-path (a corpus tokenized with its tokenizer: python -m bridge.training.data ...)")
    if args.save and megatron_checkpoint.is_checkpoint(args.save) and (args.load is None or args.load.resolve() != args.save.resolve()):
        p.error(
            f"--save {args.save} holds the checkpoint of an earlier run (iteration {megatron_checkpoint.latest_iteration(args.save)}): "
            f"add --load {args.save} to resume it (with a larger --train-iters to train on), or --save another folder"
        )
    return args


def load_hf(folder: Path | str, not_in_transformers: tuple[str, ...] = ()):
    """The export (or the base) with plain transformers; every key must load but those ``not_in_transformers``
    names (the model bridge's ``hf_not_in_transformers``: multi-token-prediction layers, which transformers drops)."""
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    unexpected = [key for key in info["unexpected_keys"] if not any(re.fullmatch(pattern, key) for pattern in not_in_transformers)]
    if info["missing_keys"] or unexpected:
        raise RuntimeError(f"{folder} does not load cleanly: {info}")
    return model


def generate(model, tokenizer_folder: Path | str, prompt: str, max_new_tokens: int) -> str:
    """Continue ``prompt`` greedily with ``model`` (transformers or peft)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    out = model.generate(input_ids=ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1] :])


def lora_summary(model, bridge, lora: LoraConfig) -> str:
    """``LoRA r=8 alpha=16 on q_proj, v_proj: trainable N of M parameters (x%)``: the adapters' and the base's HF sizes."""
    trainable = sum(math.prod(shape) for shape in adapter_plan(model, bridge).expected_hf_shapes().values())
    base = sum(math.prod(shape) for shape in bridge.reader.shapes().values())
    adapted = ", ".join((*lora.targets, *lora.target_parameters))
    return (
        f"LoRA r={lora.r} alpha={lora.alpha:g} on {adapted}: trainable {trainable} of {trainable + base} "
        f"parameters ({100 * trainable / (trainable + base):.2f}%); the base is frozen"
    )


def report_lora_generation(
    hf_model: str, adapter: Path, export: Path, prompt: str, max_new_tokens: int, not_in_transformers: tuple[str, ...]
) -> None:
    """Rank 0: the adapter on its base in peft, and the merged export in transformers, each continue ``prompt``."""
    try:
        from peft import PeftModel
    except ImportError:
        print(f"peft is not installed (pip install peft): {adapter} is not reloaded on its base")
    else:
        peft_model = PeftModel.from_pretrained(load_hf(hf_model, not_in_transformers), adapter).eval()
        print(f"peft (base + adapter) continues {prompt!r} with {generate(peft_model, hf_model, prompt, max_new_tokens)!r}")
    merged = load_hf(export, not_in_transformers)
    print(f"merged model (transformers) continues {prompt!r} with {generate(merged, export, prompt, max_new_tokens)!r}")


def main() -> None:
    args = parse_args()
    init_distributed()
    rank0 = dist.get_rank() == 0
    logging.basicConfig(level=logging.INFO if rank0 else logging.WARNING, format="%(message)s")
    logging.getLogger("megatron").setLevel(logging.WARNING)

    hf_model, data_paths = args.hf_model, args.data_path
    if hf_model is None:
        demo = list(prepare_demo(args.workdir)) if rank0 else [None, None]
        dist.broadcast_object_list(demo, src=0)
        hf_model, data_paths = str(demo[0]), data_paths or demo[1]
    export = args.export or args.workdir / "hf_export"

    cfg = TrainingConfig(
        train_iters=args.train_iters,
        micro_batch_size=args.micro_batch_size,
        global_batch_size=args.global_batch_size,
        seq_length=args.seq_length,
        lr=args.lr,
        min_lr=args.min_lr,
        lr_warmup_iters=args.lr_warmup_iters,
        lr_decay_iters=args.lr_decay_iters,
        lr_decay_style=args.lr_decay_style,
        weight_decay=args.weight_decay,
        clip_grad=args.clip_grad,
        use_distributed_optimizer=not args.no_distributed_optimizer,
        seed=args.seed,
        log_interval=args.log_interval,
    )
    dtype = torch.bfloat16 if cpu_mode.cuda_available() else torch.float32
    resume = args.load is not None and megatron_checkpoint.is_checkpoint(args.load)
    start, consumed = 0, 0
    try:
        bridge = AutoBridge.from_hf_pretrained(hf_model, dtype=dtype, mtp=args.mtp)
        # A LoRA checkpoint holds the adapters only: the frozen base always comes from the HF weights.
        model, optimizer, scheduler = setup_model_and_optimizer(
            bridge,
            args.tp,
            args.pp,
            args.vpp,
            cfg,
            load_weights=args.lora is not None or not resume,
            lora=args.lora,
            ep=args.ep,
            etp=args.etp,
            sequence_parallel=args.sequence_parallel,
        )
        if resume:
            info = load_train_state(args.load, model, optimizer, scheduler, cfg.use_distributed_optimizer, bridge=bridge)
            start, consumed = info.iteration, info.consumed_samples
    # the same on every rank: one line, exit 2
    except (LoraError, megatron_checkpoint.MegatronCheckpointError, UnsupportedArchitectureError) as err:
        if rank0:
            print(f"convert_and_train.py: error: {err}", file=sys.stderr)
        dist.destroy_process_group()
        sys.exit(2)
    if args.lora is not None:
        summary = lora_summary(model, bridge, args.lora)
        if rank0:
            logging.info(summary)
    if not resume and args.load is not None and rank0:
        logging.warning("no checkpoint in %s: starting from the HF weights", args.load)

    tokenizer = load_tokenizer(hf_model)
    dataset = build_gpt_dataset(data_paths, tokenizer, cfg.seq_length, cfg.train_iters * cfg.global_batch_size, seed=cfg.seed)
    # A resumed run that is already at --train-iters has no samples left to draw (and needs none).
    iterators = build_train_iterators(dataset, model, cfg.micro_batch_size, consumed) if start < cfg.train_iters else []

    def save(iteration: int) -> None:
        consumed = iteration * cfg.global_batch_size
        save_train_state(args.save, model, optimizer, scheduler, iteration, consumed, cfg.use_distributed_optimizer, bridge=bridge)

    def on_step_end(result) -> None:
        if args.save and args.save_interval and result.iteration % args.save_interval == 0:
            save(result.iteration)

    results = train(model, optimizer, scheduler, iterators, cfg, make_forward_step(), start, on_step_end)
    if args.save and results and not (args.save_interval and cfg.train_iters % args.save_interval == 0):
        save(cfg.train_iters)

    overwrite = args.overwrite_export or args.hf_model is None
    adapter = args.export_adapter or args.workdir / "lora_adapter"
    if args.lora is None:
        bridge.save_hf_pretrained(model, export, overwrite=overwrite)
    else:
        save_peft_adapter(model, bridge, adapter, overwrite=overwrite, base_model_name_or_path=hf_model)
        save_merged_hf_pretrained(model, bridge, export, overwrite=overwrite)
    if rank0:
        if not results:
            print(f"resumed at iteration {start}: nothing left to train (raise --train-iters to go on)")
        if results:
            print(
                f"loss {results[0].loss:.4f} at iteration {results[0].iteration} -> "
                f"{results[-1].loss:.4f} at iteration {results[-1].iteration}"
            )
        prompt = tokenizer.detokenize(dataset[0]["tokens"][:8].tolist())
        if args.lora is None:
            continued = generate(load_hf(export, bridge.model_bridge.hf_not_in_transformers), export, prompt, args.generate_tokens)
            print(f"exported to {export}; transformers continues {prompt!r} with {continued!r}")
        else:
            print(f"exported the adapter to {adapter} (PEFT) and the merged model to {export}")
            report_lora_generation(hf_model, adapter, export, prompt, args.generate_tokens, bridge.model_bridge.hf_not_in_transformers)
    dist.destroy_process_group()


if __name__ == "__main__":  # dist_checkpointing's writer uses spawned processes: the guard is required
    main()
