"""The LoRA options of a training command: ``--lora-rank``, ``--lora-alpha``, ``--lora-targets``,
``--lora-target-parameters``, ``--lora-dropout``.

Targets are HF module names as peft takes them (``q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj``),
comma- or space-separated; target parameters the stacked routed-expert parameters of transformers 5, as
peft's ``target_parameters`` (``experts.gate_up_proj,experts.down_proj``). Without ``--lora-rank`` a run is a
full fine-tune and the other ``--lora-*`` options are refused. Whether the model has the targets is checked
when the adapters are applied (``bridge.lora.apply_lora`` names a missing one and lists the model's linears).
"""

from __future__ import annotations

import argparse

from bridge.lora import LoraConfig, LoraError

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def add_lora_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``--lora-*`` options (in a group of their own) to ``parser``."""
    group = parser.add_argument_group("LoRA", "train low-rank adapters on a frozen base instead of every weight")
    group.add_argument("--lora-rank", type=int, help="adapter rank r; turns LoRA on (default: full fine-tune)")
    group.add_argument("--lora-alpha", type=float, help="the update is scaled by alpha / r (default: alpha = 2 r)")
    group.add_argument(
        "--lora-targets",
        nargs="+",
        help=f"HF module names to adapt, as for peft (default: {','.join(DEFAULT_TARGETS)}; none with --lora-target-parameters)",
    )
    group.add_argument(
        "--lora-target-parameters",
        nargs="+",
        help="stacked MoE expert parameters to adapt, as peft's target_parameters (e.g. experts.gate_up_proj,experts.down_proj)",
    )
    group.add_argument("--lora-dropout", type=float, help="dropout on the adapters' input (default: 0)")


def lora_config_from_args(args: argparse.Namespace) -> LoraConfig | None:
    """The ``LoraConfig`` the options ask for, or None (no ``--lora-rank``). Raises ``LoraError`` naming a bad option."""
    if args.lora_rank is None:
        given = [name for name in ("alpha", "targets", "target_parameters", "dropout") if getattr(args, f"lora_{name}") is not None]
        if given:
            raise LoraError(f"--lora-{given[0].replace('_', '-')} needs --lora-rank (LoRA is on only with a rank)")
        return None
    parameters = parse_targets(args.lora_target_parameters or [])
    default = () if parameters else DEFAULT_TARGETS  # only experts when only their parameters are named
    targets = default if args.lora_targets is None else parse_targets(args.lora_targets)
    alpha = 2 * args.lora_rank if args.lora_alpha is None else args.lora_alpha
    return LoraConfig(r=args.lora_rank, alpha=alpha, targets=targets, dropout=args.lora_dropout or 0.0, target_parameters=parameters)


def parse_targets(values: list[str] | str) -> tuple[str, ...]:
    """``["q_proj,v_proj", "o_proj"]`` → ``("q_proj", "v_proj", "o_proj")``; empty names are dropped."""
    items = [values] if isinstance(values, str) else values
    return tuple(name.strip() for item in items for name in item.split(",") if name.strip())


def lora_arguments_for(config: LoraConfig) -> list[str]:
    """The command-line options that ask for ``config`` (for messages that tell a user how to resume)."""
    options = ["--lora-rank", str(config.r), "--lora-alpha", f"{config.alpha:g}"]
    if config.targets:
        options += ["--lora-targets", ",".join(config.targets)]
    if config.target_parameters:
        options += ["--lora-target-parameters", ",".join(config.target_parameters)]
    if config.dropout:
        options += ["--lora-dropout", f"{config.dropout:g}"]
    return options
