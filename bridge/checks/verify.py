"""Checks a person can trust: HF folders compared tensor by tensor, an HF folder's transformers load
report, and Megatron-Core's forward compared with transformers' on the same tokens.

transformers only *warns* about missing or unexpected keys when it loads a folder (the weights are
then randomly initialised or dropped), so ``check_loads_in_transformers`` asserts that its load
report is empty. ``ParityReport`` holds per-layer hidden-state differences, logits differences,
top-1 / top-5 agreement and KL(p_hf ‖ p_megatron), and says which thresholds it misses.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from bridge.hf.folder import CheckpointError
from bridge.hf.reader import SafetensorsReader

logger = logging.getLogger(__name__)


class ExportCheckError(ValueError):
    """A finished export is not what it claims to be (the target was left untouched)."""


def load_hf_tensors(folder: str | Path) -> dict[str, torch.Tensor]:
    reader = SafetensorsReader(Path(folder))
    return {name: reader.lazy(name).narrow(0, 0, reader.lazy(name).shape[0]) for name in reader.names()}


def compare_tensors(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor]) -> list[str]:
    """Every difference in names, dtypes, shapes or bytes; empty when identical.

    Bytes, not values: ``torch.equal`` says that a NaN differs from itself and that +0.0 equals
    -0.0, so two identical folders holding a NaN would differ and a sign flip would pass.
    """
    problems = [f"missing {n}" for n in sorted(set(expected) - set(actual))]
    problems += [f"extra {n}" for n in sorted(set(actual) - set(expected))]
    for name in sorted(set(expected) & set(actual)):
        a, b = expected[name], actual[name]
        if a.dtype != b.dtype or a.shape != b.shape:
            problems.append(f"{name}: {a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}")
        elif not torch.equal(_element_bytes(a), _element_bytes(b)):
            problems.append(f"{name}: {_describe_difference(a, b)}")
    return problems


def _element_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``'s bytes as ``[elements, itemsize]`` uint8, so that comparing them compares bit patterns."""
    return tensor.contiguous().reshape(-1).view(torch.uint8).view(-1, tensor.element_size())


def _describe_difference(a: torch.Tensor, b: torch.Tensor) -> str:
    """How two tensors of one dtype and shape whose bytes differ differ, in numbers where numbers tell it."""
    differ = (_element_bytes(a) != _element_bytes(b)).any(-1)
    if a.is_complex():
        return f"values differ ({int(differ.sum())} of {a.numel()} elements)"
    x, y = a.reshape(-1)[differ].double(), b.reshape(-1)[differ].double()
    diff = (x - y).abs()
    numeric = diff[~diff.isnan()]
    details = []
    if numeric.numel() and numeric.max().item() > 0:
        details.append(f"max abs diff {numeric.max().item():.3g}")
    if lonely_nans := int((x.isnan() != y.isnan()).sum()):
        details.append(f"NaN on one side only in {lonely_nans} elements")
    if not details:
        details.append(f"{int(differ.sum())} elements equal as numbers but not in their bits: +0.0 vs -0.0 or NaN payloads")
    return f"values differ ({', '.join(details)})"


def compare_hf_folders(expected: str | Path, actual: str | Path) -> list[str]:
    return compare_tensors(load_hf_tensors(expected), load_hf_tensors(actual))


# ---------------------------------------------------------------- transformers load check


def transformers_load_report(folder: str | Path) -> dict[str, list[str]]:
    """transformers' load report for ``folder``: missing, unexpected, mismatched keys and errors (each a list).

    A shape mismatch makes transformers raise without naming the tensor; the load is then repeated
    with ``ignore_mismatched_sizes`` so that the report names it. Other failures are ``load_error``.
    """
    from transformers import AutoModelForCausalLM

    try:
        try:
            _, info = AutoModelForCausalLM.from_pretrained(str(folder), output_loading_info=True)
        except RuntimeError as err:
            if "ignore_mismatched_sizes" not in str(err):
                raise
            _, info = AutoModelForCausalLM.from_pretrained(str(folder), output_loading_info=True, ignore_mismatched_sizes=True)
            if not info.get("mismatched_keys"):
                raise
    except (RuntimeError, ValueError, OSError) as err:
        return {"load_error": [f"{type(err).__name__}: {err}"]}
    return {key: sorted(str(item) for item in value) for key, value in info.items()}


def check_loads_in_transformers(folder: str | Path, not_in_transformers: Sequence[str] = ()) -> None:
    """Raise ``ExportCheckError`` unless transformers loads ``folder`` with an empty load report.

    ``not_in_transformers``: patterns of the tensors transformers' model has no place for
    (multi-token-prediction layers, which it drops from the released checkpoints too; it may name them in
    its own fused form): unexpected, as they should be.
    """
    report = transformers_load_report(folder)
    if "unexpected_keys" in report:
        expected = [re.compile(pattern) for pattern in not_in_transformers]
        report["unexpected_keys"] = [key for key in report["unexpected_keys"] if not any(p.fullmatch(key) for p in expected)]
    problems = {key: value for key, value in report.items() if value}
    if problems:
        details = "; ".join(
            f"{key}: {', '.join(value[:10])}" + (f" and {len(value) - 10} more" if len(value) > 10 else "")
            for key, value in problems.items()
        )
        raise ExportCheckError(f"transformers does not load {folder} cleanly: {details}")
    logger.info("transformers loads %s with no missing, unexpected or mismatched keys", folder)


# ---------------------------------------------------------------- forward parity


@dataclass
class Thresholds:
    """Where ``verify`` fails. Defaults are for an fp32 forward of a correct conversion."""

    max_logits_diff: float = 1e-4
    min_top1: float = 1.0  # fraction of positions whose argmax agrees
    max_kl: float = 1e-6  # per-token KL(p_hf ‖ p_megatron), the largest
    min_top5: float | None = None  # fraction of positions with the same top-5 set; None: reported only
    max_hidden_diff: float | None = None  # per-layer max abs diff; None: reported only


@dataclass
class LayerDiff:
    layer: int
    max_abs: float
    mean_abs: float
    scale: float  # max |hidden| on the transformers side


@dataclass
class ParityReport:
    tokens: tuple[int, int]
    layers: list[LayerDiff] = field(default_factory=list)
    missing_layers: list[int] = field(default_factory=list)
    logits_max_diff: float = math.nan
    logits_mean_diff: float = math.nan
    top1: float = math.nan
    top5: float = math.nan
    kl_mean: float = math.nan
    kl_max: float = math.nan

    def checks(self, t: Thresholds) -> list[tuple[str, str, str, bool | None]]:
        """(metric, value, threshold, passed or None when reported only) rows."""
        worst_hidden = max((layer.max_abs for layer in self.layers), default=math.nan)
        rows: list[tuple[str, str, str, bool | None]] = [
            (
                "logits max abs diff",
                f"{self.logits_max_diff:.3e}",
                f"<= {t.max_logits_diff:.1e}",
                _le(self.logits_max_diff, t.max_logits_diff),
            ),
            ("logits mean abs diff", f"{self.logits_mean_diff:.3e}", "", None),
            ("top-1 agreement", f"{100 * self.top1:.2f}%", f">= {100 * t.min_top1:.2f}%", _ge(self.top1, t.min_top1)),
            (
                "top-5 agreement (same set)",
                f"{100 * self.top5:.2f}%",
                "" if t.min_top5 is None else f">= {100 * t.min_top5:.2f}%",
                None if t.min_top5 is None else _ge(self.top5, t.min_top5),
            ),
            ("KL(hf || megatron) mean", f"{self.kl_mean:.3e}", "", None),
            ("KL(hf || megatron) max", f"{self.kl_max:.3e}", f"<= {t.max_kl:.1e}", _le(self.kl_max, t.max_kl)),
            (
                "hidden states max abs diff",
                f"{worst_hidden:.3e}",
                "" if t.max_hidden_diff is None else f"<= {t.max_hidden_diff:.1e}",
                None if t.max_hidden_diff is None else _le(worst_hidden, t.max_hidden_diff),
            ),
        ]
        return rows

    def failures(self, t: Thresholds) -> list[str]:
        failed = [f"{name} {value} (threshold {limit})" for name, value, limit, ok in self.checks(t) if ok is False]
        if self.missing_layers:
            failed.append(f"no hidden states from layers {self.missing_layers}")
        return failed

    def format(self, t: Thresholds) -> str:
        lines = [f"{'layer':>5}  {'max abs diff':>12}  {'mean abs diff':>13}  {'max |hidden|':>12}"]
        for layer in self.layers:
            lines.append(f"{layer.layer:>5}  {layer.max_abs:>12.3e}  {layer.mean_abs:>13.3e}  {layer.scale:>12.4g}")
        first_bad = next(
            (layer.layer for layer in self.layers if t.max_hidden_diff is not None and layer.max_abs > t.max_hidden_diff), None
        )
        if first_bad is not None:
            lines.append(f"first layer past the hidden-state threshold: {first_bad}")
        lines.append("")
        lines.append(f"{'metric':<28}  {'value':>12}  {'threshold':>12}  result")
        for name, value, limit, ok in self.checks(t):
            verdict = "-" if ok is None else ("ok" if ok else "FAIL")
            lines.append(f"{name:<28}  {value:>12}  {limit:>12}  {verdict}")
        return "\n".join(lines)


def _le(value: float, limit: float) -> bool:
    return not math.isnan(value) and value <= limit


def _ge(value: float, limit: float) -> bool:
    return not math.isnan(value) and value >= limit


def compare_outputs(
    hf_logits: torch.Tensor,
    megatron_logits: torch.Tensor,
    hf_hidden: dict[int, torch.Tensor],
    megatron_hidden: dict[int, torch.Tensor],
) -> ParityReport:
    """Compare logits ``[batch, seq, vocab]`` and per-layer hidden states ``{layer: [batch, seq, hidden]}``."""
    if hf_logits.shape != megatron_logits.shape:
        raise ValueError(f"logits shapes differ: transformers {list(hf_logits.shape)}, Megatron {list(megatron_logits.shape)}")
    report = ParityReport(tokens=tuple(hf_logits.shape[:2]))
    for layer in sorted(hf_hidden):
        if layer not in megatron_hidden:
            report.missing_layers.append(layer)
            continue
        ref, ours = hf_hidden[layer].double(), megatron_hidden[layer].double()
        diff = (ours - ref).abs()
        report.layers.append(LayerDiff(layer, diff.max().item(), diff.mean().item(), ref.abs().max().item()))
    ref, ours = hf_logits.double(), megatron_logits.double()
    diff = (ours - ref).abs()
    report.logits_max_diff, report.logits_mean_diff = diff.max().item(), diff.mean().item()
    report.top1 = (ref.argmax(-1) == ours.argmax(-1)).double().mean().item()
    k = min(5, ref.shape[-1])
    same_top5 = (ref.topk(k, dim=-1).indices.sort(-1).values == ours.topk(k, dim=-1).indices.sort(-1).values).all(-1)
    report.top5 = same_top5.double().mean().item()
    log_p, log_q = torch.log_softmax(ref, -1), torch.log_softmax(ours, -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    report.kl_mean, report.kl_max = kl.mean().item(), kl.max().item()
    return report


def _layer_output(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _decoder_layers(hf_model: torch.nn.Module) -> torch.nn.ModuleList:
    decoder = hf_model.get_decoder() if hasattr(hf_model, "get_decoder") else getattr(hf_model, "model")
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise TypeError(f"cannot find the decoder layers of {type(hf_model).__name__}")
    return layers


@torch.no_grad()
def hf_reference(folder: str | Path, tokens: torch.Tensor) -> tuple[torch.Tensor, dict[int, torch.Tensor], dict[str, list[str]]]:
    """transformers' fp32 logits, each decoder layer's output ``[batch, seq, hidden]``, and the load report."""
    model, report = _reference_model(folder)
    return (*_outputs(model, tokens), report)


def peft_reference(base: str | Path, adapter: str | Path, tokens: torch.Tensor) -> tuple[torch.Tensor, dict[int, torch.Tensor], dict]:
    """``hf_reference`` of the transformers model ``base`` with the PEFT adapter folder ``adapter`` on it (``peft``)."""
    from peft import PeftModel

    model, report = _reference_model(base)
    return (*_outputs(PeftModel.from_pretrained(model, str(adapter)).eval(), tokens, layers=model), report)


def _reference_model(folder: str | Path) -> tuple[torch.nn.Module, dict[str, list[str]]]:
    """transformers' fp32 model of ``folder`` (eval mode) and its load report."""
    from transformers import AutoModelForCausalLM

    try:
        model, info = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, output_loading_info=True)
    except RuntimeError as err:
        raise CheckpointError(f"transformers cannot load the reference {folder}: {err}") from err
    return model.eval(), {key: sorted(str(item) for item in value) for key, value in info.items()}


@torch.no_grad()
def _outputs(model, tokens: torch.Tensor, layers=None) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """``model``'s fp32 logits and the output of each decoder layer of ``layers`` (default: the model's own)."""
    hidden: dict[int, torch.Tensor] = {}
    handles = [
        layer.register_forward_hook(lambda module, args, output, i=i: hidden.__setitem__(i, _layer_output(output).detach().float().clone()))
        for i, layer in enumerate(_decoder_layers(layers if layers is not None else model))
    ]
    try:
        logits = model(tokens).logits.float()
    finally:
        for handle in handles:
            handle.remove()
    return logits, hidden


@torch.no_grad()
def megatron_outputs(model, tokens: torch.Tensor, vocab_size: int) -> tuple[torch.Tensor | None, dict[int, torch.Tensor]]:
    """Megatron's logits and every decoder layer's output, gathered to global rank 0 (None elsewhere). All ranks call.

    Layer outputs come from forward hooks on ``chunk.decoder.layers[i]`` (``[seq, batch, hidden]``,
    gathered over TP when sequence parallelism splits them), numbered over the whole model.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

    from bridge.checks.forward import megatron_logits
    from bridge.megatron.chunks import unwrap_chunks

    speaker = parallel_state.get_tensor_model_parallel_rank() == 0 and parallel_state.get_data_parallel_rank() == 0
    hidden: dict[int, torch.Tensor] = {}

    def hook(layer_index: int, sequence_parallel: bool):
        def record(module, args, output):
            out = _layer_output(output)
            if sequence_parallel:
                out = gather_from_sequence_parallel_region(out, tensor_parallel_output_grad=False)
            if speaker:
                hidden[layer_index] = out.detach().transpose(0, 1).float().cpu().clone()

        return record

    handles = []
    for chunk in unwrap_chunks(model):
        for layer in chunk.decoder.layers:
            handles.append(layer.register_forward_hook(hook(layer.layer_number - 1, bool(chunk.config.sequence_parallel))))
    try:
        logits = megatron_logits(model, tokens, vocab_size)
    finally:
        for handle in handles:
            handle.remove()
    payload = (logits.cpu() if logits is not None and speaker else None, hidden)
    gathered: list | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(payload, gathered, dst=0)
    if dist.get_rank() != 0:
        return None, {}
    all_logits = next((item[0] for item in gathered if item[0] is not None), None)
    all_hidden: dict[int, torch.Tensor] = {}
    for _, layers in gathered:
        all_hidden.update(layers)
    return all_logits, all_hidden
