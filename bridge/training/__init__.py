"""Training a bridged model with Megatron-Core's own engine.

- ``data``: preprocessing into Megatron's indexed format, ``GPTDataset`` via
  ``BlendedMegatronDatasetBuilder``, Megatron-LM's pretraining sampler.
- ``setup``: ``TrainingConfig``; DDP wrapping, ``get_megatron_optimizer``, ``OptimizerParamScheduler``.
- ``loop``: Megatron-LM's train step (``get_forward_backward_func``, ``finalize_model_grads``,
  clipping in ``optimizer.step``) and a logging loop.
- ``checkpoint``: save/resume with ``dist_checkpointing`` at any TP/PP/DP.

A loop of your own::

    bridge = AutoBridge.from_hf_pretrained(path, dtype=torch.float32)
    model, optimizer, scheduler = setup_model_and_optimizer(bridge, tp, pp, vpp, cfg)
    iterators = [train_data_iterator(dataset, 0, cfg.micro_batch_size, dp_rank, dp_size) for _ in model]
    forward_step = make_forward_step(bridge.model_bridge.vocab_size)
    for it in range(1, cfg.train_iters + 1):
        result = train_step(forward_step, iterators, model, optimizer, scheduler, cfg, it)
"""

from bridge.training.checkpoint import ResumeInfo, load_train_state, save_train_state
from bridge.training.data import (
    MegatronTokenizerAdapter,
    build_gpt_dataset,
    load_tokenizer,
    preprocess,
    train_data_iterator,
    write_demo_corpus,
)
from bridge.training.loop import StepResult, loss_func, make_forward_step, train, train_step
from bridge.training.setup import (
    TrainingConfig,
    TrainingConfigError,
    build_optimizer,
    num_microbatches,
    setup_model_and_optimizer,
    wrap_model,
)

__all__ = [
    "MegatronTokenizerAdapter",
    "ResumeInfo",
    "StepResult",
    "TrainingConfig",
    "TrainingConfigError",
    "build_gpt_dataset",
    "build_optimizer",
    "load_tokenizer",
    "load_train_state",
    "loss_func",
    "make_forward_step",
    "num_microbatches",
    "preprocess",
    "save_train_state",
    "setup_model_and_optimizer",
    "train",
    "train_data_iterator",
    "train_step",
    "wrap_model",
    "write_demo_corpus",
]
