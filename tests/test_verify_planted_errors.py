"""``hfmb verify`` catches a checkpoint with one norm swapped in a family whose layers are not Llama's.

OLMo-2, Gemma 2 and Gemma 3 normalise the attention and MLP outputs (``post_attention_layernorm``,
``post_feedforward_layernorm``): a converter that mixes them up is wrong in layer 1 only. The tiny
checkpoint is converted as a user would (``hfmb import``, one process), verified, then a copy with layer
1's ``post_feedforward_layernorm`` replaced by its ``post_attention_layernorm`` is imported and verified
against the original.
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


def _swap_post_norms(tensors: dict[str, torch.Tensor]) -> None:
    tensors[LAYER_1 + "post_feedforward_layernorm.weight"] = tensors[LAYER_1 + "post_attention_layernorm.weight"].clone()


@pytest.mark.parametrize("name", ["olmo2", "gemma3"])
def test_verify_fails_on_a_post_norm_swapped_for_the_other(tmp_path, name):
    hf = build_tiny_checkpoint(name, tmp_path / name, dtype=torch.float32)
    swapped = edited_copy(hf, tmp_path / f"{name}-swapped", _swap_post_norms)
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
