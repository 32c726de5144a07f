"""LoRA on bridged Megatron-Core models: adapters on the linears, HF PEFT adapter export and import, merged export.

>>> model = bridge.to_megatron_model(tp=2, pp=2)
>>> apply_lora(model, bridge, LoraConfig(r=8, alpha=16, targets=["q_proj", "v_proj"]))
>>> optimizer = torch.optim.AdamW(adapter_parameters(model))     # the base is frozen
>>> save_peft_adapter(model, bridge, "adapter")                   # peft.PeftModel.from_pretrained loads it
>>> save_merged_hf_pretrained(model, bridge, "merged")            # W + (alpha/r)·B·A as an HF model folder
>>> load_peft_adapter(other_model, bridge, "adapter")             # at any TP/PP layout

Every function runs on all ranks together.
"""

from bridge.lora.apply import adapter_parameters, adapter_plan, apply_lora, init_adapter_weights, lora_adapters, lora_config_of, remove_lora
from bridge.lora.config import LoraConfig, LoraError
from bridge.lora.merge import merged_weights, save_merged_hf_pretrained
from bridge.lora.peft_folder import export_adapter_weights, load_peft_adapter, read_adapter_config, save_peft_adapter
from bridge.lora.targets import adaptable_linears, resolve_targets

__all__ = [
    "LoraConfig",
    "LoraError",
    "adaptable_linears",
    "adapter_parameters",
    "adapter_plan",
    "apply_lora",
    "export_adapter_weights",
    "init_adapter_weights",
    "load_peft_adapter",
    "lora_adapters",
    "lora_config_of",
    "merged_weights",
    "read_adapter_config",
    "remove_lora",
    "resolve_targets",
    "save_merged_hf_pretrained",
    "save_peft_adapter",
]
