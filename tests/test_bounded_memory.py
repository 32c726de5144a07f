"""Bounded-memory import/export (``bridge/megatron/streaming_*.py``): exact, loadable at any layout, and bounded.

* The streamed import of a dense, a tied-embedding and four MoE checkpoints (GLM-4.5, DeepSeek-V3 among them)
  loads (at TP=PP=1 and at TP2·PP2) into exactly the weights the in-memory conversion gives, and its streamed export equals
  the source HF folder bit for bit.
* In a fresh process, importing and exporting a checkpoint several times larger than ``--max-memory``
  stays within it: peak RSS (VmHWM) minus the RSS right after the imports.
* The accounting is the real figure: a checkpoint with one 256 MiB tensor is refused below the
  budget its refusal names (naming the tensor, leaving no output folder), converts at that budget
  (the estimate plus its stated margin), and peaks below it, as measured and as reported.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from bridge.runtime.local_launch import run_distributed
from tests.case_matrix import case_results, run_cases

pytestmark = pytest.mark.distributed  # every test starts processes or reads what spawned ranks computed

# dense, tied embeddings, MoE with a shared expert and dense layers, MoE, sigmoid router, multi-latent attention
MODELS = ("llama", "llama3.2", "qwen2_moe", "mixtral", "glm4_moe", "deepseek_v3")


def _cli(*argv: str) -> tuple[int, str, str]:
    import contextlib
    import io

    from bridge.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def _differences(expected: list, actual: list) -> list[str]:
    problems = []
    for chunk_e, chunk_a in zip(expected, actual):
        got = dict(chunk_a.named_parameters())
        for name, param in chunk_e.named_parameters():
            if param.dtype != got[name].dtype or not torch.equal(param, got[name]):
                problems.append(name)
    return problems


def single_rank_session(hf: dict[str, str], root: str) -> dict:
    """Streamed import (CLI, TP=1 and TP=2 vocabulary padding) of each model, compared with the in-memory conversion; streamed export."""
    from megatron.core import parallel_state

    from bridge import AutoBridge
    from bridge.checks.verify import compare_hf_folders
    from bridge.megatron import checkpoint as mc

    def run_case(name: str) -> dict:
        ckpt, out = f"{root}/{name}-ckpt", f"{root}/{name}-out"
        r = {"import": _cli("import", hf[name], ckpt, "--max-memory", "64MB")}
        r["import_tp2"] = _cli("import", hf[name], f"{root}/{name}-ckpt-tp2", "--tp", "2", "--pp", "2")  # default budget
        bridge = AutoBridge.from_hf_pretrained(hf[name])
        expected = bridge.to_megatron_model(load_weights=True)
        actual = bridge.to_megatron_model(load_weights=False)
        mc.load_model(ckpt, actual)
        r["differences"] = _differences(expected, actual)
        parallel_state.destroy_model_parallel()
        r["export"] = _cli("export", ckpt, out, "--max-memory", "64MB", "--max-shard-size", "200KB")
        r["roundtrip"] = compare_hf_folders(hf[name], out)
        r["shards"] = len(list(Path(out).glob("*.safetensors")))
        return r

    results = run_cases(MODELS, run_case)
    results["budget_import"] = _cli("import", hf["llama"], f"{root}/never", "--max-memory", "100KB")
    results["budget_export"] = _cli("export", f"{root}/llama-ckpt", f"{root}/never-out", "--max-memory", "100KB")
    return results


def four_rank_session(hf: dict[str, str], root: str) -> dict:
    """TP2·PP2: the streamed checkpoint loads into exactly the in-memory conversion's shards."""
    from megatron.core import parallel_state

    from bridge import AutoBridge
    from bridge.megatron import checkpoint as mc

    def run_case(name: str) -> list[str]:
        parallel_state.destroy_model_parallel()
        bridge = AutoBridge.from_hf_pretrained(hf[name])
        expected = bridge.to_megatron_model(tp=2, pp=2, load_weights=True)
        actual = bridge.to_megatron_model(tp=2, pp=2, load_weights=False)
        mc.load_model(f"{root}/{name}-ckpt-tp2", actual)
        differences = _differences(expected, actual)
        parallel_state.destroy_model_parallel()
        return differences

    return run_cases(MODELS, run_case)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bounded")


@pytest.fixture(scope="module")
def hf_folders(tiny_checkpoints, tiny_moe_checkpoints) -> dict[str, str]:
    return {name: str(path) for name, path in {**tiny_checkpoints, **tiny_moe_checkpoints}.items()}


@pytest.fixture(scope="module")
def single(hf_folders, workdir) -> dict:
    return run_distributed(single_rank_session, 1, hf_folders, str(workdir))[0]


@pytest.fixture(scope="module")
def four(single, hf_folders, workdir) -> list[dict]:
    return run_distributed(four_rank_session, 4, hf_folders, str(workdir))


@pytest.mark.parametrize("name", MODELS)
def test_streamed_import_equals_the_in_memory_conversion(single, name):
    (result,) = case_results([single], name)
    code, out, err = result["import"]
    assert code == 0, err
    assert "streamed in one process (peak " in out and " of --max-memory 64MB)" in out
    assert result["differences"] == []


@pytest.mark.parametrize("name", MODELS)
def test_streamed_import_loads_at_tp2_pp2(single, four, name):
    code, out, err = case_results([single], name)[0]["import_tp2"]
    assert code == 0, err
    assert "hfmb: starting" not in err  # streaming needs no ranks, whatever the layout
    differences = case_results(four, name)
    assert all(rank == [] for rank in differences), differences


@pytest.mark.parametrize("name", MODELS)
def test_streamed_export_is_bit_exact(single, name):
    (result,) = case_results([single], name)
    code, out, err = result["export"]
    assert code == 0, err
    assert "transformers load report: empty" in out
    assert result["roundtrip"] == []
    assert result["shards"] > 1  # --max-shard-size is honoured


def test_a_tensor_over_the_budget_is_refused_by_name(single, workdir):
    code, _, err = single["budget_import"]  # the parameter that holds the most: fc1, a half of it cloned to be written
    assert code == 2 and "decoder.layers.0.mlp.linear_fc1.weight" in err and "--max-memory 100KB allows" in err
    assert "raise --max-memory to at least" in err
    code, _, err = single["budget_export"]
    assert code == 2 and "embedding.word_embeddings.weight" in err and "--max-memory 100KB allows" in err
    assert not (workdir / "never").exists() and not (workdir / "never-out").exists()
    assert not list(workdir.glob(".never*"))


# ---------------------------------------------------------------- memory

BUDGET = "64MB"
# A Llama-architecture checkpoint of 257 MiB in bf16 (12 layers, hidden 1024, MLP 2560, vocab 4096):
# four times the budget, the largest tensor (fused fc1) 10 MiB.
BIG = dict(vocab_size=4096, hidden_size=1024, intermediate_size=2560, num_hidden_layers=12, num_attention_heads=16, num_key_value_heads=4)

_MEASURE = textwrap.dedent(
    """
    import contextlib, io, json, resource, sys, warnings
    warnings.filterwarnings("ignore")
    import torch, transformers
    from transformers.models.llama import modeling_llama
    import bridge.models.llama
    from bridge import cli
    from bridge.megatron import streaming_export, streaming_import
    from bridge.checks import verify

    from tests.process_memory import proc_status_bytes as status

    baseline = status("VmRSS")
    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(io.StringIO()) as err:
        code = cli.main(sys.argv[1:])
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    report = {"code": code, "baseline": baseline, "peak": status("VmHWM"), "ru_maxrss": maxrss}
    print(json.dumps({**report, "out": out.getvalue(), "err": err.getvalue()}))
    """
)
# The peak is VmHWM, this process's own high-water mark: Linux carries ru_maxrss over exec, so a child
# of the (large) pytest process would report pytest's resident size as its own peak. The conversion
# resets it where it starts measuring its own peak (``PeakMemory``): what came before (the bridge,
# the meta model: module imports) is then not seen, everything the conversion holds is.


def _measure(*argv: str) -> dict:
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run([sys.executable, "-c", _MEASURE, *argv], capture_output=True, text=True, cwd=root, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def convert_within_budget(hf: Path, root: Path, label: str, times: int, *export_args: str) -> None:
    """``hfmb import`` then ``hfmb export`` of ``hf`` (in ``root``) within ``BUDGET``, each in a fresh process: the Megatron
    checkpoint is more than ``times`` the budget, each step's peak RSS over its imports stays under the budget, and the
    export equals ``hf`` bit for bit."""
    from bridge.checks.verify import compare_hf_folders
    from bridge.runtime.sizes import parse_size

    budget = parse_size(BUDGET)
    ckpt, out = (root / "within-budget" / label.replace(" ", "-") / name for name in ("ckpt", "out"))
    imported = _measure("import", str(hf), str(ckpt), "--max-memory", BUDGET)
    assert imported["code"] == 0, imported["err"]
    size = _folder_bytes(ckpt / "release")
    assert size > times * budget, size
    exported = _measure("export", str(ckpt), str(out), "--max-memory", BUDGET, *export_args)
    assert exported["code"] == 0, exported["err"]
    for step, measured in (("import", imported), ("export", exported)):
        over = measured["peak"] - measured["baseline"]
        print(f"{label} {step}: checkpoint {size / 2**20:.0f} MiB, peak RSS over the imports {over / 2**20:.1f} MiB of {BUDGET}")
        assert over < budget, f"{step}: peak RSS {over / 2**20:.1f} MiB above the imports, over the {BUDGET} budget"
    assert compare_hf_folders(hf, out) == []


def test_peak_memory_stays_within_the_budget_for_a_checkpoint_four_times_larger(workdir):
    from tests.tiny_checkpoints import build_tiny_checkpoint

    convert_within_budget(build_tiny_checkpoint("llama", workdir / "big-hf", **BIG), workdir, "llama", 4)


# A gpt-oss whose experts are 232 MiB in bf16 (8 layers of 8 experts, hidden and expert MLP 768), stored in MXFP4
# as released (about 62 MiB on disk): read dequantized, written back in MXFP4.
BIG_GPT_OSS = dict(
    vocab_size=4096, hidden_size=768, intermediate_size=768, num_hidden_layers=8, num_attention_heads=12, num_key_value_heads=4
)


def test_an_mxfp4_checkpoint_converts_within_the_budget_and_comes_back_byte_for_byte(workdir):
    import shutil

    from tests.tiny_checkpoints import build_tiny_checkpoint, mxfp4_copy

    bf16 = build_tiny_checkpoint("gptoss", workdir / "gptoss-bf16", num_local_experts=8, head_dim=64, **BIG_GPT_OSS)
    hf = mxfp4_copy(bf16, workdir / "gptoss-mxfp4")
    shutil.rmtree(bf16)
    convert_within_budget(hf, workdir, "gpt-oss MXFP4", 3, "--quantize", "mxfp4")  # the blocks and scales as released


# ---------------------------------------------------------------- the accounting

MiB = 2**20
# A Llama with one large tensor: the tied 65536 × 2048 bf16 embedding, 256 MiB; two small layers.
ONE_LARGE = dict(vocab_size=65536, hidden_size=2048, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=16)
_MINIMUM = re.compile(r"raise --max-memory to at least (\d+)MiB")


def _refused_then_converted(step: str, source: Path, target: Path, *extra: str) -> tuple[dict, int]:
    """``step`` refused at 100MB (naming the embedding, leaving nothing), then run at the minimum the refusal named."""
    refused = _measure(step, str(source), str(target), "--max-memory", "100MB", *extra)
    assert refused["code"] == 2, refused["err"]
    assert "embedding.word_embeddings.weight" in refused["err"] and "more than --max-memory 100MB allows" in refused["err"]
    assert not target.exists() and not list(target.parent.glob(f".{target.name}*")), "a refused conversion left files"
    minimum = int(_MINIMUM.search(refused["err"]).group(1))
    converted = _measure(step, str(source), str(target), "--max-memory", f"{minimum}MiB", *extra)
    assert converted["code"] == 0, converted["err"]
    return converted, minimum


def test_a_256_mib_tensor_converts_at_the_budget_its_refusal_names_and_peaks_below_it(tmp_path):
    from bridge.checks.verify import compare_hf_folders
    from tests.synthetic_llama import LlamaShape, write_llama_checkpoint

    hf = write_llama_checkpoint(tmp_path / "hf", LlamaShape(**ONE_LARGE, num_key_value_heads=4, tie_word_embeddings=True))
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    for step, source, target in (("import", hf, ckpt), ("export", ckpt, out)):
        measured, minimum = _refused_then_converted(step, source, target)
        # The estimate is the bytes held (2 × 256 MiB: the parameter and the mapped HF tensor, or the saved
        # chunk read) plus a stated margin of tens of MiB, not a multiple of the tensor.
        assert 512 * MiB < minimum * MiB < 600 * MiB, minimum
        over = measured["peak"] - measured["baseline"]
        reported = re.search(rf"peak ([\d.]+) MiB of --max-memory {minimum}MiB", measured["out"])
        assert reported, measured["out"]
        print(f"{step}: minimum budget {minimum} MiB, peak RSS over the imports {over / MiB:.1f} MiB, reported {reported.group(1)} MiB")
        assert float(reported.group(1)) * MiB <= over + MiB  # the report's peak is the process's own
        assert over < minimum * MiB, f"{step}: peak RSS {over / MiB:.1f} MiB above the imports, over the {minimum} MiB budget"
    assert compare_hf_folders(hf, out) == []
