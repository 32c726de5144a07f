"""``hfmb``'s entry point: parse the command line, start local ranks where needed, run the command, map errors to exit codes.

Every command runs on every rank under ``torchrun`` (rank 0 prints the report), or as one plain
process; a plain process asked for more than one rank (``--tp 2``…) starts that many local ranks
itself (gloo on CPU, NCCL on GPUs) so that a conversion needs no launcher on one machine.

Exit status: 0 success, 1 a check failed (plan problems, verify thresholds, folder differences),
2 bad input (unreadable or mismatched checkpoint, unsupported config, refused output folder, a full
disk or a folder this process may not write).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import warnings

from bridge.cli import cmd_export, cmd_import, cmd_plan, cmd_verify
from bridge.cli.common import BAD_INPUT, CHECK_FAILED, streams

COMMANDS = {"plan": cmd_plan, "import": cmd_import, "export": cmd_export, "verify": cmd_verify}
# Errors that are bad input (exit 2 with their message); OSErrors of a full disk or a refused path are too (``write_errors``).
KNOWN_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, NotADirectoryError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hfmb",
        description="Hugging Face ⇄ Megatron-Core checkpoint bridge. Run under torchrun for several ranks, or as one "
        "process (which starts the local ranks --tp/--pp need itself).",
        epilog="\n\n".join(module.EXAMPLES for module in COMMANDS.values())
        + "\n\nexit status: 0 ok, 1 a check failed, 2 bad input (set HFMB_TRACEBACK=1 for its traceback)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and the report")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{plan,import,export,verify}")

    def command(name: str, help: str, examples: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help, epilog=examples, formatter_class=argparse.RawDescriptionHelpFormatter)
        sub.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="only warnings and the report")
        return sub

    for module in COMMANDS.values():
        module.add_parser(commands, command)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the command; the return value is the exit status."""
    parser = build_parser()
    if not (sys.argv[1:] if argv is None else argv):
        print(_command_list(), file=sys.stderr)
        return BAD_INPUT
    args = parser.parse_args(argv)
    if getattr(args, "in_memory", False) and args.max_memory is not None:
        parser.error("--max-memory streams the conversion; it cannot be combined with --in-memory")
    if getattr(args, "max_memory", None) is not None and not streams(args):
        parser.error("--max-memory streams in one process: run without torchrun (the checkpoint loads at any TP/PP)")
    _configure_logging(args.quiet)
    if args.command == "plan":  # the first word within a second: what follows imports torch and Megatron-Core
        logging.getLogger("bridge.cli").info("reading the config of %s…", args.hf)  # progress, not an error line
    try:
        _check_before_start(args)
    except BaseException as err:
        return _error_status(err, args)
    ranks = _ranks_to_start(args)
    if ranks > 1:
        return _spawn(args, ranks)
    return run_command(args)


def _ranks_to_start(args: argparse.Namespace) -> int:
    """How many local ranks this plain process starts (1: it runs the command itself).

    1 under torchrun (it started them) or for ``plan``, which derives every rank's parameters in
    one process (``--nproc`` then only names the world it plans for); a streamed conversion runs in
    this process unless ``--nproc`` asks for ranks.
    """
    if "RANK" in os.environ or args.command == "plan":
        return 1
    return args.nproc or (1 if streams(args) else _world_needed(args))


def _check_before_start(args: argparse.Namespace) -> None:
    """The parallel sizes against the model's config, in a second or two, before any rank or model starts."""
    from bridge.cli.common import parallel_sizes
    from bridge.hf.folder import read_hf_config, resolve_hf_folder
    from bridge.megatron import checkpoint as mc
    from bridge.megatron.builder import check_parallel_sizes
    from bridge.models import bridge_for

    if args.command == "export":
        folder = args.hf_config or mc.hf_config_folder(args.ckpt)
        if args.hf_config is None:
            mc.read_source_info(args.ckpt)
    elif args.command == "verify" and args.other is not None and not mc.is_checkpoint(args.other):
        return  # two HF folders: no model is built
    else:
        folder = resolve_hf_folder(args.hf)
    check_parallel_sizes(bridge_for(read_hf_config(folder)), parallel_sizes(args))


def _command_list() -> str:
    """What ``hfmb`` alone prints: one line per command, and where the rest is."""
    width = max(map(len, COMMANDS))
    lines = [f"  {name.ljust(width)}  {module.SUMMARY}" for name, module in COMMANDS.items()]
    return "usage: hfmb COMMAND ARGS...\n\ncommands:\n" + "\n".join(lines) + "\n\n`hfmb COMMAND -h` shows a command's options and examples."


def _world_needed(args: argparse.Namespace) -> int:
    """The smallest world both the dense (tp×pp) and the expert (tp×ep×pp) layouts divide."""
    return math.lcm(args.tp * args.pp, args.tp * args.ep * args.pp)


def _spawn(args: argparse.Namespace, world: int) -> int:
    from bridge.runtime.local_launch import RankFailedError, run_distributed

    print(f"hfmb: starting {world} local ranks (use torchrun for several machines)", file=sys.stderr)
    try:
        codes = run_distributed(run_command, world, args, timeout=24 * 3600)  # a failure ends it at once, not at the timeout
    except RankFailedError as err:
        print(f"hfmb {args.command}: a rank failed: {err}", file=sys.stderr)
        return CHECK_FAILED
    return codes[0]


def run_command(args: argparse.Namespace) -> int:
    """Run one parsed command on this rank (all ranks call it). Leaves no parallel state behind."""
    import torch.distributed as dist

    _configure_logging(args.quiet)
    created_group = not dist.is_initialized()
    try:
        return COMMANDS[args.command].run(args)
    except BaseException as err:
        return _error_status(err, args)
    finally:
        _teardown(created_group)


def _error_status(err: BaseException, args: argparse.Namespace) -> int:
    """Exit 2 with one line (rank 0 prints it) for bad input; anything else is raised again with its traceback."""
    import torch.distributed as dist

    message = _bad_input_message(err, args)
    if message is None or os.environ.get("HFMB_TRACEBACK"):
        raise err
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"hfmb {args.command}: error: {message}", file=sys.stderr)
    return BAD_INPUT


def _bad_input_message(err: BaseException, args: argparse.Namespace) -> str | None:
    """The one line a bad input gets (exit 2), or None for an error that keeps its traceback.

    A full disk or a folder this process may not write is bad input too, however deep a library
    wrapped its OSError (torch's checkpoint writer, ``torch.save``): the line names the path.
    """
    from bridge.runtime.write_errors import cause, describe

    if isinstance(err, KNOWN_ERRORS):
        return str(err)
    if isinstance(err, (KeyboardInterrupt, SystemExit)):
        return None
    if isinstance(err, BrokenPipeError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # or Python's exit-time flush fails on it again
        return "the output was closed before the report was written (a pipe such as `| head` stopped reading)"
    found = cause(err)
    if found is not None:
        return describe(found, getattr(args, "out", None))
    if isinstance(err, PermissionError):
        return f"permission denied: {err}"
    return None


def _teardown(created_group: bool) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if created_group and dist.is_initialized():
        dist.destroy_process_group()


def _configure_logging(quiet: bool) -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    logging.getLogger("bridge").setLevel(logging.WARNING if quiet or rank != 0 else logging.INFO)
    if quiet:
        os.environ["TQDM_DISABLE"] = "1"  # tqdm's own switch: our bars, in this process and its ranks
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # transformers' and huggingface_hub's (read when they are imported)
    # Megatron-Core / DCP / transformers notices that say nothing about the conversion.
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine|TransformerEngine).*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*torch.distributed.checkpoint.*")
    # DCP's note when one process reads a checkpoint: the streamed export does so on purpose.
    warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
