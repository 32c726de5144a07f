"""The ``hfmb`` command line: one module per command (``cmd_*``), shared pieces in ``common``, the entry point in ``main``.

Each command parses its arguments, calls the library (``bridge.conversions``, ``bridge.checks``)
and prints what it returns.
"""

from bridge.cli.main import build_parser, main, run_command

__all__ = ["build_parser", "main", "run_command"]
