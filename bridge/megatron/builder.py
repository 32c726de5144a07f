"""Building this rank's Megatron-Core ``GPTModel`` chunks from a model bridge.

Weights about to be overwritten are not randomly initialised (``perform_initialization=False``);
the tensor-parallel attributes Megatron-Core sets only inside that initialisation are set here
instead (``tag_tensor_parallel_params``), so that a converted model trains exactly like one Megatron
built itself.
The decoder spec is derived from the config alone (``get_gpt_decoder_block_spec``: dense and MoE
layers alike): Transformer Engine's modules when TE is importable on a GPU, Megatron-Core's local
modules otherwise, with norms that allow sequence parallelism, edited to the family's ``decoder_shape``
(``bridge/megatron/layers/``).
"""

from __future__ import annotations

import importlib.util
import logging

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from megatron.core.transformer import TransformerConfig

from bridge.megatron.layers.mla import local_mla_spec
from bridge.megatron.layers.model_ends import apply_model_ends, mask_vocab_padding_in_loss
from bridge.megatron.layers.norms import use_torch_norms_with_sequence_parallel
from bridge.megatron.layers.spec import apply_decoder_shape
from bridge.megatron.parallel import ParallelConfigError, ParallelSizes
from bridge.megatron.yarn_config import YarnTransformerConfig
from bridge.model_bridge import ModelBridge
from bridge.runtime import cpu_mode
from bridge.runtime.gc_freeze import frozen_heap

logger = logging.getLogger(__name__)


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Megatron-LM's rule: round the vocabulary up to a multiple of ``divisible_by × tp``."""
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple


def vocab_rows(vocab_size: int, tp: int, divisible_by: int = 128, padded: int | None = None) -> int:
    """The embedding's rows: ``padded`` when given (an existing checkpoint's, checked), else Megatron-LM's rule.

    This is the one place the padded vocabulary is decided.
    """
    if padded is None:
        return padded_vocab_size(vocab_size, divisible_by, tp)
    if padded < vocab_size or padded % tp:
        raise ParallelConfigError(
            f"a padded vocabulary of {padded} rows cannot hold vocab_size={vocab_size} split over tp={tp} "
            "(it must be at least the vocabulary and divisible by the TP size)"
        )
    return padded


def check_parallel_sizes(bridge: ModelBridge, sizes: ParallelSizes, kwargs: dict | None = None) -> None:
    """Fail before anything starts, naming the setting, when a parallel size does not divide what it splits.

    The one place these sizes are checked: the CLI calls it before starting ranks, every conversion
    (streamed ones too, which build the model at TP=PP=1 but record the sizes) before writing.
    ``kwargs``: the bridge's ``transformer_config_kwargs()``, when the caller has them.
    """
    kwargs = bridge.transformer_config_kwargs() if kwargs is None else kwargs
    checks = [
        ("num_attention_heads", kwargs["num_attention_heads"], sizes.tp, "tp"),
        ("num_key_value_heads (num_query_groups)", kwargs.get("num_query_groups") or kwargs["num_attention_heads"], sizes.tp, "tp"),
        ("intermediate_size (ffn_hidden_size)", kwargs["ffn_hidden_size"], sizes.tp, "tp"),
        ("num_hidden_layers", kwargs["num_layers"], sizes.pp * (sizes.vpp or 1), "pp × vpp"),
    ]
    if kwargs.get("multi_latent_attention"):  # the down projections are split over TP along their rows (local spec)
        if kwargs.get("q_lora_rank"):
            checks.append(("q_lora_rank", kwargs["q_lora_rank"], sizes.tp, "tp"))
        latent = kwargs["kv_lora_rank"] + kwargs["qk_pos_emb_head_dim"]
        checks.append(("kv_lora_rank + qk_rope_head_dim", latent, sizes.tp, "tp"))
    experts = kwargs.get("num_moe_experts")
    if experts:
        checks += [
            ("the number of experts", experts, sizes.ep, "ep"),
            ("the expert FFN size (moe_intermediate_size)", kwargs["moe_ffn_hidden_size"], sizes.expert_tp, "etp (defaults to tp)"),
        ]
        if kwargs.get("add_bias_linear") and sizes.expert_tp > 1:
            raise ParallelConfigError(
                f"{bridge.architecture}: its experts have biases, which Megatron-Core supports only without expert tensor "
                f"parallelism; pass etp=1 (it defaults to tp = {sizes.tp})"
            )
        if kwargs.get("moe_shared_expert_intermediate_size"):
            checks.append(("shared_expert_intermediate_size", kwargs["moe_shared_expert_intermediate_size"], sizes.tp, "tp"))
    elif sizes.ep > 1 or (sizes.etp or sizes.tp) != sizes.tp:
        raise ParallelConfigError(f"{bridge.architecture} has no experts: leave ep=1 and etp unset")
    for setting, value, size, what in checks:
        if value % size:
            raise ParallelConfigError(
                f"{bridge.architecture}: {setting} = {value} is not divisible by {what} = {size}; change {what.split()[0]}"
            )


def build_transformer_config(
    bridge: ModelBridge,
    sizes: ParallelSizes,
    *,
    dtype: torch.dtype,
    initialize_weights: bool,
    sequence_parallel: bool | None = None,
) -> TransformerConfig:
    """The ``TransformerConfig`` for this bridge's checkpoint at these parallel sizes.

    ``sequence_parallel`` defaults to on exactly when Megatron-Core needs it: MoE with TP > 1.
    """
    kwargs = {**bridge.transformer_config_kwargs(), **bridge.rope_config_kwargs()}
    if bridge.builds_mtp_layers:
        kwargs["mtp_num_layers"] = bridge.mtp_layer_count
    check_parallel_sizes(bridge, sizes, kwargs)
    moe = bool(kwargs.get("num_moe_experts"))
    if sequence_parallel is None:
        sequence_parallel = moe and sizes.tp > 1
    if moe:
        # allgather works on every backend; the alltoall dispatcher needs NCCL's uneven all-to-all.
        kwargs.setdefault("moe_token_dispatcher_type", "alltoall" if cpu_mode.cuda_available() else "allgather")
    kwargs.update(
        tensor_model_parallel_size=sizes.tp,
        pipeline_model_parallel_size=sizes.pp,
        virtual_pipeline_model_parallel_size=sizes.vpp,
        expert_model_parallel_size=sizes.ep,
        expert_tensor_parallel_size=sizes.expert_tp,
        sequence_parallel=sequence_parallel and sizes.tp > 1,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        # Megatron-Core puts GPU parameters on the current device explicitly, ignoring a meta default device.
        use_cpu_initialization=not cpu_mode.cuda_available() or building_on_meta(),
        perform_initialization=initialize_weights,
        # Pure-PyTorch paths: the fused kernels need Apex/TE or CUDA, and give the same math.
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        cuda_graph_scope=[],  # the default "full" means the same but warns that it is deprecated
    )
    config_class = transformer_config_class(kwargs)
    try:
        return config_class(**kwargs)
    except (AssertionError, ValueError) as err:
        raise ParallelConfigError(f"Megatron-Core rejects the config derived from {bridge.architecture}: {err}") from err


def transformer_config_class(kwargs: dict) -> type[TransformerConfig]:
    """``MLATransformerConfig`` for multi-latent attention (its rope fields are its own), ``YarnTransformerConfig``
    for a YaRN rope elsewhere, else ``TransformerConfig``."""
    if kwargs.get("multi_latent_attention"):
        from megatron.core.transformer.transformer_config import MLATransformerConfig

        return MLATransformerConfig
    return YarnTransformerConfig if any(key.startswith("yarn_") for key in kwargs) else TransformerConfig


def building_on_meta() -> bool:
    """A model built now is shapes only (``with torch.device("meta")``: plans, streamed conversions), on a GPU machine too."""
    return torch.get_default_device().type == "meta"


def use_transformer_engine(bridge: ModelBridge) -> bool:
    """Transformer Engine's spec on a GPU that has it, for the layers Megatron-Core's own spec builds.

    A family whose ``decoder_shape`` needs the project's own modules gets the local spec everywhere.
    """
    return (
        bridge.decoder_shape.is_megatron_default
        and bridge.transformer_engine_layers
        and cpu_mode.cuda_available()
        and importlib.util.find_spec("transformer_engine") is not None
    )


def mtp_spec(bridge: ModelBridge, config: TransformerConfig, decoder, vp_stage: int | None):
    """Megatron-Core's MTP block spec on the stage that holds it (None elsewhere, and without MTP layers): its
    ``transformer_layer`` is the decoder's last layer's spec (``decoder``), its norms as the decoder's."""
    if not config.mtp_num_layers:
        return None
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_mtp_block_spec

    spec = get_gpt_mtp_block_spec(config, decoder, use_transformer_engine=use_transformer_engine(bridge), vp_stage=vp_stage)
    return spec if spec is None or use_transformer_engine(bridge) else use_torch_norms_with_sequence_parallel(spec)


def decoder_spec(bridge: ModelBridge, config: TransformerConfig, vp_stage: int | None):
    """The decoder block spec of this rank's layers (in virtual stage ``vp_stage``)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    te = use_transformer_engine(bridge)
    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=te, normalization=config.normalization, vp_stage=vp_stage)
    if te:
        return spec
    if config.multi_latent_attention:
        spec = local_mla_spec(spec)
    return apply_decoder_shape(use_torch_norms_with_sequence_parallel(spec), bridge.decoder_shape)


@frozen_heap()
def build_gpt_chunks(bridge: ModelBridge, config: TransformerConfig, vocab_size: int) -> list[GPTModel]:
    """This rank's model chunks: one per virtual pipeline stage (one when VPP is off)."""
    vpp = config.virtual_pipeline_model_parallel_size
    chunks = []
    for stage in range(vpp or 1):
        vp_stage = stage if vpp else None
        decoder = decoder_spec(bridge, config, vp_stage)
        model = GPTModel(
            config=config,
            transformer_layer_spec=decoder,
            mtp_block_spec=mtp_spec(bridge, config, decoder, vp_stage),
            vocab_size=vocab_size,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
            share_embeddings_and_output_weights=bridge.tie_word_embeddings,
            vp_stage=vp_stage,
            **{"position_embedding_type": "rope", **bridge.gpt_model_kwargs()},
        )
        apply_model_ends(model, bridge.decoder_shape, config.hidden_size)
        mask_vocab_padding_in_loss(model, bridge.vocab_size)
        # The local spec's torch norms ignore params_dtype; Megatron's Float16Module would cast them too.
        for param in model.parameters():
            if param.is_floating_point() and param.dtype != config.params_dtype:
                param.data = param.data.to(config.params_dtype)
        if cpu_mode.cuda_available() and not building_on_meta():
            model.cuda(torch.cuda.current_device())
        chunks.append(model)
    if not config.perform_initialization:
        tag_tensor_parallel_params(chunks)
    unbatch_pipeline_p2p_on_gloo(config)
    return chunks


def tag_tensor_parallel_params(chunks: list[torch.nn.Module]) -> int:
    """Tag TP-split weights with ``tensor_model_parallel`` / ``partition_dim``, as Megatron's weight init does.

    Megatron-Core's local linear layers and embedding set these attributes inside their random
    initialisation, which a converted model skips (and on its attention's learnable softmax offsets
    never). Without them the optimizer counts every weight as a TP duplicate and takes it from TP
    rank 0 only: at TP > 1 the grad norm (and clipping) is
    wrong, and the distributed optimizer's checkpoint treats TP-split state as replicated.
    (Transformer Engine's layers set them unconditionally.) Returns how many parameters were tagged.
    """
    tagged = 0
    for chunk in chunks:
        for module in chunk.modules():
            if isinstance(module, (ColumnParallelLinear, VocabParallelEmbedding)):
                dims = {"weight": 0, "bias": 0}
            elif isinstance(module, RowParallelLinear):
                dims = {"weight": 1}  # its bias is added after the reduction: replicated
            elif isinstance(getattr(module, "softmax_offset", None), torch.nn.Parameter):
                dims = {"softmax_offset": 0}  # learnable softmax offsets (attention sinks): this rank's heads'
            else:
                continue
            for name, dim in dims.items():
                param = getattr(module, name, None)
                if isinstance(param, torch.nn.Parameter) and not hasattr(param, "tensor_model_parallel"):
                    param.tensor_model_parallel, param.partition_dim, param.partition_stride = True, dim, 1
                    tagged += 1
    return tagged


def unbatch_pipeline_p2p_on_gloo(config: TransformerConfig) -> None:
    """Pipeline sends and receives one by one (Megatron's even/odd order) when the pipeline group is gloo.

    The batched p2p path posts ``send_prev, recv_prev, send_next, recv_next`` on every rank. At
    PP=2 the previous and the next stage are the same rank, and the interleaved schedule sends an
    activation and a gradient of the same shape to it in one batch; gloo matches messages between
    two ranks first in, first out, so the receiver takes the gradient for its activation (seen: the
    losses of micro-batches 3 and 4 changed at PP=2·VPP=2). The unbatched path orders the pairs.
    """
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        group = parallel_state.get_pipeline_model_parallel_group()
        if torch.distributed.get_backend(group) == "gloo":
            config.batch_p2p_comm = False
