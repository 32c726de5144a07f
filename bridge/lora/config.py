"""``LoraConfig``: the adapter settings, checked when made, and their form in peft's ``adapter_config.json``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


class LoraError(ValueError):
    """A LoRA setting, target or adapter folder the bridge cannot use; the message names it."""


# peft settings whose non-default value changes what the adapter computes: refused on import, not ignored.
_PEFT_DEFAULTS: dict[str, Any] = {
    "use_dora": False,
    "use_rslora": False,
    "fan_in_fan_out": False,
    "bias": "none",
    "modules_to_save": None,
    "layers_to_transform": None,
    "rank_pattern": {},
    "alpha_pattern": {},
    "lora_bias": False,
    "trainable_token_indices": None,
    "layer_replication": None,
}


@dataclass(frozen=True)
class LoraConfig:
    """Rank ``r``, ``alpha`` (the update is scaled by ``alpha / r``), dropout on the adapters' input, and the
    target modules by their HF names as peft takes them (``q_proj``, ``o_proj``, ``gate_proj``, ...).

    ``target_parameters``: routed MoE experts, as peft names the stacked expert parameters of transformers 5
    (``experts.gate_up_proj``, ``experts.down_proj``); peft allows no dropout on them.
    ``dtype``: the adapters' dtype (default: the adapted weight's). ``exclude_modules``: peft's, as an imported
    adapter's config gave it (written back on export; the modules adapted are decided by ``targets`` and the
    model, and an adapter's tensors must be exactly those). Raises ``LoraError`` on a bad value.
    """

    r: int
    alpha: float
    targets: tuple[str, ...]
    dropout: float = 0.0
    target_parameters: tuple[str, ...] = ()
    dtype: torch.dtype | None = field(default=None, compare=False)
    exclude_modules: str | tuple[str, ...] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        object.__setattr__(self, "targets", targets)
        parameters = (self.target_parameters,) if isinstance(self.target_parameters, str) else tuple(self.target_parameters or ())
        object.__setattr__(self, "target_parameters", parameters)
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise LoraError(f"LoRA rank r={self.r!r}: it must be a positive integer")
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) or self.alpha <= 0:
            raise LoraError(f"LoRA alpha={self.alpha!r}: it must be a positive number")
        if not 0.0 <= self.dropout < 1.0:
            raise LoraError(f"LoRA dropout={self.dropout!r}: it must be in [0, 1)")
        if not (targets or parameters) or not all(isinstance(t, str) and t for t in (*targets, *parameters)):
            raise LoraError(
                f"LoRA targets={list(targets)!r}, target_parameters={list(parameters)!r}: name at least one module "
                "(e.g. 'q_proj', 'v_proj') or stacked expert parameter (e.g. 'experts.gate_up_proj')"
            )
        for kind, names in (("targets", targets), ("target_parameters", parameters)):
            twice = sorted({name for name in names if names.count(name) > 1})
            if twice:
                raise LoraError(f"LoRA {kind}={list(names)!r}: {', '.join(map(repr, twice))} given twice")
        if parameters and self.dropout:
            raise LoraError(f"LoRA dropout={self.dropout!r} with target_parameters: peft allows no dropout on stacked expert parameters")

    @property
    def scale(self) -> float:
        """What ``B·A`` is multiplied by: ``alpha / r``, as peft does without rsLoRA."""
        return self.alpha / self.r

    def peft_config(self, base_model_name_or_path: str, exclude_modules: str | None = None) -> dict[str, Any]:
        """The ``adapter_config.json`` peft writes for this adapter (a causal-LM LoRA); ``exclude_modules`` when the
        config has none (the model bridge's ``peft_exclude_modules``)."""
        excluded = self.exclude_modules if self.exclude_modules is not None else exclude_modules
        return {
            "base_model_name_or_path": base_model_name_or_path,
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": sorted(self.targets),
            "target_parameters": list(self.target_parameters) or None,
            "inference_mode": True,
            "init_lora_weights": True,
            **_PEFT_DEFAULTS,
            "exclude_modules": list(excluded) if isinstance(excluded, tuple) else excluded,
        }

    @classmethod
    def from_peft_config(cls, doc: dict[str, Any], source: str, dtype: torch.dtype | None = None) -> "LoraConfig":
        """The config of a peft ``adapter_config.json`` (``source`` names it in errors); refuses what it cannot reproduce."""
        if doc.get("peft_type") != "LORA":
            raise LoraError(f"{source}: peft_type is {doc.get('peft_type')!r}; only LORA adapters can be loaded")
        for key, default in _PEFT_DEFAULTS.items():
            value = doc.get(key, default)
            if value not in (default, None, [], {}):
                raise LoraError(f"{source}: {key}={value!r} is not supported (only {key}={default!r})")
        targets = doc.get("target_modules")
        if isinstance(targets, str):
            raise LoraError(f"{source}: target_modules={targets!r} is a regular expression; only a list of module names is supported")
        if doc.get("r") is None or doc.get("lora_alpha") is None:
            raise LoraError(f"{source}: r and lora_alpha must both be given")
        excluded = doc.get("exclude_modules")
        return cls(
            r=doc["r"],
            alpha=doc["lora_alpha"],
            targets=tuple(targets or ()),
            dropout=doc.get("lora_dropout", 0.0),
            target_parameters=tuple(doc.get("target_parameters") or ()),
            dtype=dtype,
            exclude_modules=tuple(excluded) if isinstance(excluded, list) else excluded,
        )
