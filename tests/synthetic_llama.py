"""HF checkpoints of any size with random weights, written with safetensors directly (no weights are initialised).

Random bf16 weights under the real tensor names, in shards of at most ``shard_bytes``, with a
``config.json`` and an index: what the memory tests and ``bench/memory_bench.py`` convert. Only one
shard's tensors are in memory at a time, so an 8B-shaped checkpoint is written in a few GB. A Llama's
tensors are listed here (``tensor_shapes``); any other architecture's are read off a meta-device
transformers model of its config (``meta_tensor_shapes``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch
from safetensors.torch import save_file


@dataclass(frozen=True)
class LlamaShape:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    tie_word_embeddings: bool = False


# Llama-3.1-8B's dimensions (its config.json).
LLAMA_3_1_8B = LlamaShape(128256, 4096, 14336, 32, 32, 8)


def tensor_shapes(shape: LlamaShape) -> Iterator[tuple[str, tuple[int, ...]]]:
    """The HF names and shapes of a Llama of ``shape``, in the order transformers saves them."""
    hidden, head_dim = shape.hidden_size, shape.hidden_size // shape.num_attention_heads
    kv = shape.num_key_value_heads * head_dim
    yield "model.embed_tokens.weight", (shape.vocab_size, hidden)
    for i in range(shape.num_hidden_layers):
        layer = f"model.layers.{i}"
        yield f"{layer}.input_layernorm.weight", (hidden,)
        yield f"{layer}.self_attn.q_proj.weight", (hidden, hidden)
        yield f"{layer}.self_attn.k_proj.weight", (kv, hidden)
        yield f"{layer}.self_attn.v_proj.weight", (kv, hidden)
        yield f"{layer}.self_attn.o_proj.weight", (hidden, hidden)
        yield f"{layer}.post_attention_layernorm.weight", (hidden,)
        yield f"{layer}.mlp.gate_proj.weight", (shape.intermediate_size, hidden)
        yield f"{layer}.mlp.up_proj.weight", (shape.intermediate_size, hidden)
        yield f"{layer}.mlp.down_proj.weight", (hidden, shape.intermediate_size)
    yield "model.norm.weight", (hidden,)
    if not shape.tie_word_embeddings:
        yield "lm_head.weight", (shape.vocab_size, hidden)


def meta_tensor_shapes(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    """The tensors transformers saves for a model of ``config`` (a config.json's content): names and shapes of a
    meta-device model (nothing allocated) under the names ``save_pretrained`` writes (an image-text model's
    ``language_model.model.*``), the tied output layer left out."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.core_model_loading import revert_weight_conversion

    hf_config = AutoConfig.for_model(**config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    tied = bool(getattr(hf_config, "tie_word_embeddings", False))
    saved = revert_weight_conversion(model, model.state_dict())
    return [(name, tuple(t.shape)) for name, t in saved.items() if not (tied and name.endswith("lm_head.weight"))]


def write_llama_checkpoint(folder: str | Path, shape: LlamaShape, *, shard_bytes: int = 2 * 10**9, seed: int = 0) -> Path:
    """``folder`` holding a bf16 Llama of ``shape`` with random weights (norms near 1), its config and index."""
    return write_random_checkpoint(folder, tensor_shapes(shape), _config(shape), shard_bytes=shard_bytes, seed=seed)


def write_random_checkpoint(
    folder: str | Path, shapes: Iterable[tuple[str, tuple[int, ...]]], config: dict, *, shard_bytes: int = 2 * 10**9, seed: int = 0
) -> Path:
    """``folder`` holding bf16 tensors of these names and ``shapes`` with random weights (norms near 1), ``config`` and an index."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    shards: list[dict[str, torch.Tensor]] = [{}]
    used = 0
    for name, dims in shapes:
        nbytes = 2 * torch.Size(dims).numel()
        if shards[-1] and used + nbytes > shard_bytes:
            shards.append({})
            used = 0
        shards[-1][name] = torch.Size(dims)  # type: ignore[assignment]  (filled when its shard is written)
        used += nbytes
    weight_map, total = {}, 0
    for number, shard in enumerate(shards, 1):
        file = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: _random(name, dims, generator) for name, dims in shard.items()}
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
        total += sum(t.nbytes for t in tensors.values())
        del tensors
    _write_json(folder / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
    _write_json(folder / "config.json", config)
    return folder


def _random(name: str, dims: torch.Size, generator: torch.Generator) -> torch.Tensor:
    values = torch.randn(dims, generator=generator, dtype=torch.bfloat16).mul_(0.02)
    return values.add_(1.0) if name.endswith("norm.weight") else values


def _config(shape: LlamaShape) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **asdict(shape),
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "hidden_act": "silu",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "bfloat16",
    }


def _write_json(path: Path, content: dict) -> None:
    path.write_text(json.dumps(content, indent=2) + "\n")
