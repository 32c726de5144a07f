"""``hfmb plan``: how an HF checkpoint maps onto Megatron-Core at some parallel sizes, with no weights moved."""

from __future__ import annotations

import argparse
import os

from bridge.cli.common import CHECK_FAILED, OK, add_parallel_args, parallel_sizes, report, report_nonfinite

SUMMARY = "show how an HF checkpoint maps onto Megatron-Core at these parallel sizes (no weights move)"
EXAMPLES = """examples:
  hfmb plan meta-llama/Llama-3.2-1B --tp 2 --pp 2
  hfmb plan ./my-hf-model                     # TP=PP=1
No weights move and no rank starts: one process builds the model once on the meta device and derives
every rank's parameters from it. Prints the architecture, the derived Megatron config and every HF
tensor → Megatron parameter with its mapping kind, shapes and ranks (of the world --nproc names, by
default the smallest the sizes need), and warns of NaN/Inf values (each tensor is read once,
streaming, to count them). Exits 1 on missing, unused, wrongly shaped, non-float or unmapped tensors."""


def add_parser(commands, command) -> None:
    plan = command("plan", SUMMARY, EXAMPLES)
    plan.add_argument("hf", help="HF checkpoint folder or Hub repo id")
    add_parallel_args(plan)


def run(args: argparse.Namespace) -> int:
    from bridge.conversion_plan import plan_conversion
    from bridge.conversions import sizes_text

    plan = plan_conversion(args.hf, sizes=parallel_sizes(args), world_size=None if "RANK" in os.environ else args.nproc)
    if plan is None:  # not rank 0
        return OK
    report(_describe_model(plan, sizes_text))
    for note in plan.bridge.dtype_choice.notes():
        report(f"NOTE: {note}")
    if plan.mapping_error:
        report(f"\nPLAN FAILED: {plan.mapping_error}")
        return CHECK_FAILED
    rows = [
        (
            row.hf_name,
            _shape(row.hf_shape),
            row.megatron_name,
            row.kind,
            f"{_shape(row.local_shape)} {'' if row.tp_split is None else '(tp-split)' if row.tp_split else '(replicated)'}".rstrip(),
            f"{row.stage} ranks {_ranges(row.ranks)}",
            "MISSING" if row.hf_shape is None else f"SHAPE (needs {list(row.needed_shape)})" if row.needed_shape else "",
        )
        for row in plan.rows
    ]
    report("")
    report(_table(("HF tensor", "HF shape", "Megatron parameter", "kind", "shape per rank", "held by", ""), rows))
    if plan.match.ignored:
        report(f"\nignored (not weights): {', '.join(sorted(plan.match.ignored))}")
    if plan.match.carried:
        carried = sorted(plan.match.carried)
        report(
            f"\ncarried unchanged into exports, not converted (multi-token-prediction layers, a vision tower): {len(carried)} tensors, "
            f"{carried[0]} … {carried[-1]}"
        )
    report_nonfinite(plan.nonfinite)
    problems = plan.problems()
    if problems:
        report("\nPLAN FAILED:\n  " + "\n  ".join(problems))
        return CHECK_FAILED
    on_disk = len(plan.bridge.reader.shapes()) - len(plan.match.ignored) - len(plan.match.carried)
    report(f"\nplan OK: {on_disk} HF tensors → {plan.parameters} Megatron parameters on {plan.world_size} rank(s)")
    return OK


def _describe_model(plan, sizes_text) -> str:
    bridge, config, sizes = plan.bridge, plan.model_config, plan.sizes
    kwargs = bridge.model_bridge.transformer_config_kwargs()
    lines = [
        f"architecture: {bridge.model_bridge.architecture} ({type(bridge.model_bridge).__name__}), "
        f"model_type {bridge.hf_config.model_type}",
        f"source: {bridge.hf_folder}",
        f"parallel: {sizes_text(sizes)} on {plan.world_size} rank(s) (dp={plan.world_size // (sizes.tp * sizes.pp)})",
        f"vocabulary: {bridge.model_bridge.vocab_size} (HF) → {plan.padded_vocab_size} (padded for Megatron), "
        f"tied embeddings: {bridge.model_bridge.tie_word_embeddings}",
        f"params dtype: {str(config.params_dtype).removeprefix('torch.')} (weights stored as {bridge.dtype_choice.stored_text()})",
        "Megatron TransformerConfig:",
    ]
    for key in kwargs:
        value = getattr(config, key, kwargs[key])
        lines.append(f"  {key} = {getattr(value, '__name__', value)}")
    for key, value in bridge.model_bridge.gpt_model_kwargs().items():
        lines.append(f"  GPTModel.{key} = {value}")
    return "\n".join(lines)


def _shape(shape) -> str:
    return "-" if shape is None else "[" + ", ".join(str(d) for d in shape) + "]"


def _ranges(ranks: list[int]) -> str:
    """``[0, 1, 2, 5]`` → ``"0-2,5"``."""
    runs: list[list[int]] = []
    for rank in ranks:
        if runs and rank == runs[-1][-1] + 1:
            runs[-1].append(rank)
        else:
            runs.append([rank])
    return ",".join(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}" for run in runs) or "-"


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(header, widths)).rstrip()]
    lines.append("  ".join("-" * width for width in widths).rstrip())
    lines += ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)
