"""Multi-token-prediction layers (DeepSeek-V3, GLM-4.5): carried unchanged, or built as Megatron-Core's MTP block.

The checkpoints hold ``num_nextn_predict_layers`` of them after the decoder, ``model.layers.{num_hidden_layers + i}``:
a decoder layer's tensors plus ``enorm`` (on the next token's embedding), ``hnorm`` (on the previous depth's
hidden state), ``eh_proj`` (the two concatenated, embedding first, back to the hidden size) and
``shared_head.norm``; and ``embed_tokens`` / ``shared_head.head``, the model's embedding and output layer
again. transformers drops them at load. By default exports carry them unchanged (``ModelBridge.hf_carried``);
a bridge ``with_mtp_layers()`` maps them onto Megatron-Core's ``mtp.layers.{i}``: its ``transformer_layer``
is a decoder layer (the decoder's layer mappings moved there), ``enorm``/``hnorm``/``eh_proj`` by name,
``final_layernorm`` from ``shared_head.norm``, and the embedding and output layer, which Megatron-Core
shares with the MTP block, from the model's (each copy checked equal on import, written on export).
"""

from __future__ import annotations

from bridge.mappings import ColumnParallelMapping, CopiedMapping, MappingRegistry, ParamMapping, ReplicatedMapping
from bridge.models.blocks import HF_LAYER, LAYER, mtp_layers

EMBEDDING, OUTPUT = "embedding.word_embeddings.weight", "output_layer.weight"


class MultiTokenPrediction:
    """Mixin of a ``ModelBridge`` whose checkpoints hold MTP layers: their count, carrying, and the MTP block's mappings."""

    @property
    def mtp_layer_count(self) -> int:
        return getattr(self.hf_config, "num_nextn_predict_layers", 0) or 0

    @property
    def hf_carried(self) -> tuple[str, ...]:
        return () if self.builds_mtp_layers else mtp_layers(self.hf_config)

    @property
    def hf_not_in_transformers(self) -> tuple[str, ...]:
        return mtp_layers(self.hf_config)

    def with_mtp_block(self, mappings: list[ParamMapping]) -> MappingRegistry:
        """The registry of ``mappings`` (the model's), plus the MTP block's when it is built."""
        if not self.builds_mtp_layers:
            return MappingRegistry(mappings)
        first = self.hf_config.num_hidden_layers
        hf_layers = [f"model.layers.{first + i}." for i in range(self.mtp_layer_count)]
        copies = {EMBEDDING: "embed_tokens.weight", OUTPUT: "shared_head.head.weight"}
        shared = [
            CopiedMapping(m, [layer + copies[m.megatron_param] for layer in hf_layers]) for m in mappings if m.megatron_param in copies
        ]
        return MappingRegistry(
            [
                *(m for m in mappings if m.megatron_param not in copies),
                *shared,
                *(mapping for i, layer in enumerate(hf_layers) for mapping in mtp_layer(mappings, i, layer)),
            ]
        )


def mtp_layer(mappings: list[ParamMapping], index: int, hf_layer: str) -> list[ParamMapping]:
    """Megatron-Core's MTP layer ``index`` ⇄ the HF layer ``hf_layer`` (``model.layers.61.``): the decoder layer
    mappings of ``mappings`` moved into its ``transformer_layer``, and its own norms and projection."""
    mtp = f"mtp.layers.{index}."
    layer = [m.relocated((LAYER, mtp + "transformer_layer."), (HF_LAYER, hf_layer)) for m in mappings if m.megatron_param.startswith(LAYER)]
    return [
        *layer,
        ReplicatedMapping(mtp + "enorm.weight", hf_layer + "enorm.weight"),
        ReplicatedMapping(mtp + "hnorm.weight", hf_layer + "hnorm.weight"),
        ColumnParallelMapping(mtp + "eh_proj.weight", hf_layer + "eh_proj.weight"),
        ReplicatedMapping(mtp + "final_layernorm.weight", hf_layer + "shared_head.norm.weight"),
    ]
