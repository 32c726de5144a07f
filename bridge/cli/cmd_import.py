"""``hfmb import``: an HF checkpoint → a Megatron-Core distributed checkpoint (``bridge.conversions.import_hf_checkpoint``)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from bridge.cli.common import DTYPES, OK, add_memory_args, add_parallel_args, parallel_sizes, report, report_nonfinite, streams, torch_dtype

SUMMARY = "HF checkpoint → Megatron-Core distributed checkpoint"
EXAMPLES = """examples:
  hfmb import ./my-hf-model ./ckpt --tp 2 --pp 2 --dtype bfloat16
  hfmb import ./my-hf-model ./ckpt --max-memory 8GB     # a checkpoint larger than this machine's RAM
  torchrun --nproc-per-node=8 -m bridge import ./my-hf-model ./ckpt --tp 4 --pp 2
Writes a Megatron-Core distributed checkpoint in Megatron-LM's layout (iteration "release"), plus
hf_config/ and bridge.json so that `hfmb export` needs no HF folder. Written atomically.
As one process (no torchrun) it streams tensor by tensor within --max-memory (default: 60% of the
available memory; the report gives the peak measured): the checkpoint does not depend on the layout,
so it loads at any TP/PP (--tp only sets the vocabulary padding that layout needs). Under torchrun
with several ranks, or with --in-memory, each rank builds its shards of the model and they save together."""


def add_parser(commands, command) -> None:
    imp = command("import", SUMMARY, EXAMPLES)
    imp.add_argument("hf", help="HF checkpoint folder or Hub repo id")
    imp.add_argument("out", type=Path, help="checkpoint root to write")
    add_parallel_args(imp)
    imp.add_argument(
        "--dtype",
        choices=DTYPES,
        help="cast the parameters to this dtype, rounding what it cannot hold (default: the stored dtypes, "
        "or float32 where they are mixed, so that nothing is rounded; the config's dtype where it holds them exactly)",
    )
    imp.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint at OUT (only one this tool wrote)")
    imp.add_argument(
        "--mtp",
        action="store_true",
        help="write the multi-token-prediction layers (DeepSeek-V3, GLM-4.5) as Megatron-Core's MTP block (mtp.layers.*), "
        "for training with them; without it they are carried into exports unchanged",
    )
    add_memory_args(imp)


def run(args: argparse.Namespace) -> int:
    from bridge.conversions import import_hf_checkpoint

    start = time.time()
    result = import_hf_checkpoint(
        args.hf,
        args.out,
        sizes=parallel_sizes(args),
        dtype=torch_dtype(args.dtype),
        overwrite=args.overwrite,
        stream=streams(args),
        max_memory=args.max_memory,
        mtp=args.mtp,
    )
    out = result.out
    report(
        f"imported {result.architecture} from {args.hf} → {out}\n"
        f"  {result.parameters:,} parameters {result.how}, dtype {result.dtype}, {time.time() - start:.1f}s\n"
        f"  Megatron-LM resumes from it with --load {out} (iteration 'release'); `hfmb export {out} OUT` turns it back into HF"
    )
    for note in result.dtype_notes:
        report(f"NOTE: {note}")
    report_nonfinite(result.nonfinite)
    return OK
