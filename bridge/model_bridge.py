"""The model-bridge base class (the architecture table that picks one is ``bridge.models.registry``).

A model bridge is mostly declarative: how an HF config becomes Megatron-Core ``TransformerConfig``
fields and ``GPTModel`` arguments, and the table of parameter mappings. Everything about ranks,
files and model construction lives in the engine, so adding an architecture touches ``models/`` only.
"""

from __future__ import annotations

import copy
from typing import Any

from transformers import PretrainedConfig

from bridge.mappings import MappingRegistry
from bridge.megatron.layers.decoder_shape import DecoderShape


class UnsupportedArchitectureError(ValueError):
    """No registered bridge for the checkpoint's architecture, or a config setting it cannot express."""


class ModelBridge:
    """Base class: subclasses say how their HF config and tensors map onto a Megatron-Core GPTModel."""

    # Regular expressions of HF tensor names that are not weights (e.g. rotary buffers in old checkpoints).
    hf_ignore: tuple[str, ...] = ()
    # Regular expressions of HF tensors no mapping reads that exports write back unchanged, read from the source
    # folder (DeepSeek's and GLM's multi-token-prediction layers when not built, an image-text model's vision tower): never lost.
    hf_carried: tuple[str, ...] = ()
    # Regular expressions of HF tensors transformers' model has no place for (unexpected at load, as in the released
    # checkpoints): multi-token-prediction layers, carried or built.
    hf_not_in_transformers: tuple[str, ...] = ()
    # Regular expressions of HF weights Megatron-Core keeps in float32 whatever the parameters' dtype (the sigmoid
    # router's correction bias, its expert_bias buffer): they do not decide the parameters' dtype.
    hf_fp32_weights: tuple[str, ...] = ()
    # Other on-disk layouts of the same tensors (mappings/hf_views.py), e.g. transformers-5 fused experts.
    hf_views: tuple = ()
    # How the decoder differs from Megatron-Core's pre-norm GPT model (post-norms, q/k norms, soft-caps...); a
    # family whose shape depends on its config makes this a property.
    decoder_shape: DecoderShape = DecoderShape()
    # False: built from Megatron-Core's local modules on GPUs with Transformer Engine too (a mapping relies on
    # the local spec's TP layout of some parameter).
    transformer_engine_layers: bool = True
    # (stored-name prefix, module path) pairs where transformers' modules are not named as the tensors are stored
    # (an image-text Gemma 3 stores language_model.model.* and holds model.language_model.*): peft names adapters by
    # module path.
    hf_module_paths: tuple[tuple[str, str], ...] = ()
    # peft's exclude_modules for the adapters the bridge writes: what peft's target names would also reach that the
    # bridge does not convert (a vision tower's q_proj).
    peft_exclude_modules: str | None = None
    # The checkpoint's multi-token-prediction layers become Megatron-Core's MTP block (trained, exported from it)
    # instead of being carried: set on the copy ``with_mtp_layers`` returns.
    builds_mtp_layers: bool = False

    def __init__(self, hf_config: PretrainedConfig):
        self.hf_config = hf_config
        self.check_supported()

    @property
    def architecture(self) -> str:
        return (self.hf_config.architectures or [type(self).__name__])[0]

    @property
    def vocab_size(self) -> int:
        return self.hf_config.vocab_size

    @property
    def tie_word_embeddings(self) -> bool:
        return bool(getattr(self.hf_config, "tie_word_embeddings", False))

    @property
    def mtp_layer_count(self) -> int:
        """Multi-token-prediction layers the checkpoint holds after its decoder (a family that maps them says how many)."""
        return 0

    def with_mtp_layers(self) -> "ModelBridge":
        """This bridge building the checkpoint's multi-token-prediction layers as Megatron-Core's MTP block, for
        training them (``mtp_num_layers``); refused, naming the setting, when the checkpoint has none."""
        if not self.mtp_layer_count:
            if hasattr(self.hf_config, "num_nextn_predict_layers"):
                raise self.unsupported("num_nextn_predict_layers", 0, "the checkpoint has no multi-token-prediction layers to build")
            raise UnsupportedArchitectureError(f"{self.architecture} has no multi-token-prediction layers to build (mtp=True, --mtp)")
        bridge = copy.copy(self)
        bridge.builds_mtp_layers = True
        return bridge

    def check_supported(self) -> None:
        """Raise ``UnsupportedArchitectureError`` naming a config setting Megatron-Core cannot express."""

    def unsupported(self, setting: str, value: Any, why: str) -> UnsupportedArchitectureError:
        return UnsupportedArchitectureError(f"{self.architecture}: config setting {setting}={value!r} is not supported: {why}")

    def transformer_config_kwargs(self) -> dict[str, Any]:
        """Model fields of Megatron-Core's ``TransformerConfig`` (not parallelism, dtype or runtime flags)."""
        raise NotImplementedError

    def gpt_model_kwargs(self) -> dict[str, Any]:
        """Extra ``GPTModel`` arguments (position embeddings, max sequence length)."""
        return {}

    def rope_config_kwargs(self) -> dict[str, Any]:
        """``TransformerConfig`` fields of the position embedding beyond Megatron-Core's own (YaRN's ``yarn_*``)."""
        return {}

    def mapping_registry(self) -> MappingRegistry:
        raise NotImplementedError
