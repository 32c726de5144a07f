"""Tensors no mapping converts that exports carry unchanged: DeepSeek-V3's and GLM-4.5's multi-token-prediction layers,
an image-text Gemma 3's vision tower and projector.

The released checkpoints hold MTP layers after the decoder (``model.layers.{num_hidden_layers}``); transformers drops
them at load. The vision tower is not trained here, but an export must stay a complete image-text checkpoint
that transformers loads whole. A conversion must never lose them silently: ``hfmb plan`` says they are carried, ``hfmb import`` and
``hfmb export`` (streamed) and the in-memory ``save_hf_pretrained`` write them back bit for bit, and an export
whose source folder no longer holds them is refused, naming them, before anything is written.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from bridge.runtime.local_launch import run_distributed
from tests.commands import hfmb
from tests.edited_checkpoints import with_mtp_layer
from tests.tiny_checkpoints import build_tiny_checkpoint

pytestmark = pytest.mark.distributed  # hfmb processes and ranks

EXIT_OK, EXIT_BAD_INPUT = 0, 2


# the checkpoint → the start of its carried tensors' names
CARRIED = {"deepseek_v3": "model.layers.4.", "glm4_moe": "model.layers.4.", "gemma3-vision": "multi_modal_projector."}


@pytest.fixture(scope="module", params=list(CARRIED))
def carrying(request, tmp_path_factory):
    """(name, folder) of a checkpoint with tensors to carry (an MTP layer added to the MoE ones)."""
    root = tmp_path_factory.mktemp(request.param)
    plain = build_tiny_checkpoint(request.param, root / "plain", dtype=torch.float32)
    return request.param, plain if request.param == "gemma3-vision" else with_mtp_layer(plain, root / "hf")


def test_plan_says_what_is_carried(carrying):
    name, hf = carrying
    planned = hfmb("plan", str(hf))
    assert planned.returncode == EXIT_OK, planned.stdout + planned.stderr
    assert "carried unchanged into exports, not converted" in planned.stdout
    assert CARRIED[name] in planned.stdout


def test_import_and_export_carry_them_bit_for_bit(carrying, tmp_path):
    from bridge.checks.verify import compare_hf_folders

    name, hf = carrying
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    for argv in (("import", str(hf), str(ckpt)), ("export", str(ckpt), str(out))):
        done = hfmb(*argv)
        assert done.returncode == EXIT_OK, done.stdout + done.stderr
    # the MTP layer is unexpected to transformers, as released; the vision tower loads
    assert "transformers load report: empty" in done.stdout
    assert compare_hf_folders(hf, out) == []


def _save(src: str, out: str) -> None:
    from bridge import AutoBridge

    bridge = AutoBridge.from_hf_pretrained(src)
    bridge.save_hf_pretrained(bridge.to_megatron_model(tp=2), out)


def test_in_memory_export_carries_them(carrying, tmp_path):
    from bridge.checks.verify import compare_hf_folders

    name, hf = carrying
    run_distributed(_save, 2, str(hf), str(tmp_path / "out"))
    assert compare_hf_folders(hf, tmp_path / "out") == []


def test_export_whose_source_lost_them_is_refused_by_name(carrying, tmp_path):
    name, hf = carrying
    moved, ckpt, out = tmp_path / "hf", tmp_path / "ckpt", tmp_path / "out"
    shutil.copytree(hf, moved)
    imported = hfmb("import", str(moved), str(ckpt))
    assert imported.returncode == EXIT_OK, imported.stdout + imported.stderr
    shutil.rmtree(moved)
    refused = hfmb("export", str(ckpt), str(out))
    assert refused.returncode == EXIT_BAD_INPUT, refused.stdout + refused.stderr
    assert CARRIED[name] in refused.stderr and "which is gone" in refused.stderr
    assert not out.exists()
