"""MXFP4 codec for checkpoints stored like the released gpt-oss weights.

On disk a weight W of shape [..., R, C] is two uint8 tensors:

- ``<name>_blocks`` [..., R, C/32, 16]: 32 FP4 (e2m1) codes per group, two per byte; element 2k sits in the low
  nibble and element 2k+1 in the high nibble. Nibble n means ``FP4_VALUES[n]`` (bit 3 is the sign).
- ``<name>_scales`` [..., R, C/32]: one E8M0 exponent per group, biased by 127.

Value = ``FP4_VALUES[nibble] * 2**(scale - 127)``. The codec only groups the last dimension; orientation is the
caller's business (transformers transposes the gpt-oss experts after dequantizing, this module never does).

Canonical bytes (what ``quantize_mxfp4`` emits) are the fixed points of quantize-after-dequantize: all-zero
groups have scale byte 0, and every other group either has a largest nibble magnitude of 4.0 or 6.0 at a scale
byte in 1..252, or sits at scale byte 1 (the smallest exponent the rule produces) with any nonzero nibbles.
Other encodings requantize to different bytes: a group whose largest magnitude is <= 3.0 at a scale byte >= 2
moves to a lower exponent with scaled-up codes and a zero group at a nonzero scale byte moves to byte 0, both
with identical values; a nonzero group at scale byte 0 moves to byte 1, where its +-0.5 and +-1.5 nibbles
(+-2**-128, +-1.5 * 2**-127) do not exist and round to 0 and +-2**-126. Scale bytes above 252 fall in the first
case or do not dequantize to finite values. Pass the original ``scales`` to ``quantize_mxfp4`` to reproduce any
finite bytes exactly.
"""

from __future__ import annotations

import torch

FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
GROUP = 32
# The largest group maximum whose canonical encoding (scale byte 252, nibble 6.0) dequantizes to a finite float.
MAX_ABS = 6.0 * 2.0**125
# Rounding thresholds in units of the group scale; a tie goes to the code with an even (zero) mantissa bit.
_TIES_DOWN = (0.25, 1.25, 2.5, 5.0)
_TIES_UP = (0.75, 1.75, 3.5)
# Magnitude code -> code of twice that value (3.0 -> 6.0 at most); 6 and 7 never need doubling.
_DOUBLED = (0, 2, 4, 5, 6, 7, 6, 7)
_DEFAULT_CHUNK = 1 << 18


def dequantize_mxfp4(
    blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16, groups_per_chunk: int = _DEFAULT_CHUNK
) -> torch.Tensor:
    """Decode ``blocks`` [..., G, 16] and ``scales`` [..., G] to [..., G*32], as transformers does before transposing.

    ``dtype`` should be bfloat16 or float32 (float16 cannot hold most exponents); scale byte 255, E8M0's NaN,
    decodes to inf or NaN exactly as in transformers.

    Works ``groups_per_chunk`` groups at a time, so a lazily loaded (memory-mapped) tensor is read piecewise.
    """
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"MXFP4 blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.ndim < 2 or blocks.shape[-1] != GROUP // 2 or blocks.shape[:-1] != scales.shape:
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} need shape [..., G, 16] with scales [..., G], got {tuple(scales.shape)}")
    *prefix, groups, _ = blocks.shape
    flat_blocks = blocks.reshape(-1, GROUP // 2)
    flat_scales = scales.reshape(-1, 1)
    lut = torch.tensor(FP4_VALUES, dtype=dtype, device=blocks.device)
    out = torch.empty(flat_blocks.shape[0], GROUP, dtype=dtype, device=blocks.device)
    for start in range(0, flat_blocks.shape[0], groups_per_chunk):
        chunk = flat_blocks[start : start + groups_per_chunk]
        sub = out[start : start + groups_per_chunk]
        sub[:, 0::2] = lut[(chunk & 0x0F).long()]
        sub[:, 1::2] = lut[(chunk >> 4).long()]
        torch.ldexp(sub, flat_scales[start : start + groups_per_chunk].to(torch.int32) - 127, out=sub)
    return out.reshape(*prefix, groups * GROUP)


def quantize_mxfp4(
    values: torch.Tensor, scales: torch.Tensor | None = None, groups_per_chunk: int = _DEFAULT_CHUNK
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode ``values`` [..., N] (N % 32 == 0) as canonical (blocks [..., N/32, 16], scales [..., N/32]).

    The scale is triton's round-up rule, 2**ceil(log2(amax / 6)) with amax the group's max |x| (at least
    2**-126), and elements round to the nearest FP4 value with ties to even (as the newer triton_kernels do),
    clamped to +-6, keeping the sign (-0.0 and negatives that round to zero give nibble 8). Two fixes make the
    bytes survive dequantize -> quantize while keeping triton's values: a group whose maximum rounds down to 3.0
    is re-encoded one exponent lower with doubled codes, and a group that rounds to all zeros gets scale byte 0.
    Given ``scales``, those exponents are used as they are (values beyond 6 times the scale are clamped), which
    reproduces any finite (blocks, scales), canonical or not, from its dequantized values.
    """
    if values.ndim < 1 or values.shape[-1] % GROUP:
        raise ValueError(f"MXFP4 needs the last dimension to be a multiple of {GROUP}, got shape {tuple(values.shape)}")
    prefix, groups = values.shape[:-1], values.shape[-1] // GROUP
    flat = values.reshape(-1, GROUP)
    given = None
    if scales is not None:
        if scales.dtype != torch.uint8 or scales.shape != (*prefix, groups):
            raise ValueError(f"MXFP4 scales must be uint8 of shape {(*prefix, groups)}, got {scales.dtype} {tuple(scales.shape)}")
        given = scales.reshape(-1)
        if bool((given == 255).any()):
            raise ValueError("MXFP4 scale byte 255 is E8M0's NaN and cannot be used to encode values")
    out_blocks = torch.empty(flat.shape[0], GROUP // 2, dtype=torch.uint8, device=values.device)
    out_scales = torch.empty(flat.shape[0], dtype=torch.uint8, device=values.device)
    doubled = torch.tensor(_DOUBLED, dtype=torch.uint8, device=values.device)
    for start in range(0, flat.shape[0], groups_per_chunk):
        stop = start + groups_per_chunk
        x = flat[start:stop].to(torch.float32)
        if not bool(torch.isfinite(x).all()):
            raise ValueError("MXFP4 cannot encode non-finite values (inf or NaN); the input holds some")
        amax = x.abs().amax(dim=1)
        if given is None:
            if bool((amax > MAX_ABS).any()):
                raise ValueError(f"MXFP4 groups must have max |x| <= 6 * 2**125 (about 2.55e38), got {amax.max().item():g}")
            exponent = ((amax / 6.0).view(torch.int32) + 0x007FFFFF) & 0x7F800000
            exponent = (exponent >> 23).to(torch.uint8)
        else:
            exponent = given[start:stop]
        codes = _fp4_codes(x * torch.ldexp(torch.ones_like(amax), 127 - exponent.to(torch.int32)).unsqueeze(1))
        if given is None:
            lower = ((codes & 7).amax(dim=1) == 5) & (exponent >= 2)
            codes = torch.where(lower.unsqueeze(1), (codes & 8) | doubled[(codes & 7).long()], codes)
            exponent = torch.where((codes & 7).amax(dim=1) == 0, 0, exponent - lower.to(torch.uint8))
        out_blocks[start:stop] = codes[:, 0::2] | (codes[:, 1::2] << 4)
        out_scales[start:stop] = exponent
    return out_blocks.reshape(*prefix, groups, GROUP // 2), out_scales.reshape(*prefix, groups)


def _fp4_codes(scaled: torch.Tensor) -> torch.Tensor:
    """Nearest FP4 code (ties to even, saturating at 6.0) for float32 values already divided by their scale."""
    magnitude = scaled.abs()
    code = torch.zeros(scaled.shape, dtype=torch.uint8, device=scaled.device)
    for threshold in _TIES_DOWN:
        code += magnitude > threshold
    for threshold in _TIES_UP:
        code += magnitude >= threshold
    return code | (torch.signbit(scaled).to(torch.uint8) << 3)
