"""Demo: a small Llama checkpoint → Megatron-Core at TP2·PP2 on CPU → back to HF, checked two ways.

    torchrun --nproc-per-node=4 examples/demo.py

1. The exported folder equals the source bit for bit (every tensor, name and dtype).
2. Megatron's logits on the converted weights match transformers' on the same tokens (fp32).
"""

from __future__ import annotations

import argparse
import logging
import warnings

# Megatron-Core's notices about optional packages (Apex, Transformer Engine) and deprecated
# collectives it calls say nothing about this run; keep them out of its output.
warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine|TransformerEngine).*")
warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from bridge import AutoBridge
from bridge.checks.forward import megatron_logits
from bridge.checks.verify import compare_hf_folders
from bridge.demo_model import build_demo_checkpoint
from bridge.megatron.parallel import init_distributed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--pp", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=Path("demo_out"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    init_distributed()
    rank = dist.get_rank()
    source, exported = args.workdir / "hf_source", args.workdir / "hf_exported"
    if rank == 0:
        build_demo_checkpoint(source, dtype=torch.float32)
        print(f"built a small Llama checkpoint in {source}")
    dist.barrier()

    bridge = AutoBridge.from_hf_pretrained(source)
    model = bridge.to_megatron_model(tp=args.tp, pp=args.pp)
    params = sum(p.numel() for chunk in model for p in chunk.parameters())
    print(
        f"rank {rank}: tp rank {parallel_state.get_tensor_model_parallel_rank()}, pp rank "
        f"{parallel_state.get_pipeline_model_parallel_rank()}, {params} parameters loaded"
    )
    bridge.save_hf_pretrained(model, exported, overwrite=True)

    ok = True
    if rank == 0:
        problems = compare_hf_folders(source, exported)
        ok = not problems
        print(
            f"roundtrip HF → Megatron (tp={args.tp}, pp={args.pp}) → HF: "
            + ("bit-exact, every tensor" if ok else f"{len(problems)} differences: {problems[:5]}")
        )

    tokens = torch.randint(0, bridge.model_bridge.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    logits = megatron_logits(model, tokens, bridge.model_bridge.vocab_size)
    if logits is not None and parallel_state.get_tensor_model_parallel_rank() == 0 and parallel_state.get_data_parallel_rank() == 0:
        from transformers import AutoModelForCausalLM

        with torch.no_grad():
            reference = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)(tokens).logits
        diff = (logits - reference).abs().max().item()
        same_top1 = torch.equal(logits.argmax(-1), reference.argmax(-1))
        ok = diff <= 1e-4 and same_top1
        print(f"logits vs transformers (fp32): max abs diff {diff:.2e}, top-1 identical: {same_top1}")
    verdicts = [None] * dist.get_world_size()
    dist.all_gather_object(verdicts, ok)
    if rank == 0:
        print("DEMO PASSED" if all(verdicts) else "DEMO FAILED")
    dist.destroy_process_group()
    raise SystemExit(0 if all(verdicts) else 1)


if __name__ == "__main__":
    main()
