"""Quantized copies of saved tiny checkpoints, stored the way the released quantized checkpoints are (test fixtures)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

# What the block-scaled FP8 releases (DeepSeek-V3/R1, GLM-4.5-FP8) leave unquantized besides biases: embeddings,
# the output layer, norms and the routers (``mlp.gate``; their correction bias is not a weight).
NOT_QUANTIZED = re.compile(r".*(embed_tokens|lm_head|norm|mlp\.gate)\.weight")


def fp8_config(block: tuple[int, int]) -> dict:
    """DeepSeek-V3's ``quantization_config``, with the block size ``block``."""
    return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": list(block)}


def fp8_quantized_names(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The tensors such a release stores in FP8: every matrix ``*.weight`` but the embeddings, output layer, norms and routers."""
    return [n for n, t in tensors.items() if n.endswith(".weight") and t.dim() == 2 and not NOT_QUANTIZED.fullmatch(n)]


def fp8_copy(src: str | Path, dst: str | Path, block: tuple[int, int] = (128, 128), dtype: torch.dtype = torch.bfloat16) -> Path:
    """``src`` (any saved checkpoint) with every linear weight stored as float8_e4m3fn plus ``weight_scale_inv`` (one
    float32 per ``block``, scale = block maximum / 448 of the stored values, by the bridge's codec), the other float
    tensors in ``dtype`` (bf16 in the releases) and ``quantization_config`` set.

    From an fp32 ``src`` the scales are those of fp32 masters (as DeepSeek-V3's FP8 training keeps): recomputed from
    the bf16 values they decode to, they differ (``bridge.hf.quantization.fp8_blocks``)."""
    from safetensors.torch import load_file, save_file

    from bridge.hf.quantization.fp8_blocks import quantize_fp8_blocks

    dst = Path(dst)
    shutil.copytree(src, dst)
    for weights in dst.glob("*.safetensors"):
        tensors = load_file(weights)
        quantized = fp8_quantized_names(tensors)
        for name in quantized:
            tensors[name], tensors[name + "_scale_inv"] = quantize_fp8_blocks(tensors[name].float(), block)
        kept = [n for n, t in tensors.items() if t.is_floating_point() and t.dtype != torch.float8_e4m3fn and not n.endswith("_scale_inv")]
        for name in kept:
            tensors[name] = tensors[name].to(dtype)
        save_file(tensors, weights, metadata={"format": "pt"})
    _edit_config(dst, quantization_config=fp8_config(block), dtype=str(dtype).removeprefix("torch."))
    return dst


def dequantized_copy(src: str | Path, dst: str | Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """``src`` (a block-scaled FP8 checkpoint) with each FP8 weight decoded to ``dtype`` (its float32 product, rounded
    once) and ``quantization_config`` dropped: the unquantized checkpoint it stands for."""
    from safetensors.torch import load_file, save_file

    from bridge.hf.quantization.fp8_blocks import dequantize_fp8_blocks

    dst = Path(dst)
    shutil.copytree(src, dst)
    block = tuple(json.loads((dst / "config.json").read_text())["quantization_config"]["weight_block_size"])
    for weights in dst.glob("*.safetensors"):
        tensors = load_file(weights)
        for name in [n for n in tensors if n.endswith("_scale_inv")]:
            weight = name.removesuffix("_scale_inv")
            tensors[weight] = dequantize_fp8_blocks(tensors[weight], tensors.pop(name), block, dtype)
        save_file(tensors, weights, metadata={"format": "pt"})
    _edit_config(dst, quantization_config=None, dtype=str(dtype).removeprefix("torch."))
    return dst


def _edit_config(folder: Path, **changes) -> None:
    """Set (or, given None, remove) keys of ``folder``'s config.json."""
    path = folder / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config, indent=2))
