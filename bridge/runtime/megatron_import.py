"""A one-shot import hook that makes ``import megatron.core`` skip work a conversion never uses (docs/design.md).

``install_megatron_import_hook`` (run by ``import bridge``) installs it; what Megatron-Core computes
does not change:

- Megatron-Core 0.16.1 decorates its fused functions with ``megatron.core.jit.jit_fuser``, which is
  ``torch.compile``, while ``import megatron.core`` runs. The first ``torch.compile`` call imports
  torch's compiler stack (dynamo, inductor, functorch, networkx), in a conversion that
  never calls those functions. The hook makes ``jit_fuser`` build the same ``torch.compile``
  wrapper at a function's first call instead (``lazy_torch_compile``). No environment variable or
  API of 0.16.1 does this; ``disable_jit_fuser()`` can only run after the decorations.
- The cyclic garbage collector is paused while ``megatron/core/__init__.py`` runs: the full
  collections that import triggers walk torch's and transformers' objects too.

Nothing changes when Megatron-Core was imported before ``bridge``; set
``HFMB_EAGER_MEGATRON_IMPORT=1`` to import it untouched. A lazy ``jit_fuser`` in Megatron-Core
itself would make this module unnecessary.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import os
import re
import sys
import warnings
from types import FunctionType, ModuleType
from typing import Any, Callable, Iterator


def lazy_torch_compile(model: Callable | None = None, **options: Any) -> Callable:
    """``torch.compile`` that, for a plain function, builds the compiled wrapper at its first call.

    That call runs the same ``torch.compile(model, **options)``, so the compiled code and its
    numerics are ``torch.compile``'s. Inside a compiled region dynamo inlines ``model`` (through
    ``_torchdynamo_inline``, as for the wrapper ``torch.compile`` returns); while compiling or
    exporting, ``model`` runs as is, as a nested ``torch.compile`` wrapper does. Modules and other
    callables are compiled at once: the type of the result is part of ``torch.compile``'s contract.
    """
    import torch

    if model is None:
        return lambda fn: lazy_torch_compile(fn, **options)
    if not isinstance(model, FunctionType):
        return torch.compile(model, **options)
    compiled: Callable | None = None

    @functools.wraps(model)
    def compile_on_first_call(*args: Any, **kwargs: Any) -> Any:
        nonlocal compiled
        if torch.compiler.is_compiling():
            return model(*args, **kwargs)
        if compiled is None:
            compiled = torch.compile(model, **options)
        return compiled(*args, **kwargs)

    compile_on_first_call._torchdynamo_inline = model  # type: ignore[attr-defined]
    return compile_on_first_call


_ExecHook = Callable[[Callable[[ModuleType], None], ModuleType], None]


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Automatic collection off for the block; left off if it was off (the caller's choice)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _exec_megatron_core(exec_module: Callable[[ModuleType], None], module: ModuleType) -> None:
    """Run ``megatron/core/__init__.py`` (which imports most of Megatron-Core) without full collections."""
    with _gc_paused():
        exec_module(module)


def _exec_megatron_jit(exec_module: Callable[[ModuleType], None], module: ModuleType) -> None:
    """Run ``megatron/core/jit.py``; if it chose ``torch.compile`` itself, defer it to first calls."""
    exec_module(module)
    torch = sys.modules.get("torch")
    if torch is not None and getattr(module, "jit_fuser", None) is torch.compile:
        module.jit_fuser = lazy_torch_compile


_HOOKS: dict[str, _ExecHook] = {
    "megatron.core": _exec_megatron_core,
    "megatron.core.jit": _exec_megatron_jit,
}
_LAST_HOOKED = "megatron.core.jit"  # imported while megatron.core's __init__ runs, after it starts


class _HookedLoader:
    """The module's own loader, with its ``exec_module`` run through one of ``_HOOKS``."""

    def __init__(self, loader: Any, hook: _ExecHook):
        self._loader = loader
        self._hook = hook

    def create_module(self, spec: Any) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._hook(self._loader.exec_module, module)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # e.g. copy/pickle probing before ``_loader`` exists
            raise AttributeError(name)
        return getattr(self._loader, name)


class _MegatronImportHook:
    """Finds the modules of ``_HOOKS`` through the other finders and hands them ``_HookedLoader``."""

    def find_spec(self, name: str, path: Any = None, target: ModuleType | None = None) -> Any:
        hook = _HOOKS.get(name)
        if hook is None:
            return None
        if name == _LAST_HOOKED:
            with contextlib.suppress(ValueError):
                sys.meta_path.remove(self)
        for finder in list(sys.meta_path):
            find_spec = getattr(finder, "find_spec", None)
            spec = None if finder is self or find_spec is None else find_spec(name, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _HookedLoader(spec.loader, hook)
                return spec
        return None


# Warnings about Megatron-Core itself that a user of the bridge has nothing to act on: optional packages it
# falls back from (to the PyTorch implementations the bridge builds with anyway), and torch's deprecation
# of the collectives Megatron-Core 0.16 calls.
MEGATRON_NOTICES: tuple[tuple[str, type[Warning]], ...] = (
    (re.escape("Transformer Engine and Apex are not installed"), UserWarning),
    (re.escape("Apex is not installed"), UserWarning),
    (r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated", FutureWarning),
)


def hide_megatron_notices() -> None:
    """Filter exactly ``MEGATRON_NOTICES`` in this process; ``import bridge`` calls it."""
    for message, category in MEGATRON_NOTICES:
        warnings.filterwarnings("ignore", message=message, category=category)


def install_megatron_import_hook() -> None:
    """Install the hook unless Megatron-Core was imported already, the hook is installed, or ``HFMB_EAGER_MEGATRON_IMPORT`` is set."""
    if os.environ.get("HFMB_EAGER_MEGATRON_IMPORT", "0") not in ("", "0"):
        return
    if "megatron.core" not in sys.modules and not any(isinstance(f, _MegatronImportHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _MegatronImportHook())
