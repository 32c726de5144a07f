"""HF ⇄ Megatron-Core checkpoint bridge.

The public names are imported lazily, so that ``import bridge.runtime.cpu_mode`` (or a spawned rank's
launcher) does not pay for transformers before it needs it. Importing the package installs
``bridge.runtime.megatron_import``'s hook, which makes a later ``import megatron.core`` cheaper,
and hides Megatron-Core's notices a user cannot act on (missing Apex / Transformer Engine, deprecated collectives).
"""

from __future__ import annotations

import importlib
from typing import Any

from bridge.runtime.megatron_import import hide_megatron_notices, install_megatron_import_hook

_PUBLIC = {
    "AutoBridge": "bridge.auto_bridge",
    "ModelBridge": "bridge.model_bridge",
    "UnsupportedArchitectureError": "bridge.model_bridge",
    "register_bridge": "bridge.models.registry",
    "supported_architectures": "bridge.models",
}
__all__ = list(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'bridge' has no attribute {name!r}")


install_megatron_import_hook()
hide_megatron_notices()
