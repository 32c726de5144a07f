"""Block-scaled FP8 weights (DeepSeek-V3/R1, GLM-4.5-FP8, Qwen3-*-FP8): read as the bf16 tensors they stand for,
and written back in FP8 on request.

Those checkpoints store a linear weight ``X.weight`` as float8_e4m3fn with ``X.weight_scale_inv`` (float32, one
per ``weight_block_size`` block, the last ones possibly partial) beside it (``bridge.hf.quantization.fp8_blocks``),
and say so in config.json's ``quantization_config`` (``quant_method: fp8``). ``Fp8BlockWeights``, a reader view
for any family, presents ``X.weight`` under its own name, decoded (in bfloat16 unless another dtype is asked
for) from only the blocks a slice touches; the scales vanish from the names. ``Fp8BlockEncoding`` writes the
weights the source checkpoint held in FP8 back that way on export.

Which weights an export writes in FP8 is read from the source checkpoint (the folder the model was converted from):
exactly those it held in FP8, so a round trip keeps its names, dtypes and bytes. When that folder is gone the export
is refused rather than guessed from the config (``modules_to_not_convert`` lists differ between releases).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

from bridge.hf.folder import CheckpointError
from bridge.hf.quantization.fp8_blocks import dequantize_fp8_blocks, quantize_fp8_blocks, scale_inv_shape
from bridge.mappings import materialize

FP8 = torch.float8_e4m3fn
SCALE = "_scale_inv"
# Elements decoded or encoded at a time (at least one row of blocks): the float32 temporaries stay a few MiB.
CHUNK_ELEMENTS = 1 << 18
# Bytes those temporaries take per element (float32 values, expanded scales and product, or their encoding's).
TEMP_BYTES_PER_ELEMENT = 16
_INTEGER_VIEW = {2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclass(frozen=True)
class Fp8Format:
    """What config.json's ``quantization_config`` says about the FP8 weights: their block, and the setting itself."""

    block: tuple[int, int]
    config: dict


def quantization_config(hf_config) -> dict | None:
    """config.json's ``quantization_config`` as a dict (transformers keeps it as a dict or a config object), or None."""
    config = getattr(hf_config, "quantization_config", None)
    config = config.to_dict() if hasattr(config, "to_dict") else config
    return config if isinstance(config, dict) else None


def fp8_format(hf_config) -> Fp8Format | None:
    """The block-scaled FP8 format the checkpoint declares, or None when it declares none.

    Refuses, by setting, an FP8 format this reader does not decode: another float8 than e4m3, or no
    ``weight_block_size`` (per-tensor or per-channel scales).
    """
    config = quantization_config(hf_config)
    if config is None or config.get("quant_method") != "fp8":
        return None
    fmt = config.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise CheckpointError(f"quantization_config.fmt is {fmt!r}: the bridge reads FP8 weights stored as e4m3 only")
    block = config.get("weight_block_size")
    if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(type(n) is int and n > 0 for n in block)):
        raise CheckpointError(
            f"quantization_config.weight_block_size is {block!r}: the bridge reads FP8 weights with block scales "
            "([rows, columns] of each scale's block, e.g. [128, 128]) only, not per-tensor or per-channel ones"
        )
    return Fp8Format((block[0], block[1]), config)


class Fp8BlockWeight:
    """An FP8 weight ``[R, C]`` and its block scales, as the ``dtype`` tensor they decode to.

    A read decodes only the blocks the rows and columns it asks for lie in, one chunk of block rows at a time.
    """

    def __init__(self, weight, scale_inv, block: tuple[int, int], dtype: torch.dtype = torch.bfloat16):
        self.weight, self.scale_inv, self.block = weight, scale_inv, block
        self.shape = torch.Size(weight.shape)
        self.dtype = dtype

    def __repr__(self) -> str:
        return f"Fp8BlockWeight({getattr(self.weight, 'name', '?')}, {list(self.shape)}, block {list(self.block)}, as {self.dtype})"

    @property
    def nbytes(self) -> int:
        return self.shape.numel() * self.dtype.itemsize

    @property
    def decode_bytes(self) -> int:
        """What reading all of it holds beside the mapped FP8 bytes: the decoded copy and one chunk's temporaries
        (a streamed import counts it in its budget)."""
        return self.nbytes + TEMP_BYTES_PER_ELEMENT * _chunk_elements(self.shape, self.block)

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        if dim not in (0, 1) or start < 0 or start + length > self.shape[dim]:
            raise CheckpointError(f"{self!r}: slice [{start}:{start + length}] of dim {dim} is outside its shape {list(self.shape)}")
        index = [slice(0, self.shape[0]), slice(0, self.shape[1])]
        index[dim] = slice(start, start + length)
        return self._decode(index[0], index[1])

    def select_slice(self, index: tuple[slice, ...]) -> torch.Tensor:
        """A 2-D slice (steps of 1), decoded."""
        rows, cols = (*index, slice(None), slice(None))[:2]
        (r0, r1, rs), (c0, c1, cs) = rows.indices(self.shape[0]), cols.indices(self.shape[1])
        if rs != 1 or cs != 1:
            raise CheckpointError(f"{self!r}: a strided slice is not read block by block")
        return self._decode(slice(r0, max(r0, r1)), slice(c0, max(c0, c1)))

    def stored(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The FP8 bytes and the scales, copied out of the files' maps."""
        return self.weight.narrow(0, 0, self.shape[0]).clone(), self.scale_inv.narrow(0, 0, self.scale_inv.shape[0]).clone()

    def _decode(self, rows: slice, cols: slice) -> torch.Tensor:
        out = torch.empty((rows.stop - rows.start, cols.stop - cols.start), dtype=self.dtype)
        if out.numel() == 0:
            return out
        (br, bc), (total_rows, total_cols) = self.block, self.shape
        first_col, last_col = cols.start // bc * bc, min(-(-cols.stop // bc) * bc, total_cols)
        step = br * _block_rows(br, last_col - first_col)
        last_row = min(-(-rows.stop // br) * br, total_rows)
        for lo in range(rows.start // br * br, rows.stop, step):
            hi = min(lo + step, last_row)
            weight = self.weight.select_slice((slice(lo, hi), slice(first_col, last_col)))
            scales = self.scale_inv.select_slice((slice(lo // br, -(-hi // br)), slice(first_col // bc, -(-last_col // bc))))
            values = dequantize_fp8_blocks(weight, scales, self.block, self.dtype, block_rows_per_chunk=step // br)
            keep_lo, keep_hi = max(lo, rows.start), min(hi, rows.stop)
            out[keep_lo - rows.start : keep_hi - rows.start] = values[
                keep_lo - lo : keep_hi - lo, cols.start - first_col : cols.stop - first_col
            ]
        return out


def _block_rows(block_rows: int, columns: int) -> int:
    """Rows of blocks decoded or encoded at a time: ``CHUNK_ELEMENTS`` worth, at least one."""
    return max(1, CHUNK_ELEMENTS // (block_rows * max(1, columns)))


def _chunk_elements(shape, block: tuple[int, int]) -> int:
    """Elements of the largest chunk a whole-tensor read or encoding of ``shape`` works on."""
    return min(shape[0], block[0] * _block_rows(block[0], shape[1])) * shape[1]


@dataclass(frozen=True)
class Fp8BlockWeights:
    """The FP8 form of every weight stored as float8 with a ``<weight>_scale_inv`` beside it: the weight is presented
    as an ``Fp8BlockWeight`` under its own name, its scales are read by it and vanish from the names.

    Refuses, naming the tensor, an FP8 weight without scales, scales without an FP8 weight, and scales whose
    shape is not one per ``block`` (config.json's ``weight_block_size``) of the weight's shape.
    """

    block: tuple[int, int]
    dtype: torch.dtype = torch.bfloat16

    def expand(self, name: str, base, stored: Mapping[str, object]) -> dict | None:
        # The weight is presented under its own name through its scales' entry: the reader drops the stored name a
        # view expands (the scales'), and the weight's name keeps its own file.
        if not name.endswith(SCALE):
            if base.dtype.itemsize == 1 and base.dtype.is_floating_point and name + SCALE not in stored:
                raise CheckpointError(
                    f"{name} is stored as {str(base.dtype).removeprefix('torch.')} without {name + SCALE} beside it "
                    "(block-scaled FP8 weights need their scales)"
                )
            return None
        weight_name = name.removesuffix(SCALE)
        weight = stored.get(weight_name)
        if weight is None:
            raise CheckpointError(f"{name} has no {weight_name} beside it (FP8 block scales belong to a weight)")
        if weight.dtype != FP8:
            raise CheckpointError(
                f"{name} scales {weight_name}, which is stored as {str(weight.dtype).removeprefix('torch.')}; "
                "the bridge reads block-scaled FP8 weights stored as float8_e4m3fn only"
            )
        if len(weight.shape) != 2:
            raise CheckpointError(f"{weight_name} has shape {list(weight.shape)}; block-scaled FP8 weights are matrices")
        expected = scale_inv_shape(weight.shape, self.block)
        if len(base.shape) != 2 or tuple(base.shape) != expected:
            raise CheckpointError(
                f"{name} has shape {list(base.shape)}, but config.json's quantization_config.weight_block_size "
                f"{list(self.block)} gives {list(expected)} for {weight_name} {list(weight.shape)}"
                f"{_block_hint(weight.shape, base.shape)}"
            )
        if not base.dtype.is_floating_point or base.dtype.itemsize == 1:
            raise CheckpointError(f"{name} is stored as {str(base.dtype).removeprefix('torch.')}; FP8 block scales are floats")
        return {weight_name: Fp8BlockWeight(weight, base, self.block, self.dtype)}


def _block_hint(shape, scale_shape) -> str:
    """``" (the files hold [32, 32] blocks)"`` when a power-of-two block (as released checkpoints use) fits the scales'
    shape in each dimension, else nothing."""
    if len(scale_shape) != 2:
        return ""
    fits = [[2**k for k in range(13) if math.ceil(n / 2**k) == count] for n, count in zip(shape, scale_shape)]
    return f" (the files hold {[f[-1] for f in fits]} blocks)" if all(fits) else ""


def fp8_views(hf_config, dtype: torch.dtype | None = None) -> tuple[Fp8BlockWeights, ...]:
    """The reader view a checkpoint needs for its FP8 weights (none when its config declares none), decoding them
    to ``dtype`` (bfloat16 by default: DeepSeek's reference dequantization rounds its float32 products so)."""
    found = fp8_format(hf_config)
    return () if found is None else (Fp8BlockWeights(found.block, dtype or torch.bfloat16),)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors of one dtype hold the same bytes (a NaN equals itself, -0.0 differs from 0.0)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    view = _INTEGER_VIEW.get(a.dtype.itemsize)
    return torch.equal(a.contiguous().view(view), b.contiguous().view(view)) if view is not None else torch.equal(a, b)


class Fp8BlockEncoding:
    """An export's FP8 form of the weights its source checkpoint stored in FP8: each written as ``X.weight`` float8_e4m3fn
    and ``X.weight_scale_inv``; every other tensor as is.

    Which weights are FP8 comes from the source checkpoint itself (``source``: the folder the model was converted
    from, which must still hold its weights), so the written folder has the source's names and dtypes. A weight
    whose values are exactly what the source's FP8 bytes decode to (in the export's dtype) gets those bytes and
    scales back, so an unmodified import and export reproduces the checkpoint byte for byte whatever rule made its
    scales; a changed one is quantized afresh (scale = block maximum / 448, ``bridge.hf.quantization.fp8_blocks``).
    """

    def __init__(self, source: Path, found: Fp8Format):
        from bridge.hf.reader import SafetensorsReader

        self.config = found.config  # config.json's quantization_config
        self.block = found.block
        self._source = SafetensorsReader(source, [Fp8BlockWeights(found.block)])
        self.quantized = {name for name in self._source.names() if isinstance(self._source.lazy(name), Fp8BlockWeight)}
        if not self.quantized:
            raise ValueError(f"the source checkpoint {source} holds no FP8 weights with block scales: nothing to write in FP8")

    def transformers_load_problem(self) -> str | None:
        """Why transformers cannot load the written folder here, or None.

        Without a GPU transformers (5.x) dequantizes FP8 weights itself, taking each block to be the weight's rows
        (columns) over its scales' rows (columns): a weight with a dimension its block count does not divide (a
        partial last block, e.g. DeepSeek-V3's 576-row ``kv_a_proj_with_mqa`` in 128-row blocks) fails to load, and
        one it divides (48 rows in 32-row blocks) loads with the wrong blocks, which a load report does not show.
        """
        if torch.cuda.is_available():
            return None
        for name in sorted(self.quantized):
            shape = self._source.lazy(name).shape
            counts = scale_inv_shape(shape, self.block)
            if any(n % count for n, count in zip(shape, counts)):
                return (
                    f"{name} {list(shape)} ends in a partial {list(self.block)} block, which transformers' dequantization "
                    "without a GPU cannot read"
                )
        return None

    def meta(self, name: str, tensor) -> list[tuple[str, torch.Tensor]]:
        """What ``encode`` makes of ``tensor`` (shapes and dtypes only)."""
        if name not in self.quantized:
            return [(name, tensor)]
        weight = torch.empty(tensor.shape, dtype=FP8, device="meta")
        return [(name, weight), (name + SCALE, torch.empty(scale_inv_shape(tensor.shape, self.block), dtype=torch.float32, device="meta"))]

    def working_bytes(self, name: str, tensor) -> int:
        """What encoding ``tensor`` holds beside it at most: the values joined into one tensor, the source's FP8 bytes
        (or the new ones), their scales, and the temporaries of one chunk."""
        if name not in self.quantized:
            return 0
        scales = math.prod(scale_inv_shape(tensor.shape, self.block)) * 4
        temporaries = TEMP_BYTES_PER_ELEMENT * _chunk_elements(tensor.shape, self.block)
        return tensor.numel() * tensor.dtype.itemsize + tensor.numel() + scales + temporaries

    def encode(self, name: str, tensor) -> list[tuple[str, torch.Tensor]]:
        if name not in self.quantized:
            return [(name, tensor)]
        values = materialize(tensor)
        if values.shape != self._source.lazy(name).shape:
            raise CheckpointError(
                f"{name}: exported shape {list(values.shape)}, the source's FP8 weight is {list(self._source.lazy(name).shape)}"
            )
        weight, scales = self._source.lazy(name).stored()
        self._source.release()  # copied: the source's map is dropped at once
        if self._decodes_to(weight, scales, values):
            return [(name, weight), (name + SCALE, scales)]
        del weight, scales
        try:
            weight, scales = quantize_fp8_blocks(values, self.block, block_rows_per_chunk=_block_rows(self.block[0], values.shape[1]))
        except ValueError as err:  # non-finite values: say which tensor holds them
            raise ValueError(f"{name}: {err}") from err
        return [(name, weight), (name + SCALE, scales)]

    def _decodes_to(self, weight: torch.Tensor, scales: torch.Tensor, values: torch.Tensor) -> bool:
        """Whether ``weight`` with ``scales`` decodes to exactly ``values`` (in their dtype), compared chunk by chunk."""
        step = self.block[0] * _block_rows(self.block[0], values.shape[1])
        for lo in range(0, values.shape[0], step):
            hi = min(lo + step, values.shape[0])
            part = scales[lo // self.block[0] : -(-hi // self.block[0])]
            decoded = dequantize_fp8_blocks(weight[lo:hi], part, self.block, values.dtype, block_rows_per_chunk=step // self.block[0])
            if not _same_bits(decoded, values[lo:hi]):
                return False
        return True


def fp8_encoding(model_bridge, source: Path | None) -> Fp8BlockEncoding:
    """The FP8 export encoding of a model converted from a block-scaled FP8 checkpoint; refused, saying why, for one
    converted from anything else or whose source folder (which says which weights were FP8) is gone."""
    found = fp8_format(model_bridge.hf_config)
    if found is None:
        raise ValueError(
            f"quantization='fp8' writes back the weights a block-scaled FP8 checkpoint stored in FP8, but this "
            f"{model_bridge.architecture} model's config has no quantization_config with quant_method 'fp8'"
        )
    if source is None or not Path(source).is_dir():
        raise ValueError(
            f"quantization='fp8' needs the FP8 checkpoint the model was converted from (which weights were FP8, and "
            f"their scales), and {source or 'its folder'} is not there; export without quantization to write bf16"
        )
    return Fp8BlockEncoding(Path(source), found)
