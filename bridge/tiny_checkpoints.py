"""Small HF checkpoints built locally (config → transformers model → ``save_pretrained``).

The demo and the tests use them instead of Hub downloads: real on-disk names and layouts, a vocab
that is not a multiple of 128 (so Megatron's padding is exercised), and a word-level tokenizer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

VOCAB_SIZE = 250
_COMMON = dict(
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
_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

# name → (config class name, config overrides)
TINY_MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", {}),
    "llama3.1": ("LlamaConfig", {"rope_parameters": _LLAMA3_ROPE}),
    "llama3.2": ("LlamaConfig", {"rope_parameters": _LLAMA3_ROPE, "tie_word_embeddings": True}),
    "mistral": ("MistralConfig", {"sliding_window": 4096}),
    "qwen2": ("Qwen2Config", {"tie_word_embeddings": True}),
    "qwen3": ("Qwen3Config", {"head_dim": 32}),
}

_MOE = dict(num_experts_per_tok=2, output_router_logits=False)
TINY_MOE_MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "mixtral": ("MixtralConfig", {**_MOE, "num_local_experts": 4, "intermediate_size": 32, "sliding_window": None}),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        {
            **_MOE,
            "num_experts": 4,
            "moe_intermediate_size": 32,
            "shared_expert_intermediate_size": 48,
            "mlp_only_layers": [1],
            "norm_topk_prob": False,
        },
    ),
    "qwen3_moe": ("Qwen3MoeConfig", {**_MOE, "num_experts": 4, "moe_intermediate_size": 32, "norm_topk_prob": True, "head_dim": 32}),
}


def tiny_config(name: str, **overrides: Any):
    import transformers

    class_name, extra = {**TINY_MODELS, **TINY_MOE_MODELS}[name]
    return getattr(transformers, class_name)(**{**_COMMON, **extra, **overrides})


def build_tiny_checkpoint(
    name: str,
    out_dir: str | Path,
    *,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    save_original_format: bool = True,
    **overrides: Any,
) -> Path:
    """Save a randomly initialised tiny ``name`` model (see ``TINY_MODELS``, ``TINY_MOE_MODELS``) with a tokenizer to ``out_dir``.

    ``save_original_format=False`` (an override) writes transformers-5 fused expert tensors.
    """
    from transformers import AutoModelForCausalLM

    config = tiny_config(name, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # the default init leaves norms at 1 and biases at 0: perturb them so mistakes show
        for pname, param in model.named_parameters():
            if pname.endswith("norm.weight") or pname.endswith(".bias"):
                param.add_(torch.randn_like(param) * 0.1)
    model.to(dtype).save_pretrained(out_dir, save_original_format=save_original_format)
    tiny_tokenizer(config.vocab_size).save_pretrained(out_dir)
    return Path(out_dir)


def tiny_tokenizer(vocab_size: int = VOCAB_SIZE):
    """A word-level tokenizer over ``<unk> <s> </s>`` and the words ``w3 … w{vocab_size-1}``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
