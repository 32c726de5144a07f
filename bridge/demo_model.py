"""The demo's built-in model: a small Llama-architecture HF checkpoint built locally, with a word-level tokenizer.

``examples/demo.py`` and ``bridge.training.data.prepare_demo`` use it instead of a Hub download: real
on-disk names and layout (config → transformers model → ``save_pretrained``), a vocabulary that is
not a multiple of 128 (so Megatron's padding is exercised), and norms that are not all ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

VOCAB_SIZE = 250
# A Llama whose every dimension is small: 4 layers, hidden 64, 4 heads over 2 KV heads.
SMALL_LLAMA: dict[str, Any] = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
)


def build_demo_checkpoint(out_dir: str | Path, *, dtype: torch.dtype = torch.float32, seed: int = 0) -> Path:
    """Save a randomly initialised small Llama (``SMALL_LLAMA``) with its tokenizer to ``out_dir``."""
    from transformers import LlamaConfig

    return save_random_checkpoint(LlamaConfig(**SMALL_LLAMA), out_dir, dtype=dtype, seed=seed)


def save_random_checkpoint(config, out_dir: str | Path, *, dtype: torch.dtype, seed: int = 0, save_original_format: bool = True) -> Path:
    """A randomly initialised model of ``config`` saved to ``out_dir`` in ``dtype``, with ``demo_tokenizer``.

    The default initialisation leaves norms at 1 and biases at 0; they (and attention sinks) are perturbed, so that a
    conversion that drops or swaps one shows. ``save_original_format=False`` writes transformers-5
    fused expert tensors.
    """
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("norm.weight", ".bias", "_bias", ".sinks")):
                param.add_(torch.randn_like(param) * 0.1)
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # the routers' correction bias (DeepSeek-V3, GLM-4.5)
                buffer.add_(torch.randn_like(buffer) * 0.1)
    model.to(dtype).save_pretrained(out_dir, save_original_format=save_original_format)
    demo_tokenizer(config.get_text_config().vocab_size).save_pretrained(out_dir)
    return Path(out_dir)


def demo_tokenizer(vocab_size: int = VOCAB_SIZE):
    """A word-level tokenizer over ``<unk> <s> </s>`` and the words ``w3 … w{vocab_size-1}``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
