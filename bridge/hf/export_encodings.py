"""How an export stores its weights: as they are, or quantized the way a family's released checkpoints are.

An encoding turns each HF tensor an export makes into the tensors written for it (``encode``; ``meta``:
the same on shapes, to lay the files out; ``working_bytes``: what encoding one holds, counted in a streamed
export's budget) and says the ``quantization_config`` config.json gets. ``"mxfp4"``: gpt-oss's experts
(``bridge.hf.mxfp4_experts``); ``"fp8"``: the weights a block-scaled FP8 checkpoint (DeepSeek-V3, GLM-4.5-FP8,
Qwen3-FP8) stored in FP8 (``bridge.hf.fp8_block_weights``).
"""

from __future__ import annotations

from pathlib import Path

QUANTIZATIONS = ("fp8", "mxfp4")


def export_encoding(model_bridge, source: Path | None, quantization: str | None):
    """The encoding of ``quantization`` for ``model_bridge``'s weights (``source``: the HF folder the model was
    converted from, None or gone when unknown), or None to write them as they are; refuses a quantization it does
    not know, by name."""
    if quantization is None:
        return None
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization={quantization!r} is not supported; supported: {', '.join(QUANTIZATIONS)}")
    if quantization == "fp8":
        from bridge.hf.fp8_block_weights import fp8_encoding

        return fp8_encoding(model_bridge, source)
    from bridge.hf.mxfp4_experts import mxfp4_encoding

    return mxfp4_encoding(model_bridge, source if source is not None and Path(source).is_dir() else None)
