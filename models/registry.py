"""The architecture table: which model bridge handles an HF checkpoint, by its ``config.architectures``."""

from __future__ import annotations

from typing import Callable

from transformers import PretrainedConfig

from bridge.model_bridge import ModelBridge, UnsupportedArchitectureError

_BRIDGES: dict[str, type[ModelBridge]] = {}


def register_bridge(*architectures: str) -> Callable[[type[ModelBridge]], type[ModelBridge]]:
    """Class decorator: this bridge handles HF checkpoints whose ``architectures`` name any of these."""

    def register(cls: type[ModelBridge]) -> type[ModelBridge]:
        for arch in architectures:
            if arch in _BRIDGES and _BRIDGES[arch] is not cls:
                raise ValueError(f"{arch} is already registered to {_BRIDGES[arch].__name__}")
            _BRIDGES[arch] = cls
        return cls

    return register


def supported_architectures() -> list[str]:
    return sorted(_BRIDGES)


def bridge_for(hf_config: PretrainedConfig) -> ModelBridge:
    """The registered bridge for ``hf_config.architectures``."""
    archs = list(getattr(hf_config, "architectures", None) or [])
    for arch in archs:
        if arch in _BRIDGES:
            return _BRIDGES[arch](hf_config)
    raise UnsupportedArchitectureError(
        f"architecture {archs or '(none in config.json)'} is not supported; supported architectures: {', '.join(supported_architectures())}"
    )
