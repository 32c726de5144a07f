"""The HF files' memory-mapped pages stay out of the loader's resident memory.

safetensors memory-maps each file and every page read stays resident (``RssFile``) until the map
is closed; ``SafetensorsReader`` closes its maps before the bytes read through them pass its bound,
and the load closes them at its end.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from bridge.mappings.hf_views import FusedExperts
from safetensors.torch import save_file

from bridge.hf.reader import SafetensorsReader

MiB = 2**20
BOUND = 64 * MiB
# A Llama-architecture checkpoint of about 160 MiB in bf16 (7 layers, hidden 1024, MLP 2560, vocab
# 4096): more than twice the reader's default bound, max(largest tensor (5 MiB), MIN_REOPEN_BYTES).
DIMS = dict(vocab_size=4096, hidden_size=1024, intermediate_size=2560, num_hidden_layers=7, num_attention_heads=16, num_key_value_heads=4)

_MEASURE = textwrap.dedent(
    """
    import json, sys, warnings
    warnings.filterwarnings("ignore")
    import torch
    from safetensors.torch import load_file
    from bridge import AutoBridge
    from bridge.engine import load as engine_load
    from bridge.hf.reader import LazyTensor

    from tests.process_memory import proc_status_bytes

    def rss_file():
        return proc_status_bytes("RssFile")

    samples = {"peak": 0}
    narrow, select, load = LazyTensor.narrow, LazyTensor.select_slice, engine_load.load_checkpoint

    def sampled(read):
        def sampled_read(self, *args):  # the pages of every read so far that are still mapped
            samples["peak"] = max(samples["peak"], rss_file())
            return read(self, *args)
        return sampled_read

    def measured_load(plan, reader, strategy="slice"):
        samples["before"] = rss_file()
        load(plan, reader, strategy)
        samples["after"] = rss_file()

    LazyTensor.narrow, LazyTensor.select_slice, engine_load.load_checkpoint = sampled(narrow), sampled(select), measured_load
    bridge = AutoBridge.from_hf_pretrained(sys.argv[1])
    model = bridge.to_megatron_model()
    LazyTensor.narrow, LazyTensor.select_slice = narrow, select
    exported = dict(bridge.export_hf_weights(model))  # the reader is still usable (dtypes) after the load
    on_disk = {name: tensor for path in sorted(bridge.hf_folder.glob("*.safetensors")) for name, tensor in load_file(path).items()}
    different = sorted(name for name, tensor in on_disk.items() if not torch.equal(tensor, exported[name]))
    print(json.dumps({**samples, "different": different, "count": len(on_disk)}))
    """
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    from tests.tiny_checkpoints import build_tiny_checkpoint

    return build_tiny_checkpoint("llama", tmp_path_factory.mktemp("reader-memory") / "hf", **DIMS)


@pytest.mark.distributed
def test_mapped_pages_stay_within_the_bound_while_and_after_loading(checkpoint):
    size = sum(path.stat().st_size for path in checkpoint.glob("*.safetensors"))
    result = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(checkpoint)], capture_output=True, text=True, timeout=300, cwd=Path(__file__).parent.parent
    )
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert size > 2 * BOUND, size  # without re-opening, the whole file would stay mapped
    peak, after = measured["peak"] - measured["before"], measured["after"] - measured["before"]
    print(
        f"checkpoint {size / MiB:.0f} MiB, bound {BOUND / MiB:.0f} MiB: "
        f"file-backed RSS while loading +{peak / MiB:.1f} MiB, after +{after / MiB:.1f} MiB"
    )
    largest_param = 2 * DIMS["intermediate_size"] * DIMS["hidden_size"] * 2  # gate + up, in flight while fc1 is built
    assert peak <= BOUND + largest_param, f"{peak / MiB:.1f} MiB of file-backed pages mapped while loading, bound {BOUND / MiB:.0f} MiB"
    assert after < 8 * MiB, f"{after / MiB:.1f} MiB of file-backed pages still mapped after the load"
    assert measured["count"] > 0 and measured["different"] == []
    assert SafetensorsReader(checkpoint).reopen_bytes == BOUND


def test_lazy_tensors_and_views_survive_a_reopen(tmp_path):
    experts = torch.arange(4 * 6 * 8, dtype=torch.float32).reshape(4, 6, 8)
    plain = torch.randn(64, 32)
    save_file({"layers.0.experts.gate_up_proj": experts, "plain": plain}, str(tmp_path / "model.safetensors"))
    view = FusedExperts("layers.*.experts.gate_up_proj", ("layers.*.experts.{e}.gate", "layers.*.experts.{e}.up"))
    reader = SafetensorsReader(tmp_path, views=[view], reopen_bytes=1024)
    lazy, gate = reader.lazy("plain"), reader.lazy("layers.0.experts.2.gate")
    for _ in range(3):  # each read passes the 1 KiB bound: the maps are re-opened between reads
        assert torch.equal(lazy.narrow(0, 8, 16), plain[8:24])
        assert torch.equal(lazy.narrow(1, 4, 4), plain[:, 4:8])
        assert torch.equal(gate.narrow(1, 2, 3), experts[2, :3, 2:5])
    reader.release()
    assert torch.equal(reader.lazy("layers.0.experts.3.up").narrow(0, 0, 3), experts[3, 3:])
    assert reader.shapes()["layers.0.experts.1.up"] == torch.Size([3, 8]) and reader.dtypes()["plain"] == torch.float32
