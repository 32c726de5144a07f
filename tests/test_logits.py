"""Megatron's forward on converted weights matches transformers' (fp32), at every TP/PP layout."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bridge.tiny_checkpoints import TINY_MODELS, VOCAB_SIZE
from bridge.runtime.local_launch import run_distributed

LAYOUTS = [(1, 1, None), (2, 1, None), (1, 2, None), (2, 2, None), (1, 2, 2)]  # (tp, pp, vpp)
TOKENS = torch.randint(0, VOCAB_SIZE, (2, 24), generator=torch.Generator().manual_seed(0))


def forward_matrix(checkpoints: dict[str, str], tokens: torch.Tensor) -> dict:
    import torch.distributed as dist
    from megatron.core import parallel_state

    from bridge import AutoBridge
    from bridge.checks.forward import megatron_logits

    results = {}
    for tp, pp, vpp in LAYOUTS:
        for name, src in checkpoints.items():
            parallel_state.destroy_model_parallel()
            bridge = AutoBridge.from_hf_pretrained(src, dtype=torch.float32)
            model = bridge.to_megatron_model(tp=tp, pp=pp, vpp=vpp)
            logits = megatron_logits(model, tokens, bridge.model_bridge.vocab_size)
            if logits is not None and parallel_state.get_tensor_model_parallel_rank() == 0 and parallel_state.get_data_parallel_rank() == 0:
                results[(name, tp, pp, vpp)] = logits
            if dist.get_rank() == 0:
                results[(name, "inv_freq")] = model[0].rotary_pos_emb.inv_freq.clone()
    return results


@pytest.fixture(scope="module")
def megatron_results(tiny_checkpoints):
    per_rank = run_distributed(forward_matrix, 4, {k: str(v) for k, v in tiny_checkpoints.items()}, TOKENS)
    merged = {}
    for results in per_rank:
        merged.update(results)
    return merged


@pytest.fixture(scope="module")
def hf_models(tiny_checkpoints):
    from transformers import AutoModelForCausalLM

    return {name: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval() for name, path in tiny_checkpoints.items()}


@pytest.fixture(scope="module")
def hf_logits(hf_models):
    with torch.no_grad():
        return {name: model(TOKENS).logits for name, model in hf_models.items()}


def _loss(logits: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), TOKENS[:, 1:].reshape(-1))


@pytest.mark.parametrize("tp,pp,vpp", LAYOUTS, ids=[f"tp{tp}-pp{pp}" + (f"-vpp{vpp}" if vpp else "") for tp, pp, vpp in LAYOUTS])
@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_logits_match_transformers(megatron_results, hf_logits, name, tp, pp, vpp):
    ours, theirs = megatron_results[(name, tp, pp, vpp)], hf_logits[name]
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() <= 1e-4
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_loss_is_the_same_in_every_layout(megatron_results, hf_logits, name):
    losses = [_loss(megatron_results[layout_key]).item() for layout_key in [(name, *layout) for layout in LAYOUTS]]
    assert max(losses) - min(losses) <= 1e-5, losses
    assert abs(losses[0] - _loss(hf_logits[name]).item()) <= 1e-5


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_rotary_frequencies_match_transformers(megatron_results, hf_models, name):
    """Rope base and Llama-3.1 scaling: too subtle to show in short-sequence logits, so compared directly."""
    theirs = hf_models[name].model.rotary_emb.inv_freq.float()
    torch.testing.assert_close(megatron_results[(name, "inv_freq")].float(), theirs, rtol=1e-6, atol=0)
