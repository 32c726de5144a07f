"""A user's own ``models`` and ``mappings`` packages (common in training repositories) do not shadow the bridge's.

The bridge installs one top-level package, ``bridge``; the repository's ``models/`` and ``mappings/``
folders are installed as ``bridge.models`` and ``bridge.mappings`` (pyproject's package-dir).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = textwrap.dedent(
    """
    import sys
    import models, mappings
    assert models.MINE and mappings.MINE, "the user's own packages are the ones named models and mappings"
    from bridge import AutoBridge
    auto = AutoBridge.from_hf_pretrained(sys.argv[1])
    auto.save_hf_pretrained(auto.to_megatron_model(), sys.argv[2])
    import bridge.models, bridge.mappings
    assert not hasattr(bridge.models, "MINE") and not hasattr(bridge.mappings, "MINE")
    print("CONVERTED", auto.model_bridge.architecture)
    """
)


@pytest.mark.distributed
def test_a_script_beside_its_own_models_and_mappings_packages_converts(tiny_checkpoints, tmp_path):
    project = tmp_path / "training-repo"
    for name in ("models", "mappings"):
        (project / name).mkdir(parents=True)
        (project / name / "__init__.py").write_text("MINE = True\n")
    (project / "convert.py").write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "PYTHONPATH")}
    result = subprocess.run(
        [sys.executable, "convert.py", str(tiny_checkpoints["llama"]), str(tmp_path / "out")],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0 and "CONVERTED LlamaForCausalLM" in result.stdout, result.stderr[-3000:]
    assert (tmp_path / "out" / "config.json").is_file()


def test_every_package_folder_is_installed():
    """pyproject lists the installed packages by hand (package-dir maps two of them): none may be missing."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed, folders = set(config["packages"]), config["package-dir"]
    found = set()
    for package, folder in folders.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((package, *relative)))
    assert found == listed
