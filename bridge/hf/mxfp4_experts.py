"""MXFP4 expert weights: read as the bf16 tensors they stand for, and written back on request.

gpt-oss's released checkpoints store each stacked expert weight ``W`` (``[E, out, in]``, ``nn.Linear``
orientation) as ``<name>_blocks`` ``[E, out, in/32, 16]`` and ``<name>_scales`` ``[E, out, in/32]``
(``bridge.hf.quantization.mxfp4``), while the bf16 checkpoints hold ``<name>`` ``[E, in, out]``.
``Mxfp4Experts``, a reader view like those of ``bridge.mappings.hf_views``, presents expert ``e`` under
the bf16 checkpoint's slice name ``<name>[e]``, ``[in, out]``, so one mapping table reads both; a read
decodes only the 32-value groups the slice asked for touches, in bfloat16, which holds every MXFP4
value exactly. ``Mxfp4Encoding`` writes them back in that form on export.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

from bridge.hf.folder import CheckpointError
from bridge.hf.quantization.mxfp4 import GROUP, dequantize_mxfp4, quantize_mxfp4
from bridge.mappings import materialize
from bridge.mappings.hf_views import stacked_slice_name

BLOCKS, SCALES = "_blocks", "_scales"
# Groups a read decodes, or an encoding quantizes, at a time: the temporaries stay a few MiB whatever the tensor.
GROUPS_PER_STEP = 1 << 12
# Those temporaries at most: six float32 values per element (encoding; decoding's int64 nibble indices take less).
GROUP_STEP_BYTES = 6 * GROUPS_PER_STEP * GROUP * 4


class Mxfp4ExpertSlice:
    """Expert ``expert`` of an MXFP4 stacked weight, as the ``[in, out]`` bf16 tensor of the unquantized checkpoint."""

    def __init__(self, blocks, scales, expert: int):
        self.blocks, self.scales, self.expert = blocks, scales, expert
        out_features, groups = scales.shape[1], scales.shape[2]
        self.shape = torch.Size([groups * GROUP, out_features])
        self.dtype = torch.bfloat16

    @property
    def nbytes(self) -> int:
        return self.shape.numel() * self.dtype.itemsize

    @property
    def decode_bytes(self) -> int:
        """What reading all of it holds beside the mapped blocks: the decoded copy and one step of groups' temporaries
        (a streamed import counts it in its budget)."""
        return self.nbytes + GROUP_STEP_BYTES

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        e = slice(self.expert, self.expert + 1)
        if dim == 1:  # output features: rows of W, whole groups
            rows = slice(start, start + length)
            weight = self._decode((e, rows), slice(None))
            return weight.T
        first, last = start // GROUP, -(-(start + length) // GROUP)  # input features: the groups that hold them
        weight = self._decode((e, slice(None)), slice(first, last))
        offset = start - first * GROUP
        return weight[:, offset : offset + length].T

    def _decode(self, index: tuple[slice, slice], groups: slice) -> torch.Tensor:
        blocks = self.blocks.select_slice((*index, groups, slice(None)))[0]
        scales = self.scales.select_slice((*index, groups))[0]
        return dequantize_mxfp4(blocks, scales, self.dtype, GROUPS_PER_STEP)


@dataclass(frozen=True)
class Mxfp4Experts:
    """The MXFP4 form of the stacked expert weight ``stacked`` (a pattern, ``*`` for the layer): its ``_blocks`` are
    presented as the slices ``stacked[e]``, its ``_scales`` are read by them and vanish from the names."""

    stacked: str

    def expand(self, name: str, base, stored: Mapping[str, object]) -> dict | None:
        pattern = re.escape(self.stacked).replace(r"\*", r"(\d+)")
        match = re.fullmatch(f"({pattern})({BLOCKS}|{SCALES})", name)
        if match is None:
            return None
        if match.group(match.lastindex) == SCALES:
            return {}  # read through the blocks' slices
        stacked = match.group(1)
        scales = stored.get(stacked + SCALES)
        if scales is None:
            raise CheckpointError(f"{name} has no {stacked + SCALES} beside it (MXFP4 weights are blocks and scales)")
        if len(base.shape) != 4 or base.shape[3] != GROUP // 2 or tuple(scales.shape) != tuple(base.shape[:3]):
            raise CheckpointError(
                f"{name} {list(base.shape)} and {stacked + SCALES} {list(scales.shape)} are not MXFP4 blocks "
                "[experts, out, groups, 16] and scales [experts, out, groups]"
            )
        return {stacked_slice_name(stacked, e): Mxfp4ExpertSlice(base, scales, e) for e in range(base.shape[0])}


class Mxfp4Encoding:
    """An export's MXFP4 form of the expert weights its model's ``Mxfp4Experts`` views name: each slice ``X[e]``
    (``[in, out]``) written as ``X_blocks[e]`` and ``X_scales[e]`` of its transpose; every other tensor as is.

    A slice whose values are those of the source checkpoint's MXFP4 slice gets the source's bytes back
    (``source``: the folder the model was converted from, when it still holds its weights), so an
    unmodified import and export reproduces the released blocks and scales byte for byte, whatever rule
    quantized them; a changed one (or one with no source) is quantized afresh (canonical scales:
    ``bridge.hf.quantization.mxfp4``).
    """

    def __init__(self, views: list[Mxfp4Experts], config: dict, source: Path | None = None):
        self.config = config  # config.json's quantization_config
        self.views = views
        self.patterns = [re.compile(re.escape(view.stacked).replace(r"\*", r"\d+") + r"\[(\d+)\]") for view in views]
        self.source_folder = source
        self._source = None

    def _original(self, name: str):
        """The source checkpoint's MXFP4 slice ``name``, if there is one (the source is opened at the first ask)."""
        if self._source is None and self.source_folder is not None:
            from bridge.hf.folder import weight_files
            from bridge.hf.reader import SafetensorsReader

            if weight_files(self.source_folder):
                self._source = SafetensorsReader(self.source_folder, self.views)
            self.source_folder = None
        original = self._source.lazy(name) if self._source is not None and name in self._source else None
        return original if isinstance(original, Mxfp4ExpertSlice) else None

    def _split(self, name: str) -> tuple[str, int] | None:
        for pattern in self.patterns:
            match = pattern.fullmatch(name)
            if match is not None:
                return name[: match.start(1) - 1], int(match.group(1))
        return None

    def meta(self, name: str, tensor) -> list[tuple[str, torch.Tensor]]:
        """What ``encode`` makes of ``tensor`` (shapes and dtypes only)."""
        split = self._split(name)
        if split is None:
            return [(name, tensor)]
        stacked, e = split
        in_features, out_features = tensor.shape
        blocks = torch.empty((out_features, in_features // GROUP, GROUP // 2), dtype=torch.uint8, device="meta")
        return [(stacked_slice_name(stacked + BLOCKS, e), blocks), (stacked_slice_name(stacked + SCALES, e), blocks[..., 0])]

    def working_bytes(self, name: str, tensor) -> int:
        """What encoding ``tensor`` holds beside it at most: its transpose made contiguous, the source's
        values decoded, the output, and the float32 temporaries of one step of groups."""
        if self._split(name) is None:
            return 0
        return 2 * tensor.numel() * tensor.dtype.itemsize + tensor.numel() * 2 + GROUP_STEP_BYTES

    def encode(self, name: str, tensor) -> list[tuple[str, torch.Tensor]]:
        split = self._split(name)
        if split is None:
            return [(name, tensor)]
        stacked, e = split
        weight = materialize(tensor).T
        original = self._original(name)
        if original is not None:  # read (copied: a few bytes per value) and the source's map dropped at once
            index = (slice(e, e + 1),)
            blocks, scales = original.blocks.select_slice(index)[0].clone(), original.scales.select_slice(index)[0].clone()
            self._source.release()
            if torch.equal(dequantize_mxfp4(blocks, scales, weight.dtype, GROUPS_PER_STEP), weight):
                return [(stacked_slice_name(stacked + BLOCKS, e), blocks), (stacked_slice_name(stacked + SCALES, e), scales)]
        blocks, scales = quantize_mxfp4(weight, groups_per_chunk=GROUPS_PER_STEP)
        return [(stacked_slice_name(stacked + BLOCKS, e), blocks), (stacked_slice_name(stacked + SCALES, e), scales)]


def mxfp4_encoding(model_bridge, source: Path | None = None) -> Mxfp4Encoding:
    """The MXFP4 export encoding of ``model_bridge``'s quantizable weights; refused for a family that has none.

    Its ``quantization_config`` is the source checkpoint's when that one is MXFP4, else the family's
    (``mxfp4_modules_to_not_convert``: what stays unquantized).
    """
    views = [view for view in model_bridge.hf_views if isinstance(view, Mxfp4Experts)]
    if not views:
        raise ValueError(f"{model_bridge.architecture} has no weights stored in MXFP4; export it without quantization")
    config = getattr(model_bridge.hf_config, "quantization_config", None)
    config = config.to_dict() if hasattr(config, "to_dict") else config
    if not (isinstance(config, dict) and config.get("quant_method") == "mxfp4"):
        config = {"quant_method": "mxfp4", "modules_to_not_convert": list(model_bridge.mxfp4_modules_to_not_convert)}
    return Mxfp4Encoding(views, config, source)
