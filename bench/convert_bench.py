"""Conversion benchmark: raw safetensors read, transformers, and the bridge at TP1 / TP2 / PP2.

    python bench/convert_bench.py                       # the issue's 0.85B Llama (~1.7 GB bf16), 3 repeats
    python bench/convert_bench.py --hidden 256 --layers 2 --heads 8 --kv-heads 4 --ffn 704 --repeats 2
    python bench/convert_bench.py --layouts tp1,tp2      # a subset (tp1, tp2, pp2, tp2-scatter)

Generates a Llama-architecture bf16 checkpoint once under bench/data/ (built in bf16 directly, in a
subprocess), reads it once to warm the page cache, then for each repeat runs every measurement in
fresh processes (after an ``os.sync()``, so that none pays for the write-back of another's files):

- raw:          one process mmaps each safetensors file and copies every tensor into preallocated
                (``torch.empty``, not yet touched — like the bridge's unloaded parameters) memory;
- raw write:    the same number of bytes written with O_DIRECT in 8 MiB blocks, by one process and
                by two processes at once (half each): the disk's pace, and whether two writers share it;
- transformers: one process, ``from_pretrained(dtype=bfloat16)`` then ``save_pretrained``;
- bridge:       one process per rank, started like torchrun would (RANK, WORLD_SIZE, MASTER_*; torch
                threads = cores // ranks as in ``bridge.runtime.local_launch``): ``initialize_parallel``
                ("init"), ``AutoBridge.from_hf_pretrained`` + ``to_megatron_model`` up to the moment
                it calls ``load_hf_weights`` ("build"), the load itself ("load"), then
                ``save_hf_pretrained`` to a fresh folder ("export").

On a machine with GPUs the bridge's model lives on them (one GPU per rank: layouts that need more
are skipped) and is loaded through pinned buffers; each bridge process then also measures the card's
host→device bandwidth from pinned memory, after its export, and the load's GB/s are printed against it.

Every process records ``ru_maxrss`` (peak RSS so far) at the end of each phase, its RSS right after
its imports (the baseline), and the wall clock when its folder is written; "e2e" is that moment minus
the moment the parent started the process ("process start → exported folder", interpreter start and
imports included, process teardown excluded). Medians over ``--repeats`` of each number, then the
targets of issue 5 as ratios with PASS/FAIL. The parent process imports neither torch nor
transformers, so it stays small and cannot inflate its children's ``ru_maxrss``.
"""

from __future__ import annotations

import time

_T_TOP = time.time()  # the first thing a worker process does: interpreter start-up ends here

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import struct  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
MIB = 2**20

LAYOUTS = {  # name → (tp, pp, load strategy)
    "tp1": (1, 1, "slice"),
    "tp2": (2, 1, "slice"),
    "pp2": (1, 2, "slice"),
    "tp2-scatter": (2, 1, "scatter"),
}

# Limits of the targets that are not ratios fixed by the issue (it says "a small part" for the build).
BUILD_SHARE_LIMIT = 0.10  # build time / (build + load + export) at TP1
BUILD_RSS_LIMIT = 0.5  # RSS added by the build / this rank's shard: no initialisation, no full copies


# ----------------------------------------------------------------------------------------------------
# measurements inside the worker processes


def _rss() -> dict[str, int]:
    """Peak RSS so far (``ru_maxrss``) and the current RSS split into anonymous and file-backed pages, bytes."""
    out = {"peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


class _Recorder:
    """Per-phase wall times and RSS of one process, written as JSON at the end."""

    def __init__(self, result: Path):
        self.result = result
        self.data: dict = {"t_top": _T_TOP, "seconds": {}, "rss": {}}
        self._start = time.perf_counter()
        self.probes: dict[str, list] = {}  # what the probes measured in the current phase: name → [calls, seconds]

    def mark(self, phase: str) -> None:
        now = time.perf_counter()
        self.data["seconds"][phase] = now - self._start
        self.data["rss"][phase] = _rss()
        if self.probes:
            self.data.setdefault("probes", {})[phase] = self.probes
            self.probes = {}
        self._start = time.perf_counter()

    def probe(self, owner, attr: str, key: str) -> None:
        """Count the calls of ``owner.attr`` and the time spent in them (a generator: the time inside its steps)."""
        import inspect

        fn = getattr(owner, attr)

        def add(seconds: float) -> None:
            entry = self.probes.setdefault(key, [0, 0.0])
            entry[0] += 1
            entry[1] += seconds

        if inspect.isgeneratorfunction(fn):

            def wrapped(*a, **k):
                steps = fn(*a, **k)
                while True:
                    start = time.perf_counter()
                    try:
                        item = next(steps)
                    except StopIteration:
                        add(time.perf_counter() - start)
                        return
                    add(time.perf_counter() - start)
                    yield item
        else:

            def wrapped(*a, **k):
                start = time.perf_counter()
                try:
                    return fn(*a, **k)
                finally:
                    add(time.perf_counter() - start)

        setattr(owner, attr, wrapped)

    def restart(self) -> None:
        self._start = time.perf_counter()

    def done(self, t_done: float | None = None, **extra) -> None:
        self.data["t_done"] = t_done or time.time()
        self.data.update(extra)
        tmp = self.result.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data))
        os.replace(tmp, self.result)


def _safetensors_entries(path: Path) -> tuple[int, dict]:
    """(offset of the data section, header) of a safetensors file, without torch."""
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    header.pop("__metadata__", None)
    return 8 + length, header


def worker_raw(args) -> None:
    rec = _Recorder(Path(args.result))
    import mmap
    import warnings

    import torch

    rec.mark("imports")
    files = sorted(Path(args.folder).glob("*.safetensors"))
    plan = []
    for path in files:
        base, header = _safetensors_entries(path)
        for name, info in header.items():
            start, stop = info["data_offsets"]
            plan.append((path, name, base + start, stop - start))
    # Preallocated destination: allocated, not touched, as the bridge's parameters are before the load.
    dest = {name: torch.empty(size, dtype=torch.uint8) for _, name, _, size in plan}
    rec.mark("build")
    warnings.filterwarnings("ignore", message="The given buffer is not writable")
    total = 0
    for path in files:
        with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            for file, name, offset, size in plan:
                if file == path:
                    dest[name].copy_(torch.frombuffer(mapped, dtype=torch.uint8, count=size, offset=offset))
                    total += size
    rec.mark("load")
    rec.done(bytes=total, shard_bytes=total)


def worker_rawwrite(args) -> None:
    """The disk's own pace: this process's share (1/--layout) of the checkpoint's bytes written with O_DIRECT in
    8 MiB blocks from one touched, aligned buffer, as the bridge's writer does; "export" times it."""
    import mmap

    rec = _Recorder(Path(args.result))
    rec.mark("imports")
    writers, rank = int(args.layout), int(os.environ.get("RANK", "0"))
    total = sum(path.stat().st_size for path in Path(args.folder).glob("*.safetensors"))
    block = 8 * MIB
    stage = mmap.mmap(-1, block)
    stage.write(b"\x01" * block)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"part-{rank}"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | getattr(os, "O_DIRECT", 0), 0o644)
    rec.mark("build")
    share, done = -(-total // writers), 0
    view = memoryview(stage)
    while done < share:
        done += os.pwrite(fd, view, done)
    os.close(fd)
    rec.mark("export")
    rec.done(bytes=done, shard_bytes=done)


def worker_transformers(args) -> None:
    rec = _Recorder(Path(args.result))
    import torch
    from transformers import AutoModelForCausalLM

    rec.mark("imports")
    model = AutoModelForCausalLM.from_pretrained(args.folder, dtype=torch.bfloat16)
    rec.mark("load")
    model.save_pretrained(args.out)
    rec.mark("export")
    shard = sum(p.numel() * p.element_size() for p in model.parameters())
    rec.done(shard_bytes=shard)


def worker_bridge(args) -> None:
    rec = _Recorder(Path(args.result))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))  # as bridge.runtime.local_launch does
    import torch.distributed as dist

    from bridge.auto_bridge import AutoBridge
    from bridge.megatron.parallel import ParallelSizes, initialize_parallel

    rec.mark("imports")
    _install_bridge_probes(rec)
    tp, pp, strategy = LAYOUTS[args.layout]
    initialize_parallel(ParallelSizes(tp=tp, pp=pp))
    dist.barrier()
    if torch.cuda.is_available():  # NCCL makes a group's communicator at its first collective: not inside the load
        from megatron.core import parallel_state

        dist.barrier(group=parallel_state.get_tensor_model_parallel_group())
    rec.mark("init")
    bridge = AutoBridge.from_hf_pretrained(args.folder)
    load = bridge.load_hf_weights

    def timed_load(model, strategy: str = "slice") -> None:  # the build ends where to_megatron_model starts loading
        rec.mark("build")
        load(model, strategy=strategy)

    bridge.load_hf_weights = timed_load
    model = bridge.to_megatron_model(tp=tp, pp=pp, load_weights=True, load_strategy=strategy)
    if torch.cuda.is_available():  # collectives queued on the GPU (scatter) may still be running
        torch.cuda.synchronize()
    rec.mark("load")
    dist.barrier()
    rec.restart()
    bridge.save_hf_pretrained(model, args.out)
    rec.mark("export")
    shard = sum(p.numel() * p.element_size() for chunk in model for p in chunk.parameters())
    written = time.time()  # e2e ends here, before the bandwidth probe
    gpu = {"h2d_gbps": pinned_h2d_gbps(torch), "device": torch.cuda.get_device_name()} if torch.cuda.is_available() else {}
    rec.done(t_done=written, shard_bytes=shard, rank=dist.get_rank(), **gpu)
    dist.barrier()
    dist.destroy_process_group()


def pinned_h2d_gbps(torch, nbytes: int = 256 * MIB, repeats: int = 5) -> float:
    """The card's host→device bandwidth from pinned memory (the best of ``repeats`` copies), GB/s: the load's ceiling."""
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    device = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    device.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        device.copy_(host, non_blocking=True)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return nbytes / best / 1e9


# Where the bridge's time goes, per phase: (module, owner path, attribute, label). Nested probes overlap
# (the collectives happen inside "export_tensors"); the breakdown lists them side by side, not summed.
BRIDGE_PROBES = (
    ("bridge.auto_bridge", "AutoBridge", "from_hf_pretrained", "AutoBridge.from_hf_pretrained"),
    ("bridge.megatron.builder", "", "build_transformer_config", "TransformerConfig"),
    ("bridge.megatron.builder", "", "build_gpt_chunks", "GPTModel construction"),
    ("bridge.engine.plan", "TransferPlan", "build", "TransferPlan.build"),
    ("bridge.engine.plan", "", "validate_checkpoint", "validate_checkpoint"),
    ("bridge.hf.reader", "SafetensorsReader", "__init__", "open safetensors"),
    ("bridge.hf.reader", "LazyTensor", "narrow", "read slice (narrow)"),
    ("bridge.hf.reader", "LazyTensor", "select_slice", "read slice (select)"),
    ("bridge.engine.export", "", "export_tensors", "export_tensors steps"),
    ("bridge.hf.layout", "LayoutWriter", "add", "writer.add"),
    ("bridge.hf.data_appender", "DataAppender", "append", "writer staging"),
    ("bridge.hf.layout", "LayoutWriter", "close", "writer close"),
    ("bridge.hf.layout", "ShardLayout", "__init__", "ShardLayout (plan)"),
    ("bridge.hf.layout", "ShardLayout", "create", "ShardLayout.create"),
    ("bridge.hf.output_folder", "", "_fsync_tree", "fsync files"),
    ("torch.distributed", "", "gather", "dist.gather"),
    ("torch.distributed", "", "send", "dist.send"),
    ("torch.distributed", "", "recv", "dist.recv"),
    ("torch.distributed", "", "broadcast", "dist.broadcast"),
    ("torch.distributed", "", "isend", "dist.isend"),
    ("torch.distributed", "", "irecv", "dist.irecv"),
    ("torch.distributed", "", "gather_object", "dist.gather_object"),
    ("torch.distributed", "", "all_gather_object", "dist.all_gather_object"),
    ("torch.distributed", "", "barrier", "dist.barrier"),
)


def _install_bridge_probes(rec: _Recorder) -> None:
    import importlib

    for module, owner, attr, label in BRIDGE_PROBES:
        try:
            target = importlib.import_module(module)
            for part in filter(None, owner.split(".")):
                target = getattr(target, part)
            if hasattr(target, attr):
                rec.probe(target, attr, label)
        except (ImportError, AttributeError):  # the engine moved on: measure what is still there
            pass


def worker_generate(args) -> None:
    """The benchmark checkpoint, built in bf16 directly (no fp32 copy), with a word-level tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from bridge.demo_model import demo_tokenizer

    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.ffn,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    with torch.no_grad():  # norms start at 1: perturb them so a wrong mapping would show
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.add_(torch.randn_like(param) * 0.1)
    tmp = Path(args.out)
    model.save_pretrained(tmp)
    demo_tokenizer(args.vocab).save_pretrained(tmp)
    os.replace(tmp, args.folder)


# ----------------------------------------------------------------------------------------------------
# the parent: launches, collects, prints


def _checkpoint_folder(args) -> Path:
    return DATA / f"llama-h{args.hidden}-l{args.layers}-a{args.heads}-kv{args.kv_heads}-ff{args.ffn}-v{args.vocab}"


def _launch(worker: str, extra: list[str], env: dict | None = None, log: Path | None = None) -> subprocess.Popen:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", worker, *extra]
    out = open(log, "w") if log else subprocess.DEVNULL
    return subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=out, stderr=subprocess.STDOUT, cwd=HERE.parent)


def _wait(procs: list[subprocess.Popen], logs: list[Path], timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    try:
        for proc, log in zip(procs, logs):
            rc = proc.wait(timeout=max(1.0, deadline - time.time()))
            if rc != 0:
                raise RuntimeError(f"{what}: process exited with {rc}; its output:\n{log.read_text()[-6000:]}")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def ensure_checkpoint(args) -> Path:
    folder = _checkpoint_folder(args)
    if (folder / "config.json").exists():
        return folder
    DATA.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"generating {folder} ...", flush=True)
    start = time.time()
    log = DATA / "generate.log"
    extra = ["--folder", str(folder), "--out", str(tmp)]
    extra += ["--hidden", str(args.hidden), "--layers", str(args.layers), "--heads", str(args.heads)]
    extra += ["--kv-heads", str(args.kv_heads), "--ffn", str(args.ffn), "--vocab", str(args.vocab)]
    _wait([_launch("generate", extra, log=log)], [log], args.timeout, "generating the checkpoint")
    print(f"generated in {time.time() - start:.0f} s", flush=True)
    return folder


def warm_page_cache(folder: Path) -> None:
    for path in sorted(folder.glob("*.safetensors")):
        with open(path, "rb") as handle:
            while handle.read(64 * MIB):
                pass


def run_measurement(kind: str, folder: Path, work: Path, args, layout: str | None = None) -> list[dict]:
    """One measurement in fresh processes; each process's record, by rank, with "launch" (parent's clock)."""
    name = kind if layout is None else f"{kind}-{layout}"
    out = work / f"out-{name}"
    shutil.rmtree(out, ignore_errors=True)
    world = 1 if layout is None else int(layout) if kind == "rawwrite" else LAYOUTS[layout][0] * LAYOUTS[layout][1]
    results = [work / f"{name}-rank{r}.json" for r in range(world)]
    logs = [work / f"{name}-rank{r}.log" for r in range(world)]
    for path in results:
        path.unlink(missing_ok=True)
    common = ["--folder", str(folder), "--out", str(out)]
    procs, stores = [], []
    # Write back what earlier measurements (or other users) left dirty, so that no measurement pays for another's.
    os.sync()
    launch = time.time()
    if kind in ("bridge", "rawwrite"):
        from bridge.runtime.local_launch import host_rendezvous

        store, store_env = host_rendezvous()
        stores.append(store)  # the ranks' rendezvous, kept until they are done
        for rank in range(world):
            env = (
                dict(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), **store_env)
                if world > 1
                else {}
            )
            procs.append(_launch(kind, [*common, "--layout", layout, "--result", str(results[rank])], env, logs[rank]))
    else:
        procs.append(_launch(kind, [*common, "--result", str(results[0])], None, logs[0]))
    _wait(procs, logs, args.timeout, name)
    stores.clear()
    records = []
    for path in results:
        record = json.loads(path.read_text())
        record["launch"] = launch
        records.append(record)
    if args.keep_outputs:
        print(f"kept {out}")
    else:
        shutil.rmtree(out, ignore_errors=True)
    return records


def summarise(runs: list[list[dict]]) -> list[dict]:
    """Medians over repeats, per rank: seconds per phase, e2e, startup, peak RSS per phase, the import RSS."""
    summary = []
    for rank in range(len(runs[0])):
        recs = [run[rank] for run in runs]
        med = lambda values: statistics.median(values)  # noqa: E731
        row = {
            "seconds": {p: med([r["seconds"][p] for r in recs]) for p in recs[0]["seconds"]},
            "peak": {p: med([r["rss"][p]["peak"] for r in recs]) for p in recs[0]["rss"]},
            "anon": {p: med([r["rss"][p].get("RssAnon", 0) for r in recs]) for p in recs[0]["rss"]},
            "file": {p: med([r["rss"][p].get("RssFile", 0) for r in recs]) for p in recs[0]["rss"]},
            "base": med([r["rss"]["imports"]["VmRSS"] for r in recs]),
            "startup": med([r["t_top"] - r["launch"] for r in recs]),
            "shard": recs[0]["shard_bytes"],
        }
        probes: dict = {}
        for phase in ("build", "load", "export"):
            labels = {label for r in recs for label in r.get("probes", {}).get(phase, {})}
            for label in labels:
                values = [r.get("probes", {}).get(phase, {}).get(label, [0, 0.0]) for r in recs]
                probes.setdefault(phase, {})[label] = (med([v[0] for v in values]), med([v[1] for v in values]))
        row["probes"] = probes
        if "t_done" in recs[0]:
            row["e2e"] = med([r["t_done"] - r["launch"] for r in recs])
        if "h2d_gbps" in recs[0]:
            row["h2d_gbps"], row["device"] = med([r["h2d_gbps"] for r in recs]), recs[0]["device"]
        summary.append(row)
    return summary


def _fmt_s(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def _fmt_m(value) -> str:
    return "-" if value is None else f"{value / MIB:.0f}"


def print_table(results: dict[str, list[dict]], largest: int) -> None:
    head = (
        f"{'measurement':<22}{'rank':>4} |{'start':>7}{'import':>7}{'init':>7}{'build':>7}{'load':>7}{'export':>7}{'e2e':>8} |"
        f"{'RSS imp':>8}{'build':>7}{'load':>7}{'export':>7}{'limit':>7}{'shard':>7}"
    )
    print("seconds (medians); e2e = process start → folder written (raw: → data copied);")
    print("RSS in MiB: 'RSS imp' = RSS right after the imports, then ru_maxrss (peak so far) at the end of each phase;")
    print("limit = shard + 2 × largest tensor + RSS imp")
    print(head)
    print("-" * len(head))
    for name, rows in results.items():
        for rank, row in enumerate(rows):
            s, peak = row["seconds"], row["peak"]
            limit = row["shard"] + 2 * largest + row["base"]
            print(
                f"{name:<22}{rank:>4} |{_fmt_s(row['startup']):>7}{_fmt_s(s.get('imports')):>7}{_fmt_s(s.get('init')):>7}"
                f"{_fmt_s(s.get('build')):>7}{_fmt_s(s.get('load')):>7}{_fmt_s(s.get('export')):>7}{_fmt_s(row.get('e2e')):>8} |"
                f"{_fmt_m(row['base']):>8}{_fmt_m(peak.get('build')):>7}{_fmt_m(peak.get('load')):>7}{_fmt_m(peak.get('export')):>7}"
                f"{_fmt_m(limit):>7}{_fmt_m(row['shard']):>7}"
            )
    print()
    print("current RSS at the end of each phase, anonymous + file-backed (mmapped checkpoint pages), MiB:")
    for name, rows in results.items():
        for rank, row in enumerate(rows):
            parts = [f"{p} {row['anon'][p] / MIB:.0f}+{row['file'][p] / MIB:.0f}" for p in row["anon"]]
            print(f"  {name:<20}{rank:>3}  " + ", ".join(parts))


def print_breakdown(results: dict[str, list[dict]]) -> None:
    print()
    print("where the bridge's time goes (medians; seconds [calls]; nested probes overlap, e.g. dist.* inside export_tensors):")
    for name, rows in results.items():
        for rank, row in enumerate(rows):
            for phase, probes in row.get("probes", {}).items():
                parts = [
                    f"{label} {seconds:.2f} [{calls:g}]"
                    for label, (calls, seconds) in sorted(probes.items(), key=lambda item: -item[1][1])
                    if calls
                ]
                print(f"  {name:<20}{rank:>3} {phase:<7}{row['seconds'][phase]:>6.2f} s: " + ", ".join(parts))


def print_targets(results: dict[str, list[dict]], largest: int) -> bool:
    checks: list[tuple[str, float, float, str]] = []  # (what, value, limit, detail)

    def worst(rows, phase):
        return max(row["seconds"][phase] for row in rows)

    tp1 = results.get("bridge tp1")
    raw = results.get("raw read+copy")
    hf = results.get("transformers")
    if tp1:
        s = tp1[0]["seconds"]
        total = s["build"] + s["load"] + s["export"]
        checks.append(
            ("build share of build+load+export, TP1", s["build"] / total, BUILD_SHARE_LIMIT, f"{s['build']:.2f} s of {total:.2f} s")
        )
        for name, rows in results.items():
            if name.startswith("bridge"):
                grow = max((row["peak"]["build"] - row["base"]) / row["shard"] for row in rows)
                checks.append((f"build RSS growth / shard, {name[7:]}", grow, BUILD_RSS_LIMIT, "max over ranks"))
    if tp1 and raw:
        checks.append(
            (
                "load TP1 / raw read+copy",
                tp1[0]["seconds"]["load"] / raw[0]["seconds"]["load"],
                2.0,
                f"{tp1[0]['seconds']['load']:.2f} s / {raw[0]['seconds']['load']:.2f} s",
            )
        )
    if tp1 and hf:
        checks.append(
            (
                "export TP1 / transformers save_pretrained",
                tp1[0]["seconds"]["export"] / hf[0]["seconds"]["export"],
                1.0,
                f"{tp1[0]['seconds']['export']:.2f} s / {hf[0]['seconds']['export']:.2f} s",
            )
        )
        checks.append(
            (
                "e2e TP1 / transformers from_pretrained+save process",
                tp1[0]["e2e"] / hf[0]["e2e"],
                1.0,
                f"{tp1[0]['e2e']:.2f} s / {hf[0]['e2e']:.2f} s",
            )
        )
    for layout in ("tp2", "pp2"):
        rows = results.get(f"bridge {layout}")
        if tp1 and rows:
            for phase in ("load", "export"):
                checks.append(
                    (
                        f"{phase} {layout.upper()} (slowest rank) / TP1",
                        worst(rows, phase) / tp1[0]["seconds"][phase],
                        1.0,
                        f"{worst(rows, phase):.2f} s / {tp1[0]['seconds'][phase]:.2f} s",
                    )
                )
    for name, rows in results.items():
        if name.startswith("bridge"):
            ratios = [row["peak"]["export"] / (row["shard"] + 2 * largest + row["base"]) for row in rows]
            rank = max(range(len(rows)), key=lambda r: ratios[r])
            row = rows[rank]
            checks.append(
                (
                    f"peak RSS / limit, {name[7:]}",
                    ratios[rank],
                    1.0,
                    f"rank {rank}: {row['peak']['export'] / MIB:.0f} MiB vs {row['shard'] / MIB:.0f} shard "
                    f"+ 2×{largest / MIB:.0f} + {row['base'] / MIB:.0f} imports",
                )
            )
    print()
    print(f"{'target':<54}{'ratio':>7}{'limit':>7}  result   detail")
    ok = True
    for what, value, limit, detail in checks:
        passed = value <= limit
        ok &= passed
        print(f"{what:<54}{value:>7.2f}{limit:>7.2f}  {'PASS' if passed else 'FAIL':<7}  {detail}")
    one, two = results.get("raw write, 1 writer"), results.get("raw write, 2 writers")
    if one and two:
        alone, shared = one[0]["seconds"]["export"], worst(two, "export")
        print(
            f"{'(info) disk: 2 writers of half / 1 writer of all':<54}{shared / alone:>7.2f}{'':>7}  {'':<7}  "
            f"{shared:.2f} s / {alone:.2f} s (1.0: the disk's bandwidth is shared, ~0.5: it is per writer)"
        )
        for name, rows, reference, label in (
            ("bridge tp1", tp1, alone, "1 writer"),
            ("bridge tp2", results.get("bridge tp2"), shared, "2 writers"),
            ("bridge pp2", results.get("bridge pp2"), shared, "2 writers"),
        ):
            if rows:
                print(
                    f"{f'(info) export {name[7:].upper()} (slowest rank) / raw write, {label}':<54}"
                    f"{worst(rows, 'export') / reference:>7.2f}"
                    f"{'':>7}  {'':<7}  {worst(rows, 'export'):.2f} s / {reference:.2f} s"
                )
    tp2, pp2 = results.get("bridge tp2"), results.get("bridge pp2")
    if tp2 and pp2:  # the same bytes per rank into the same files: what TP2's row-parallel transfers cost
        print(
            f"{'(info) export TP2 / PP2 (slowest ranks)':<54}{worst(tp2, 'export') / worst(pp2, 'export'):>7.2f}"
            f"{'':>7}  {'':<7}  {worst(tp2, 'export'):.2f} s / {worst(pp2, 'export'):.2f} s (PP2 sends nothing)"
        )
    for name, rows in results.items():  # on a GPU: the load's pace against the card's own host→device pace
        if name.startswith("bridge") and "h2d_gbps" in rows[0]:
            load = min(row["shard"] / row["seconds"]["load"] / 1e9 for row in rows)
            print(
                f"{f'(info) load GB/s / pinned host→device GB/s, {name[7:]}':<54}{load / rows[0]['h2d_gbps']:>7.2f}{'':>7}  {'':<7}  "
                f"{load:.1f} GB/s (slowest rank) / {rows[0]['h2d_gbps']:.1f} GB/s on {rows[0]['device']}"
            )
    scatter, slice_ = results.get("bridge tp2-scatter"), results.get("bridge tp2")
    if scatter and slice_:
        print(
            f"{'(info) TP2 load: scatter / slice':<54}{worst(scatter, 'load') / worst(slice_, 'load'):>7.2f}"
            f"{'':>7}  {'':<7}  {worst(scatter, 'load'):.2f} s / {worst(slice_, 'load'):.2f} s (slowest rank)"
        )
    return ok


def cuda_device_count() -> int:
    """GPUs the workers will see (0 on a CPU machine), asked of a child so that this process never imports torch."""
    probe = "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)"
    return int(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip() or 0)


def machine() -> str:
    mem = 0
    with open("/proc/meminfo") as info:
        for line in info:
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), cpu)
    except OSError:
        pass
    system = f"{platform.system()} {platform.release()}, Python {platform.python_version()}"
    return f"{os.cpu_count()} cores ({cpu}), {mem / 2**30:.1f} GiB RAM, {system}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--ffn", type=int, default=5632)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layouts", default="tp1,tp2,pp2,tp2-scatter", help=f"comma-separated, from {', '.join(LAYOUTS)}")
    parser.add_argument("--no-raw", action="store_true", help="skip the raw read+copy and raw write measurements")
    parser.add_argument("--no-transformers", action="store_true", help="skip the transformers measurement")
    parser.add_argument("--keep-outputs", action="store_true", help="keep the exported folders (bench/data/run/)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds one measurement may take")
    # worker-process options
    parser.add_argument("--worker", choices=("raw", "rawwrite", "transformers", "bridge", "generate"), help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--layout", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        workers = {
            "raw": worker_raw,
            "rawwrite": worker_rawwrite,
            "transformers": worker_transformers,
            "bridge": worker_bridge,
            "generate": worker_generate,
        }
        workers[args.worker](args)
        return

    layouts = [name.strip() for name in args.layouts.split(",") if name.strip()]
    unknown = [name for name in layouts if name not in LAYOUTS]
    if unknown:
        parser.error(f"unknown layouts {unknown}; choose from {list(LAYOUTS)}")
    folder = ensure_checkpoint(args)
    files = sorted(folder.glob("*.safetensors"))
    headers = [_safetensors_entries(path)[1] for path in files]
    sizes = [info["data_offsets"][1] - info["data_offsets"][0] for header in headers for info in header.values()]
    params = sum(math.prod(info["shape"]) for header in headers for info in header.values())
    largest = max(sizes)
    work = DATA / "run"
    work.mkdir(parents=True, exist_ok=True)
    warm_page_cache(folder)

    plan: list[tuple[str, str, str | None]] = []
    if not args.no_raw:
        plan.append(("raw read+copy", "raw", None))
    if not args.no_transformers:
        plan.append(("transformers", "transformers", None))
    if not args.no_raw:
        plan += [("raw write, 1 writer", "rawwrite", "1"), ("raw write, 2 writers", "rawwrite", "2")]
    gpus = cuda_device_count()
    if gpus:  # one GPU per rank, as NCCL needs
        too_big = [layout for layout in layouts if LAYOUTS[layout][0] * LAYOUTS[layout][1] > gpus]
        if too_big:
            print(f"{gpus} GPU(s): skipping {', '.join(too_big)} (one GPU per rank)")
        layouts = [layout for layout in layouts if layout not in too_big]
    plan += [(f"bridge {layout}", "bridge", layout) for layout in layouts]
    runs: dict[str, list[list[dict]]] = {name: [] for name, _, _ in plan}
    for repeat in range(args.repeats):
        for name, kind, layout in plan:
            start = time.time()
            runs[name].append(run_measurement(kind, folder, work, args, layout))
            print(f"repeat {repeat + 1}/{args.repeats}: {name} {time.time() - start:.1f} s", flush=True)
    results = {name: summarise(records) for name, records in runs.items()}
    (work / "records.json").write_text(json.dumps(runs, indent=1))  # every process's numbers, for a closer look

    print()
    print(f"machine: {machine()}")
    print(
        f"checkpoint: {folder.name}: {params / 1e9:.3f} B parameters, {sum(sizes) / 1e9:.2f} GB in {len(files)} file(s), "
        f"largest tensor {largest / MIB:.0f} MiB; page cache warm; medians of {args.repeats} repeats"
    )
    print()
    print_table(results, largest)
    print_breakdown(results)
    ok = print_targets(results, largest)
    print()
    print("all targets PASS" if ok else "some targets FAIL")


if __name__ == "__main__":
    main()
