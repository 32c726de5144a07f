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


# HF names of a routed expert's gate / up / down projections and of the router, per MoE family.
MOE_NAMES = {
    "mixtral": (
        "block_sparse_moe.experts.{e}.w1.weight",
        "block_sparse_moe.experts.{e}.w3.weight",
        "block_sparse_moe.experts.{e}.w2.weight",
        "block_sparse_moe.gate.weight",
    ),
    "qwen": ("mlp.experts.{e}.gate_proj.weight", "mlp.experts.{e}.up_proj.weight", "mlp.experts.{e}.down_proj.weight", "mlp.gate.weight"),
}


def _gated(gate: torch.Tensor, up: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    return torch.cat([gate.chunk(tp, dim=0)[rank], up.chunk(tp, dim=0)[rank]], dim=0)


def _split_qkv(hf: dict[str, torch.Tensor], p: str, kind: str) -> tuple[torch.Tensor, ...]:
    """A layer's q, k, v: their own tensors, or the row blocks of a fused ``qkv_proj`` (Phi-3), whose q rows
    are as many as ``o_proj``'s input columns and whose k and v rows split the rest in halves."""
    fused = hf.get(f"{p}self_attn.qkv_proj.{kind}")
    if fused is None:
        return tuple(hf[f"{p}self_attn.{x}_proj.{kind}"] for x in "qkv")
    q_rows = hf[f"{p}self_attn.o_proj.weight"].shape[1]
    kv_rows = (fused.shape[0] - q_rows) // 2
    return fused[:q_rows], fused[q_rows : q_rows + kv_rows], fused[q_rows + kv_rows :]


def _gate_up(hf: dict[str, torch.Tensor], p: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's MLP gate and up: their own tensors, or the two halves of a fused ``gate_up_proj`` (Phi-3)."""
    fused = hf.get(p + "mlp.gate_up_proj.weight")
    if fused is None:
        return hf[p + "mlp.gate_proj.weight"], hf[p + "mlp.up_proj.weight"]
    ffn = hf[p + "mlp.down_proj.weight"].shape[1]
    return fused[:ffn], fused[ffn:]


def _stacked_expert(hf: dict[str, torch.Tensor], p: str, rest: str, etp: int, etp_rank: int) -> tuple[str, torch.Tensor] | None:
    """gpt-oss's experts, read off its stacked tensors as its forward reads them: ``x @ gate_up_proj[e]`` with gate
    in the even columns and up in the odd ones, ``h @ down_proj[e]``; Megatron's fc1 is [gate rows; up rows] of
    ``y = W x``, so gate = ``gate_up_proj[e][:, 0::2].T``; its fc2 weight is ``down_proj[e].T``."""
    match = re.match(r"mlp\.experts\.local_experts\.(\d+)\.(linear_fc[12])\.(weight|bias)", rest)
    if match is None or p + "mlp.experts.gate_up_proj" not in hf:
        return None
    e, layer, kind = int(match.group(1)), match.group(2), match.group(3)
    if layer == "linear_fc1":
        both = hf[p + ("mlp.experts.gate_up_proj" if kind == "weight" else "mlp.experts.gate_up_proj_bias")][e]
        gate, up = both[..., 0::2], both[..., 1::2]
        if kind == "weight":
            gate, up = gate.T, up.T
        return "expert_fc1" if kind == "weight" else "expert_fc1_bias", _gated(gate, up, etp, etp_rank)
    if kind == "weight":
        return "expert_fc2", hf[p + "mlp.experts.down_proj"][e].T.chunk(etp, dim=1)[etp_rank]
    return "expert_fc2_bias", hf[p + "mlp.experts.down_proj_bias"][e]


def expected_shard(
    name: str,
    hf: dict[str, torch.Tensor],
    *,
    groups: int,
    tied: bool,
    tp: int,
    rank: int,
    padded_vocab: int,
    etp: int = 1,
    etp_rank: int = 0,
    moe_names: tuple[str, str, str, str] = MOE_NAMES["qwen"],
) -> tuple[str, torch.Tensor]:
    """(kind, expected tensor) of TP rank ``rank`` (expert-TP rank ``etp_rank``) for the Megatron parameter
    ``name`` (global layer and expert numbers)."""
    mtp = re.match(r"mtp\.layers\.(\d+)\.(.+)", name)
    if mtp is not None:  # Megatron-Core's MTP layer i: the HF layer after the decoder's, num_hidden_layers + i
        first = min(int(m.group(1)) for key in hf if (m := re.match(r"model\.layers\.(\d+)\.eh_proj\.weight$", key)))
        layer, rest = first + int(mtp.group(1)), mtp.group(2)
        if rest.startswith("transformer_layer."):
            return expected_shard(
                f"decoder.layers.{layer}.{rest.removeprefix('transformer_layer.')}",
                hf,
                groups=groups,
                tied=tied,
                tp=tp,
                rank=rank,
                padded_vocab=padded_vocab,
                etp=etp,
                etp_rank=etp_rank,
                moe_names=moe_names,
            )
        p = f"model.layers.{layer}."
        if rest == "eh_proj.weight":
            return "column", hf[p + "eh_proj.weight"].chunk(tp, dim=0)[rank]
        norms = {"enorm.weight": "enorm.weight", "hnorm.weight": "hnorm.weight", "final_layernorm.weight": "shared_head.norm.weight"}
        return "replicated", hf[p + norms[rest]]
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
    stacked = _stacked_expert(hf, p, rest, etp, etp_rank)
    if stacked is not None:
        return stacked
    singles = {  # gpt-oss: router and attention-output biases, attention sinks (one per query head)
        "mlp.router.bias": ("router", hf.get(p + "mlp.router.bias")),
        "self_attention.linear_proj.bias": ("replicated", hf.get(p + "self_attn.o_proj.bias")),
        "self_attention.core_attention.softmax_offset": ("sinks", hf.get(p + "self_attn.sinks")),
    }
    if rest in singles:
        kind, tensor = singles[rest]
        return kind, tensor.chunk(tp, dim=0)[rank] if kind == "sinks" else tensor
    expert = re.match(r"mlp\.experts\.local_experts\.(\d+)\.(linear_fc[12])\.weight", rest)
    if expert:
        gate, up, down = (p + n.format(e=expert.group(1)) for n in moe_names[:3])
        if expert.group(2) == "linear_fc1":
            return "expert_fc1", _gated(hf[gate], hf[up], etp, etp_rank)
        return "expert_fc2", hf[down].chunk(etp, dim=1)[etp_rank]
    if rest == "mlp.router.weight":
        return "router", hf[p + ("mlp.router.weight" if p + "mlp.router.weight" in hf else moe_names[3])]
    shared = p + ("mlp.shared_experts." if p + "mlp.shared_experts.down_proj.weight" in hf else "mlp.shared_expert.")  # GLM / Qwen2-MoE
    if rest == "mlp.shared_experts.linear_fc1.weight":
        return "gated_mlp", _gated(hf[shared + "gate_proj.weight"], hf[shared + "up_proj.weight"], tp, rank)
    if rest == "mlp.shared_experts.linear_fc2.weight":
        return "row", hf[shared + "down_proj.weight"].chunk(tp, dim=1)[rank]
    if rest == "mlp.router.expert_bias":  # the sigmoid router's correction bias (a buffer): whole on every rank
        return "router", hf[p + "mlp.gate.e_score_correction_bias"]
    if rest == "mlp.shared_experts.gate_weight":
        return "replicated", hf[p + "mlp.shared_expert_gate.weight"]
    if rest in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
        kind = rest.rsplit(".", 1)[1]
        fused = _interleave_qkv(*_split_qkv(hf, p, kind), groups)
        return "qkv", fused.chunk(tp, dim=0)[rank]
    if rest == "mlp.linear_fc1.weight":
        return "gated_mlp", _gated(*_gate_up(hf, p), tp, rank)
    row = {"self_attention.linear_proj.weight": "self_attn.o_proj.weight", "mlp.linear_fc2.weight": "mlp.down_proj.weight"}
    if rest in row:
        return "row", hf[p + row[rest]].chunk(tp, dim=1)[rank]
    mla = {  # DeepSeek's multi-latent attention (local spec): every projection but the output split along its rows
        "self_attention.linear_q_down_proj.weight": "self_attn.q_a_proj.weight",
        "self_attention.linear_q_up_proj.weight": "self_attn.q_b_proj.weight",
        "self_attention.linear_q_proj.weight": "self_attn.q_proj.weight",
        "self_attention.linear_kv_down_proj.weight": "self_attn.kv_a_proj_with_mqa.weight",
        "self_attention.linear_kv_up_proj.weight": "self_attn.kv_b_proj.weight",
    }
    if rest in mla:
        return "column", hf[p + mla[rest]].chunk(tp, dim=0)[rank]
    latent = p + "self_attn.kv_a_layernorm.weight" in hf
    qk_norms = {
        "self_attention.q_layernorm.weight": "self_attn.q_a_layernorm.weight" if latent else "self_attn.q_norm.weight",
        "self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
        "self_attention.kv_layernorm.weight": "self_attn.kv_a_layernorm.weight",
    }
    if rest in qk_norms:  # per head (Qwen3, Gemma 3) or over the projection (OLMo): whole on every rank
        return "replicated", hf[p + qk_norms[rest]]
    post_normed = p + "post_feedforward_layernorm.weight" in hf  # then HF's post_attention_layernorm is a post-norm too
    norms = {
        "input_layernorm.weight": "input_layernorm.weight",
        "pre_mlp_layernorm.weight": "pre_feedforward_layernorm.weight" if post_normed else "post_attention_layernorm.weight",
        "post_self_attn_layernorm.weight": "post_attention_layernorm.weight",
        "post_mlp_layernorm.weight": "post_feedforward_layernorm.weight",
    }
    return "replicated", hf[p + norms[rest]]


IMAGE_TEXT_PREFIX = "language_model."  # where an image-text checkpoint (Gemma 3's) stores its text model


def text_model_tensors(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The text model's tensors named as in a text checkpoint: an image-text one's ``language_model.`` tensors without it."""
    prefix = IMAGE_TEXT_PREFIX
    if not any(name.startswith(prefix) for name in hf):
        return hf
    return {name[len(prefix) :]: tensor for name, tensor in hf.items() if name.startswith(prefix)}


def check_model_shards(model, bridge, hf: dict[str, torch.Tensor], moe_names=MOE_NAMES["qwen"]) -> tuple[list[str], dict[str, int]]:
    """Compare every parameter on this rank with its independently computed expected shard.

    Returns the mismatching parameter names and how many parameters of each kind were checked.
    """
    from megatron.core import parallel_state

    from bridge.megatron.chunks import global_names, unwrap_chunks

    problems, kinds = [], {}
    hf = text_model_tensors(hf)
    for chunk in unwrap_chunks(model):
        names = global_names(chunk)
        for local_name, param in chunk.named_parameters():
            kind, want = expected_shard(
                names[local_name],
                hf,
                groups=bridge.model_bridge.hf_config.num_key_value_heads,
                tied=bridge.model_bridge.tie_word_embeddings,
                tp=parallel_state.get_tensor_model_parallel_world_size(),
                rank=parallel_state.get_tensor_model_parallel_rank(),
                padded_vocab=chunk.vocab_size,
                etp=parallel_state.get_expert_tensor_parallel_world_size(),
                etp_rank=parallel_state.get_expert_tensor_parallel_rank(),
                moe_names=moe_names,
            )
            kinds[kind] = kinds.get(kind, 0) + 1
            if param.dtype != want.dtype or not torch.equal(param.detach(), want):
                problems.append(f"{names[local_name]} ({kind})")
    return problems, kinds


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes: ``torch.equal`` takes -0.0 for +0.0 and a NaN for different from itself."""
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))
    )


def fill_nan(model) -> None:
    """Overwrite every parameter with NaN, so that a load that misses one shows in ``check_model_shards``."""
    with torch.no_grad():
        for chunk in model:
            for param in chunk.parameters():
                param.fill_(float("nan"))
