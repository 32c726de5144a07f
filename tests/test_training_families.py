"""The convert-and-train example on the families whose layers are the project's own: tiny Gemma 3 (image-text: its
text model trains, its vision tower is carried) and OLMo-2 at TP2·PP2; gpt-oss, GLM-4.5 and DeepSeek-V3 (with its
multi-token-prediction layer) at TP2·EP2, then resumed at PP2·EP2.

Each is converted, trained a few steps on Megatron-Core's engine (4 gloo ranks), exported, and the
export reloaded in transformers (the example generates with it); the exported weights are the trained
ones, not the source's.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch

from tests.commands import ROOT, clean_env
from tests.edited_checkpoints import with_mtp_layer
from tests.tiny_checkpoints import build_tiny_checkpoint

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    """The demo corpus, tokenized with the demo tokenizer the tiny checkpoints share."""
    from bridge.training.data import prepare_demo

    _, data_paths = prepare_demo(tmp_path_factory.mktemp("demo"))
    return data_paths[1]


def _example(hf, corpus: str, work, *args: str, refused: bool = False) -> str:
    """Run the convert-and-train example on 4 gloo ranks; its output (it must succeed, or with ``refused`` fail)."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node=4",
        str(ROOT / "examples" / "convert_and_train.py"),
        *("--hf-model", str(hf), "--data-path", corpus, "--workdir", str(work), "--log-interval", "3", "--seq-length", "32"),
        *args,
    ]
    env = clean_env(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT, env=env)
    text = result.stdout + result.stderr
    if refused:  # every rank exits 2; torchrun itself exits 1 once one of them has
        assert result.returncode != 0, text[-5000:]
        return result.stderr
    assert result.returncode == 0, text[-5000:]
    assert re.search(r"^exported to .*; transformers continues '.+' with '.+'$", text, re.M), text[-3000:]
    return text


def _losses(text: str, iters: int) -> list[float]:
    return [float(loss) for loss in re.findall(rf"^iteration \d+/{iters} \| loss ([\d.]+) ", text, re.M)]


def _exported_and_source(hf, exported) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The export's tensors (after checking that transformers loads it with no weight missing or unexpected) and the source's."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32)  # loads without missing or unexpected weights
    (source,) = hf.glob("*.safetensors")
    trained = {k: v for f in exported.glob("*.safetensors") for k, v in load_file(f).items()}
    before = load_file(source)
    assert trained.keys() == before.keys()
    return trained, before


# checkpoint → where its text model's tensors are (Gemma 3 image-text: under language_model., with a vision tower)
DENSE_TRAINED = {"gemma3-vision": "language_model.", "olmo2": ""}


@pytest.mark.parametrize("name", list(DENSE_TRAINED))
def test_example_trains_and_exports_at_tp2_pp2(tmp_path, corpus, name):
    hf = build_tiny_checkpoint(name, tmp_path / name, dtype=torch.float32)
    work = tmp_path / "work"
    text = _example(hf, corpus, work, "--tp", "2", "--pp", "2", "--train-iters", "12")
    losses = _losses(text, 12)
    assert len(losses) == 4 and sum(losses[2:]) < sum(losses[:2]), losses  # random weights: the trend, not every step
    trained, before = _exported_and_source(hf, work / "hf_export")
    prefix = DENSE_TRAINED[name]
    norm = prefix + "model.layers.1.post_feedforward_layernorm.weight"
    assert not torch.equal(trained[norm], before[norm])
    untrained = [tensor for tensor in before if not tensor.startswith(prefix)]  # the vision tower, carried as it was
    assert all(torch.equal(trained[tensor], before[tensor]) for tensor in untrained) and (untrained or not prefix)


# The MoE families whose routers or experts are not Llama's, and the layer-1 tensors training must change
# (gpt-oss: sinks and expert biases; GLM-4.5 and DeepSeek-V3: the router's correction bias, which Megatron-Core
# updates from the expert loads, not by gradients, and the latent attention).
MOE_TRAINED = {
    "gptoss": ("self_attn.sinks", "mlp.router.bias", "mlp.experts.gate_up_proj", "mlp.experts.down_proj_bias"),
    "glm4_moe": ("mlp.gate.e_score_correction_bias", "mlp.gate.weight", "mlp.shared_experts.up_proj.weight"),
    "deepseek_v3": ("mlp.gate.e_score_correction_bias", "self_attn.kv_b_proj.weight", "mlp.experts.1.down_proj.weight"),
}


# DeepSeek-V3 trains its multi-token-prediction layer too (--mtp: Megatron-Core's MTP block, on the last stage at PP2).
WITH_MTP = ("deepseek_v3",)


@pytest.mark.parametrize("name", list(MOE_TRAINED))
def test_moe_family_trains_at_tp2_ep2_and_resumes_at_pp2_ep2(tmp_path, corpus, name):
    """Trained at TP2·EP2 (gpt-oss's experts without expert-TP: they have biases), saved; resumed at PP2·EP2 and exported."""
    hf = build_tiny_checkpoint(name, tmp_path / name, dtype=torch.float32)
    mtp = ("--mtp",) if name in WITH_MTP else ()
    if mtp:
        hf = with_mtp_layer(hf, tmp_path / f"{name}-mtp")
    work, ckpt = tmp_path / "work", tmp_path / "ckpt"
    schedule = ("--lr-decay-iters", "15", *mtp)  # one schedule for both runs: the first stops at 12, the resumed one goes on to 15
    layout = ("--tp", "2", "--ep", "2", *(("--etp", "1") if name == "gptoss" else ()))
    first = _example(hf, corpus, work, *layout, "--train-iters", "12", *schedule, "--save", str(ckpt))
    losses = _losses(first, 12)
    assert len(losses) == 4 and sum(losses[2:]) < sum(losses[:2]), losses
    resume = ("--pp", "2", "--ep", "2", "--train-iters", "15", *schedule, "--load", str(ckpt), "--overwrite-export")
    if mtp:  # resuming the MTP layers' checkpoint without them would drop them: refused, naming the option
        without = [arg for arg in resume if arg != "--mtp"]
        assert "holds 1 multi-token-prediction layers and the model has 0" in _example(hf, corpus, work, *without, refused=True)
    resumed = _example(hf, corpus, work, *resume)
    assert [int(i) for i in re.findall(r"^iteration (\d+)/15 ", resumed, re.M)] == [15]  # it went on from step 12
    trained, before = _exported_and_source(hf, work / "hf_export")
    for tensor in MOE_TRAINED[name]:
        assert not torch.equal(trained[f"model.layers.1.{tensor}"], before[f"model.layers.1.{tensor}"]), tensor
    if mtp:  # the MTP layer (model.layers.4) trained too; its embedding and output copies are the trained model's
        for tensor in ("eh_proj.weight", "enorm.weight", MOE_TRAINED[name][1], MOE_TRAINED[name][0]):
            assert not torch.equal(trained[f"model.layers.4.{tensor}"], before[f"model.layers.4.{tensor}"]), tensor
        assert torch.equal(trained["model.layers.4.embed_tokens.weight"], trained["model.embed_tokens.weight"])
        assert torch.equal(trained["model.layers.4.shared_head.head.weight"], trained["lm_head.weight"])
        assert not torch.equal(trained["lm_head.weight"], before["lm_head.weight"])
