"""Training a converted model with Megatron-Core's engine (``bridge.training``) on CPU/gloo, tiny Llama, fp32.

Two groups of worker processes train on the same blended corpus with the same seed and batches:

- 4 ranks: TP2·PP2 for 20 steps (saving a checkpoint and an HF snapshot at step 10, exporting at
  the end), then steps 11–20 again twice from that checkpoint: at TP2·PP2 and at TP1·PP2·VPP2·DP2.
- 2 ranks: TP1·PP1·DP2 with Megatron's plain optimizer and with the distributed optimizer.

The tests then compare their per-step losses, grad norms and weights with each other and with
transformers. The example script and the preprocessing command run as subprocesses. A run that
raises fails the tests that read it, with the ranks' tracebacks (``tests/case_matrix.py``).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch

from bridge.runtime.local_launch import run_distributed
from tests.case_matrix import case_results, run_cases
from tests.commands import hfmb

pytestmark = pytest.mark.distributed  # every test starts processes or reads what spawned ranks computed

REPO = Path(__file__).resolve().parent.parent
STEPS, SAVE_AT = 20, 10
CONFIG = dict(
    train_iters=STEPS,
    micro_batch_size=1,
    global_batch_size=8,
    seq_length=32,
    lr=3e-3,
    min_lr=3e-4,
    lr_warmup_iters=2,
    lr_decay_style="cosine",
    clip_grad=1.0,
    log_interval=5,
)


def _train(
    hf: str,
    data_paths: list[str],
    tp: int,
    pp: int,
    vpp: int | None,
    distributed_optimizer: bool = True,
    save: str | None = None,
    snapshot: str | None = None,
    load: str | None = None,
    export: str | None = None,
) -> dict:
    """One training run on this group of ranks. ``save``: checkpoint (and HF ``snapshot``) at step SAVE_AT;
    ``load``: resume from it, checking the loaded weights against ``snapshot``; ``export``: HF folder at the end."""
    from megatron.core import parallel_state

    from bridge import AutoBridge
    from bridge.checks.verify import load_hf_tensors
    from bridge.training import (
        TrainingConfig,
        build_gpt_dataset,
        build_train_iterators,
        load_tokenizer,
        load_train_state,
        make_forward_step,
        save_train_state,
        setup_model_and_optimizer,
        train,
    )
    from tests.checks import check_model_shards

    parallel_state.destroy_model_parallel()
    cfg = TrainingConfig(**CONFIG, use_distributed_optimizer=distributed_optimizer)
    bridge = AutoBridge.from_hf_pretrained(hf, dtype=torch.float32)
    model, optimizer, scheduler = setup_model_and_optimizer(bridge, tp, pp, vpp, cfg, load_weights=load is None)
    out: dict = {"layout": (tp, pp, vpp, parallel_state.get_data_parallel_world_size())}
    start = consumed = 0
    if load is not None:
        info = load_train_state(load, model, optimizer, scheduler, cfg.use_distributed_optimizer)
        start, consumed = info.iteration, info.consumed_samples
        out["resume"] = (info.iteration, info.consumed_samples, info.loaded_optimizer, info.loaded_rng)
        out["loaded_weights"] = check_model_shards(model, bridge, load_hf_tensors(snapshot))[0]
    dataset = build_gpt_dataset(data_paths, load_tokenizer(hf), cfg.seq_length, cfg.train_iters * cfg.global_batch_size, seed=cfg.seed)
    if load is None:
        out["first_batch"] = (
            torch.stack([torch.as_tensor(dataset[i]["tokens"]) for i in range(cfg.global_batch_size)]),
            torch.stack([torch.as_tensor(dataset[i]["labels"]) for i in range(cfg.global_batch_size)]),
        )

    def on_step_end(result) -> None:
        if save is not None and result.iteration == SAVE_AT:
            save_train_state(save, model, optimizer, scheduler, SAVE_AT, SAVE_AT * cfg.global_batch_size, cfg.use_distributed_optimizer)
            bridge.save_hf_pretrained(model, snapshot)

    iterators = build_train_iterators(dataset, model, cfg.micro_batch_size, consumed)
    results = train(model, optimizer, scheduler, iterators, cfg, make_forward_step(), start, on_step_end, progress=False)
    out["steps"] = [r.iteration for r in results]
    out["losses"] = [r.loss for r in results]
    out["grad_norms"] = [r.grad_norm for r in results]
    out["lrs"] = [r.lr for r in results]
    if export is not None:
        bridge.save_hf_pretrained(model, export)
        out["export_vs_model"] = check_model_shards(model, bridge, load_hf_tensors(export))[0]
    return out


def four_rank_session(hf: str, data_paths: list[str], root: str) -> dict:
    """TP2·PP2 training (saved at step 10, exported at the end), then two resumes of its checkpoint; each run fails alone."""
    r = Path(root)
    ckpt, snapshot = str(r / "ckpt"), str(r / "snapshot-step10")
    runs: dict[str, Callable[[], dict]] = {
        "tp2pp2": lambda: _train(hf, data_paths, 2, 2, None, save=ckpt, snapshot=snapshot, export=str(r / "export")),
        "resume_tp2pp2": lambda: _train(hf, data_paths, 2, 2, None, load=ckpt, snapshot=snapshot),
        "resume_tp1pp2vpp2dp2": lambda: _train(hf, data_paths, 1, 2, 2, load=ckpt, snapshot=snapshot),
    }
    return run_cases(runs, lambda name: runs[name]())


def two_rank_session(hf: str, data_paths: list[str]) -> dict:
    """DP2 training with and without the distributed optimizer; each run fails alone."""
    runs: dict[str, Callable[[], dict]] = {
        "dp2": lambda: _train(hf, data_paths, 1, 1, None, distributed_optimizer=False),
        "dp2_distopt": lambda: _train(hf, data_paths, 1, 1, None, distributed_optimizer=True),
    }
    return run_cases(runs, lambda name: runs[name]())


def _run(session: dict, name: str) -> dict:
    """Rank 0's result of the run ``name``; fails the test with the ranks' messages when that run raised."""
    return case_results([session], name)[0]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("training")


@pytest.fixture(scope="module")
def four(demo, workdir) -> dict:
    return run_distributed(four_rank_session, 4, *demo, str(workdir))[0]


@pytest.fixture(scope="module")
def two(demo) -> dict:
    return run_distributed(two_rank_session, 2, *demo)[0]


@pytest.fixture(scope="module")
def runs(four, two) -> dict:
    return {"tp2pp2": four["tp2pp2"], **two}


# ---------------------------------------------------------------- training


def test_loss_goes_down_in_every_layout(runs):
    for name in runs:
        run = _run(runs, name)
        losses = run["losses"]
        assert run["steps"] == list(range(1, STEPS + 1)) and len(losses) == STEPS, name
        assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3, f"{name}: {losses}"


def test_layouts_agree_on_the_first_step_and_track_each_other(runs):
    reference = _run(runs, "tp2pp2")
    for name in runs:
        run = _run(runs, name)
        assert run["layout"][-1] in ((1, 2) if name == "tp2pp2" else (2,))
        assert abs(run["losses"][0] - reference["losses"][0]) <= 1e-4, name
        # the grad norm of step 1 sums every TP shard once (TP-split weights must be tagged as such)
        assert abs(run["grad_norms"][0] - reference["grad_norms"][0]) <= 1e-4 * reference["grad_norms"][0], name
        assert run["lrs"] == pytest.approx(reference["lrs"], rel=1e-12), name
        for step, (a, b) in enumerate(zip(run["losses"], reference["losses"]), 1):
            assert abs(a - b) <= 1e-5 * abs(b), f"{name} step {step}: {a} vs {b}"  # measured: 5e-8


def test_first_step_loss_equals_transformers(runs, demo):
    from transformers import AutoModelForCausalLM

    tokens, labels = _run(runs, "tp2pp2")["first_batch"]
    model = AutoModelForCausalLM.from_pretrained(demo[0], dtype=torch.float32)
    with torch.no_grad():
        logits = model(tokens).logits
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten()).item()
    for name in runs:
        run = _run(runs, name)
        assert abs(run["losses"][0] - expected) <= 1e-4, f"{name}: {run['losses'][0]} vs transformers {expected}"


def test_learning_rate_follows_warmup_and_cosine_decay(runs):
    lrs = _run(runs, "tp2pp2")["lrs"]
    assert lrs[0] == 0.0 and lrs[1] == pytest.approx(1.5e-3) and lrs[2] == pytest.approx(3e-3)
    assert all(a > b for a, b in zip(lrs[2:], lrs[3:])) and lrs[-1] > CONFIG["min_lr"]


# ---------------------------------------------------------------- checkpoints


def test_resume_at_the_same_layout_repeats_the_uninterrupted_run(four):
    base, resumed = _run(four, "tp2pp2"), _run(four, "resume_tp2pp2")
    assert resumed["resume"] == (SAVE_AT, SAVE_AT * CONFIG["global_batch_size"], True, True)
    assert resumed["loaded_weights"] == []
    assert resumed["steps"] == list(range(SAVE_AT + 1, STEPS + 1))
    assert resumed["losses"] == pytest.approx(base["losses"][SAVE_AT:], abs=1e-6)
    assert resumed["grad_norms"] == pytest.approx(base["grad_norms"][SAVE_AT:], rel=1e-6)
    assert resumed["lrs"] == pytest.approx(base["lrs"][SAVE_AT:], rel=1e-12)


def test_resume_at_another_layout_loads_the_saved_weights_and_tracks_the_run(four):
    base, resumed = _run(four, "tp2pp2"), _run(four, "resume_tp1pp2vpp2dp2")
    assert resumed["layout"] == (1, 2, 2, 2)
    assert resumed["resume"] == (SAVE_AT, SAVE_AT * CONFIG["global_batch_size"], True, False)  # RNG is per TP×PP rank
    assert resumed["loaded_weights"] == []  # every shard equals the step-10 weights bit for bit
    assert resumed["steps"] == list(range(SAVE_AT + 1, STEPS + 1))
    assert resumed["losses"] == pytest.approx(base["losses"][SAVE_AT:], rel=1e-3)
    assert resumed["lrs"] == pytest.approx(base["lrs"][SAVE_AT:], rel=1e-12)


def test_checkpoint_is_in_megatron_lm_layout(four, workdir):
    _run(four, "tp2pp2")  # the run that saved it
    ckpt = workdir / "ckpt"
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == str(SAVE_AT)
    assert (ckpt / f"iter_{SAVE_AT:07d}" / "metadata.json").is_file()


# ---------------------------------------------------------------- export


def test_export_loads_in_transformers_and_holds_the_trained_weights(four, demo, workdir):
    from transformers import AutoModelForCausalLM

    from bridge.checks.verify import load_hf_tensors

    export = workdir / "export"
    assert _run(four, "tp2pp2")["export_vs_model"] == []  # every Megatron shard equals the exported tensor, bit for bit
    model, info = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    prompt = torch.tensor([[10, 11, 12, 13, 14, 15]])
    generated = model.generate(prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=2)
    assert generated.shape == (1, 10)
    trained, original = load_hf_tensors(export), load_hf_tensors(demo[0])
    assert trained.keys() == original.keys()
    unchanged = [name for name in original if torch.equal(trained[name], original[name])]
    assert unchanged == []  # Adam with weight decay moved every tensor
    assert all(trained[name].dtype == torch.float32 for name in trained)


# ---------------------------------------------------------------- command line


def _env() -> dict:
    return {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def test_preprocessing_command(demo, workdir):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    corpus = workdir / "tiny.jsonl"
    corpus.write_text('{"text": "w3 w4 w5"}\n\n{"text": "w7 w8"}\n')
    prefix = workdir / "pre" / "tiny"
    cmd = [
        sys.executable,
        "-W",
        "default",
        "-m",
        "bridge.training.data",
        "--input",
        str(corpus),
        "--tokenizer",
        demo[0],
        "--output-prefix",
        str(prefix),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, env={**_env(), "PYTHONWARNINGS": "default"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "found in sys.modules" not in result.stderr  # the module runs once, not a second copy
    dataset = IndexedDataset(str(prefix))
    assert [dataset[i].tolist() for i in range(len(dataset))] == [[3, 4, 5, 2], [7, 8, 2]]  # each document ends with EOS


def test_example_script_converts_trains_saves_and_exports(workdir):
    out = workdir / "example"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node=2",
        str(REPO / "examples" / "convert_and_train.py"),
        "--workdir",
        str(out),
        "--tp",
        "1",
        "--pp",
        "2",
        "--train-iters",
        "12",
        "--log-interval",
        "3",
        "--seq-length",
        "32",
        "--save",
        str(out / "ckpt"),
        "--save-interval",
        "6",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO, env=_env())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    text = result.stdout + result.stderr
    lines = re.findall(
        r"^iteration (\d+)/12 \| loss ([\d.]+) \| lr (\S+) \| grad norm ([\d.]+) \| tokens/s (\d+) \| elapsed ([\d.]+)s$", text, re.M
    )
    assert [int(line[0]) for line in lines] == [3, 6, 9, 12], text[-3000:]
    losses = [float(line[1]) for line in lines]
    assert all(a > b for a, b in zip(losses, losses[1:])) and losses[-1] < losses[0] - 0.15, losses
    assert (out / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip() == "12"
    assert (out / "ckpt" / "iter_0000006" / "metadata.json").is_file()
    assert (out / "hf_export" / "config.json").is_file()
    assert re.search(r"^exported to .*; transformers continues '.+' with '.+'$", text, re.M), text[-3000:]

    # The training checkpoint carries its provenance: `hfmb export` takes it and gives the model the run exported.
    from bridge.checks.verify import compare_hf_folders

    exported = out / "hfmb_export"
    done = hfmb("export", str(out / "ckpt"), str(exported))
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert compare_hf_folders(out / "hf_export", exported) == []

    # A rerun never destroys the earlier run's checkpoint: without --load it is refused, with it it resumes.
    saved = (out / "ckpt" / "iter_0000012" / "metadata.json").stat().st_mtime_ns
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO, env=_env())
    assert again.returncode != 0 and f"add --load {out / 'ckpt'} to resume it" in again.stderr, again.stderr[-3000:]
    resumed = subprocess.run([*cmd, "--load", str(out / "ckpt")], capture_output=True, text=True, timeout=600, cwd=REPO, env=_env())
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-5000:]
    assert "resumed at iteration 12: nothing left to train" in resumed.stdout
    assert (out / "ckpt" / "iter_0000012" / "metadata.json").stat().st_mtime_ns == saved


def test_a_save_never_replaces_a_complete_checkpoint(tmp_path):
    from bridge.megatron.checkpoint import MegatronCheckpointError, check_save_keeps_history, write_tracker

    (tmp_path / "iter_0000040").mkdir()
    (tmp_path / "iter_0000040" / "metadata.json").write_text("{}")
    (tmp_path / "iter_0000020").mkdir()  # an incomplete save (no metadata.json) may be replaced
    write_tracker(tmp_path, 40)
    with pytest.raises(MegatronCheckpointError, match="already holds a complete checkpoint at iteration 40"):
        check_save_keeps_history(tmp_path, 40)
    with pytest.raises(MegatronCheckpointError, match="holds a checkpoint at iteration 40, later than the iteration 20"):
        check_save_keeps_history(tmp_path, 20)
    check_save_keeps_history(tmp_path, 60)
