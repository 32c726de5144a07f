"""The import hook of ``bridge.runtime.megatron_import``: Megatron-Core imports without torch's compiler stack, or untouched on request."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROBE = """
import json, sys
from bridge.auto_bridge import AutoBridge
import megatron.core.jit as jit, torch
from bridge.runtime.megatron_import import lazy_torch_compile
print(json.dumps({"dynamo": "torch._dynamo" in sys.modules, "lazy": jit.jit_fuser is lazy_torch_compile,
                  "compile": jit.jit_fuser is torch.compile, "gc": __import__("gc").isenabled()}))
"""


def _probe(**env: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=300, check=True
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.distributed
def test_megatron_core_imports_without_the_compiler_stack():
    assert _probe() == {"dynamo": False, "lazy": True, "compile": False, "gc": True}


@pytest.mark.distributed
def test_the_hook_can_be_switched_off():
    assert _probe(HFMB_EAGER_MEGATRON_IMPORT="1") == {"dynamo": True, "lazy": False, "compile": True, "gc": True}


def test_lazy_compile_defers_torch_compile_to_the_first_call(monkeypatch):
    import torch

    from bridge.runtime.megatron_import import lazy_torch_compile

    calls = []
    monkeypatch.setattr(torch, "compile", lambda fn, **options: calls.append(options) or fn)

    @lazy_torch_compile
    def double(x):
        return 2 * x

    assert calls == [] and double.__name__ == "double"
    assert double(3) == 6 and double(4) == 8 and calls == [{}]
    assert lazy_torch_compile(fullgraph=True)(double.__wrapped__)(5) == 10 and calls[-1] == {"fullgraph": True}
