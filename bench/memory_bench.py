"""Streamed import and export of a Llama-3.1-8B-shaped checkpoint with the default --max-memory: peak against budget, and time.

    python bench/memory_bench.py                      # 32 layers: ~16 GB bf16, needs ~48 GB of disk under --work
    python bench/memory_bench.py --layers 8           # the same tensors, fewer layers (~5.5 GB)
    python bench/memory_bench.py --max-memory 4GB     # a given budget instead of the default
    python bench/memory_bench.py --model gemma-3-1b --compare   # another family at its real size (see MODELS)

Writes random bf16 weights under Llama-3.1-8B's names and shapes (hidden 4096, MLP 14336, 32 heads
over 8 KV heads, vocabulary 128256: its largest tensors are the two 1002 MiB embeddings) with
safetensors (``tests/synthetic_llama.py``), then runs ``hfmb import`` and ``hfmb export`` in fresh
processes, each after an ``os.sync()``. For each it prints the report's peak (the process's resident
memory beyond what it held when the conversion began, mapped file pages included: ``PeakMemory``)
against the budget, the process's whole peak RSS (``wait4``; the program itself included), and the
time. ``--compare`` also checks the export against the source, byte for byte. The parent imports
neither torch nor the bridge, so that it cannot inflate its children's peak.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GiB = 2**30
# Real configs' dimensions (their config.json), converted at full size with --model.
MODELS: dict[str, dict] = {
    "gemma-3-1b": {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "vocab_size": 262144,
        "hidden_size": 1152,
        "intermediate_size": 6912,
        "num_hidden_layers": 26,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 256,
        "query_pre_attn_scalar": 256,
        "sliding_window": 512,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {
            "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        },
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
    },
    # The image-text Gemma 3: its text model converts, the SigLIP vision tower (0.4B) is carried into the export.
    "gemma-3-4b": {
        "architectures": ["Gemma3ForConditionalGeneration"],
        "model_type": "gemma3",
        "boi_token_index": 255999,
        "eoi_token_index": 256000,
        "image_token_index": 262144,
        "mm_tokens_per_image": 256,
        "text_config": {
            "model_type": "gemma3_text",
            "vocab_size": 262208,
            "hidden_size": 2560,
            "intermediate_size": 10240,
            "num_hidden_layers": 34,
            "num_attention_heads": 8,
            "num_key_value_heads": 4,
            "head_dim": 256,
            "query_pre_attn_scalar": 256,
            "sliding_window": 1024,
            "max_position_embeddings": 131072,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            },
        },
        "vision_config": {
            "model_type": "siglip_vision_model",
            "hidden_size": 1152,
            "image_size": 896,
            "intermediate_size": 4304,
            "num_attention_heads": 16,
            "num_hidden_layers": 27,
            "patch_size": 14,
            "vision_use_head": False,
        },
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
    },
    "olmo-2-1b": {
        "architectures": ["Olmo2ForCausalLM"],
        "model_type": "olmo2",
        "vocab_size": 100352,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    },
}
_PEAK = re.compile(r"peak (?:at most )?([\d.,]+) (MiB|GiB) of (--max-memory [^;)]+\)?)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["llama-3.1-8b", *MODELS], default="llama-3.1-8b", help="the checkpoint's architecture and size")
    parser.add_argument("--layers", type=int, default=32, help="decoder layers of the Llama (default 32, Llama-3.1-8B's)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/hfmb-memory-bench"), help="folder for the three checkpoints")
    parser.add_argument("--max-memory", help="pass this budget instead of using the default")
    parser.add_argument("--compare", action="store_true", help="check the export against the source byte for byte (reads both)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints (the HF one is reused by the next run)")
    args = parser.parse_args()

    name = f"{args.layers}" if args.model == "llama-3.1-8b" else args.model
    hf, ckpt, out = args.work / f"hf-{name}", args.work / "ckpt", args.work / "out"
    shutil.rmtree(ckpt, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    started = time.time()
    if not (hf / "config.json").exists() and args.model == "llama-3.1-8b":
        shape = f"dataclasses.replace(LLAMA_3_1_8B, num_hidden_layers={args.layers})"
        _python(f"import dataclasses; from tests.synthetic_llama import *; write_llama_checkpoint({str(hf)!r}, {shape})")
    elif not (hf / "config.json").exists():
        config = MODELS[args.model]
        _python(f"from tests.synthetic_llama import *; c = {config!r}; write_random_checkpoint({str(hf)!r}, meta_tensor_shapes(c), c)")
    size = sum(path.stat().st_size for path in hf.glob("*.safetensors"))
    what = f"Llama-3.1-8B shapes, {args.layers} layers" if args.model == "llama-3.1-8b" else f"{args.model} shapes"
    print(f"checkpoint: {what}, {size / 1e9:.2f} GB bf16 in {hf} ({time.time() - started:.0f}s)")
    print(f"machine: {os.cpu_count()} cores, {_meminfo('MemTotal') / GiB:.1f} GiB RAM, {_meminfo('MemAvailable') / GiB:.1f} GiB available")
    budget = ["--max-memory", args.max_memory] if args.max_memory else []
    for step, argv in (("import", ["import", str(hf), str(ckpt)]), ("export", ["export", str(ckpt), str(out)])):
        _report(step, size, *_hfmb(argv + budget))
    if args.compare:
        found = f"compare_hf_folders({str(hf)!r}, {str(out)!r})"
        _python(f"from bridge.checks.verify import compare_hf_folders; d = {found}; print('compare:', d or 'identical'); assert not d")
    if not args.keep:
        shutil.rmtree(args.work, ignore_errors=True)


def _hfmb(argv: list[str]) -> tuple[str, float, int]:
    """Run ``hfmb ARGV`` in a fresh process: its output, its wall time and its peak RSS (bytes)."""
    os.sync()
    start = time.time()
    child = subprocess.Popen([sys.executable, "-m", "bridge", *argv], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = child.stdout.read()  # type: ignore[union-attr]
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        sys.exit(f"hfmb {' '.join(argv)} failed ({child.returncode}):\n{output[-3000:]}")
    return output, time.time() - start, usage.ru_maxrss * 1024


def _report(step: str, size: int, output: str, seconds: float, max_rss: int) -> None:
    found = _PEAK.search(output)
    if found is None:
        sys.exit(f"no peak in the report of {step}:\n{output[-2000:]}")
    peak = float(found.group(1).replace(",", "")) * (GiB if found.group(2) == "GiB" else 2**20)
    budget = _budget_bytes(found.group(3))
    print(
        f"{step}: {seconds:.0f}s ({size / 1e9 / seconds:.2f} GB/s); peak {peak / GiB:.2f} GiB of {found.group(3)}: "
        f"{peak / budget:.2f} of the budget, {peak / size:.3f} of the checkpoint; process peak RSS {max_rss / GiB:.2f} GiB"
    )


def _budget_bytes(text: str) -> float:
    """The budget's bytes from the report's ``--max-memory 13.6 GiB (default ...)`` or ``--max-memory 4GB``."""
    value = re.match(r"--max-memory ([\d.,]+) ?([A-Za-z]*)", text)
    units = {"GiB": GiB, "MiB": 2**20, "GB": 1e9, "MB": 1e6, "KB": 1e3, "": 1}
    return float(value.group(1).replace(",", "")) * units[value.group(2)]  # type: ignore[union-attr]


def _python(code: str) -> None:
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def _meminfo(field: str) -> int:
    with open("/proc/meminfo") as lines:
        return next(int(line.split()[1]) * 1024 for line in lines if line.startswith(field + ":"))


if __name__ == "__main__":
    main()
