"""How long ``hfmb`` takes to say something, and to plan: time to first output and plan time (issue 19, item 3).

    python bench/startup_bench.py [--repeats 3] [--layouts 1x1 2x2]

Builds the demo's small Llama (``bridge.demo_model``) and, for each layout (TPxPP), runs
``hfmb plan`` as a user would (a fresh interpreter), recording when the first byte of output
appears and when the command ends. Since issue 19 the plan starts no rank at any layout: one process
builds the model once on the meta device and derives every rank's parameters (before, hfmb started
TP×PP local ranks that each built their part of the model, so the 2x2 row timed four processes). The machines are noisy, so each
figure is also printed as a ratio to a reference measured in the same run: the time a fresh
interpreter takes to ``import torch`` (what every command pays before it can do anything).
Medians over ``--repeats``.
"""

from __future__ import annotations

import argparse
import selectors
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def timed(argv: list[str]) -> tuple[float, float]:
    """(seconds to the first byte on stdout or stderr, seconds to the end) of running ``argv``."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    first = None
    with selectors.DefaultSelector() as selector:
        for stream in (proc.stdout, proc.stderr):
            selector.register(stream, selectors.EVENT_READ)
        open_streams = 2
        while open_streams:
            for key, _ in selector.select():
                if key.fileobj.read1(65536):
                    first = first if first is not None else time.perf_counter() - start
                else:
                    selector.unregister(key.fileobj)
                    open_streams -= 1
    if proc.wait() != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}")
    return (first if first is not None else float("nan")), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layouts", nargs="+", default=["1x1", "2x2"], help="TPxPP layouts to plan (default 1x1 2x2)")
    args = parser.parse_args()

    from bridge.demo_model import build_demo_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        model = build_demo_checkpoint(Path(tmp) / "demo")
        reference = statistics.median(timed([sys.executable, "-c", "import torch"])[1] for _ in range(args.repeats))
        print(f"reference: a fresh interpreter imports torch in {reference:.2f}s (median of {args.repeats})")
        print(f"{'command':<28} {'first output':>14} {'total':>10} {'first/ref':>10} {'total/ref':>10}")
        for layout in args.layouts:
            tp, pp = (int(n) for n in layout.split("x"))
            argv = [sys.executable, "-m", "bridge", "plan", str(model), "--tp", str(tp), "--pp", str(pp)]
            runs = [timed(argv) for _ in range(args.repeats)]
            first, total = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
            name = f"hfmb plan --tp {tp} --pp {pp}"
            print(f"{name:<28} {first:>13.2f}s {total:>9.2f}s {first / reference:>10.2f} {total / reference:>10.2f}")


if __name__ == "__main__":
    main()
