"""Rotary position embeddings: HF rope settings → ``GPTModel`` arguments, and the settings Megatron-Core cannot reproduce."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from bridge.models.config import head_dim
from transformers import PretrainedConfig

from bridge.model_bridge import ModelBridge

# Old checkpoints save the rotary frequencies, which are not weights.
ROTARY_BUFFERS = (r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",)
# The Llama-3 rope scaling constants Megatron-Core's RotaryEmbedding hard-codes (rope_utils._apply_scaling).
MEGATRON_LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def rope_parameters(hf_config: PretrainedConfig) -> dict[str, Any]:
    """The rope settings of a transformers-5 config (``rope_parameters``) or an older one (``rope_theta``/``rope_scaling``)."""
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    if "rope_theta" not in params and getattr(hf_config, "rope_theta", None) is not None:
        params["rope_theta"] = hf_config.rope_theta
    legacy = getattr(hf_config, "rope_scaling", None)
    if legacy and "rope_type" not in params:
        params.update(legacy)
    params.setdefault("rope_type", params.pop("type", "default"))
    params.setdefault("rope_theta", 10000.0)
    return params


def partial_rotary_factor(hf_config: PretrainedConfig) -> float:
    """The share of each head's dims that rope rotates (transformers 5 keeps it in ``rope_parameters``, older configs at the top)."""
    factor = (getattr(hf_config, "rope_parameters", None) or {}).get(
        "partial_rotary_factor", getattr(hf_config, "partial_rotary_factor", None)
    )
    return 1.0 if factor is None else float(factor)


def _rotary_kwargs(bridge: ModelBridge, rope: dict[str, Any] | None = None) -> dict[str, Any]:
    """Rotary base, scaling and share of rotated dims of a default, linear, llama3 or YaRN rope
    (``rope``: the model's rope parameters; by default the config's only ones).

    A partial rotary embedding is Megatron-Core's ``rotary_percent``: both rotate the leading
    ``int(head_dim × factor)`` dims of each head, split in halves (transformers' ``rotate_half`` inside
    ``q[..., :rotary_dim]``, Megatron-Core's ``_apply_rotary_pos_emb_bshd``), and leave the rest as is.
    """
    rope = rope_parameters(bridge.hf_config) if rope is None else rope
    kwargs: dict[str, Any] = {"rotary_base": rope["rope_theta"]}
    partial = partial_rotary_factor(bridge.hf_config)
    if partial != 1.0:
        kwargs["rotary_percent"] = partial
    kind = rope["rope_type"]
    if kind == "llama3":
        for key, value in MEGATRON_LLAMA3_ROPE.items():
            if float(rope.get(key, value)) != value:
                raise bridge.unsupported(f"rope_parameters.{key}", rope[key], f"Megatron-Core's llama3 rope scaling fixes it at {value}")
        kwargs.update(rope_scaling=True, rope_scaling_factor=float(rope["factor"]))
    elif kind == "linear":
        kwargs["seq_len_interpolation_factor"] = float(rope["factor"])
    elif kind == "yarn":
        if partial != 1.0:
            raise bridge.unsupported("partial_rotary_factor", partial, "Megatron-Core's YaRN rotates whole heads")
        yarn_config(bridge, rope)  # its refusals
        kwargs["position_embedding_type"] = "yarn"
    elif kind == "longrope":
        raise bridge.unsupported(
            "rope_parameters.rope_type",
            kind,
            "LongRoPE (short_factor/long_factor: Phi-3-128k, Phi-3.5-mini, Phi-4-mini) is not implemented",
        )
    elif kind != "default":
        raise bridge.unsupported("rope_parameters.rope_type", kind, "supported: default, linear, llama3, yarn")
    return kwargs


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


@dataclass(frozen=True)
class YarnParameters:
    """HF's YaRN settings with transformers' defaults filled in, as both Megatron-Core YaRN embeddings read them
    (GPTModel's: ``yarn_config``; multi-latent attention's own: ``models.deepseek``)."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float
    beta_slow: float
    mscale: float | None  # HF's; cos/sin are scaled by mscale / mscale_all_dim only when both are set
    mscale_all_dim: float | None
    truncate: bool  # round the correction range (Megatron-Core: correction_range_round_to_int)

    @property
    def ratio_set(self) -> bool:
        return bool(self.mscale and self.mscale_all_dim)


def yarn_parameters(bridge: ModelBridge, rope: dict[str, Any]) -> YarnParameters:
    """The YaRN settings of ``rope``; refuses what Megatron-Core's YaRN cannot express, by setting.

    Megatron-Core scales cos/sin by HF's ``mscale / mscale_all_dim`` ratio when given both, else by
    ``0.1·ln(factor) + 1``, as transformers does; an explicit ``attention_factor`` other than that one has
    no Megatron-Core field.
    """
    original = rope.get("original_max_position_embeddings")
    if not original:
        raise bridge.unsupported("rope_parameters.original_max_position_embeddings", original, "YaRN needs the pretraining length")
    factor = float(rope.get("factor") or bridge.hf_config.max_position_embeddings / original)
    mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
    params = YarnParameters(
        factor=factor,
        original_max_position_embeddings=int(original),
        beta_fast=float(rope.get("beta_fast") or 32),
        beta_slow=float(rope.get("beta_slow") or 1),
        mscale=None if mscale is None else float(mscale),
        mscale_all_dim=None if mscale_all_dim is None else float(mscale_all_dim),
        truncate=bool(rope.get("truncate", True)),
    )
    attention = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim) if params.ratio_set else _yarn_mscale(factor)
    given = rope.get("attention_factor")
    if given is not None and float(given) != attention:
        raise bridge.unsupported("rope_parameters.attention_factor", given, f"Megatron-Core's YaRN scales by {attention} here")
    return params


def yarn_config(bridge: ModelBridge, rope: dict[str, Any]) -> dict[str, Any]:
    """The ``TransformerConfig`` fields GPTModel's YaRN rotary embedding reads (``YarnTransformerConfig``).

    Both compute the same frequencies (HF's ``truncate`` is Megatron-Core's ``correction_range_round_to_int``);
    ``yarn_mscale``/``yarn_mscale_all_dim`` None makes Megatron-Core scale cos/sin as HF does without the ratio.
    """
    yarn = yarn_parameters(bridge, rope)
    return dict(
        yarn_rotary_scaling_factor=yarn.factor,
        yarn_original_max_position_embeddings=yarn.original_max_position_embeddings,
        yarn_beta_fast=yarn.beta_fast,
        yarn_beta_slow=yarn.beta_slow,
        yarn_mscale=yarn.mscale if yarn.ratio_set else None,
        yarn_mscale_all_dim=yarn.mscale_all_dim if yarn.ratio_set else None,
        yarn_correction_range_round_to_int=yarn.truncate,
    )


def check_rope(bridge: ModelBridge, *, partial_rotary: bool = False, rope: dict[str, Any] | None = None) -> None:
    """Refuse the rope settings ``RotaryBridge.gpt_model_kwargs`` cannot express, and a partial rotary embedding
    unless the family declares it (``partial_rotary``: its transformers model rotates the leading dims of each
    head, as Megatron-Core's ``rotary_percent`` does; checked by logits for Phi-3)."""
    partial = partial_rotary_factor(bridge.hf_config)
    if partial != 1.0:
        if not partial_rotary:
            raise bridge.unsupported("partial_rotary_factor", partial, f"only full rotary embeddings are mapped for {bridge.architecture}")
        dims, of = int(head_dim(bridge.hf_config) * partial), head_dim(bridge.hf_config)
        if not 0 < dims < of or dims % 2:
            why = f"it rotates {dims} of {of} dims per head; an even number below {of} is mapped"
            raise bridge.unsupported("partial_rotary_factor", partial, why)
    _rotary_kwargs(bridge, rope)


class RotaryBridge(ModelBridge):
    """Base of the families with rotary position embeddings (their ``check_supported`` calls ``check_rope``)."""

    hf_ignore = ROTARY_BUFFERS

    def model_rope(self) -> dict[str, Any]:
        """The rope parameters of the model's rotary embedding (Gemma 3: those of its full-attention layers)."""
        return rope_parameters(self.hf_config)

    def gpt_model_kwargs(self) -> dict[str, Any]:
        """The longest sequence, rotary base and scaling."""
        return dict(max_sequence_length=self.hf_config.max_position_embeddings, **_rotary_kwargs(self, self.model_rope()))

    def rope_config_kwargs(self) -> dict[str, Any]:
        """YaRN's fields, for a YaRN rope."""
        rope = self.model_rope()
        return yarn_config(self, rope) if rope["rope_type"] == "yarn" else {}
