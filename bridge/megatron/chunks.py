"""A Megatron model as the bridge sees it: its ``GPTModel`` chunks, their weights' global names, routed experts."""

from __future__ import annotations

import re
from typing import Iterator

import torch
from megatron.core import parallel_state

# Set (True) on the LoRA adapter parameters ``bridge.lora`` adds: plans of the model's own weights skip them.
ADAPTER_ATTR = "bridge_lora_adapter"
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_LOCAL_EXPERT = re.compile(r"\.local_experts\.(\d+)\.")


def unwrap_chunks(model) -> list[torch.nn.Module]:
    """The ``GPTModel`` chunks inside a model list (or a single model), through DDP/Float16Module wrappers."""
    from megatron.core.models.gpt import GPTModel

    chunks = list(model) if isinstance(model, (list, tuple)) else [model]
    unwrapped = []
    for chunk in chunks:
        while not isinstance(chunk, GPTModel) and hasattr(chunk, "module"):
            chunk = chunk.module
        if not isinstance(chunk, GPTModel):
            raise TypeError(f"expected Megatron-Core GPTModel chunks, got {type(chunk).__name__}")
        unwrapped.append(chunk)
    return unwrapped


def named_weights(chunk: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The chunk's parameters, then its persistent buffers: the tensors a checkpoint of it holds.

    A buffer is a weight of the HF checkpoint when a mapping names it (the router's ``expert_bias``:
    DeepSeek's and GLM's ``e_score_correction_bias``, updated by a rule rather than by gradients);
    the plans skip the buffers no mapping names.
    """
    yield from chunk.named_parameters()
    for module_name, module in chunk.named_modules():
        for name, buffer in module.named_buffers(recurse=False):
            if buffer is not None and name not in module._non_persistent_buffers_set:
                yield (f"{module_name}.{name}" if module_name else name), buffer


def global_names(chunk: torch.nn.Module) -> dict[str, str]:
    """Local weight name → global name: layers counted over all PP/VPP stages, experts over all EP ranks.

    This is the one place where local layer and expert numbers become global ones.
    """
    layer_numbers = [layer.layer_number - 1 for layer in chunk.decoder.layers] if hasattr(chunk, "decoder") else []
    experts = chunk.config.num_moe_experts or 0
    local_experts = experts // parallel_state.get_expert_model_parallel_world_size() if experts else 0
    expert_offset = parallel_state.get_expert_model_parallel_rank() * local_experts

    def rename(name: str) -> str:
        match = _LAYER.match(name)
        if match is not None:
            name = f"decoder.layers.{layer_numbers[int(match.group(1))]}." + name[match.end() :]
        return _LOCAL_EXPERT.sub(lambda m: f".local_experts.{int(m.group(1)) + expert_offset}.", name)

    return {name: rename(name) for name, _ in named_weights(chunk)}


def is_expert_param(module: torch.nn.Module, param: torch.nn.Parameter) -> bool:
    """Routed-expert weights: Megatron marks their modules ``is_expert`` (and, at EP > 1, the params ``allreduce=False``)."""
    return bool(getattr(module, "is_expert", False)) or not getattr(param, "allreduce", True)


def is_adapter_param(param: torch.nn.Parameter) -> bool:
    """LoRA adapter parameters (``bridge.lora``), which are not weights of the HF checkpoint."""
    return bool(getattr(param, ADAPTER_ATTR, False))
