"""Mixtral: Mistral attention with a sparse MoE block (``block_sparse_moe``: router ``gate``, experts ``w1/w3/w2``)."""

from __future__ import annotations

from typing import Any

from bridge.mappings import MappingRegistry
from bridge.mappings.hf_views import FusedExperts, Renamed
from bridge.models.llama import dense_decoder_mappings
from bridge.models.mistral import MistralBridge
from bridge.models.moe import expert_mappings, moe_config_kwargs
from bridge.models.registry import register_bridge

MOE = "model.layers.*.block_sparse_moe."


@register_bridge("MixtralForCausalLM")
class MixtralBridge(MistralBridge):
    hf_views = (
        Renamed("model.layers.*.mlp.gate.weight", MOE + "gate.weight"),
        FusedExperts("model.layers.*.mlp.experts.gate_up_proj", (MOE + "experts.{e}.w1.weight", MOE + "experts.{e}.w3.weight")),
        FusedExperts("model.layers.*.mlp.experts.down_proj", (MOE + "experts.{e}.w2.weight",)),
    )

    def transformer_config_kwargs(self) -> dict[str, Any]:
        c = self.hf_config
        return {
            **super().transformer_config_kwargs(),
            **moe_config_kwargs(
                c,
                num_experts=c.num_local_experts,
                expert_ffn=c.intermediate_size,
                normalize_topk=True,
                moe_layers=[True] * c.num_hidden_layers,
                input_jitter=getattr(c, "router_jitter_noise", 0.0),
            ),
        }

    def mapping_registry(self) -> MappingRegistry:
        dense = [m for m in dense_decoder_mappings(self.tie_word_embeddings) if ".mlp.linear_fc" not in m.megatron_param]
        return MappingRegistry(
            dense
            + expert_mappings(
                router=MOE + "gate.weight",
                gate=MOE + "experts.*.w1.weight",
                up=MOE + "experts.*.w3.weight",
                down=MOE + "experts.*.w2.weight",
            )
        )
