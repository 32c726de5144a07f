"""HF ⇄ Megatron-Core checkpoint bridge."""

from bridge.auto_bridge import AutoBridge
from bridge.model_bridge import ModelBridge, UnsupportedArchitectureError, register_bridge, supported_architectures

__all__ = ["AutoBridge", "ModelBridge", "UnsupportedArchitectureError", "register_bridge", "supported_architectures"]
