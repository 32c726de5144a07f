"""The project's own decoder pieces for Megatron-Core's local spec, for what its GPT spec lacks.

``decoder_shape.DecoderShape`` is what a model bridge declares; ``spec.apply_decoder_shape`` edits
Megatron-Core's layer specs to match it with the modules here, and ``model_ends.apply_model_ends``
hooks the decoder's two ends: torch norms that allow sequence parallelism and zero-centred RMSNorm
(``norms``), a q/k norm over the whole projection (``projection_norm``), a layer with norms on its
sublayers' outputs (``post_norm_layer``), the sliding layers' own rope and soft-capped attention scores
(``attention_variants``), the embedding scale and the final logit cap (``model_ends``).
"""
