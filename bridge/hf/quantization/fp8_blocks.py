"""Block-scaled FP8 codec for checkpoints stored like DeepSeek-V3/R1 (and some GLM releases).

On disk a weight W [R, C] is ``weight`` float8_e4m3fn [R, C] plus ``weight_scale_inv`` float32
[ceil(R/br), ceil(C/bc)], with (br, bc) the config's ``quantization_config.weight_block_size`` (usually
[128, 128]); the last row and column blocks may be partial. Value = ``float(weight) * scale_inv`` of its block,
computed in float32 (DeepSeek's ``weight_dequant`` then rounds that product to bfloat16).

Exactness of dequantize -> quantize for bytes made by ``quantize_fp8_blocks``:

- through float32 the bytes come back identical. scale_inv = fl(amax / 448) is recovered as
  fl(fl(448 * scale_inv) / 448) because the block maximum encodes as +-448 and that identity holds for every
  float32 that fl(a / 448) can produce; it fails for about 11% of arbitrary normal float32 values, so scales
  made by another rule need not survive. Scales are clamped to at least 2**-126, so they stay normal floats,
  every product keeps >= 14 bits, and a tiny block gets exactly 2**-126 (with a float8 maximum below 448) back.
- through bfloat16 the float8 bytes come back identical for blocks with scale_inv >= 2**-117 (the products are
  then normal bfloat16 values whose 8 significant bits pin e4m3's 4), but scale_inv is recomputed from the
  rounded maximum and moves by less than 2**-8 relative. Bytes quantized from bfloat16 values (so also after
  one such pass) are a fixed point of the bfloat16 round trip, within the same range. Pass the original
  ``scale_inv`` to ``quantize_fp8_blocks`` to get every byte back.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

FP8_MAX = 448.0
# Scales stay normal float32 so that fl(448 * scale) / 448 recovers them and products keep their precision.
MIN_SCALE = 2.0**-126
# A block that encodes as all zeros stores 1.0: any positive scale decodes it to zeros, and 1/scale_inv stays finite.
ZERO_BLOCK_SCALE = 1.0
_DEFAULT_BLOCK_ROWS = 64


def scale_inv_shape(shape: tuple[int, ...] | torch.Size, block: tuple[int, int] = (128, 128)) -> tuple[int, int]:
    """Shape of ``weight_scale_inv`` for a weight of ``shape``: one entry per (possibly partial) block."""
    return math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1])


def dequantize_fp8_blocks(
    weight: torch.Tensor,
    scale_inv: torch.Tensor,
    block: tuple[int, int] = (128, 128),
    dtype: torch.dtype = torch.bfloat16,
    block_rows_per_chunk: int = _DEFAULT_BLOCK_ROWS,
) -> torch.Tensor:
    """Decode ``weight`` [R, C] with its per-block ``scale_inv``; the product is formed in float32, then cast."""
    if weight.dtype != torch.float8_e4m3fn or weight.ndim != 2:
        raise ValueError(f"FP8 weight must be a 2-D float8_e4m3fn tensor, got {weight.dtype} {tuple(weight.shape)}")
    _check_scale(scale_inv, weight.shape, block)
    out = torch.empty(weight.shape, dtype=dtype, device=weight.device)
    for rows, scale_rows in _row_chunks(weight.shape[0], block[0], block_rows_per_chunk):
        out[rows] = weight[rows].to(torch.float32) * _expand(scale_inv[scale_rows].to(torch.float32), block, weight[rows].shape)
    return out


def quantize_fp8_blocks(
    values: torch.Tensor,
    block: tuple[int, int] = (128, 128),
    scale_inv: torch.Tensor | None = None,
    block_rows_per_chunk: int = _DEFAULT_BLOCK_ROWS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode ``values`` [R, C] as (float8_e4m3fn weight, float32 scale_inv).

    scale_inv = amax / 448 per block in float32 (at least 2**-126) and weight = x / scale_inv rounded to nearest
    even, clamped to +-448, signs kept; a block that encodes as all zeros (zero input, or every |x| <=
    2**-136) stores scale_inv 1.0 so that its bytes survive a round trip. Given ``scale_inv``, it is used as is
    (elements beyond 448 times it are clamped), which reproduces an existing checkpoint from its values.
    """
    if values.ndim != 2 or not values.is_floating_point():
        raise ValueError(f"FP8 block quantization needs a 2-D floating tensor, got {values.dtype} {tuple(values.shape)}")
    if scale_inv is not None:
        _check_scale(scale_inv, values.shape, block)
        if not bool(((scale_inv > 0) & torch.isfinite(scale_inv)).all()):
            raise ValueError("FP8 block quantization needs a positive, finite scale_inv for every block")
    weight = torch.empty(values.shape, dtype=torch.float8_e4m3fn, device=values.device)
    scales = torch.empty(scale_inv_shape(values.shape, block), dtype=torch.float32, device=values.device)
    for rows, scale_rows in _row_chunks(values.shape[0], block[0], block_rows_per_chunk):
        x = values[rows].to(torch.float32)
        if not bool(torch.isfinite(x).all()):
            raise ValueError("FP8 block quantization cannot encode non-finite values (inf or NaN); the input holds some")
        if scale_inv is None:
            amax = _block_amax(x, block)
            scale = (amax / FP8_MAX).clamp_min(MIN_SCALE)
        else:
            scale = scale_inv[scale_rows].to(torch.float32)
        encoded = (x / _expand(scale, block, x.shape)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        if scale_inv is None:
            scale = torch.where(_block_amax(encoded.to(torch.float32), block) == 0, ZERO_BLOCK_SCALE, scale)
        weight[rows] = encoded
        scales[scale_rows] = scale
    return weight, scales


def _check_scale(scale_inv: torch.Tensor, shape: torch.Size, block: tuple[int, int]) -> None:
    """Reject a scale tensor that does not have one entry per block, naming both shapes."""
    expected = scale_inv_shape(shape, block)
    if tuple(scale_inv.shape) != expected:
        raise ValueError(
            f"weight_scale_inv for weight {tuple(shape)} with block {tuple(block)} must be {expected}, got {tuple(scale_inv.shape)}"
        )


def _row_chunks(rows: int, block_rows: int, per_chunk: int) -> Iterator[tuple[slice, slice]]:
    """Yield (row slice, scale row slice) pairs covering whole block rows, to bound the float32 temporaries."""
    step = block_rows * max(1, per_chunk)
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        yield slice(start, stop), slice(start // block_rows, math.ceil(stop / block_rows))


def _expand(scale: torch.Tensor, block: tuple[int, int], shape: torch.Size) -> torch.Tensor:
    """Broadcast per-block scales to element shape, cutting the partial last blocks."""
    return scale.repeat_interleave(block[0], 0)[: shape[0]].repeat_interleave(block[1], 1)[:, : shape[1]]


def _block_amax(x: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Per-block max |x|, zero-padding the partial last blocks."""
    rows, cols = scale_inv_shape(x.shape, block)
    padded = torch.nn.functional.pad(x.abs(), (0, cols * block[1] - x.shape[1], 0, rows * block[0] - x.shape[0]))
    return padded.view(rows, block[0], cols, block[1]).amax(dim=(1, 3))
