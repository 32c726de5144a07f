"""Block-scaled FP8 checkpoints (DeepSeek-V3/R1, GLM-4.5-FP8, Qwen3-FP8): read dequantized, written back byte for byte.

Two fixtures: a dense Qwen3 whose MLP (48 wide) ends in partial [32, 32] blocks, and a GLM-4.5 MoE (experts,
shared expert, dense first layer, router and correction bias left unquantized) whose weights are whole blocks.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bridge import AutoBridge
from bridge.demo_model import VOCAB_SIZE
from bridge.hf.folder import CheckpointError
from bridge.hf.fp8_block_weights import Fp8BlockWeight, fp8_encoding
from bridge.hf.quantization.fp8_blocks import dequantize_fp8_blocks
from bridge.hf.reader import SafetensorsReader
from bridge.runtime.local_launch import run_distributed
from tests.quantized_checkpoints import dequantized_copy, fp8_copy
from tests.tiny_checkpoints import build_tiny_checkpoint

BLOCK = (32, 32)
# name → (tiny family, overrides): Qwen3's MLP is 48 wide, so gate/up rows and down columns end in a half block.
# DeepSeek-V3's latent projections (kv_a_proj_with_mqa: 16 + 8 rows) end in partial blocks too.
FAMILIES = {"qwen3": ("qwen3", {"intermediate_size": 48}), "glm4_moe": ("glm4_moe", {}), "deepseek_v3": ("deepseek_v3", {})}
PARTIAL_BLOCKS = {"qwen3", "deepseek_v3"}  # transformers misreads them on a CPU: compared with the dequantized fp32 folder
TOKENS = torch.randint(0, VOCAB_SIZE, (2, 16), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, dict[str, Path]]:
    """Per family: the FP8 checkpoint (quantized from fp32 weights, the rest bf16), and the bf16 and fp32 checkpoints
    of its dequantized values."""
    root = tmp_path_factory.mktemp("fp8")
    out = {}
    for name, (family, overrides) in FAMILIES.items():
        source = build_tiny_checkpoint(family, root / f"{name}-source", dtype=torch.float32, **overrides)
        fp8 = fp8_copy(source, root / f"{name}-fp8", BLOCK)
        out[name] = {
            "fp8": fp8,
            "bf16": dequantized_copy(fp8, root / f"{name}-bf16", torch.bfloat16),
            "fp32": dequantized_copy(fp8, root / f"{name}-fp32", torch.float32),
        }
    return out


def _edited(folder: Path, target: Path, config: dict | None = None, drop: str | None = None) -> Path:
    """A copy of ``folder`` with ``quantization_config`` changed by ``config`` and the tensor ``drop`` removed."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(folder, target)
    path = target / "config.json"
    settings = json.loads(path.read_text())
    settings["quantization_config"] = {k: v for k, v in {**settings["quantization_config"], **(config or {})}.items() if v is not None}
    path.write_text(json.dumps(settings))
    if drop is not None:
        (weights,) = target.glob("*.safetensors")
        tensors = load_file(weights)
        del tensors[drop]
        save_file(tensors, weights, metadata={"format": "pt"})
    return target


# ---------------------------------------------------------------- reading (fast tier)


def test_the_fixtures_store_linear_weights_as_released_fp8_checkpoints_do(folders):
    reader = SafetensorsReader(folders["glm4_moe"]["fp8"])
    dtypes = reader.dtypes()
    fp8 = {n for n, d in dtypes.items() if d == torch.float8_e4m3fn}
    assert "model.layers.1.mlp.experts.3.down_proj.weight" in fp8 and "model.layers.0.self_attn.q_proj.weight" in fp8
    assert all(dtypes[n + "_scale_inv"] == torch.float32 for n in fp8)
    for kept in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.1.mlp.gate.weight", "model.norm.weight"):
        assert dtypes[kept] == torch.bfloat16, kept
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in dtypes
    qwen = SafetensorsReader(folders["qwen3"]["fp8"])
    assert list(qwen.lazy("model.layers.0.mlp.gate_proj.weight_scale_inv").shape) == [2, 2]  # 48 rows: one half block


def test_fp8_weights_read_as_their_dequantized_bf16_values_and_the_scales_vanish(folders):
    for name in FAMILIES:
        bridge = AutoBridge.from_hf_pretrained(folders[name]["fp8"])
        plain = SafetensorsReader(folders[name]["bf16"])
        assert bridge.dtype == torch.bfloat16
        assert sorted(bridge.reader.names()) == sorted(plain.names())
        assert bridge.reader.dtypes() == plain.dtypes()
        generator = torch.Generator().manual_seed(0)
        for tensor in plain.names():
            got, want = bridge.reader.lazy(tensor), plain.lazy(tensor)
            assert torch.equal(got.narrow(0, 0, got.shape[0]), want.narrow(0, 0, want.shape[0])), tensor
            for dim in range(len(want.shape)):
                start = int(torch.randint(0, want.shape[dim], (1,), generator=generator))
                length = int(torch.randint(1, want.shape[dim] - start + 1, (1,), generator=generator))
                assert torch.equal(got.narrow(dim, start, length), want.narrow(dim, start, length)), (tensor, dim, start, length)


class _Recording:
    """A tensor that records the slices read from it."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor, self.shape, self.dtype, self.reads = tensor, tensor.shape, tensor.dtype, []

    def select_slice(self, index):
        self.reads.append(tuple((s.start, s.stop) for s in index))
        return self.tensor[index]


def test_a_read_decodes_only_the_blocks_its_slice_lies_in():
    from bridge.hf.quantization.fp8_blocks import quantize_fp8_blocks

    values = torch.randn(100, 90)
    weight, scales = quantize_fp8_blocks(values, BLOCK)
    stored, scale = _Recording(weight), _Recording(scales)
    view = Fp8BlockWeight(stored, scale, BLOCK)
    expected = dequantize_fp8_blocks(weight, scales, BLOCK)
    assert torch.equal(view.narrow(0, 40, 30), expected[40:70])  # rows 40-69: blocks 1 and 2
    assert stored.reads == [((32, 96), (0, 90))] and scale.reads == [((1, 3), (0, 3))]
    stored.reads.clear(), scale.reads.clear()
    assert torch.equal(view.narrow(1, 70, 20), expected[:, 70:90])  # the last, partial column block
    assert {cols for _, cols in stored.reads} == {(64, 90)} and {cols for _, cols in scale.reads} == {(2, 3)}
    assert torch.equal(view.select_slice((slice(99, 100), slice(5, 6))), expected[99:100, 5:6])


def test_a_weight_block_size_the_files_do_not_hold_is_refused_by_name(folders, tmp_path):
    folder = _edited(folders["qwen3"]["fp8"], tmp_path / "wrong-block", {"weight_block_size": [64, 64]})
    with pytest.raises(CheckpointError, match=r"weight_block_size \[64, 64\].*\[32, 32\] blocks") as err:
        AutoBridge.from_hf_pretrained(folder).reader
    assert "_scale_inv has shape" in str(err.value) and "model.layers." in str(err.value)


@pytest.mark.parametrize(
    "config,drop,message",
    [
        ({"fmt": "e5m2"}, None, "quantization_config.fmt is 'e5m2'"),
        ({"weight_block_size": None}, None, "quantization_config.weight_block_size is None"),
        ({"quant_method": "gptq"}, None, "quant_method is 'gptq'"),
        (
            None,
            "model.layers.2.self_attn.o_proj.weight_scale_inv",
            "model.layers.2.self_attn.o_proj.weight is stored as float8_e4m3fn without",
        ),
        (None, "model.layers.2.self_attn.o_proj.weight", "model.layers.2.self_attn.o_proj.weight_scale_inv has no"),
    ],
    ids=["fmt", "per-tensor", "quant-method", "no-scales", "no-weight"],
)
def test_fp8_checkpoints_the_bridge_cannot_read_are_refused_by_name(folders, tmp_path, config, drop, message):
    folder = _edited(folders["qwen3"]["fp8"], tmp_path / "edited", config, drop)
    with pytest.raises(CheckpointError, match=message):
        AutoBridge.from_hf_pretrained(folder).reader


def test_quantized_export_needs_an_fp8_source(folders, tmp_path):
    fp8 = AutoBridge.from_hf_pretrained(folders["qwen3"]["fp8"])
    assert fp8_encoding(fp8.model_bridge, folders["qwen3"]["fp8"]).config["weight_block_size"] == list(BLOCK)
    with pytest.raises(ValueError, match="needs the FP8 checkpoint the model was converted from"):
        fp8_encoding(fp8.model_bridge, tmp_path / "gone")
    with pytest.raises(ValueError, match="no quantization_config with quant_method 'fp8'"):
        fp8_encoding(AutoBridge.from_hf_pretrained(folders["qwen3"]["bf16"]).model_bridge, folders["qwen3"]["bf16"])


def test_the_encoding_gives_back_the_source_bytes_for_unchanged_values_and_quantizes_changed_ones_afresh(folders):
    from bridge.hf.quantization.fp8_blocks import quantize_fp8_blocks

    fp8, plain = folders["qwen3"]["fp8"], SafetensorsReader(folders["qwen3"]["bf16"])
    encoding = fp8_encoding(AutoBridge.from_hf_pretrained(fp8).model_bridge, fp8)
    stored = SafetensorsReader(fp8)
    name = "model.layers.1.mlp.down_proj.weight"  # [64, 48]: partial column blocks
    values = plain.lazy(name).narrow(0, 0, 64).clone()
    meta = encoding.meta(name, values.to("meta"))
    encoded = encoding.encode(name, values)
    assert [(n, t.dtype, t.shape) for n, t in meta] == [(n, t.dtype, t.shape) for n, t in encoded]
    for (written, tensor), original in zip(encoded, (name, name + "_scale_inv")):
        assert written == original
        assert torch.equal(tensor.view(torch.uint8), stored.lazy(original).narrow(0, 0, tensor.shape[0]).view(torch.uint8))
    # fresh scales from the bf16 values would not be the source's (made from fp32 weights): the source's are reused
    fresh = quantize_fp8_blocks(values, BLOCK)[1]
    assert not torch.equal(fresh, stored.lazy(name + "_scale_inv").narrow(0, 0, 2))
    values[5, 7] += 1.0
    changed = dict(encoding.encode(name, values))
    weight, scales = quantize_fp8_blocks(values, BLOCK)
    assert torch.equal(changed[name].view(torch.uint8), weight.view(torch.uint8)) and torch.equal(changed[name + "_scale_inv"], scales)
    assert encoding.encode("model.norm.weight", values) == [("model.norm.weight", values)]


def test_a_partial_block_transformers_cannot_dequantize_skips_the_export_load_check(folders, tmp_path):
    """transformers (5.x) dequantizes on CPU with a block of rows // scale rows: 70 rows in 32-row blocks (3) fail to
    load, so an export of them skips its load check (naming the tensor) rather than refusing the source's own form."""
    from bridge.checks.verify import transformers_load_report

    fp8 = fp8_copy(build_tiny_checkpoint("qwen3", tmp_path / "source", intermediate_size=70), tmp_path / "fp8", BLOCK)
    assert transformers_load_report(fp8)["load_error"]
    problem = fp8_encoding(AutoBridge.from_hf_pretrained(fp8).model_bridge, fp8).transformers_load_problem()
    assert "model.layers.0.mlp.down_proj.weight [64, 70] ends in a partial [32, 32] block" in problem
    for whole in folders.values():  # 48 rows in 32-row blocks load (with the wrong blocks: see the logits test)
        assert fp8_encoding(AutoBridge.from_hf_pretrained(whole["fp8"]).model_bridge, whole["fp8"]).transformers_load_problem() is None


# ---------------------------------------------------------------- conversions (ranks as processes)


def fp8_matrix(folders: dict[str, dict[str, str]], out_root: str, tokens: torch.Tensor) -> dict:
    """Per family at TP1 and TP2: the FP8 load against the bf16 one, both exports, and fp32 logits."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from bridge.checks.forward import megatron_logits
    from bridge.checks.verify import compare_hf_folders

    results = {}
    for name, paths in folders.items():
        for tp in (1, 2):
            case = f"{name}-tp{tp}"
            parallel_state.destroy_model_parallel()
            bridge = AutoBridge.from_hf_pretrained(paths["fp8"])
            model = bridge.to_megatron_model(tp=tp)
            out = Path(out_root) / case
            bridge.save_hf_pretrained(model, out / "fp8", quantization="fp8")
            bridge.save_hf_pretrained(model, out / "bf16")
            loaded = {n: p.detach().clone() for chunk in model for n, p in chunk.named_parameters()}
            AutoBridge.from_hf_pretrained(paths["bf16"]).load_hf_weights(model)
            after = {n: p for chunk in model for n, p in chunk.named_parameters()}
            result = {"dtype": str(bridge.dtype), "differ": [n for n in loaded if not torch.equal(loaded[n], after[n])]}
            if dist.get_rank() == 0:
                result["fp8_roundtrip"] = compare_hf_folders(paths["fp8"], out / "fp8")
                result["bf16_export"] = compare_hf_folders(paths["bf16"], out / "bf16")
            parallel_state.destroy_model_parallel()
            fp32 = AutoBridge.from_hf_pretrained(paths["fp8"], dtype=torch.float32)
            logits = megatron_logits(fp32.to_megatron_model(tp=tp), tokens, fp32.model_bridge.vocab_size)
            if dist.get_rank() == 0:
                result["logits"] = logits
            results[case] = result
    return results


@pytest.fixture(scope="module")
def matrix(folders, tmp_path_factory):
    out = tmp_path_factory.mktemp("fp8-out")
    paths = {name: {kind: str(path) for kind, path in kinds.items()} for name, kinds in folders.items()}
    return run_distributed(fp8_matrix, 2, paths, str(out), TOKENS)[0], out


CASES = [f"{name}-tp{tp}" for name in FAMILIES for tp in (1, 2)]


@pytest.mark.distributed
@pytest.mark.parametrize("case", CASES)
def test_an_fp8_checkpoint_loads_the_weights_of_its_dequantized_bf16_checkpoint(matrix, case):
    result = matrix[0][case]
    assert result["dtype"] == "torch.bfloat16"
    assert result["differ"] == []


@pytest.mark.distributed
@pytest.mark.parametrize("case", CASES)
def test_a_quantized_export_gives_back_the_fp8_weights_and_scales_byte_for_byte(matrix, case):
    assert matrix[0][case]["fp8_roundtrip"] == []
    config = json.loads((matrix[1] / case / "fp8" / "config.json").read_text())
    assert config["quantization_config"]["weight_block_size"] == list(BLOCK)


@pytest.mark.distributed
@pytest.mark.parametrize("case", CASES)
def test_a_plain_export_writes_the_dequantized_bf16_checkpoint_transformers_loads(matrix, case):
    from bridge.checks.verify import transformers_load_report

    assert matrix[0][case]["bf16_export"] == []  # the tensors, byte for byte
    out = matrix[1] / case / "bf16"
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    if case.endswith("tp1"):
        assert not any(transformers_load_report(out).values())


@pytest.mark.distributed
@pytest.mark.parametrize("case", CASES)
def test_fp32_logits_match_transformers(matrix, folders, case):
    """transformers (5.24) dequantizes FP8 on CPU with a block of rows // scale rows, which misreads partial blocks:
    Qwen3's (48-wide MLP) and DeepSeek-V3's are compared with their fp32 dequantized checkpoints, GLM's whole
    blocks with the FP8 folder."""
    from transformers import AutoModelForCausalLM

    name = case.rsplit("-", 1)[0]
    folder = folders[name]["fp32" if name in PARTIAL_BLOCKS else "fp8"]
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()(TOKENS).logits
    got = matrix[0][case]["logits"]
    print(f"{case}: fp32 logits max |diff| {(got - expected).abs().max().item():.2e}")
    assert (got - expected).abs().max() <= 1e-4
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


@pytest.mark.distributed
def test_a_refused_block_size_writes_nothing(folders, tmp_path):
    from tests.test_bounded_memory import _measure

    folder = _edited(folders["qwen3"]["fp8"], tmp_path / "wrong-block", {"weight_block_size": [128, 128]})
    refused = _measure("import", str(folder), str(tmp_path / "ckpt"))
    assert refused["code"] == 2 and "weight_block_size [128, 128]" in refused["err"] and "_scale_inv has shape" in refused["err"]
    assert not (tmp_path / "ckpt").exists() and not list(tmp_path.glob(".ckpt*"))


@pytest.mark.distributed
def test_hfmb_import_and_quantized_export_give_back_scales_made_from_fp32_weights(folders, tmp_path):
    """The streamed CLI round trip of the GLM MoE, whose scales (from fp32 weights) the bf16 values would not give back."""
    from bridge.checks.verify import compare_hf_folders
    from tests.test_bounded_memory import _measure

    source, ckpt, out = folders["glm4_moe"]["fp8"], tmp_path / "ckpt", tmp_path / "out"
    assert _measure("import", str(source), str(ckpt), "--max-memory", "256MB")["code"] == 0
    exported = _measure("export", str(ckpt), str(out), "--max-memory", "256MB", "--quantize", "fp8")
    assert exported["code"] == 0, exported["err"]
    assert "transformers load report: empty" in exported["out"]
    assert compare_hf_folders(source, out) == []


# A Qwen3 of 206 MiB in bf16 (14 layers, hidden 1024, MLP 1400: not a multiple of the 128 blocks), stored in FP8
# (about 105 MiB on disk).
BIG_QWEN3 = dict(
    vocab_size=4096,
    hidden_size=1024,
    intermediate_size=1400,
    num_hidden_layers=14,
    num_attention_heads=16,
    num_key_value_heads=4,
    head_dim=64,
)


@pytest.mark.distributed
def test_an_fp8_checkpoint_streams_within_the_budget_and_comes_back_byte_for_byte(tmp_path):
    import shutil

    from tests.test_bounded_memory import convert_within_budget

    source = build_tiny_checkpoint("qwen3", tmp_path / "bf16", **BIG_QWEN3)
    hf = fp8_copy(source, tmp_path / "fp8")
    shutil.rmtree(source)
    convert_within_budget(hf, tmp_path, "Qwen3 FP8", 3, "--quantize", "fp8")  # FP8 weights and their scales as stored
