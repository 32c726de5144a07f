"""Which TP load strategy is faster: each rank reads its own slice, or one reader per TP group scatters?

    python bench/load_strategy.py [--hidden 1024 --layers 8 --repeats 5]

Builds a Llama-architecture bf16 checkpoint once (under bench/data/), then loads it at TP=2 on two
local gloo ranks with each strategy, several times, and prints median wall times and their ratio.
A TP=1 load on one rank is printed as the reference measured in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from bridge.runtime.local_launch import run_distributed


def _time_loads(folder: str, tp: int, strategies: list[str], repeats: int) -> dict[str, list[float]]:
    import torch.distributed as dist

    from bridge import AutoBridge

    bridge = AutoBridge.from_hf_pretrained(folder)
    model = bridge.to_megatron_model(tp=tp, load_weights=False)
    times: dict[str, list[float]] = {s: [] for s in strategies}
    for strategy in strategies:  # warm-up: first touches of the page cache and of the parameters
        bridge.load_hf_weights(model, strategy=strategy)
    for _ in range(repeats):
        for strategy in strategies:
            dist.barrier()
            start = time.perf_counter()
            bridge.load_hf_weights(model, strategy=strategy)
            dist.barrier()
            times[strategy].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    import torch
    from transformers import LlamaConfig

    from bridge.demo_model import SMALL_LLAMA, save_random_checkpoint

    folder = Path(__file__).parent / "data" / f"llama-h{args.hidden}-l{args.layers}"
    if not (folder / "config.json").exists():
        shape = dict(
            hidden_size=args.hidden,
            intermediate_size=args.hidden * 11 // 4,
            num_hidden_layers=args.layers,
            num_attention_heads=16,
            num_key_value_heads=8,
            vocab_size=32000,
        )
        save_random_checkpoint(LlamaConfig(**{**SMALL_LLAMA, **shape}), folder, dtype=torch.bfloat16)
    size_gb = sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 1e9
    reference = statistics.median(run_distributed(_time_loads, 1, str(folder), 1, ["slice"], args.repeats)[0]["slice"])
    results = run_distributed(_time_loads, 2, str(folder), 2, ["slice", "scatter"], args.repeats)[0]
    medians = {s: statistics.median(t) for s, t in results.items()}
    print(f"checkpoint: {size_gb:.2f} GB bf16, {args.repeats} repeats, medians")
    print(f"{'load':<26}{'seconds':>10}{'× TP1 load':>12}")
    print(f"{'TP1, 1 rank (reference)':<26}{reference:>10.3f}{1.0:>12.2f}")
    for strategy, seconds in medians.items():
        print(f"{'TP2, ' + strategy:<26}{seconds:>10.3f}{seconds / reference:>12.2f}")
    print(f"scatter / slice = {medians['scatter'] / medians['slice']:.2f}")


if __name__ == "__main__":
    main()
