"""The MXFP4 and block-FP8 codecs: reference values, canonical bytes and exact dequantize -> quantize round trips.

Exactness is checked on bytes (``.view(torch.uint8)`` / ``.view(torch.int32)``), never with a tolerance.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers.integrations.mxfp4 import _convert_moe_packed_tensors

from bridge.hf.quantization import dequantize_fp8_blocks, dequantize_mxfp4, quantize_fp8_blocks, quantize_mxfp4
from bridge.hf.quantization.mxfp4 import FP4_VALUES

DTYPES = [torch.bfloat16, torch.float32]


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bytewise equality, so -0.0 != 0.0 and a NaN equals itself."""
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def _mixed_values(shape: tuple[int, ...], seed: int, low: float = -140.0, high: float = 124.0) -> torch.Tensor:
    """Random float32 values whose magnitude varies per row from 2**low to 2**high, with zero and -0.0 runs."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen)
    rows = x.reshape(-1, shape[-1])
    rows *= torch.exp2(torch.empty(rows.shape[0], 1).uniform_(low, high, generator=gen))
    rows[::7, : shape[-1] // 2] = 0.0
    rows[::11, shape[-1] // 2 :] = -0.0
    return x


# --- MXFP4 -------------------------------------------------------------------------------------------------------


def _random_mxfp4(gen: torch.Generator, groups: int, low: int = 0, high: int = 253) -> tuple[torch.Tensor, torch.Tensor]:
    """Arbitrary (blocks, scales): any nibbles, scale bytes in [low, high)."""
    blocks = torch.randint(0, 256, (groups, 16), generator=gen, dtype=torch.uint8)
    return blocks, torch.randint(low, high, (groups,), generator=gen, dtype=torch.uint8)


def _nibbles(blocks: torch.Tensor) -> torch.Tensor:
    return torch.stack([blocks & 0x0F, blocks >> 4], dim=-1).flatten(-2)


def _pack(nibbles: torch.Tensor) -> torch.Tensor:
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)


def _fp4_reference(t: float) -> float:
    """Nearest FP4 magnitude to |t| (ties to the even code, saturating at 6), sign kept."""
    mags = FP4_VALUES[:8]
    best = min(range(8), key=lambda code: (abs(abs(t) - mags[code]), code % 2))
    return math.copysign(mags[best], t)


@pytest.mark.parametrize("dtype", DTYPES)
def test_mxfp4_dequantize_matches_transformers(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    blocks, scales = _random_mxfp4(gen, 4 * 6 * 8, high=255)
    blocks, scales = blocks.reshape(4, 6, 8, 16), scales.reshape(4, 6, 8)
    expected = _convert_moe_packed_tensors(blocks, scales, dtype=dtype).transpose(1, 2)
    assert _same_bits(dequantize_mxfp4(blocks, scales, dtype), expected.contiguous())
    assert _same_bits(dequantize_mxfp4(blocks, scales, dtype, groups_per_chunk=5), expected.contiguous())


def test_mxfp4_dequantize_nibble_order() -> None:
    blocks = torch.tensor([[[0x72, 0x8F] + [0] * 14]], dtype=torch.uint8)
    out = dequantize_mxfp4(blocks, torch.tensor([[128]], dtype=torch.uint8), torch.float32)
    assert out[0, :4].tolist() == [2.0, 12.0, -12.0, -0.0] and math.copysign(1.0, out[0, 3].item()) == -1.0


def test_mxfp4_quantize_follows_the_round_up_scale_rule() -> None:
    """Values equal an independent per-group reference: scale 2**max(-126, ceil(log2(amax/6))), FP4 ties to even."""
    x = _mixed_values((96, 64), seed=1)
    x[5, :32] = torch.tensor([3.2, 1.25, -0.7, 0.25] + [0.0] * 28)
    blocks, scales = quantize_mxfp4(x)
    got = dequantize_mxfp4(blocks, scales, torch.float32)
    for group, values in enumerate(x.reshape(-1, 32).tolist()):
        amax = max(abs(v) for v in values)
        mantissa, exponent = math.frexp(amax)
        e = max(-126, exponent - 3 if mantissa <= 0.75 else exponent - 2)
        expected = [_fp4_reference(math.ldexp(v, -e)) * 2.0**e for v in values] if amax else values
        assert got.reshape(-1, 32)[group].tolist() == expected
        rounded_max = max(abs(v) for v in expected)
        byte = 0 if rounded_max == 0 else e + 127 - (rounded_max == 3.0 * 2.0**e and e > -126)
        assert scales.reshape(-1)[group].item() == byte
    assert scales[5, 0].item() == 126 and _nibbles(blocks[5, 0])[:4].tolist() == [7, 4, 10, 0]


@pytest.mark.parametrize("dtype", DTYPES)
def test_mxfp4_roundtrip_of_quantized_values_is_byte_exact(dtype: torch.dtype) -> None:
    x = _mixed_values((3, 40, 256), seed=2)
    x[0, 0, :32] = torch.linspace(-3.3, 3.3, 32)
    x[0, 1, :32] = 2.0**-148
    x[0, 2, :32] = torch.linspace(-1e-39, 1e-39, 32)
    x[0, 3, :32] = 6.0 * 2.0**125
    blocks, scales = quantize_mxfp4(x)
    again = quantize_mxfp4(dequantize_mxfp4(blocks, scales, dtype))
    assert _same_bits(again[0], blocks) and _same_bits(again[1], scales)
    assert _same_bits(quantize_mxfp4(x, groups_per_chunk=7)[0], blocks)


@pytest.mark.parametrize("dtype", DTYPES)
def test_mxfp4_roundtrip_of_random_canonical_bytes_is_exact(dtype: torch.dtype) -> None:
    """Group maximum 4.0 or 6.0 at scale bytes 1..252, any nonzero group at byte 1, zero groups at byte 0."""
    gen = torch.Generator().manual_seed(3)
    groups = 4096
    top = torch.randint(6, 8, (groups,), generator=gen, dtype=torch.uint8)
    codes = torch.minimum(torch.randint(0, 8, (groups, 32), generator=gen, dtype=torch.uint8), top.unsqueeze(1))
    codes[torch.arange(groups), torch.randint(0, 32, (groups,), generator=gen)] = top
    codes |= torch.randint(0, 2, (groups, 32), generator=gen, dtype=torch.uint8) << 3
    scales = torch.randint(1, 253, (groups,), generator=gen, dtype=torch.uint8)
    codes[::5] &= 0b1011
    scales[::5] = 1
    codes[::9] &= 8
    scales[::9] = 0
    blocks = _pack(codes)
    again = quantize_mxfp4(dequantize_mxfp4(blocks, scales, dtype))
    assert _same_bits(again[0], blocks) and _same_bits(again[1], scales)


@pytest.mark.parametrize("dtype", DTYPES)
def test_mxfp4_noncanonical_bytes_keep_values_or_need_the_scales(dtype: torch.dtype) -> None:
    """Maximum <= 3.0 at byte >= 2: same values, new bytes; given the original scales any bytes come back."""
    gen = torch.Generator().manual_seed(4)
    blocks, scales = _random_mxfp4(gen, 2048)
    values = dequantize_mxfp4(blocks, scales, dtype)
    hinted = quantize_mxfp4(values, scales=scales)
    assert _same_bits(hinted[0], blocks) and _same_bits(hinted[1], scales)
    small = _pack(_nibbles(blocks) & 0b1101)
    small_scales = scales.clamp_min(2)
    values = dequantize_mxfp4(small, small_scales, dtype)
    again = quantize_mxfp4(values)
    assert not torch.equal(again[1], small_scales)
    assert _same_bits(dequantize_mxfp4(*again, dtype), values)


def test_mxfp4_nonzero_group_at_scale_zero_rounds() -> None:
    blocks = _pack(torch.tensor([[[1, 3, 9, 2] + [0] * 28]], dtype=torch.uint8))
    values = dequantize_mxfp4(blocks, torch.tensor([[0]], dtype=torch.uint8), torch.float32)
    again = dequantize_mxfp4(*quantize_mxfp4(values), torch.float32)
    assert again[0, :4].tolist() == [0.0, 2.0**-126, -0.0, 2.0**-127]


def test_mxfp4_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match=r"multiple of 32, got shape \(4, 48\)"):
        quantize_mxfp4(torch.zeros(4, 48))
    for bad in (math.inf, math.nan):
        with pytest.raises(ValueError, match="non-finite"):
            quantize_mxfp4(torch.full((2, 32), bad))
    with pytest.raises(ValueError, match=r"6 \* 2\*\*125"):
        quantize_mxfp4(torch.full((1, 32), 3.0e38))
    with pytest.raises(ValueError, match="scales must be uint8 of shape"):
        quantize_mxfp4(torch.zeros(2, 64), scales=torch.zeros(2, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="255"):
        quantize_mxfp4(torch.zeros(1, 32), scales=torch.full((1, 1), 255, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\[\.\.\., G, 16\]"):
        dequantize_mxfp4(torch.zeros(2, 3, 16, dtype=torch.uint8), torch.zeros(2, 4, dtype=torch.uint8))


# --- FP8 blocks --------------------------------------------------------------------------------------------------


def _fp8_reference(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    out = torch.empty(weight.shape)
    for i in range(scale_inv.shape[0]):
        for j in range(scale_inv.shape[1]):
            rows, cols = slice(i * block[0], (i + 1) * block[0]), slice(j * block[1], (j + 1) * block[1])
            out[rows, cols] = weight[rows, cols].float() * scale_inv[i, j]
    return out


@pytest.mark.parametrize("block", [(128, 128), (64, 32)])
def test_fp8_dequantize_matches_per_block_reference(block: tuple[int, int]) -> None:
    gen = torch.Generator().manual_seed(5)
    weight = (torch.randn(300, 200, generator=gen) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    scale_inv = torch.rand(math.ceil(300 / block[0]), math.ceil(200 / block[1]), generator=gen)
    expected = _fp8_reference(weight, scale_inv, block)
    assert _same_bits(dequantize_fp8_blocks(weight, scale_inv, block, torch.float32, block_rows_per_chunk=1), expected)
    assert _same_bits(dequantize_fp8_blocks(weight, scale_inv, block), expected.to(torch.bfloat16))


@pytest.mark.parametrize("block", [(128, 128), (16, 48)])
def test_fp8_float32_roundtrip_is_byte_exact(block: tuple[int, int]) -> None:
    x = _mixed_values((333, 270), seed=6, low=-150.0, high=120.0)
    x[:128, :128] = 0.0
    x[128:256, 128:256] = torch.linspace(-(2.0**-125), 2.0**-125, 128 * 128).reshape(128, 128)
    x[256:, :128] = 2.0**-137
    x[-1, -1] = torch.finfo(torch.float32).max
    weight, scale_inv = quantize_fp8_blocks(x, block)
    assert bool((scale_inv == 1.0).any()) and bool((scale_inv == 2.0**-126).any())
    again = quantize_fp8_blocks(dequantize_fp8_blocks(weight, scale_inv, block, torch.float32), block)
    assert _same_bits(again[0], weight) and _same_bits(again[1], scale_inv)
    assert _same_bits(quantize_fp8_blocks(x, block, block_rows_per_chunk=1)[0], weight)


def test_fp8_scale_recovery_holds_on_every_scale_the_rule_makes() -> None:
    """fl(fl(448 s) / 448) == s for every s = fl(a / 448), a covering two whole binades (scale-invariant above 2**-126)."""
    first, last = (torch.tensor(v).view(torch.int32).item() for v in (256.0, 1024.0))
    scale = torch.arange(first, last, dtype=torch.int32).view(torch.float32) / 448.0
    assert torch.equal((scale * 448.0) / 448.0, scale)
    one = torch.tensor(1.0).view(torch.int32).item()
    arbitrary = torch.arange(one, one + (1 << 23), dtype=torch.int32).view(torch.float32)
    assert 0.10 < ((arbitrary * 448.0) / 448.0 != arbitrary).float().mean().item() < 0.11


def test_fp8_foreign_scales_need_the_original_scale_inv() -> None:
    """A scale the amax / 448 rule never makes does not come back from fp32 values; passing it back does."""
    scale = torch.tensor([[1.0, 1.2]]).view(torch.int32) + torch.arange(4096, dtype=torch.int32).reshape(-1, 1)
    scale = scale.view(torch.float32)
    scale_inv = scale[((scale * 448.0) / 448.0 != scale).any(dim=1)][:1]
    weight = torch.full((4, 8), 448.0).to(torch.float8_e4m3fn)
    values = dequantize_fp8_blocks(weight, scale_inv, (4, 4), torch.float32)
    assert not torch.equal(quantize_fp8_blocks(values, (4, 4))[1], scale_inv)
    hinted = quantize_fp8_blocks(values, (4, 4), scale_inv=scale_inv)
    assert _same_bits(hinted[0], weight) and _same_bits(hinted[1], scale_inv)


def test_fp8_bfloat16_roundtrip_keeps_weight_bytes_and_then_settles() -> None:
    """Within scale_inv >= 2**-117: float8 bytes survive bfloat16, scale_inv moves once and then stays."""
    x = _mixed_values((300, 260), seed=7, low=-100.0, high=100.0)
    weight, scale_inv = quantize_fp8_blocks(x)
    values = dequantize_fp8_blocks(weight, scale_inv)
    weight2, scale2 = quantize_fp8_blocks(values)
    assert _same_bits(weight2, weight)
    assert not torch.equal(scale2, scale_inv) and ((scale2 - scale_inv) / scale_inv).abs().max().item() <= 2.0**-8
    settled = quantize_fp8_blocks(dequantize_fp8_blocks(weight2, scale2))
    assert _same_bits(settled[0], weight2) and _same_bits(settled[1], scale2)
    direct = quantize_fp8_blocks(x.to(torch.bfloat16), (16, 48))
    settled = quantize_fp8_blocks(dequantize_fp8_blocks(*direct, (16, 48)), (16, 48))
    assert _same_bits(settled[0], direct[0]) and _same_bits(settled[1], direct[1])
    hinted = quantize_fp8_blocks(values, scale_inv=scale_inv)
    assert _same_bits(hinted[0], weight) and _same_bits(hinted[1], scale_inv)


def test_fp8_zero_blocks_and_signs() -> None:
    x = torch.zeros(130, 129)
    x[0, :3] = torch.tensor([-0.0, 2.0**-136, -(2.0**-137)])
    x[128, 128], x[129, 128] = -1e-30, -3.0
    weight, scale_inv = quantize_fp8_blocks(x)
    assert scale_inv.tolist() == [[1.0, 1.0], [1.0, (torch.tensor(3.0) / 448.0).item()]]
    assert weight.view(torch.uint8)[0, :3].tolist() == [0x80, 0x00, 0x80] and weight.view(torch.uint8)[128, 128].item() == 0x80
    assert weight[129, 128].float().item() == -448.0


def test_fp8_rejects_bad_input() -> None:
    weight = torch.zeros(300, 200).to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match=r"must be \(3, 2\), got \(2, 2\)"):
        dequantize_fp8_blocks(weight, torch.ones(2, 2))
    with pytest.raises(ValueError, match="2-D float8_e4m3fn"):
        dequantize_fp8_blocks(torch.zeros(4, 4), torch.ones(1, 1))
    with pytest.raises(ValueError, match="non-finite"):
        quantize_fp8_blocks(torch.full((4, 4), math.nan))
    with pytest.raises(ValueError, match=r"must be \(1, 1\), got \(2, 1\)"):
        quantize_fp8_blocks(torch.zeros(4, 4), scale_inv=torch.ones(2, 1))
