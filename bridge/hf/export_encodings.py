"""How an export stores its weights: as they are, or quantized the way a family's released checkpoints are.

An encoding turns each HF tensor an export makes into the tensors written for it (``encode``; ``meta``:
the same on shapes, to lay the files out) and says the ``quantization_config`` config.json gets. The
one so far: ``"mxfp4"`` (gpt-oss's experts, ``bridge.hf.mxfp4_experts``).
"""

from __future__ import annotations

from pathlib import Path

QUANTIZATIONS = ("mxfp4",)


def export_encoding(model_bridge, source: Path | None, quantization: str | None):
    """The encoding of ``quantization`` for ``model_bridge``'s weights (``source``: the HF folder the model was
    converted from), or None to write them as they are; refuses a quantization it does not know, by name."""
    if quantization is None:
        return None
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization={quantization!r} is not supported; supported: {', '.join(QUANTIZATIONS)}")
    from bridge.hf.mxfp4_experts import mxfp4_encoding

    return mxfp4_encoding(model_bridge, source)
