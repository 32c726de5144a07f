"""Built-in model bridges; importing this package registers them."""

from models import llama, mistral, mixtral, qwen, qwen_moe  # noqa: F401
