"""Writing an HF folder atomically: the safetensors files of a ``ShardLayout``, their index, config and side files.

Everything goes into a temporary folder beside the target (same filesystem, so the final rename is
atomic); the side files, the index and config.json are written last, every file is fsynced, an
optional check runs on the finished temporary folder, and only then is it moved into place. An
interrupted export (even a killed process) therefore leaves the target absent or, with
``overwrite``, untouched; a target is never a mix of old and new files, so there are no stale shards.
What a target may be, what ``overwrite`` may replace and how the result is published without
replacing anything unchecked is ``bridge.hf.output_folder``'s.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

from bridge.hf.folder import INDEX_NAME
from bridge.hf.layout import LayoutWriter, ShardLayout
from bridge.hf.output_folder import HF_MODEL_FOLDER, claimed_target
from bridge.mappings import JoinedShards

logger = logging.getLogger(__name__)


class HFFolderWriter:
    """An HF folder holding the files of ``layout``, written in ``tmp_dir`` and published by ``finish``.

    The target is claimed and ``layout``'s files are created when the writer is made; this
    process's tensors go in through ``add`` (or ``shards``), other processes that see the same
    filesystem may write theirs into ``tmp_dir`` with their own ``LayoutWriter``. Used as a context
    manager, an exception drops everything written.
    """

    def __init__(self, out_dir: str | Path, layout: ShardLayout, *, overwrite: bool = False):
        self.layout = layout
        self._claim = contextlib.ExitStack()
        self._target = self._claim.enter_context(claimed_target(out_dir, overwrite=overwrite, kind=HF_MODEL_FOLDER))
        self.out_dir = self._target.path
        self.tmp_dir = self._target.temp_path()
        try:
            self.tmp_dir.mkdir()
            layout.create(self.tmp_dir)
        except BaseException:
            shutil.rmtree(self.tmp_dir, ignore_errors=True)
            self._claim.close()
            raise
        self.shards = LayoutWriter(self.tmp_dir, layout)

    def __enter__(self) -> "HFFolderWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()

    def add(self, name: str, tensor: torch.Tensor | JoinedShards) -> None:
        """Write ``tensor`` (one the layout planned) into its file now."""
        self.shards.add(name, tensor)

    def finish(
        self,
        config: dict,
        side_files: dict[str, Path | str] | None = None,
        check: Callable[[Path], None] | None = None,
        *,
        written: Sequence[Mapping[int, int]] | None = None,
    ) -> Path:
        """Check the files are complete, name them, write side files, the index and config.json last, run ``check``, move into place.

        ``written``: the data bytes each writer put into each file (``LayoutWriter.written_bytes``),
        when other processes wrote some; by default what ``add`` wrote. ``check(folder)`` sees the
        finished folder before it is published; if anything fails, the temporary folder is removed
        and the target is left as it was.
        """
        try:
            from bridge.hf.metadata import check_weights_match_config

            self.shards.close()
            check_weights_match_config(config, self.layout.shapes())
            self.layout.check_written([self.shards.written_bytes] if written is None else written)
            files = self.layout.files
            weight_map = {}
            for index, file in enumerate(files):
                final = f"model-{index + 1:05d}-of-{len(files):05d}.safetensors"
                os.replace(self.tmp_dir / file.name, self.tmp_dir / final)
                weight_map.update({name: final for name in file.names})
            for name, source in (side_files or {}).items():
                if isinstance(source, str):  # generated content
                    _write_text(self.tmp_dir / name, source)
                else:
                    shutil.copyfile(source, self.tmp_dir / name)
            index_doc = {
                "metadata": {"total_parameters": self.layout.parameters, "total_size": self.layout.data_bytes},
                "weight_map": dict(sorted(weight_map.items())),
            }
            _write_text(self.tmp_dir / INDEX_NAME, json.dumps(index_doc, indent=2, sort_keys=True) + "\n")
            _write_text(self.tmp_dir / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
            if check is not None:
                check(self.tmp_dir)
            self._target.publish(self.tmp_dir)
        except BaseException:
            self.abort()
            raise
        self._claim.close()
        logger.info("wrote %d tensors in %d shards to %s", len(weight_map), len(files), self.out_dir)
        return self.out_dir

    def abort(self) -> None:
        """Drop everything written so far: close the open files and remove the temporary folder."""
        self.shards.abort()
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
        self._claim.close()


def _write_text(path: Path, text: str) -> None:
    with open(path, "w") as handle:
        handle.write(text)
