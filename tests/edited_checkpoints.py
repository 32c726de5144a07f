"""Broken copies of the tiny checkpoints, for the tests of bad input."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file


def edited_copy(src: str | Path, dst: str | Path, edit: Callable[[dict[str, torch.Tensor]], object]) -> Path:
    """Copy the checkpoint folder ``src`` to ``dst`` and rewrite its single weights file through ``edit(tensors)``."""
    dst = Path(dst)
    shutil.copytree(src, dst)
    (weights,) = dst.glob("*.safetensors")
    tensors = load_file(weights)
    edit(tensors)
    save_file(tensors, weights, metadata={"format": "pt"})
    return dst


def with_mtp_layer(src: str | Path, dst: str | Path) -> Path:
    """A copy of the DeepSeek-V3 or GLM-4.5 checkpoint ``src`` with one multi-token-prediction layer after its decoder, as
    the released checkpoints hold it (``model.layers.{num_hidden_layers}``: a decoder layer's tensors, here the last
    layer's perturbed, plus ``enorm``, ``hnorm``, ``eh_proj`` and ``shared_head.norm``, and the model's embedding and
    output layer again as ``embed_tokens`` and ``shared_head.head``), and ``num_nextn_predict_layers: 1``."""
    import json

    dst = Path(dst)
    config = json.loads((Path(src) / "config.json").read_text())
    last, mtp = f"model.layers.{config['num_hidden_layers'] - 1}.", f"model.layers.{config['num_hidden_layers']}."
    hidden = config["hidden_size"]

    def add_layer(tensors: dict[str, torch.Tensor]) -> None:
        generator = torch.Generator().manual_seed(7)
        dtype = tensors["model.norm.weight"].dtype
        for name in [n for n in tensors if n.startswith(last)]:
            tensors[mtp + name[len(last) :]] = tensors[name] + torch.randn(tensors[name].shape, generator=generator).to(dtype)
        extra = {"enorm.weight": (hidden,), "hnorm.weight": (hidden,), "eh_proj.weight": (hidden, 2 * hidden)}
        extra["shared_head.norm.weight"] = (hidden,)
        for name, shape in extra.items():
            tensors[mtp + name] = torch.randn(shape, generator=generator).to(dtype)
        tensors[mtp + "embed_tokens.weight"] = tensors["model.embed_tokens.weight"].clone()
        tensors[mtp + "shared_head.head.weight"] = tensors["lm_head.weight"].clone()

    edited_copy(src, dst, add_layer)
    (dst / "config.json").write_text(json.dumps({**config, "num_nextn_predict_layers": 1}, indent=2))
    return dst
