"""Built-in model bridges, one module per family; importing this package registers them (``registry``)."""

from bridge.models import deepseek, gemma, glm, gpt_oss, llama, mistral, mixtral, olmo, phi3, qwen, qwen_moe  # noqa: F401
from bridge.models.registry import bridge_for, register_bridge, supported_architectures

__all__ = ["bridge_for", "register_bridge", "supported_architectures"]
