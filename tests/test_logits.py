"""Megatron's forward on converted weights matches transformers' (fp32), at every TP/PP layout.

One group of 4 gloo processes runs every (model, layout) case; a case that raises fails its own tests
only, with the rank's traceback (``tests/case_matrix.py``).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bridge.demo_model import VOCAB_SIZE
from bridge.runtime.local_launch import run_distributed
from tests.case_matrix import case_results, run_cases
from tests.tiny_checkpoints import ROPE_VARIANTS, TINY_MODELS, build_tiny_checkpoint

pytestmark = pytest.mark.distributed  # every test starts processes or reads what spawned ranks computed

LAYOUTS = [(1, 1, None), (2, 1, None), (1, 2, None), (2, 2, None), (1, 2, 2)]  # (tp, pp, vpp)
NAMES = [*TINY_MODELS, *ROPE_VARIANTS]
TOKENS = torch.randint(0, VOCAB_SIZE, (2, 24), generator=torch.Generator().manual_seed(0))


def forward_matrix(checkpoints: dict[str, str], tokens: torch.Tensor) -> dict:
    """Each (model, tp, pp, vpp) case on this rank: the logits where this rank holds them, rank 0's rotary frequencies."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.models.common.embeddings import YarnRotaryEmbedding

    from bridge import AutoBridge
    from bridge.checks.forward import megatron_logits

    def run_case(case: tuple[str, int, int, int | None]) -> dict:
        name, tp, pp, vpp = case
        parallel_state.destroy_model_parallel()
        bridge = AutoBridge.from_hf_pretrained(checkpoints[name], dtype=torch.float32)
        model = bridge.to_megatron_model(tp=tp, pp=pp, vpp=vpp)
        result = {}
        logits = megatron_logits(model, tokens, bridge.model_bridge.vocab_size)
        if logits is not None and parallel_state.get_tensor_model_parallel_rank() == 0 and parallel_state.get_data_parallel_rank() == 0:
            result["logits"] = logits
        if dist.get_rank() == 0:  # the frequencies positions are multiplied by (a linear scaling divides positions)
            rotary = model[0].rotary_pos_emb
            result["inv_freq"] = rotary.inv_freq / (rotary.seq_len_interpolation_factor or 1.0)
            if isinstance(rotary, YarnRotaryEmbedding):  # position 1's angles, and the scale of cos/sin
                emb, result["attention_scaling"] = rotary.get_emb(2)
                result["inv_freq"] = emb[1, 0, 0, : emb.shape[-1] // 2]
            sliding = getattr(model[0].decoder.layers[0].self_attention, "sliding_rotary", None)  # Gemma 3's layer 0 slides
            if sliding is not None:
                result["sliding_inv_freq"] = sliding.inv_freq.clone()
        return result

    return run_cases([(name, tp, pp, vpp) for tp, pp, vpp in LAYOUTS for name in checkpoints], run_case)


@pytest.fixture(scope="module")
def checkpoints(tiny_checkpoints, tmp_path_factory) -> dict:
    """The tiny checkpoints, and the rope variants."""
    root = tmp_path_factory.mktemp("rope-variants")
    variants = {name: build_tiny_checkpoint(family, root / name, **edits) for name, (family, edits) in ROPE_VARIANTS.items()}
    return {**tiny_checkpoints, **variants}


@pytest.fixture(scope="module")
def megatron_results(checkpoints) -> list[dict]:
    return run_distributed(forward_matrix, 4, {k: str(v) for k, v in checkpoints.items()}, TOKENS)


def _logits(megatron_results: list[dict], case: tuple) -> torch.Tensor:
    """The case's logits, from the one rank that holds them (TP rank 0 of DP replica 0 on the last stage)."""
    (logits,) = [result["logits"] for result in case_results(megatron_results, case) if "logits" in result]
    return logits


@pytest.fixture(scope="module")
def hf_models(checkpoints):
    from transformers import AutoModelForCausalLM

    return {name: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval() for name, path in checkpoints.items()}


@pytest.fixture(scope="module")
def hf_logits(hf_models):
    with torch.no_grad():
        return {name: model(TOKENS).logits for name, model in hf_models.items()}


def _loss(logits: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), TOKENS[:, 1:].reshape(-1))


@pytest.mark.parametrize("tp,pp,vpp", LAYOUTS, ids=[f"tp{tp}-pp{pp}" + (f"-vpp{vpp}" if vpp else "") for tp, pp, vpp in LAYOUTS])
@pytest.mark.parametrize("name", NAMES)
def test_logits_match_transformers(megatron_results, hf_logits, name, tp, pp, vpp):
    ours, theirs = _logits(megatron_results, (name, tp, pp, vpp)), hf_logits[name]
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() <= 1e-4
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


@pytest.mark.parametrize("name", NAMES)
def test_loss_is_the_same_in_every_layout(megatron_results, hf_logits, name):
    losses = [_loss(_logits(megatron_results, (name, *layout))).item() for layout in LAYOUTS]
    assert max(losses) - min(losses) <= 1e-5, losses
    assert abs(losses[0] - _loss(hf_logits[name]).item()) <= 1e-5


@pytest.mark.parametrize("name", NAMES)
def test_rotary_frequencies_match_transformers(megatron_results, hf_models, name):
    """Rope base and Llama-3.1 / linear / YaRN scaling: too subtle to show in short-sequence logits, so compared directly;
    Gemma 3's full layers and its sliding layers (a base of their own) each against transformers' frequencies."""
    decoder = hf_models[name].model
    rotary = getattr(decoder, "language_model", decoder).rotary_emb  # an image-text model's is its language model's
    ours = case_results(megatron_results, (name, *LAYOUTS[-1]))[0]  # rank 0's, as the last layout built it
    per_kind = hasattr(rotary, "full_attention_inv_freq")
    theirs = rotary.full_attention_inv_freq if per_kind else rotary.inv_freq
    torch.testing.assert_close(ours["inv_freq"].float(), theirs.float(), rtol=1e-6, atol=0)
    scaling = rotary.full_attention_attention_scaling if per_kind else rotary.attention_scaling
    assert ours.get("attention_scaling", 1.0) == pytest.approx(scaling, rel=1e-12)
    assert per_kind == ("sliding_inv_freq" in ours)
    if per_kind:
        torch.testing.assert_close(ours["sliding_inv_freq"].float(), rotary.sliding_attention_inv_freq.float(), rtol=1e-6, atol=0)
