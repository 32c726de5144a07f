"""Refusals before anything starts, and messages that name the problem (issue 19, items 2, 7 and 9).

``hfmb`` runs in this process (``bridge.cli.main.main``), with starting ranks replaced by a failure:
a refusal must come from the config alone, before any rank, model or output folder exists.
"""

from __future__ import annotations

import importlib
import shutil
from pathlib import Path

import pytest

cli_main = importlib.import_module("bridge.cli.main")  # the module (bridge.cli exports its main function as `main`)

EXIT_INPUT = 2


@pytest.fixture
def hfmb(monkeypatch, capsys):
    """Run ``hfmb ARGS`` here: (exit status, stderr); starting local ranks fails the test."""

    def no_ranks(args, world):
        raise AssertionError(f"{world} ranks were started for {args.command}")

    monkeypatch.setattr(cli_main, "_spawn", no_ranks)

    def run(*argv: str) -> tuple[int, str]:
        code = cli_main.main(list(argv))
        return code, capsys.readouterr().err

    return run


@pytest.fixture(scope="module")
def llama(tiny_checkpoints) -> Path:
    return tiny_checkpoints["llama"]  # 4 heads, 2 KV heads, 4 layers


SIZES = {
    "tp3-heads": (("--tp", "3"), "num_attention_heads = 4 is not divisible by tp = 3"),
    "pp3-layers": (("--pp", "3"), "num_hidden_layers = 4 is not divisible by pp × vpp = 3"),
    "tp4-kv-heads": (("--tp", "4"), "num_key_value_heads (num_query_groups) = 2 is not divisible by tp = 4"),
}


@pytest.mark.parametrize("case", SIZES)
@pytest.mark.parametrize("command", ["plan", "import", "import-in-memory", "verify"])
def test_sizes_that_do_not_divide_are_refused_before_anything_starts(hfmb, llama, tmp_path, command, case):
    sizes, message = SIZES[case]
    out = tmp_path / "out"
    argv = {
        "plan": ["plan", str(llama)],
        "import": ["import", str(llama), str(out)],  # streamed: it used to record tp=3 and exit 0
        "import-in-memory": ["import", str(llama), str(out), "--in-memory"],
        "verify": ["verify", str(llama)],
    }[command]
    code, err = hfmb(*argv, *sizes)
    assert code == EXIT_INPUT and message in err, err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_the_streamed_import_api_refuses_sizes_it_would_record(llama, tmp_path):
    from bridge.conversions import import_hf_checkpoint
    from bridge.megatron.parallel import ParallelConfigError, ParallelSizes

    with pytest.raises(ParallelConfigError, match="num_attention_heads = 4 is not divisible by tp = 3"):
        import_hf_checkpoint(llama, tmp_path / "ckpt", sizes=ParallelSizes(tp=3), stream=True)
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("path", ["./mymodl", "/abs/path/to/model", "models/llama/3b", "../sibling"])
def test_a_missing_local_path_says_no_such_folder(hfmb, path):
    code, err = hfmb("plan", path)
    assert code == EXIT_INPUT and f"no such folder: {path}" in err, err
    assert "Hub" not in err


def test_a_folder_without_config_says_so(hfmb, tmp_path):
    code, err = hfmb("plan", str(tmp_path))
    assert code == EXIT_INPUT and f"{tmp_path} has no config.json" in err, err


def test_a_missing_checkpoint_folder_says_it_does_not_exist(hfmb, tmp_path):
    code, err = hfmb("export", str(tmp_path / "ckpt"), str(tmp_path / "out"))
    assert code == EXIT_INPUT and f"the checkpoint folder {tmp_path / 'ckpt'} does not exist" in err, err


@pytest.mark.distributed
def test_verify_prompt_without_a_tokenizer_names_it(llama, tmp_path):
    from bridge.runtime.local_launch import run_distributed
    from tests.test_cli import _cli

    folder = shutil.copytree(llama, tmp_path / "no-tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).unlink(missing_ok=True)
    code, _, err = run_distributed(_cli, 1, "verify", str(folder), "--prompt", "w3 w4 w5")[0]
    assert code == EXIT_INPUT and f"--prompt needs a tokenizer, and {folder} has none" in err, err


def test_hfmb_alone_lists_the_commands_one_line_each(hfmb):
    code, err = hfmb()
    listed = [line.split()[0] for line in err.splitlines() if line.startswith("  ")]
    assert code == EXIT_INPUT and listed == ["plan", "import", "export", "verify"], err


def test_verify_folds_repetitive_differences_into_one_line_each():
    from bridge.cli.cmd_verify import summarise_differences

    dtype_only = [f"model.layers.{i}.mlp.up_proj.weight: torch.bfloat16[128, 64] vs torch.float32[128, 64]" for i in range(50)]
    lines = dtype_only + ["missing lm_head.weight", "extra a", "extra b", "model.norm.weight: values differ (max abs diff 1)"]
    assert summarise_differences(lines) == [
        "50 tensors differ only in dtype (bfloat16 vs float32), e.g. model.layers.0.mlp.up_proj.weight",
        "missing lm_head.weight",
        "2 tensors only in the second folder, e.g. a",
        "model.norm.weight: values differ (max abs diff 1)",
    ]
