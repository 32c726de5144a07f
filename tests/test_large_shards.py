"""A safetensors shard larger than the machine's memory is read in bounded windows (issue 20, item 12).

transformers 5 writes shards of up to 50 GB. safetensors maps a whole file copy-on-write, which the
kernel charges in full against the memory it lets a process commit and against its address space:
a 30 GB shard on a 24 GiB machine could not even be opened ("unable to mmap ... Cannot allocate
memory"). The reader parses the header from the file's first bytes and maps only a window of the
file around each read. Checked in subprocesses whose address space is limited (``RLIMIT_AS``):

* a (sparse) shard larger than this machine's RAM opens, and tensors anywhere in it read exactly,
  with the process allowed 256 MiB more address space than it holds after its imports;
* a checkpoint whose one shard is twice ``--max-memory`` is imported by the streamed import with the
  process allowed only ``--max-memory`` more address space, into the same bytes as without the limit.

And in this process: windowed reads equal safetensors' own, and a broken header is refused naming the file.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from bridge.hf.folder import CheckpointError
from bridge.hf.reader import SafetensorsReader

MiB = 2**20
ROOT = Path(__file__).resolve().parent.parent
SPARSE_HEADROOM = 256 * MiB
BUDGET = 64 * MiB
# A Llama-architecture bf16 checkpoint of 136 MiB in one shard (6 layers, hidden 1024, MLP 2560,
# vocab 4096): more than twice BUDGET; its largest tensor (fused fc1) is 10 MiB.
DIMS = dict(vocab_size=4096, hidden_size=1024, intermediate_size=2560, num_hidden_layers=6, num_attention_heads=16, num_key_value_heads=4)

# Imports first, then the address-space limit: what the process may still map is ``headroom`` bytes.
_LIMITED = textwrap.dedent(
    """
    import gc, resource

    from tests.process_memory import proc_status_bytes


    def limit_address_space(headroom):
        gc.collect()
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        limit = proc_status_bytes("VmSize") + headroom
        resource.setrlimit(resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))
        return hard


    def lift_limit(hard):
        resource.setrlimit(resource.RLIMIT_AS, (hard, hard))
    """
)

_READ_SPARSE = _LIMITED + textwrap.dedent(
    """
    import json, sys
    import torch
    from bridge.hf.reader import SafetensorsReader

    folder, rows, headroom = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    hard = limit_address_space(headroom)
    try:
        reader = SafetensorsReader(folder, reopen_bytes=64 * 2**20)
        huge = reader.lazy("huge")
        result = {
            "head": reader.lazy("head").select_slice(()).tolist(),
            "tail": reader.lazy("tail").narrow(1, 3, 5).tolist(),
            "huge_first": bool((huge.narrow(0, 0, 16) == 0).all()),
            "huge_last": bool((huge.narrow(0, rows - 16, 16) == 0).all()),
            "error": None,
        }
    except Exception as err:
        result = {"error": f"{type(err).__name__}: {err}"}
    lift_limit(hard)
    print(json.dumps(result))
    """
)

_IMPORT = _LIMITED + textwrap.dedent(
    """
    import hashlib, json, shutil, sys, warnings
    from pathlib import Path
    warnings.filterwarnings("ignore")
    from bridge import AutoBridge
    from bridge.megatron.streaming_import import import_checkpoint
    from torch.distributed.checkpoint import FileSystemReader

    hf, out, budget = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])


    def digests():
        found = {}
        for path in sorted(out.rglob("*")):
            if not path.is_file():
                continue
            digest = hashlib.sha256()
            if path.name == ".metadata":  # all but its storage_meta, which holds a fresh uuid per save
                meta = FileSystemReader(str(path.parent)).read_metadata()
                digest.update(repr((meta.state_dict_metadata, meta.planner_data, meta.storage_data, meta.version)).encode())
            else:
                with open(path, "rb") as file:
                    for block in iter(lambda: file.read(2**20), b""):
                        digest.update(block)
            found[str(path.relative_to(out))] = digest.hexdigest()
        shutil.rmtree(out)  # one checkpoint on disk at a time; both are written to the same path
        return found


    # Unlimited first: it also imports every module and creates every process group the second run uses.
    import_checkpoint(AutoBridge.from_hf_pretrained(hf), out, max_memory=budget)
    unlimited = digests()
    hard = limit_address_space(budget)
    try:
        import_checkpoint(AutoBridge.from_hf_pretrained(hf), out, max_memory=budget)
        error = None
    except Exception as err:
        error = f"{type(err).__name__}: {err}"[:2000]
    lift_limit(hard)
    print(json.dumps({"unlimited": unlimited, "limited": None if error else digests(), "error": error}))
    """
)


def _run(script: str, *argv: str) -> dict:
    result = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _safetensors_file(path: Path, header: dict, parts: list[tuple[int, bytes]], size: int) -> None:
    """Write a safetensors file of ``size`` data bytes holding only ``parts`` (data offset, bytes); the rest is a hole."""
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as file:
        file.write(struct.pack("<Q", len(text)) + text)
        for offset, data in parts:
            file.seek(8 + len(text) + offset)
            file.write(data)
        file.truncate(8 + len(text) + size)


def _holes_stay_holes(folder: Path) -> bool:
    """Whether ``folder``'s filesystem keeps a file's unwritten range unallocated (else the sparse shard would fill the disk)."""
    probe = folder / "probe"
    with open(probe, "wb") as file:
        file.truncate(64 * MiB)
    sparse = probe.stat().st_blocks * 512 < MiB
    probe.unlink()
    return sparse


@pytest.mark.distributed
def test_a_sparse_shard_larger_than_ram_reads_within_a_small_address_space(tmp_path):
    if not _holes_stay_holes(tmp_path):
        pytest.skip("the temporary folder's filesystem does not keep sparse files sparse")
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    row = 4096 * 2  # one bf16 row of "huge"
    rows = (ram + 2**30) // row + 1
    head, tail = torch.arange(64, dtype=torch.float32).reshape(8, 8), torch.arange(80, dtype=torch.float32).reshape(8, 10) / 7
    huge_end = 256 + rows * row
    header = {
        "head": {"dtype": "F32", "shape": [8, 8], "data_offsets": [0, 256]},
        "huge": {"dtype": "BF16", "shape": [rows, 4096], "data_offsets": [256, huge_end]},
        "tail": {"dtype": "F32", "shape": [8, 10], "data_offsets": [huge_end, huge_end + 320]},
    }
    path = tmp_path / "model.safetensors"
    _safetensors_file(path, header, [(0, head.numpy().tobytes()), (huge_end, tail.numpy().tobytes())], huge_end + 320)
    assert path.stat().st_size > ram and path.stat().st_blocks * 512 < 64 * MiB  # larger than RAM, a hole on disk

    result = _run(_READ_SPARSE, str(tmp_path), str(rows), str(SPARSE_HEADROOM))
    path.unlink()  # a hole, but one that tools reading apparent sizes would count
    assert result["error"] is None, result["error"]
    assert result["head"] == head.tolist() and result["tail"] == tail[:, 3:8].tolist()
    assert result["huge_first"] and result["huge_last"]


@pytest.mark.distributed
def test_a_shard_twice_the_budget_imports_within_it_bit_identical(tmp_path):
    from tests.tiny_checkpoints import build_tiny_checkpoint

    hf = build_tiny_checkpoint("llama", tmp_path / "hf", **DIMS)
    (shard,) = hf.glob("*.safetensors")
    assert shard.stat().st_size > 2 * BUDGET, shard.stat().st_size

    result = _run(_IMPORT, str(hf), str(tmp_path / "ckpt"), str(BUDGET))
    assert result["error"] is None, result["error"]
    assert {"release/__0_0.distcp", "release/.metadata", "release/common.pt"} <= set(result["unlimited"])
    assert result["limited"] == result["unlimited"]


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "matrix": torch.randn(37, 53, generator=g).to(torch.bfloat16),
        "cube": torch.randn(5, 6, 7, generator=g),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "codes": torch.randint(-100, 100, (9,), generator=g, dtype=torch.int8),
        "wide": torch.randn(300, 700, generator=g).half(),
    }


@pytest.mark.parametrize("window", [1, 5000, None])
def test_windowed_reads_equal_safetensors(tmp_path, window):
    tensors = _tensors()
    save_file(tensors, str(tmp_path / "model.safetensors"))
    reader = SafetensorsReader(tmp_path, reopen_bytes=window)
    for name, tensor in load_file(tmp_path / "model.safetensors").items():
        lazy = reader.lazy(name)
        assert torch.equal(lazy.select_slice(()), tensor), name
        for dim, size in enumerate(tensor.shape):
            for start, length in ((0, size), (0, size // 2), (size // 3, size - size // 3), (max(size - 1, 0), min(size, 1))):
                assert torch.equal(lazy.narrow(dim, start, length), tensor.narrow(dim, start, length)), (name, dim, start, length)
    strided = (slice(1, 4, 2), slice(None), slice(2, 7, 3))
    assert torch.equal(reader.lazy("cube").select_slice(strided), tensors["cube"][strided])


def _file(header: dict | bytes, data: bytes) -> bytes:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def _one(dtype: str = "I8", shape: list | None = None, offsets: list | None = None) -> dict:
    return {"dtype": dtype, "shape": [4] if shape is None else shape, "data_offsets": [0, 4] if offsets is None else offsets}


BROKEN_FILES = {
    "empty": (b"", "fewer than the 8"),
    "header beyond the file": (struct.pack("<Q", 10**6) + b"{}", "header length is 1,000,000 bytes"),
    "a pickle": (b"\x80\x04\x95" + bytes(100), "header length"),
    "not JSON": (_file(b"{nope!!}", b""), "not JSON text"),
    "not an object": (_file(b"[1, 2, 3]", b""), "not a JSON object"),
    "truncated": (_file({"x": _one()}, bytes(3)), "ends at byte 4, but the file holds 3"),
    "trailing bytes": (_file({"x": _one()}, bytes(5)), "ends at byte 4, but the file holds 5"),
    "overlap": (_file({"x": _one(), "y": _one(offsets=[2, 6])}, bytes(6)), "y starts at byte 2, where the data before it ends at 4"),
    "gap": (_file({"x": _one(), "y": _one(offsets=[6, 10])}, bytes(10)), "data of y starts at byte 6"),
    "size": (_file({"x": _one("F32")}, bytes(4)), "takes 16 bytes, but its data_offsets span 4"),
    "shape": (_file({"x": _one(shape=[-4])}, bytes(4)), "shape of x is [-4]"),
    "offsets": (_file({"x": _one(offsets=[4, 0])}, bytes(4)), "data_offsets of x are [4, 0]"),
    "metadata": (_file({"__metadata__": {"a": 1}, "x": _one()}, bytes(4)), "__metadata__"),
    "dtype": (_file({"x": _one("F13")}, bytes(4)), "safetensors dtype F13"),
}


def test_a_dtype_misaligned_in_the_file_reads_exactly(tmp_path):
    """A header of odd length and a 3-byte tensor put the f32 tensor after them off its 4-byte alignment."""
    values = torch.randn(2, 3)
    header = {"codes": _one(shape=[3], offsets=[0, 3]), "values": _one("F32", [2, 3], [3, 27])}
    text = json.dumps(header).encode() + b" " * 3
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + bytes([1, 2, 3]) + values.numpy().tobytes())
    reader = SafetensorsReader(tmp_path)
    assert torch.equal(reader.lazy("values").narrow(1, 1, 2), values[:, 1:3])
    assert reader.lazy("codes").select_slice(()).tolist() == [1, 2, 3]


@pytest.mark.parametrize("kind", list(BROKEN_FILES))
def test_a_broken_header_is_refused_naming_the_file(tmp_path, kind):
    content, problem = BROKEN_FILES[kind]
    (tmp_path / "model.safetensors").write_bytes(content)
    with pytest.raises(CheckpointError, match="model.safetensors") as raised:
        SafetensorsReader(tmp_path)
    assert problem in str(raised.value)
