"""``hfmb verify`` catches the errors converters of families whose layers are not Llama's have shipped.

- OLMo-2, Gemma 2 and Gemma 3 (text and image-text) normalise the attention and MLP outputs (``post_attention_layernorm``,
  ``post_feedforward_layernorm``): a converter that mixes them up is wrong in layer 1 only.
- gpt-oss stores its experts input-major with gate and up interleaved: a converter that reads the gate
  columns as one block, or one expert's (square) ``down_proj`` the other way round, keeps every shape.
- DeepSeek's ``kv_b_proj`` holds per head its nope rows then its value rows: rows mixed up keep every shape.

The tiny checkpoint is converted as a user would (``hfmb import``, one process), verified, then a copy
with the error planted in layer 1 is imported and verified against the original.
"""

from __future__ import annotations

import re

import pytest
import torch

from tests.commands import hfmb
from tests.edited_checkpoints import edited_copy
from tests.tiny_checkpoints import build_tiny_checkpoint

pytestmark = pytest.mark.distributed  # hfmb processes

EXIT_OK, EXIT_CHECK = 0, 1
LAYER_1 = "model.layers.1."


def _layer_diffs(report: str) -> dict[int, float]:
    """The per-layer hidden-state differences of a verify report (its rows: layer, max abs diff, ...)."""
    return {int(m.group(1)): float(m.group(2)) for m in re.finditer(r"^\s+(\d)\s+(\S+)\s+\S+\s+\S+$", report, re.M)}


def _swap_post_norms(tensors: dict[str, torch.Tensor], layer: str = LAYER_1) -> None:
    tensors[layer + "post_feedforward_layernorm.weight"] = tensors[layer + "post_attention_layernorm.weight"].clone()


def _swap_image_text_post_norms(tensors: dict[str, torch.Tensor]) -> None:
    """As ``_swap_post_norms``, in the text model of an image-text checkpoint (stored under ``language_model.``)."""
    _swap_post_norms(tensors, "language_model." + LAYER_1)


def _deinterleave_gate_up(tensors: dict[str, torch.Tensor]) -> None:
    """Every expert's gate columns first, then its up columns: what a converter that ignores the interleave makes."""
    for name in ("mlp.experts.gate_up_proj", "mlp.experts.gate_up_proj_bias"):
        both = tensors[LAYER_1 + name]
        tensors[LAYER_1 + name] = torch.cat([both[..., 0::2], both[..., 1::2]], dim=-1).contiguous()


def _transpose_one_down_proj(tensors: dict[str, torch.Tensor]) -> None:
    down = tensors[LAYER_1 + "mlp.experts.down_proj"].clone()
    assert down.shape[1] == down.shape[2], "the tiny gpt-oss keeps down_proj square, so that a transposition keeps its shape"
    down[0] = down[0].T.clone()
    tensors[LAYER_1 + "mlp.experts.down_proj"] = down


def _swap_two_kv_b_rows(tensors: dict[str, torch.Tensor]) -> None:
    """Two rows of one ``kv_b_proj`` swapped (head 0's first nope row and first value row): every shape kept."""
    kv_b = tensors[LAYER_1 + "self_attn.kv_b_proj.weight"].clone()
    kv_b[[0, 16]] = kv_b[[16, 0]]
    tensors[LAYER_1 + "self_attn.kv_b_proj.weight"] = kv_b


PLANTED = [
    pytest.param("olmo2", _swap_post_norms, id="olmo2-post-norms-swapped"),
    pytest.param("gemma3", _swap_post_norms, id="gemma3-post-norms-swapped"),
    pytest.param("gemma3-vision", _swap_image_text_post_norms, id="gemma3-image-text-post-norms-swapped"),
    pytest.param("gptoss", _deinterleave_gate_up, id="gptoss-gate-up-deinterleaved"),
    pytest.param("gptoss", _transpose_one_down_proj, id="gptoss-one-down-proj-transposed"),
    pytest.param("deepseek_v3", _swap_two_kv_b_rows, id="deepseek-v3-two-kv-b-rows-swapped"),
]


@pytest.mark.parametrize("name,plant", PLANTED)
def test_verify_fails_on_a_planted_error(tmp_path, name, plant):
    hf = build_tiny_checkpoint(name, tmp_path / name, dtype=torch.float32)
    swapped = edited_copy(hf, tmp_path / f"{name}-planted", plant)
    good_ckpt, bad_ckpt = str(tmp_path / "good-ckpt"), str(tmp_path / "bad-ckpt")
    for src, ckpt in ((hf, good_ckpt), (swapped, bad_ckpt)):
        imported = hfmb("import", str(src), ckpt)
        assert imported.returncode == EXIT_OK, imported.stdout + imported.stderr

    good = hfmb("verify", str(hf), good_ckpt)
    assert good.returncode == EXIT_OK and good.stdout.rstrip().endswith("VERIFY PASSED"), good.stdout + good.stderr

    bad = hfmb("verify", str(hf), bad_ckpt)
    assert bad.returncode == EXIT_CHECK and "VERIFY FAILED" in bad.stdout, bad.stdout + bad.stderr
    layers = _layer_diffs(bad.stdout)
    assert layers[0] <= 1e-5 < layers[1], bad.stdout  # the report points at layer 1 (layer 0: float noise only)
