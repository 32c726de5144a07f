"""Training a bridged model with Megatron-Core's own engine.

- ``data``: preprocessing into Megatron's indexed format, ``GPTDataset`` via
  ``BlendedMegatronDatasetBuilder``, Megatron-LM's pretraining sampler.
- ``setup``: ``TrainingConfig``; DDP wrapping, ``get_megatron_optimizer``, ``OptimizerParamScheduler``.
- ``loop``: Megatron-LM's train step (``get_forward_backward_func``, ``finalize_model_grads``,
  clipping in ``optimizer.step``) and a logging loop.
- ``checkpoint``: save/resume with ``dist_checkpointing`` at any TP/PP/DP.
- ``lora_args`` / ``lora_checkpoint``: LoRA training (``--lora-rank``, ``--lora-alpha``, ``--lora-targets``;
  ``setup_model_and_optimizer(..., lora=config)``): frozen base, adapters in the optimizer and in
  checkpoints, which hold the adapters (not the base) and resume at any TP/PP/DP.

A loop of your own::

    bridge = AutoBridge.from_hf_pretrained(path, dtype=torch.float32)
    model, optimizer, scheduler = setup_model_and_optimizer(bridge, tp, pp, vpp, cfg)
    iterators = build_train_iterators(dataset, model, cfg.micro_batch_size, consumed_samples=0)
    forward_step = make_forward_step()
    for it in range(1, cfg.train_iters + 1):
        result = train_step(forward_step, iterators, model, optimizer, scheduler, cfg, it)

``examples/convert_and_train.py`` puts these together (with checkpoints and the HF export).
Names are imported lazily (as in ``bridge``), so that ``python -m bridge.training.data`` runs
its module once, not a second copy imported by this package first.
"""

from __future__ import annotations

import importlib
from typing import Any

_PUBLIC = {
    "ResumeInfo": "checkpoint",
    "load_train_state": "checkpoint",
    "save_train_state": "checkpoint",
    "MegatronTokenizerAdapter": "data",
    "build_gpt_dataset": "data",
    "build_train_iterators": "data",
    "load_tokenizer": "data",
    "prepare_demo": "data",
    "preprocess": "data",
    "train_data_iterator": "data",
    "write_demo_corpus": "data",
    "StepResult": "loop",
    "loss_func": "loop",
    "make_forward_step": "loop",
    "train": "loop",
    "train_step": "loop",
    "TrainingConfig": "setup",
    "TrainingConfigError": "setup",
    "build_optimizer": "setup",
    "num_microbatches": "setup",
    "setup_model_and_optimizer": "setup",
    "add_lora_arguments": "lora_args",
    "lora_config_from_args": "lora_args",
    "wrap_model": "setup",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(f"bridge.training.{_PUBLIC[name]}"), name)
    raise AttributeError(f"module 'bridge.training' has no attribute {name!r}")
