"""The merged export: an HF model folder whose linears hold ``W + (alpha/r)·B·A``, written by the weights' own export."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import torch

from bridge.lora.apply import lora_adapters, lora_config_of
from bridge.lora.config import LoraError


@contextlib.contextmanager
def merged_weights(model) -> Iterator[None]:
    """Inside, each adapted linear's weight holds ``W + scale·B·A`` (computed in fp32, cast once to the weight's dtype).

    The original weights are put back on leaving (kept meanwhile: memory of one copy of the adapted weights).
    """
    if lora_config_of(model) is None:
        raise LoraError("the model has no LoRA adapters to merge")
    originals: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for adapter in lora_adapters(model):
                weight = adapter.base_weight
                merged = adapter.merged_weight(weight).to(weight.dtype)
                originals.append((weight, weight.data))
                weight.data = merged
        yield
    finally:
        for weight, data in originals:
            weight.data = data


def save_merged_hf_pretrained(model, bridge, out_dir: str | Path, **kwargs) -> None:
    """Write an HF model folder of the merged weights (``bridge.save_hf_pretrained``'s atomic export; its keyword arguments).

    Each tensor is written in the source checkpoint's dtype (or ``dtype=``): the fp32 sum is rounded once.
    """
    with merged_weights(model):
        bridge.save_hf_pretrained(model, out_dir, **kwargs)
