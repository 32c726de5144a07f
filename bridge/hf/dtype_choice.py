"""The dtype of the Megatron parameters: the dtypes stored in the HF files are the truth.

A config's ``dtype`` is a hint that checkpoints often contradict (fp16 weights under a config saying
bfloat16, one fp32 norm in a bf16 checkpoint). Casting to it would round weights without a word, and
the export would write the stored dtypes back with changed values. So by default the parameters get
the narrowest dtype Megatron-Core trains in that holds every stored weight exactly; a cast that rounds
happens only when the caller asks for a dtype, and is then recorded (``bridge.json``'s ``dtype_cast``)
so that the export can say its roundtrip is no longer exact.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Mapping

import torch

from bridge.hf.folder import CheckpointError
from bridge.hf.metadata import dtype_name

logger = logging.getLogger(__name__)

# The dtypes Megatron-Core keeps parameters in, narrowest first (bf16 before fp16 where both hold the weights).
PARAM_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def holds_exactly(target: torch.dtype, stored: torch.dtype) -> bool:
    """Whether every value of ``stored`` (its range, precision and subnormals) is a value of ``target``."""
    if target == stored:
        return True
    if not (target.is_floating_point and stored.is_floating_point):
        return False
    t, s = torch.finfo(target), torch.finfo(stored)
    return t.eps <= s.eps and t.max >= s.max and t.smallest_normal * t.eps <= s.smallest_normal * s.eps


@dataclass(frozen=True)
class DtypeChoice:
    """The parameters' dtype, and what it does to the stored weights."""

    params: torch.dtype
    stored: Mapping[str, torch.dtype]  # HF weight → its dtype on disk
    config: torch.dtype | None  # the config's ``dtype``, if it names one
    requested: bool  # the caller asked for ``params``

    @property
    def rounded(self) -> dict[str, torch.dtype]:
        """The stored weights that ``params`` cannot hold exactly (non-empty only for a requested dtype)."""
        return {name: dtype for name, dtype in self.stored.items() if not holds_exactly(self.params, dtype)}

    def stored_text(self) -> str:
        """``"38 bfloat16 and 1 float32 tensors"``."""
        return _listing(_counts(self.stored)) + " tensors" if self.stored else "no weights"

    def cast_record(self) -> dict | None:
        """``bridge.json``'s ``dtype_cast``: the rounding cast asked for, or None when the import kept every bit."""
        rounded = self.rounded
        if not rounded:
            return None
        return {"to": dtype_name(self.params), "rounded": len(rounded), "from": _counts(rounded), "example": min(rounded)}

    def notes(self) -> list[str]:
        """What the user should know, one line each: a config/file disagreement, a cast that rounds."""
        if self.requested:
            rounded = self.rounded
            if not rounded:
                return []
            return [
                f"dtype {dtype_name(self.params)} (asked for) does not hold every value of {_listing(_counts(rounded))} stored "
                f"weight(s), e.g. {min(rounded)}: the cast may round them, and exporting this checkpoint may not give them back"
            ]
        kinds = _counts(self.stored)
        if list(kinds) == [dtype_name(self.params)] and self.config in (None, self.params):
            return []
        said = "" if self.config is None else f"config.json says dtype {dtype_name(self.config)}; "
        mixed = "" if len(kinds) == 1 else f" (e.g. {_rarest(self.stored)})"
        cast = "" if self.config in (None, self.params) else f" (ask for dtype {dtype_name(self.config)}, --dtype in hfmb, to cast)"
        return [
            f"{said}the weights are stored as {self.stored_text()}{mixed}: the parameters are {dtype_name(self.params)}, "
            f"which holds every stored value exactly{cast}"
        ]


def choose_param_dtype(stored: Mapping[str, torch.dtype], config: torch.dtype | None, requested: torch.dtype | None) -> DtypeChoice:
    """``requested`` if given; else the config's dtype where it holds every stored weight exactly, else the narrowest that does.

    Raises ``CheckpointError`` naming a weight no Megatron-Core parameter dtype holds (float64), so that
    nothing is rounded unasked.
    """
    if requested is not None:
        return DtypeChoice(requested, dict(stored), config, requested=True)
    kinds = set(stored.values())
    fits = [d for d in PARAM_DTYPES if all(holds_exactly(d, kind) for kind in kinds)]
    if not fits:
        name = next(n for n, d in stored.items() if not holds_exactly(torch.float32, d))
        raise CheckpointError(
            f"weight {name} is stored as {dtype_name(stored[name])}, which no Megatron-Core parameter dtype holds exactly: "
            "ask for a dtype (hfmb --dtype float32, or dtype=torch.float32) to cast it"
        )
    params = config if config in fits else fits[0]
    choice = DtypeChoice(params, dict(stored), config, requested=False)
    for note in choice.notes():
        logger.warning(note)
    return choice


def _counts(dtypes: Mapping[str, torch.dtype]) -> dict[str, int]:
    counts = Counter(dtype_name(d) for d in dtypes.values())
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def _listing(counts: Mapping[str, int]) -> str:
    """``{"bfloat16": 38, "float32": 1}`` → ``"38 bfloat16 and 1 float32"``."""
    return " and ".join(f"{count} {name}" for name, count in counts.items())


def _rarest(stored: Mapping[str, torch.dtype]) -> str:
    """One weight of the least common dtype, in words: where a mixed checkpoint differs from most of it."""
    counts = Counter(stored.values())
    rare = min(counts, key=lambda d: (counts[d], dtype_name(d)))
    return f"{min(n for n, d in stored.items() if d == rare)} is {dtype_name(rare)}"


def export_rounding(import_cast: Mapping | None, source_dtypes: Mapping[str, torch.dtype], export_dtype: torch.dtype | None) -> list[str]:
    """Why an export does not give back the original weights bit for bit, one line each (empty: nothing rounded them).

    ``import_cast`` is ``bridge.json``'s ``dtype_cast``; ``source_dtypes`` the original HF dtypes.
    """
    reasons = []
    if import_cast:
        reasons.append(
            f"the import cast {_listing(import_cast['from'])} weight(s) to {import_cast['to']} (asked for), which does not hold "
            f"all their values, e.g. {import_cast['example']}"
        )
    if export_dtype is not None:
        rounded = {name: dtype for name, dtype in source_dtypes.items() if not holds_exactly(export_dtype, dtype)}
        if rounded:
            reasons.append(
                f"--dtype {dtype_name(export_dtype)} does not hold all the values of {_listing(_counts(rounded))} weight(s) of "
                f"the original, e.g. {min(rounded)}"
            )
    return reasons
