"""Independent restatements of the layouts, used to check the bridge value by value.

These formulas are written separately from ``mappings/`` on purpose: a test that reused the mapping
code could not catch a mistake in it.
"""

from __future__ import annotations

import re
import torch


def _interleave_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int) -> torch.Tensor:
    """Megatron's TP=1 fused QKV: per group, its query heads' rows, then its k rows, then its v rows."""
    d = k.shape[0] // groups
    per_group_q = q.shape[0] // groups
    rows = []
    for g in range(groups):
        rows += [q[g * per_group_q : (g + 1) * per_group_q], k[g * d : (g + 1) * d], v[g * d : (g + 1) * d]]
    return torch.cat(rows, dim=0)


def expected_shard(name: str, hf: dict[str, torch.Tensor], *, groups: int, tied: bool, tp: int, rank: int, padded_vocab: int) -> tuple[str, torch.Tensor]:
    """(kind, expected tensor) of TP rank ``rank`` for the Megatron parameter ``name`` (global layer numbers)."""
    match = re.match(r"decoder\.layers\.(\d+)\.(.+)", name)
    if match is None:
        if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
            source = hf["model.embed_tokens.weight" if tied or name.startswith("embedding") else "lm_head.weight"]
            padded = torch.zeros(padded_vocab, source.shape[1], dtype=source.dtype)
            padded[: source.shape[0]] = source
            return "vocab", padded.chunk(tp, dim=0)[rank]
        assert name == "decoder.final_layernorm.weight", name
        return "replicated", hf["model.norm.weight"]
    layer, rest = match.groups()
    p = f"model.layers.{layer}."
    if rest in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
        kind = rest.rsplit(".", 1)[1]
        fused = _interleave_qkv(*(hf[f"{p}self_attn.{x}_proj.{kind}"] for x in "qkv"), groups)
        return "qkv", fused.chunk(tp, dim=0)[rank]
    if rest == "mlp.linear_fc1.weight":
        gate, up = hf[p + "mlp.gate_proj.weight"], hf[p + "mlp.up_proj.weight"]
        return "gated_mlp", torch.cat([gate.chunk(tp, dim=0)[rank], up.chunk(tp, dim=0)[rank]], dim=0)
    row = {"self_attention.linear_proj.weight": "self_attn.o_proj.weight", "mlp.linear_fc2.weight": "mlp.down_proj.weight"}
    if rest in row:
        return "row", hf[p + row[rest]].chunk(tp, dim=1)[rank]
    norms = {
        "input_layernorm.weight": "input_layernorm.weight",
        "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
        "self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
        "self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
    }
    return "replicated", hf[p + norms[rest]]
