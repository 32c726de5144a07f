"""Built-in model bridges; importing this package registers them."""

from models import llama, mistral, qwen  # noqa: F401
