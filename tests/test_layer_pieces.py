"""The project's own layer pieces train like transformers' layers: gradients at TP2 against transformers.

The q/k norms over the whole projection (OLMo-2) all-reduce their sums of squares over TP; their
gradient needs the backward all-reduce too, which a forward-only check cannot see. One step's
gradients of every parameter the pieces touch (q/k norm weights, post-norms, the fused QKV) are
compared, gathered over TP, with transformers' on the same batch (fp32, relative to the gradient's size).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bridge.demo_model import VOCAB_SIZE
from bridge.runtime.local_launch import run_distributed
from tests.tiny_checkpoints import build_tiny_checkpoint

pytestmark = pytest.mark.distributed

TOKENS = torch.randint(0, VOCAB_SIZE, (2, 16), generator=torch.Generator().manual_seed(3))
LAYER = "decoder.layers.1."
# Megatron parameter → (HF tensor, TP split dim or None when replicated)
COMPARED = {
    LAYER + "self_attention.q_layernorm.weight": ("model.layers.1.self_attn.q_norm.weight", 0),
    LAYER + "self_attention.k_layernorm.weight": ("model.layers.1.self_attn.k_norm.weight", 0),
    LAYER + "post_self_attn_layernorm.weight": ("model.layers.1.post_attention_layernorm.weight", None),
    LAYER + "post_mlp_layernorm.weight": ("model.layers.1.post_feedforward_layernorm.weight", None),
    LAYER + "self_attention.linear_proj.weight": ("model.layers.1.self_attn.o_proj.weight", 1),
}


def _loss(logits: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), TOKENS[:, 1:].reshape(-1))


def megatron_gradients(path: str, tp: int) -> dict[str, torch.Tensor]:
    """One backward pass of the converted model at TP=``tp``; the compared parameters' gradients, gathered over TP."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from bridge import AutoBridge

    bridge = AutoBridge.from_hf_pretrained(path, dtype=torch.float32)
    (model,) = bridge.to_megatron_model(tp=tp)
    seq = TOKENS.shape[1]
    positions = torch.arange(seq).unsqueeze(0).expand_as(TOKENS)
    causal = torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1).view(1, 1, seq, seq)
    logits = gather_from_tensor_model_parallel_region(model(TOKENS, positions, causal))[..., :VOCAB_SIZE]
    _loss(logits).backward()
    params = dict(model.named_parameters())
    grads = {}
    for name, (_, dim) in COMPARED.items():
        grad = params[name].grad
        if dim is not None and tp > 1:
            parts = [torch.empty_like(grad) for _ in range(tp)]
            dist.all_gather(parts, grad.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
            grad = torch.cat(parts, dim=dim)
        grads[name] = grad.clone()
    return grads


@pytest.mark.parametrize("tp", [1, 2])
def test_olmo2_gradients_match_transformers(tmp_path, tp):
    from transformers import AutoModelForCausalLM

    path = build_tiny_checkpoint("olmo2", tmp_path / "olmo2", dtype=torch.float32)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    _loss(hf(TOKENS).logits).backward()
    theirs = dict(hf.named_parameters())
    ours = run_distributed(megatron_gradients, tp, str(path), tp)[0]
    for name, (hf_name, _) in COMPARED.items():
        want = theirs[hf_name].grad
        scale = want.abs().max().item()
        assert scale > 0, hf_name
        assert (ours[name] - want).abs().max().item() <= 1e-4 * scale, f"{name} at tp={tp}"
