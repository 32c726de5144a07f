"""Gemma (``GemmaForCausalLM``), Gemma 2 (``Gemma2ForCausalLM``) and Gemma 3 text (``Gemma3ForCausalLM``).

All three: RMSNorms scaling by ``1 + weight`` (``layernorm_zero_centered_gamma``; the weight stored as
is), input embeddings times ``sqrt(hidden_size)``, GeLU-tanh gated MLPs, tied embeddings. Gemma 2 and 3
add norms on the attention and MLP outputs (``post_attention_layernorm``, ``post_feedforward_layernorm``;
the MLP's pre-norm is ``pre_feedforward_layernorm``), ``query_pre_attn_scalar`` as the attention scale
and sliding windows on the layers ``layer_types`` marks ``sliding_attention``. Gemma 2 soft-caps the
attention scores and the output logits; Gemma 3 has per-head q/k norms and a rope of its own for the
sliding layers (``rope_parameters["sliding_attention"]``; the full layers use ``"full_attention"``'s,
with its scaling). Of an image-text ``Gemma3ForConditionalGeneration`` checkpoint the text model is converted
(stored under ``language_model.``); its vision tower and projector are carried into exports unchanged.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import torch.nn.functional as F
from bridge.mappings import MappingRegistry
from bridge.models.blocks import attention, dense_mlp, embeddings_and_output, post_norms, pre_mlp_norm
from bridge.models.config import alternating_window_config, attention_config, check_no_bias, decoder_config, layer_types
from bridge.models.registry import register_bridge
from bridge.models.rope import RotaryBridge, check_rope, rope_parameters
from transformers import PretrainedConfig

from bridge.megatron.layers.decoder_shape import DecoderShape
from bridge.model_bridge import ModelBridge, UnsupportedArchitectureError

LAYER_TYPES = ("sliding_attention", "full_attention")


def check_gemma(bridge: ModelBridge) -> None:
    """What every Gemma refuses: another activation, biases, bidirectional attention, unknown layer kinds."""
    c = bridge.hf_config
    act = getattr(c, "hidden_activation", None) or getattr(c, "hidden_act", None)
    if act != "gelu_pytorch_tanh":
        raise bridge.unsupported("hidden_activation", act, "Gemma's MLPs are mapped with the tanh-approximated GeLU only")
    if getattr(c, "use_bidirectional_attention", False):
        raise bridge.unsupported("use_bidirectional_attention", True, "GPTModel attends causally")
    check_no_bias(bridge, "attention_bias")
    unknown = sorted(set(layer_types(c)) - set(LAYER_TYPES))
    if unknown:
        raise bridge.unsupported("layer_types", unknown[0], f"known kinds: {', '.join(LAYER_TYPES)}")


def gemma_config(hf_config: PretrainedConfig, *, qk_norm: bool) -> dict[str, Any]:
    """Zero-centred norms, the attention scale, GeLU-tanh MLPs, windows on the sliding layers."""
    c = hf_config
    kwargs = {
        **decoder_config(c),
        **attention_config(c, qk_norm=qk_norm),
        "layernorm_zero_centered_gamma": True,
        "ffn_hidden_size": c.intermediate_size,
        "gated_linear_unit": True,
        "activation_func": functools.partial(F.gelu, approximate="tanh"),
    }
    scalar = getattr(c, "query_pre_attn_scalar", None)
    if scalar:
        kwargs["softmax_scale"] = float(scalar) ** -0.5
    return {**kwargs, **alternating_window_config(c)}


class _GemmaBridge(RotaryBridge):
    """What the Gemma generations share: the refusals, the config, the embedding scale and any soft-caps."""

    qk_norm = False  # per-head q/k norms (Gemma 3)

    def check_supported(self) -> None:
        check_gemma(self)
        check_rope(self, rope=self.model_rope())

    def layer_switches(self) -> dict[str, Any]:
        """The generation's ``DecoderShape`` fields beyond the embedding scale and the soft-caps."""
        return {}

    @property
    def decoder_shape(self) -> DecoderShape:
        c = self.hf_config
        attn_cap, final_cap = (getattr(c, f"{kind}_logit_softcapping", None) for kind in ("attn", "final"))
        return DecoderShape(embedding_scale=True, attn_logit_softcap=attn_cap, final_logit_softcap=final_cap, **self.layer_switches())

    def transformer_config_kwargs(self) -> dict[str, Any]:
        return gemma_config(self.hf_config, qk_norm=self.qk_norm)


@register_bridge("GemmaForCausalLM")
class GemmaBridge(_GemmaBridge):
    def mapping_registry(self) -> MappingRegistry:
        return MappingRegistry([*embeddings_and_output(self.tie_word_embeddings), *attention(), *pre_mlp_norm(), *dense_mlp()])


@register_bridge("Gemma2ForCausalLM")
class Gemma2Bridge(_GemmaBridge):
    def layer_switches(self) -> dict[str, Any]:
        return {"post_norms": True}

    def mapping_registry(self) -> MappingRegistry:
        return MappingRegistry(
            [
                *embeddings_and_output(self.tie_word_embeddings),
                *attention(qk_norm=self.qk_norm),
                *pre_mlp_norm("pre_feedforward_layernorm"),
                *post_norms(),
                *dense_mlp(pre_norm=None),
            ]
        )


@register_bridge("Gemma3ForCausalLM")
class Gemma3Bridge(Gemma2Bridge):
    qk_norm = True

    def check_supported(self) -> None:
        super().check_supported()
        if self.model_rope()["rope_type"] == "yarn":
            why = "Megatron-Core's YaRN scales every layer's cos/sin, the sliding layers' too"
            raise self.unsupported("rope_parameters.full_attention.rope_type", "yarn", why)
        sliding = self._rope("sliding_attention")
        if sliding["rope_type"] != "default":
            why = "the sliding layers' rope is mapped without scaling"
            raise self.unsupported("rope_parameters.sliding_attention.rope_type", sliding["rope_type"], why)

    def _rope(self, kind: str) -> dict[str, Any]:
        params = dict(self.hf_config.rope_parameters[kind])
        params.setdefault("rope_type", "default")
        return params

    def model_rope(self) -> dict[str, Any]:
        return (
            self._rope("full_attention") if "full_attention" in (self.hf_config.rope_parameters or {}) else rope_parameters(self.hf_config)
        )

    def layer_switches(self) -> dict[str, Any]:
        return {"post_norms": True, "sliding_rope_base": float(self._rope("sliding_attention")["rope_theta"])}


@register_bridge("Gemma3ForConditionalGeneration")
class Gemma3ImageTextBridge(Gemma3Bridge):
    """The text model of an image-text Gemma 3 checkpoint, which trains here; exports stay complete image-text ones.

    The language model's tensors are stored under ``language_model.`` (``language_model.model.layers.*``, as the
    Hub's checkpoints and transformers' ``save_pretrained`` write them); the vision tower and the projector,
    not trained here, are carried from the source folder into each export as they are. LoRA adapters name the
    text model's modules as transformers does (``model.language_model.*``) and exclude the vision tower.
    """

    TEXT_PREFIX = "language_model."
    hf_carried = (r"vision_tower\..+", r"multi_modal_projector\..+")
    hf_module_paths = (("language_model.model.", "model.language_model."),)
    peft_exclude_modules = r".*\b(vision_tower|multi_modal_projector)\b.*"

    def __init__(self, hf_config: PretrainedConfig):
        self.image_text_config = hf_config
        text = hf_config.get_text_config()
        outer, inner = getattr(hf_config, "tie_word_embeddings", None), getattr(text, "tie_word_embeddings", None)
        if outer is not None and inner is not None and bool(outer) != bool(inner):
            raise UnsupportedArchitectureError(
                f"{self.architecture}: config.json's tie_word_embeddings={outer} and text_config.tie_word_embeddings={inner} disagree"
            )
        super().__init__(text)

    @property
    def architecture(self) -> str:
        return (self.image_text_config.architectures or [type(self).__name__])[0]

    @property
    def hf_ignore(self) -> tuple[str, ...]:  # type: ignore[override]
        return tuple(re.escape(self.TEXT_PREFIX) + pattern for pattern in super().hf_ignore)

    def mapping_registry(self) -> MappingRegistry:
        return super().mapping_registry().under_prefix(self.TEXT_PREFIX)
