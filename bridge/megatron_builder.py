"""Building this rank's Megatron-Core ``GPTModel`` chunks from a model bridge.

Weights about to be overwritten are not randomly initialised (``perform_initialization=False``).
The layer spec is derived from the config alone: Transformer Engine's when it is importable on a GPU,
Megatron-Core's local modules otherwise.
"""

from __future__ import annotations

import importlib.util
import logging

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.spec_utils import ModuleSpec

from bridge import cpu_mode
from bridge.model_bridge import ModelBridge
from bridge.parallel import ParallelConfigError

logger = logging.getLogger(__name__)


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Megatron-LM's rule: round the vocabulary up to a multiple of ``divisible_by × tp``."""
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple


def check_parallel_sizes(bridge: ModelBridge, config_kwargs: dict, tp: int, pp: int, vpp: int | None) -> None:
    """Fail early, naming the setting, when a parallel size does not divide what it must split."""
    checks = [
        ("num_attention_heads", config_kwargs["num_attention_heads"], tp, "TP size"),
        ("num_key_value_heads (num_query_groups)", config_kwargs.get("num_query_groups") or config_kwargs["num_attention_heads"], tp, "TP size"),
        ("intermediate_size (ffn_hidden_size)", config_kwargs["ffn_hidden_size"], tp, "TP size"),
        ("num_hidden_layers", config_kwargs["num_layers"], pp * (vpp or 1), "PP size × VPP size"),
    ]
    for setting, value, size, what in checks:
        if value % size:
            raise ParallelConfigError(
                f"{bridge.architecture}: {setting}={value} is not divisible by {what}={size}; choose a size that divides it"
            )


def build_transformer_config(
    bridge: ModelBridge, *, tp: int, pp: int, vpp: int | None, dtype: torch.dtype, initialize_weights: bool
) -> TransformerConfig:
    kwargs = bridge.transformer_config_kwargs()
    check_parallel_sizes(bridge, kwargs, tp, pp, vpp)
    kwargs.update(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp if vpp and vpp > 1 else None,
        sequence_parallel=False,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu_initialization=not cpu_mode.cuda_available(),
        perform_initialization=initialize_weights,
        # Pure-PyTorch paths: the fused kernels need Apex/TE or CUDA, and give the same math.
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
    )
    try:
        return TransformerConfig(**kwargs)
    except (AssertionError, ValueError) as err:
        raise ParallelConfigError(f"Megatron-Core rejects the config derived from {bridge.architecture}: {err}") from err


def use_transformer_engine() -> bool:
    return cpu_mode.cuda_available() and importlib.util.find_spec("transformer_engine") is not None


def layer_spec(config: TransformerConfig) -> ModuleSpec:
    """The decoder layer spec for ``config``: TE on a GPU when installed, Megatron-Core's local modules otherwise."""
    from megatron.core.models.gpt import gpt_layer_specs

    if use_transformer_engine():
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=config.qk_layernorm)
    return gpt_layer_specs.get_gpt_layer_local_spec(normalization=config.normalization, qk_layernorm=config.qk_layernorm)


def build_gpt_chunks(bridge: ModelBridge, config: TransformerConfig, vocab_size: int) -> list[GPTModel]:
    """This rank's model chunks: one per virtual pipeline stage (one when VPP is off)."""
    vpp = config.virtual_pipeline_model_parallel_size
    spec = layer_spec(config)
    chunks = []
    for stage in range(vpp or 1):
        vp_stage = stage if vpp else None
        model = GPTModel(
            config=config,
            transformer_layer_spec=spec,
            vocab_size=vocab_size,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
            share_embeddings_and_output_weights=bridge.tie_word_embeddings,
            position_embedding_type="rope",
            vp_stage=vp_stage,
            **bridge.gpt_model_kwargs(),
        )
        # The local spec's torch norms ignore params_dtype; Megatron's Float16Module would cast them too.
        for param in model.parameters():
            if param.is_floating_point() and param.dtype != config.params_dtype:
                param.data = param.data.to(config.params_dtype)
        if cpu_mode.cuda_available():
            model.cuda(torch.cuda.current_device())
        chunks.append(model)
    return chunks
