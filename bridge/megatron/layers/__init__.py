"""The project's own layer pieces for Megatron-Core's local spec, for what its GPT layer spec lacks.

``layer_shape.LayerShape`` is what a model bridge declares; ``spec.apply_layer_shape`` edits
Megatron-Core's layer specs to match it with the modules here: torch norms that allow sequence
parallelism (``norms``), a q/k norm over the whole projection (``projection_norm``), a layer with
norms on its sublayers' outputs (``post_norm_layer``).
"""
