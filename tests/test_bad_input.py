"""Bad input gets a clear error that names the tensor or setting, before any weight moves or file is written."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from bridge import AutoBridge, UnsupportedArchitectureError
from bridge.hf.folder import CheckpointError
from bridge.megatron.parallel import ParallelConfigError
from bridge.runtime.local_launch import run_distributed
from tests.edited_checkpoints import edited_copy


def _convert(folder: str, out: str):
    """Load at TP1 and export; the error (if any) comes back as text, with whether ``out`` exists."""
    from bridge import AutoBridge

    try:
        bridge = AutoBridge.from_hf_pretrained(folder)
        model = bridge.to_megatron_model()
        bridge.save_hf_pretrained(model, out)
    except Exception as err:  # the test inspects the message
        return type(err).__name__, str(err), Path(out).exists()
    return None, "", Path(out).exists()


def test_unknown_architecture_names_the_supported_ones(tiny_checkpoints, tmp_path):
    folder = shutil.copytree(tiny_checkpoints["llama"], tmp_path / "gpt")
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["FancyNewForCausalLM"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedArchitectureError, match="FancyNewForCausalLM.*LlamaForCausalLM.*Qwen3ForCausalLM"):
        AutoBridge.from_hf_pretrained(folder)


def test_unsupported_config_setting_is_named(tiny_checkpoints, tmp_path):
    folder = shutil.copytree(tiny_checkpoints["llama"], tmp_path / "dynamic")
    config = json.loads((folder / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedArchitectureError, match="rope_type"):
        AutoBridge.from_hf_pretrained(folder)


@pytest.mark.parametrize(
    "tp,setting",
    [(3, "num_attention_heads"), (4, "num_key_value_heads")],
)
def test_tp_that_does_not_divide_heads_or_groups(tiny_checkpoints, tp, setting):
    bridge = AutoBridge.from_hf_pretrained(tiny_checkpoints["llama"])
    with pytest.raises(ParallelConfigError, match=setting):
        bridge.to_megatron_model(tp=tp)


def test_pp_that_does_not_divide_layers(tiny_checkpoints):
    bridge = AutoBridge.from_hf_pretrained(tiny_checkpoints["llama"])
    with pytest.raises(ParallelConfigError, match="num_hidden_layers"):
        bridge.to_megatron_model(pp=3)


def _drop(name):
    return lambda tensors: tensors.pop(name)


def _add_extra(tensors):
    tensors["model.layers.0.mlp.extra_proj.weight"] = torch.zeros(4, 4, dtype=torch.bfloat16)


def _wrong_shape(tensors):
    name = "model.layers.1.self_attn.k_proj.weight"
    tensors[name] = torch.zeros(48, 64, dtype=torch.bfloat16)


BROKEN = {
    "missing": (_drop("model.layers.2.mlp.up_proj.weight"), r"missing tensors: model\.layers\.2\.mlp\.up_proj\.weight"),
    "unexpected": (_add_extra, r"unused tensors.*model\.layers\.0\.mlp\.extra_proj\.weight"),
    "wrong_shape": (_wrong_shape, r"model\.layers\.1\.self_attn\.k_proj\.weight .* is \[48, 64\], the model needs \[32, 64\]"),
}


@pytest.fixture(scope="module")
def broken_results(tiny_checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("broken")
    folders = {kind: edited_copy(tiny_checkpoints["llama"], root / kind, edit) for kind, (edit, _) in BROKEN.items()}
    # One spawned rank runs all three: each conversion fails inside; the results say how.
    return run_distributed(_convert_all, 1, {k: str(v) for k, v in folders.items()}, str(root))[0]


def _convert_all(folders: dict[str, str], root: str) -> dict:
    from megatron.core import parallel_state

    results = {}
    for kind, folder in folders.items():
        parallel_state.destroy_model_parallel()
        results[kind] = _convert(folder, str(Path(root) / f"out-{kind}"))
    return results


@pytest.mark.parametrize("kind", list(BROKEN))
@pytest.mark.distributed
def test_broken_checkpoint_fails_before_writing(broken_results, kind):
    error, message, out_exists = broken_results[kind]
    assert error == CheckpointError.__name__, message
    assert re.search(BROKEN[kind][1], message), message
    assert not out_exists


@pytest.mark.distributed
def test_export_refuses_a_non_empty_target(tiny_checkpoints, tmp_path):
    target = tmp_path / "taken"
    target.mkdir()
    (target / "keep.txt").write_text("precious")
    error, message, _ = run_distributed(_convert, 1, str(tiny_checkpoints["llama"]), str(target))[0]
    assert error == "OutputFolderError" and "not empty" in message
    assert [p.name for p in target.iterdir()] == ["keep.txt"]


@pytest.mark.skipif(not hasattr(torch, "float4_e2m1fn_x2"), reason="no float4 in this torch")
def test_a_tensor_of_an_unreadable_dtype_is_named(tiny_checkpoints, tmp_path):
    from bridge.hf.reader import SafetensorsReader

    def add_fp4(tensors):
        tensors["model.layers.0.mlp.packed.weight"] = torch.zeros(2, 2, dtype=torch.uint8).view(torch.float4_e2m1fn_x2)

    folder = edited_copy(tiny_checkpoints["llama"], tmp_path / "fp4", add_fp4)
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.packed\.weight .* safetensors dtype F4"):
        SafetensorsReader(folder)
