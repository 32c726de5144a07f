"""The ``hfmb`` command line on tiny checkpoints: each command, its report and its failure exits.

Two groups of worker processes run the commands in-process (``bridge.cli.main``), as torchrun
would: one group of 4 ranks (TP2·PP2 plan / import / verify, an export at another layout) and one
of a single rank (everything at TP=PP=1, the failure exits, permuted-QKV checkpoints: two query heads of
a Llama, k and v of a Phi-3). The tests then read their exit codes and reports.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bridge.runtime.local_launch import run_distributed
from tests.edited_checkpoints import edited_copy

EXIT_OK, EXIT_CHECK, EXIT_INPUT = 0, 1, 2


def _cli(*argv: str) -> tuple[int, str, str]:
    """``hfmb argv`` in this process: (exit code, stdout, stderr)."""
    import contextlib
    import io

    from bridge.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def multi_rank_session(hf: dict[str, str], root: str) -> dict:
    """4 ranks: plan, import and verify at TP2·PP2, verify a conversion at TP2·DP2, export at TP1·PP2·DP2."""
    root_path = Path(root)
    ckpt = str(root_path / "qwen2-tp2pp2")
    return {
        "plan": _cli("plan", hf["qwen2"], "--tp", "2", "--pp", "2"),
        "import": _cli("import", hf["qwen2"], ckpt, "--tp", "2", "--pp", "2"),
        "verify_ckpt": _cli("verify", hf["qwen2"], ckpt, "--tp", "2", "--pp", "2"),
        "verify_convert": _cli("verify", hf["qwen3"], "--tp", "2"),
        "export": _cli("export", ckpt, str(root_path / "qwen2-from-tp2pp2"), "--pp", "2", "--max-shard-size", "60KB"),
    }


def _swap_qkv_heads(ckpt: str, out: str, first: int = 0, second: int = 1) -> None:
    """Copy a checkpoint and save, as its iteration 10 (as a training run would), the same weights with two
    heads' rows of layer 1's fused QKV swapped: head blocks ``first`` and ``second`` of its group 0, counted in
    Megatron's order (its query heads, then k, then v). The defaults swap two query heads (a classic interleave
    bug); with 2 query heads per group, 2 and 3 swap k and v."""
    from megatron.core import parallel_state

    from bridge import AutoBridge
    from bridge.megatron import checkpoint as mc

    shutil.copytree(ckpt, out)
    info = mc.read_source_info(ckpt)
    bridge = AutoBridge.from_hf_pretrained(mc.hf_config_folder(ckpt), dtype=getattr(torch, info["params_dtype"]))
    model = bridge.to_megatron_model(load_weights=False)
    mc.load_model(ckpt, model)
    d = model[0].config.kv_channels
    weight = model[0].decoder.layers[1].self_attention.linear_qkv.weight
    a, b = slice(first * d, (first + 1) * d), slice(second * d, (second + 1) * d)
    with torch.no_grad():
        rows_a, rows_b = weight[a].clone(), weight[b].clone()
        weight[a], weight[b] = rows_b, rows_a
    mc.save_checkpoint(out, mc.model_state_dict(model), iteration=10)
    parallel_state.destroy_model_parallel()


def _register_bridge_missing_a_mapping() -> None:
    """A bridge whose table forgets the final norm: its Megatron parameter has no mapping."""
    from bridge.mappings import MappingRegistry
    from bridge.models.llama import LlamaBridge
    from bridge.models.registry import register_bridge

    @register_bridge("ForgetfulLlamaForCausalLM")
    class ForgetfulLlamaBridge(LlamaBridge):
        def mapping_registry(self) -> MappingRegistry:
            return MappingRegistry(m for m in super().mapping_registry() if m.megatron_param != "decoder.final_layernorm.weight")


def single_rank_session(hf: dict[str, str], broken: dict[str, str], root: str, multi_ckpt: str) -> dict:
    from bridge.checks.verify import compare_hf_folders

    root_path = Path(root)
    ckpt, out, bad = (str(root_path / name) for name in ("llama-ckpt", "llama-out", "llama-permuted"))
    r: dict = {}
    r["plan"] = _cli("plan", hf["llama"])
    _register_bridge_missing_a_mapping()
    r["plan_unmapped"] = _cli("plan", broken["forgetful"])
    r["plan_unused"] = _cli("plan", broken["unused"])
    r["plan_wrong_shape"] = _cli("plan", broken["wrong_shape"])
    r["import_wrong_shape"] = _cli("import", broken["wrong_shape"], str(root_path / "never"))
    r["import"] = _cli("import", hf["llama"], ckpt)
    r["import_exists"] = _cli("import", hf["llama"], ckpt)
    r["export"] = _cli("export", ckpt, out)
    r["roundtrip"] = compare_hf_folders(hf["llama"], out)
    r["verify_folders_same"] = _cli("verify", hf["llama"], out)
    r["verify_export_vs_ckpt"] = _cli("verify", out, ckpt)  # the export's config spells rope/dtype both ways
    r["export_exists"] = _cli("export", ckpt, out)
    r["export_fp32"] = _cli("export", ckpt, out, "--overwrite", "--dtype", "float32", "--max-shard-size", "100KB")
    r["verify_folders_differ"] = _cli("verify", hf["llama"], out)
    r["verify_convert"] = _cli("verify", hf["llama"])
    r["verify_ckpt"] = _cli("verify", hf["llama"], ckpt)
    _swap_qkv_heads(ckpt, bad)
    r["verify_permuted"] = _cli("verify", hf["llama"], bad)
    r["verify_release_of_permuted"] = _cli("verify", hf["llama"], bad, "--iteration", "release")
    r["verify_mismatched_config"] = _cli("verify", hf["qwen3"], ckpt)
    phi, phi_bad = str(root_path / "phi3-ckpt"), str(root_path / "phi3-kv-swapped")
    r["import_phi"] = _cli("import", hf["phi3"], phi)  # one process: streamed through the fused mappings, both ways
    r["verify_phi"] = _cli("verify", hf["phi3"], phi)
    r["export_phi"] = _cli("export", phi, str(root_path / "phi3-out"))
    r["phi_roundtrip"] = compare_hf_folders(hf["phi3"], root_path / "phi3-out")
    _swap_qkv_heads(phi, phi_bad, 2, 3)  # Phi-3's fused qkv_proj: layer 1's k and v rows of group 0 swapped
    r["verify_phi_kv_swapped"] = _cli("verify", hf["phi3"], phi_bad)
    r["export_multi"] = _cli("export", multi_ckpt, str(root_path / "qwen2-from-tp2pp2-at-tp1"))
    r["multi_roundtrip"] = compare_hf_folders(hf["qwen2"], root_path / "qwen2-from-tp2pp2-at-tp1")
    edited = root_path / "llama-ckpt-edited-config"
    shutil.copytree(ckpt, edited)
    config = json.loads((edited / "hf_config" / "config.json").read_text())
    (edited / "hf_config" / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
    r["export_mismatched_config"] = _cli("export", str(edited), str(root_path / "never-exported"))
    return r


def _add_unused(tensors):
    tensors["model.layers.0.mlp.extra_proj.weight"] = torch.zeros(4, 4, dtype=torch.bfloat16)


def _wrong_shape(tensors):
    tensors["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(48, 64, dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def multi(tiny_checkpoints, workdir) -> list[dict]:
    return run_distributed(multi_rank_session, 4, {k: str(v) for k, v in tiny_checkpoints.items()}, str(workdir))


@pytest.fixture(scope="module")
def single(tiny_checkpoints, workdir, multi) -> dict:
    broken = {
        "unused": str(edited_copy(tiny_checkpoints["llama"], workdir / "unused", _add_unused)),
        "wrong_shape": str(edited_copy(tiny_checkpoints["llama"], workdir / "wrong-shape", _wrong_shape)),
        "forgetful": str(edited_copy(tiny_checkpoints["llama"], workdir / "forgetful", lambda tensors: None)),
    }
    config = json.loads((workdir / "forgetful" / "config.json").read_text())
    (workdir / "forgetful" / "config.json").write_text(json.dumps({**config, "architectures": ["ForgetfulLlamaForCausalLM"]}))
    hf = {k: str(v) for k, v in tiny_checkpoints.items()}
    return run_distributed(single_rank_session, 1, hf, broken, str(workdir), str(workdir / "qwen2-tp2pp2"))[0]


def _metric(report: str, name: str) -> str:
    match = re.search(rf"^{re.escape(name)}\s+(\S+)\s.*?(ok|FAIL|-)$", report, re.M)
    assert match, f"no {name!r} line in:\n{report}"
    return match.group(1) + " " + match.group(2)


# ---------------------------------------------------------------- help


@pytest.mark.distributed
def test_console_script_shows_an_example_for_every_command():
    script = Path(sys.executable).parent / "hfmb"
    assert script.exists(), "the hfmb console script is not installed: pip install -e ."
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    for command in ("plan", "import", "export", "verify"):
        assert f"  hfmb {command} " in result.stdout
    assert "exit status: 0 ok, 1 a check failed, 2 bad input" in result.stdout


@pytest.mark.parametrize("command", ["plan", "import", "export", "verify"])
def test_every_command_has_help_with_an_example(command, capsys):
    from bridge.cli import build_parser

    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "examples:" in text and f"hfmb {command} " in text


# ---------------------------------------------------------------- plan


@pytest.mark.distributed
def test_plan_lists_every_tensor_with_kind_shapes_and_ranks(multi):
    code, out, _ = multi[0]["plan"]
    assert code == EXIT_OK, out
    assert "architecture: Qwen2ForCausalLM" in out and "tp=2 pp=2" in out and "num_query_groups = 2" in out
    rows = {}
    for line in out.splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if len(cells) >= 6 and cells[0].startswith("model."):
            rows.setdefault(cells[0], []).append(cells)
    # every HF tensor of the checkpoint is in the table: embedding, final norm, 12 per layer (qwen2 is tied: no lm_head)
    assert len(rows) == 2 + 4 * 12
    q = rows["model.layers.0.self_attn.q_proj.weight"][0]
    assert q[1:] == ["[64, 64]", "decoder.layers.0.self_attention.linear_qkv.weight", "qkv", "[64, 64] (tp-split)", "pp0 ranks 0-1"]
    down = rows["model.layers.3.mlp.down_proj.weight"][0]
    assert down[2:] == ["decoder.layers.3.mlp.linear_fc2.weight", "row", "[64, 64] (tp-split)", "pp1 ranks 2-3"]
    norm = rows["model.norm.weight"][0]
    assert norm[2:] == ["decoder.final_layernorm.weight", "replicated", "[64] (replicated)", "pp1 ranks 2-3"]
    # the tied embedding feeds the first stage's embedding and the last stage's output layer
    embedding = sorted(tuple(cells[2:]) for cells in rows["model.embed_tokens.weight"])
    assert embedding == [
        ("embedding.word_embeddings.weight", "vocab", "[128, 64] (tp-split)", "pp0 ranks 0-1"),
        ("output_layer.weight", "vocab (load only)", "[128, 64] (tp-split)", "pp1 ranks 2-3"),
    ]
    assert "plan OK: 50 HF tensors → 31 Megatron parameters on 4 rank(s)" in out
    assert all(rank["plan"][0] == EXIT_OK and rank["plan"][1] == "" for rank in multi[1:])  # only rank 0 prints


@pytest.mark.distributed
def test_plan_single_process(single):
    code, out, _ = single["plan"]
    assert code == EXIT_OK and "lm_head.weight" in out and "plan OK: 39 HF tensors → 27 Megatron parameters on 1 rank(s)" in out


@pytest.mark.distributed
def test_plan_fails_on_an_unused_tensor(single):
    code, out, _ = single["plan_unused"]
    assert code == EXIT_CHECK
    assert "PLAN FAILED" in out and "unused tensors (no mapping reads them): model.layers.0.mlp.extra_proj.weight" in out


@pytest.mark.distributed
def test_plan_fails_on_an_unmapped_megatron_parameter(single):
    code, out, _ = single["plan_unmapped"]
    assert code == EXIT_CHECK
    assert "PLAN FAILED: Megatron parameters with no mapping: decoder.final_layernorm.weight" in out


@pytest.mark.distributed
def test_plan_fails_on_a_wrong_shape(single):
    code, out, _ = single["plan_wrong_shape"]
    assert code == EXIT_CHECK
    assert "model.layers.1.self_attn.k_proj.weight in model.safetensors is [48, 64], the model needs [32, 64]" in out
    assert re.search(r"model\.layers\.1\.self_attn\.k_proj\.weight\s+\[48, 64\].*SHAPE \(needs \[32, 64\]\)", out)


# ---------------------------------------------------------------- import / export


@pytest.mark.distributed
def test_import_refuses_a_wrong_shape_before_writing(single, workdir):
    code, _, err = single["import_wrong_shape"]
    assert code == EXIT_INPUT and "k_proj.weight" in err and "[48, 64]" in err
    assert not (workdir / "never").exists() and not list(workdir.glob(".never.tmp-*"))


@pytest.mark.distributed
def test_import_writes_a_megatron_lm_checkpoint(single, workdir):
    code, out, _ = single["import"]
    assert code == EXIT_OK, out
    root = workdir / "llama-ckpt"
    assert (root / "latest_checkpointed_iteration.txt").read_text() == "release"
    assert (root / "release" / "metadata.json").exists() and (root / "hf_config" / "config.json").exists()
    assert (root / "hf_config" / "tokenizer.json").exists() and (root / "bridge.json").exists()
    assert not list(workdir.glob(".llama-ckpt.tmp-*"))


@pytest.mark.distributed
def test_import_refuses_an_existing_checkpoint(single):
    code, _, err = single["import_exists"]
    assert code == EXIT_INPUT and "not empty" in err and "--overwrite" in err


@pytest.mark.distributed
def test_export_is_bit_exact_and_loads_cleanly(single):
    code, out, _ = single["export"]
    assert code == EXIT_OK, out
    assert single["roundtrip"] == []
    assert "transformers load report: empty" in out


@pytest.mark.distributed
def test_export_refuses_an_existing_target_and_overwrites_on_request(single, workdir):
    code, _, err = single["export_exists"]
    assert code == EXIT_INPUT and "not empty" in err
    code, out, _ = single["export_fp32"]
    assert code == EXIT_OK, out
    shards = sorted(p.name for p in (workdir / "llama-out").glob("*.safetensors"))
    assert len(shards) > 1 and shards[-1] == f"model-{len(shards):05d}-of-{len(shards):05d}.safetensors"


@pytest.mark.distributed
def test_export_refuses_a_checkpoint_that_does_not_match_its_config(single, workdir):
    code, _, err = single["export_mismatched_config"]
    assert code == EXIT_INPUT
    assert "tensor decoder.layers.mlp.linear_fc1.weight is [4, 256, 64], the model of this config needs [4, 192, 64]" in err, err
    assert not (workdir / "never-exported").exists()


@pytest.mark.distributed
def test_checkpoint_from_tp2pp2_exports_at_other_layouts(multi, single):
    assert all(rank["import"][0] == EXIT_OK for rank in multi), multi[0]["import"]
    assert all(rank["export"][0] == EXIT_OK for rank in multi), multi[0]["export"]
    assert single["export_multi"][0] == EXIT_OK, single["export_multi"]
    assert single["multi_roundtrip"] == []


# ---------------------------------------------------------------- verify


def _assert_passed(result):
    code, out, _ = result
    assert code == EXIT_OK, out
    assert float(_metric(out, "logits max abs diff").split()[0]) <= 1e-4
    assert _metric(out, "top-1 agreement") == "100.00% ok"
    assert re.search(r"^\s+3\s+\S+\s+\S+\s+\S+$", out, re.M)  # a row for the last layer
    assert out.rstrip().endswith("VERIFY PASSED")


@pytest.mark.distributed
def test_verify_a_conversion(single, multi):
    _assert_passed(single["verify_convert"])
    _assert_passed(multi[0]["verify_convert"])
    assert "tp=2 pp=1 vpp=1 ep=1 on 4 rank(s)" in multi[0]["verify_convert"][1]


@pytest.mark.distributed
def test_verify_a_checkpoint(single, multi):
    _assert_passed(single["verify_ckpt"])
    _assert_passed(multi[0]["verify_ckpt"])
    assert all(rank["verify_ckpt"][0] == EXIT_OK for rank in multi)


@pytest.mark.distributed
def test_verify_fails_on_a_permuted_qkv_group(single):
    code, out, _ = single["verify_permuted"]
    assert code == EXIT_CHECK, out
    assert _metric(out, "logits max abs diff").endswith("FAIL")
    assert "VERIFY FAILED" in out
    # the hidden states show where it starts: layer 0 is exact, layer 1 (the permuted one) is not
    layers = {int(m.group(1)): float(m.group(2)) for m in re.finditer(r"^\s+(\d)\s+(\S+)\s+\S+\s+\S+$", out, re.M)}
    assert layers[0] <= 1e-6 < layers[1]


@pytest.mark.distributed
def test_verify_fails_on_swapped_key_and_value_rows_of_a_fused_qkv(single):
    assert single["import_phi"][0] == EXIT_OK, single["import_phi"]
    _assert_passed(single["verify_phi"])
    assert single["export_phi"][0] == EXIT_OK and single["phi_roundtrip"] == [], single["export_phi"]
    code, out, _ = single["verify_phi_kv_swapped"]
    assert code == EXIT_CHECK, out
    assert _metric(out, "logits max abs diff").endswith("FAIL") and "VERIFY FAILED" in out
    layers = {int(m.group(1)): float(m.group(2)) for m in re.finditer(r"^\s+(\d)\s+(\S+)\s+\S+\s+\S+$", out, re.M)}
    assert layers[0] <= 1e-6 < layers[1]


@pytest.mark.distributed
def test_verify_an_exported_folder_against_its_checkpoint(single):
    _assert_passed(single["verify_export_vs_ckpt"])


@pytest.mark.distributed
def test_verify_reads_the_iteration_asked_for(single):
    assert "Megatron checkpoint" in single["verify_permuted"][1]
    _assert_passed(single["verify_release_of_permuted"])  # iteration 'release' is the unpermuted import


@pytest.mark.distributed
def test_verify_refuses_a_checkpoint_of_another_config(single):
    code, _, err = single["verify_mismatched_config"]
    assert code == EXIT_INPUT and "different config" in err and "model_type: 'qwen3' vs 'llama'" in err


@pytest.mark.distributed
def test_verify_two_hf_folders(single):
    code, out, _ = single["verify_folders_same"]
    assert code == EXIT_OK and "39 identical" in out and "VERIFY PASSED" in out
    code, out, _ = single["verify_folders_differ"]  # the float32 export of a bfloat16 checkpoint
    assert code == EXIT_CHECK and "DIFFERENT 39 tensors differ only in dtype (bfloat16 vs float32), e.g. " in out, out
    assert "VERIFY FAILED" in out
