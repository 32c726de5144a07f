"""``hfmb export``: a Megatron checkpoint → a complete HF folder (``bridge.conversions.export_megatron_checkpoint``)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from bridge.cli.common import DTYPES, OK, add_memory_args, add_parallel_args, iteration, parallel_sizes, report, streams, torch_dtype
from bridge.hf.export_encodings import QUANTIZATIONS

SUMMARY = "Megatron-Core checkpoint (from `hfmb import`) → HF folder"
EXAMPLES = """examples:
  hfmb export ./ckpt ./hf-out --dtype bfloat16 --max-shard-size 2GB
  hfmb export ./ckpt ./hf-out --max-memory 8GB          # stream within 8GB, whatever the model size
  torchrun --nproc-per-node=4 -m bridge export ./ckpt ./hf-out --tp 2 --pp 2 --overwrite
  hfmb export ./lora-ckpt ./adapter --adapter          # a LoRA training checkpoint → a PEFT adapter folder
  hfmb export ./lora-ckpt ./hf-out --merge             # ... → the base with the adapters merged in
As one process (no torchrun) it streams a few tensors at a time within --max-memory (default: 60% of
the available memory; the report gives the peak measured) from a checkpoint saved at any layout; under
torchrun with several ranks, or with --in-memory, the model is loaded at --tp/--pp (which may differ
from the saved ones).
The folder is written beside the target and renamed into place only after transformers loaded it
with an empty load report (when streaming, if the weights fit half of --max-memory); an existing
non-empty target is refused unless --overwrite.
A LoRA training checkpoint holds the adapters only: --adapter or --merge rebuilds its base from the HF
folder it records (or --hf-config) in this process, loads the adapters onto it and writes them."""


def add_parser(commands, command) -> None:
    exp = command("export", SUMMARY, EXAMPLES)
    exp.add_argument("ckpt", type=Path, help="checkpoint root written by `hfmb import` (or a training run resumed from one)")
    exp.add_argument("out", type=Path, help="HF folder to write")
    add_parallel_args(exp)
    exp.add_argument(
        "--iteration", type=iteration, default="latest", help="which saved iteration: a number, 'release' or 'latest' (default)"
    )
    exp.add_argument(
        "--dtype", choices=DTYPES, help="dtype of the written tensors (default: each tensor's dtype in the original HF checkpoint)"
    )
    exp.add_argument(
        "--hf-config",
        type=Path,
        help="for a checkpoint not written by this tool (Megatron-LM's training, another converter): the HF folder "
        "(or a folder with its config.json and tokenizer) it belongs to; the original HF folder also gives the dtypes",
    )
    exp.add_argument(
        "--quantize",
        choices=QUANTIZATIONS,
        help="store the weights the family's released checkpoints quantize that way (mxfp4: gpt-oss's experts; "
        "fp8: the weights a block-scaled FP8 checkpoint such as DeepSeek-V3 held in FP8, which needs that folder; "
        "an unmodified import/export gives back the original blocks and scales); default: unquantized",
    )
    exp.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB, 500MB (default 5GB)")
    exp.add_argument("--overwrite", action="store_true", help="replace an existing HF folder at OUT (only one this tool wrote)")
    exp.add_argument("--skip-load-check", action="store_true", help="do not load the result in transformers before publishing it")
    lora = exp.add_mutually_exclusive_group()
    lora.add_argument("--adapter", action="store_true", help="a LoRA training checkpoint: write its adapters as a PEFT adapter folder")
    lora.add_argument("--merge", action="store_true", help="a LoRA training checkpoint: write the base with its adapters merged in")
    add_memory_args(exp)


def run(args: argparse.Namespace) -> int:
    if args.adapter or args.merge:
        return _export_lora(args)
    from bridge.conversions import export_megatron_checkpoint, sizes_text

    start = time.time()
    result = export_megatron_checkpoint(
        args.ckpt,
        args.out,
        sizes=parallel_sizes(args),
        iteration=args.iteration,
        dtype=torch_dtype(args.dtype),
        max_shard_size=args.max_shard_size,
        overwrite=args.overwrite,
        load_check=not args.skip_load_check,
        stream=streams(args),
        max_memory=args.max_memory,
        hf_config=args.hf_config,
        quantization=args.quantize,
    )
    report(
        f"exported {args.ckpt.absolute()} (saved at {sizes_text(result.saved_with)}) → {result.out}\n"
        f"  {result.how}; {result.tensors} tensors in {result.shards} shard(s), dtype {result.dtype}, {time.time() - start:.1f}s\n"
        + (
            "  transformers load report: empty (no missing, unexpected or mismatched keys)"
            if result.load_checked
            else "  transformers load check skipped"
        )
    )
    for reason in result.rounded:
        report(f"NOTE: no longer a guaranteed bit-exact roundtrip of the original checkpoint: {reason}")
    return OK


def _export_lora(args: argparse.Namespace) -> int:
    """A LoRA training checkpoint's adapters, on their base rebuilt in this process, as a PEFT folder or merged."""
    from bridge.lora import save_merged_hf_pretrained, save_peft_adapter
    from bridge.training.lora_checkpoint import load_lora_checkpoint

    start = time.time()
    bridge, model = load_lora_checkpoint(args.ckpt, args.iteration, base=args.hf_config)
    dtype = torch_dtype(args.dtype)
    if args.adapter:
        save_peft_adapter(model, bridge, args.out, overwrite=args.overwrite, dtype=dtype)
        what = "PEFT adapter"
    else:
        save_merged_hf_pretrained(model, bridge, args.out, overwrite=args.overwrite, dtype=dtype, max_shard_size=args.max_shard_size)
        what = "merged model"
    seconds = time.time() - start
    report(f"exported the LoRA adapters of {args.ckpt.absolute()} (base {bridge.hf_folder}) as a {what} → {args.out} ({seconds:.1f}s)")
    return OK
