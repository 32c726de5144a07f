"""The project's own layer pieces train like transformers' layers: gradients at TP1 and TP2 against transformers.

The q/k norms over the whole projection (OLMo-2) all-reduce their sums of squares over TP; their
gradient needs the backward all-reduce too, which a forward-only check cannot see. Gemma's zero-centred
norms, soft-caps, scaled embeddings and sliding-layer rope sit in the backward pass as well. One step's
gradients of the parameters these pieces touch are compared, gathered over TP, with transformers' on
the same batch (fp32, relative to the gradient's size).
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
LAYER, HF_LAYER = "decoder.layers.1.", "model.layers.1."
# Megatron parameter → (HF tensor, TP split dim or None when replicated), per model
_POST_NORMS = {
    LAYER + "post_self_attn_layernorm.weight": (HF_LAYER + "post_attention_layernorm.weight", None),
    LAYER + "post_mlp_layernorm.weight": (HF_LAYER + "post_feedforward_layernorm.weight", None),
    LAYER + "self_attention.linear_proj.weight": (HF_LAYER + "self_attn.o_proj.weight", 1),
    "embedding.word_embeddings.weight": ("model.embed_tokens.weight", None),  # vocab rows: compared unpadded
}
_GEMMA = {**_POST_NORMS, LAYER + "pre_mlp_layernorm.weight": (HF_LAYER + "pre_feedforward_layernorm.weight", None)}
COMPARED = {
    "olmo2": {
        **_POST_NORMS,
        LAYER + "self_attention.q_layernorm.weight": (HF_LAYER + "self_attn.q_norm.weight", None),
        LAYER + "self_attention.k_layernorm.weight": (HF_LAYER + "self_attn.k_norm.weight", None),
    },
    "gemma2": _GEMMA,
    "gemma3": {**_GEMMA, LAYER + "self_attention.q_layernorm.weight": (HF_LAYER + "self_attn.q_norm.weight", None)},
}


def _loss(logits: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), TOKENS[:, 1:].reshape(-1))


def megatron_gradients(path: str, tp: int, compared: dict[str, tuple[str, int | None]]) -> dict[str, torch.Tensor]:
    """One backward pass of the converted model at TP=``tp``; the compared parameters' gradients, gathered over TP.

    q/k norm gradients are summed over TP first, as Megatron-Core's ``finalize_model_grads`` does (by
    name, for every ``q_layernorm`` / ``k_layernorm``): each rank holds only its heads' part.
    """
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
    for name, (_, dim) in compared.items():
        grad = params[name].grad
        if tp > 1 and ("q_layernorm" in name or "k_layernorm" in name):
            grad = grad.clone()
            dist.all_reduce(grad, group=parallel_state.get_tensor_model_parallel_group())
        if name.startswith("embedding."):
            dim = 0  # vocab-parallel
        if dim is not None and tp > 1:
            parts = [torch.empty_like(grad) for _ in range(tp)]
            dist.all_gather(parts, grad.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
            grad = torch.cat(parts, dim=dim)
        grads[name] = grad[:VOCAB_SIZE].clone() if name.startswith("embedding.") else grad.clone()
    return grads


CASES = [("olmo2", 1), ("olmo2", 2), ("gemma2", 2), ("gemma3", 2)]


@pytest.mark.parametrize("name,tp", CASES, ids=[f"{name}-tp{tp}" for name, tp in CASES])
def test_gradients_match_transformers(tmp_path, name, tp):
    from transformers import AutoModelForCausalLM

    path = build_tiny_checkpoint(name, tmp_path / name, dtype=torch.float32)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    _loss(hf(TOKENS).logits).backward()
    theirs = dict(hf.named_parameters())
    ours = run_distributed(megatron_gradients, tp, str(path), tp, COMPARED[name])[0]
    for param, (hf_name, _) in COMPARED[name].items():
        want = theirs[hf_name].grad
        scale = want.abs().max().item()
        assert scale > 0, hf_name
        assert (ours[param] - want).abs().max().item() <= 1e-4 * scale, f"{param} at tp={tp}"
