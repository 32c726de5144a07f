"""The parent folders of an output target: created when missing, and removed again when the run leaves them empty.

A run refused after it prepared its target (a size, shape or memory-budget check that comes after the
claim) must leave the file system as it found it: ``created_parents`` creates the missing folders
above a target and, when the run ends, removes those of them that hold nothing, deepest first. A
folder that holds anything (the published target, another run's lock or output) is kept, as is
every folder that existed before.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Iterator

logger = logging.getLogger(__name__)


def make_parents(path: Path) -> list[Path]:
    """Create the missing folders above ``path`` (an absolute path); returns those this call created, outermost first.

    A folder that appears concurrently counts as not created here (it is another process's).
    """
    missing = []
    for parent in Path(path).parents:
        if parent.exists():
            break
        missing.append(parent)
    created = []
    for folder in reversed(missing):
        try:
            folder.mkdir()
        except FileExistsError:
            continue
        created.append(folder)
    return created


def remove_empty(created: list[Path]) -> list[Path]:
    """Remove the folders of ``created`` (outermost first, as ``make_parents`` returns them) that are empty, deepest first.

    Stops at the first folder that is not empty (its parents then are not either). Returns the folders removed.
    """
    removed = []
    for folder in reversed(created):
        try:
            os.rmdir(folder)
        except FileNotFoundError:
            continue
        except OSError:  # not empty (the target was published, or something else arrived), or not ours to remove
            break
        removed.append(folder)
    if removed:
        logger.debug("removed the folders created for the output and left empty: %s", ", ".join(map(str, removed)))
    return removed


@contextlib.contextmanager
def created_parents(path: Path) -> Iterator[list[Path]]:
    """Create the missing folders above ``path`` for the length of the block; yields those created.

    On leaving the block, however it is left, the created folders that are empty are removed.
    """
    created = make_parents(path)
    try:
        yield created
    finally:
        remove_empty(created)
