"""Saving and resuming a training run with ``megatron.core.dist_checkpointing`` (Megatron-LM's layout).

A training checkpoint is the Megatron-LM state dict written through ``bridge.megatron.checkpoint``:

    model / model0, model1, …   each chunk's sharded_state_dict()          (sharded, any TP/PP)
    optimizer                   optimizer.sharded_state_dict(...)          (sharded, any TP/PP/DP)
    opt_param_scheduler         OptimizerParamScheduler.state_dict()
    iteration, checkpoint_version
    rng_state                   python / numpy / torch / tensor-parallel tracker RNG per (PP, TP) rank
    train_state                 consumed samples, the layout it was saved at, the optimizer format

The distributed optimizer's state is saved in Megatron's ``fully_reshardable`` format, so a run
saved at one TP×PP×DP resumes at another. As in Megatron-LM, the RNG state is restored only when
the TP×PP layout is unchanged (it is per model-parallel rank). A checkpoint without
``train_state`` (``hfmb import``'s ``release`` checkpoints hold model weights only) loads as
weights: the optimizer, the schedule and the data start fresh at iteration 0.

A model with LoRA adapters (``bridge.lora.apply_lora`` before ``wrap_model``) saves only the adapters
in ``model`` (their split matrices TP-sharded, ``bridge.lora.sharding``) beside their optimizer state,
and records the adapters' settings and base folder in ``train_state["lora"]``; a resume builds the
base from the HF folder again and loads the adapters over it (``bridge.training.lora_checkpoint``).
A weights-only checkpoint gives a LoRA model its base weights; the adapters keep their initial values.
"""

from __future__ import annotations

import contextlib
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject

from bridge.lora import lora_config_of
from bridge.megatron import checkpoint as megatron_checkpoint
from bridge.megatron.checkpoint import MegatronCheckpointError, complete_iteration, model_state_dict
from bridge.megatron.chunks import unwrap_chunks
from bridge.runtime.rank_errors import on_rank0
from bridge.training import lora_checkpoint

logger = logging.getLogger(__name__)


def layout() -> dict[str, int]:
    """This run's parallel layout, as recorded in a checkpoint."""
    return {
        "tp": parallel_state.get_tensor_model_parallel_world_size(),
        "pp": parallel_state.get_pipeline_model_parallel_world_size(),
        "vpp": parallel_state.get_virtual_pipeline_model_parallel_world_size() or 1,
        "dp": parallel_state.get_data_parallel_world_size(),
        "ep": parallel_state.get_expert_model_parallel_world_size(),
    }


def trains_routed_experts(model) -> bool:
    """Whether the routed experts have trainable parameters: all of a full fine-tune's, with LoRA only adapters named by
    ``target_parameters``. Read from the config and the adapters' settings, so every rank decides alike."""
    if not unwrap_chunks(model)[0].config.num_moe_experts:
        return False
    lora = lora_config_of(model)
    return lora is None or bool(lora.target_parameters)


def check_optimizer_parts(saved: dict[str, int], folder: Path, model) -> None:
    """Refuse resuming across EP = 1 ⇄ EP > 1 when the routed experts train, naming the option: at EP > 1 Megatron-Core
    keeps their optimizer state in an optimizer of its own (chained to the dense one), and neither loads the other's
    state. With frozen experts (LoRA on attention or dense modules only) both runs have the one dense optimizer."""
    if "ep" in saved and (saved["ep"] > 1) != (layout()["ep"] > 1) and trains_routed_experts(model):
        raise MegatronCheckpointError(
            f"{folder} was saved at EP={saved['ep']} and this run has EP={layout()['ep']}: Megatron-Core keeps the routed "
            "experts' optimizer state apart only at EP > 1, so the optimizer state does not load across EP = 1 and EP > 1; "
            f"resume with {'EP > 1 (--ep)' if saved['ep'] > 1 else 'EP = 1 (no --ep)'}"
        )


def optimizer_metadata(use_distributed_optimizer: bool) -> dict:
    """Megatron-LM's sharded-state-dict metadata; ``fully_reshardable`` lets the distributed optimizer change TP/PP/DP."""
    metadata = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
    if use_distributed_optimizer:
        metadata["distrib_optim_sharding_type"] = "fully_reshardable"
    return metadata


def _rng_state() -> ShardedObject:
    state = {
        "random_rng_state": random.getstate(),
        "np_rng_state": np.random.get_state(),
        "torch_rng_state": torch.get_rng_state(),
        "rng_tracker_states": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda_rng_state"] = torch.cuda.get_rng_state()
    return ShardedObject(
        "rng_state",
        [state],
        (parallel_state.get_pipeline_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_world_size()),
        (parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_tensor_model_parallel_rank()),
        replica_id=parallel_state.get_data_parallel_rank(with_context_parallel=True),
    )


def _set_rng_state(states: list[dict]) -> None:
    state = states[0]
    random.setstate(state["random_rng_state"])
    np.random.set_state(state["np_rng_state"])
    torch.set_rng_state(state["torch_rng_state"])
    if torch.cuda.is_available() and "cuda_rng_state" in state:
        torch.cuda.set_rng_state(state["cuda_rng_state"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["rng_tracker_states"])


def _torch_adams(optimizer) -> list[torch.optim.Optimizer]:
    """The plain ``torch.optim`` Adam(W)s inside a Megatron (possibly chained) optimizer; fused TE/Apex ones are left out."""
    inner = [opt.optimizer for opt in getattr(optimizer, "chained_optimizers", [optimizer])]
    return [opt for opt in inner if isinstance(opt, (torch.optim.Adam, torch.optim.AdamW))]


def _allocate_optimizer_state(optimizer) -> None:
    """Give a fresh torch Adam the ``step``/``exp_avg``/``exp_avg_sq`` its checkpoint is loaded into.

    Megatron's distributed optimizer reads ``step`` from the inner optimizer's state to build the
    sharded state dict even for loading, which fails on a torch Adam that has not stepped yet
    (Megatron-LM normally runs with Apex/TE fused Adam, which keeps no per-param step).
    """
    for adam in _torch_adams(optimizer):
        for group in adam.param_groups:
            for param in group["params"]:
                state = adam.state[param]
                if not state:
                    state.update(
                        step=torch.zeros((), dtype=torch.float32), exp_avg=torch.zeros_like(param), exp_avg_sq=torch.zeros_like(param)
                    )


@contextlib.contextmanager
def _fully_reshardable_load_with_torch_adam(optimizer) -> Iterator[None]:
    """Let the distributed optimizer load ``fully_reshardable`` state into a torch Adam.

    In megatron-core 0.16.1 ``load_parameter_state_from_fully_reshardable`` leaves Adam's ``step``
    out of the tensors it loads (steps are restored from the param groups), while
    ``_set_main_param_and_optimizer_states`` copies every key of the parameter's optimizer state,
    ``step`` included: ``KeyError: 'step'``. For the duration of the load, each parameter's
    ``step`` is set aside while its other states are copied.
    """
    patched = []
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        original = getattr(opt, "_set_main_param_and_optimizer_states", None)
        if original is None or not _torch_adams(opt) or opt.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            continue

        def set_states(model_param, tensors, opt=opt, original=original) -> None:
            group_index, group_order = opt.model_param_group_index_map[model_param]
            state = opt.optimizer.state[opt.optimizer.param_groups[group_index]["params"][group_order]]
            step = state.pop("step", None)
            try:
                original(model_param, tensors)
            finally:
                if step is not None:
                    state["step"] = step

        opt._set_main_param_and_optimizer_states = set_states
        patched.append(opt)
    try:
        yield
    finally:
        for opt in patched:
            del opt._set_main_param_and_optimizer_states  # back to the class's method


def _unshare_steps(optimizer) -> None:
    """One ``step`` tensor per parameter after loading.

    The distributed optimizer's ``load_state_dict`` hands every parameter the same step tensor,
    and torch Adam increments each parameter's step in place: shared, it would advance once per
    parameter per iteration and skew Adam's bias correction after a resume.
    """
    for adam in _torch_adams(optimizer):
        for state in adam.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()


def _state_dict(
    model, optimizer, scheduler, iteration: int, train_state: dict, metadata: dict, is_loading: bool, with_rng: bool = True
) -> dict:
    state = _trained_model_state(model)
    state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=is_loading, metadata=metadata)
    state["opt_param_scheduler"] = scheduler.state_dict()
    state["iteration"] = iteration
    state["checkpoint_version"] = megatron_checkpoint.CHECKPOINT_VERSION
    state["train_state"] = train_state
    if with_rng:
        state["rng_state"] = _rng_state()
    return state


def _trained_model_state(model) -> dict:
    """The model entries a training checkpoint holds: every weight, or with LoRA the adapters alone (the base is frozen)."""
    state = model_state_dict(model)
    if lora_checkpoint.lora_record(model) is None:
        return state
    return lora_checkpoint.split_model_state(state)[0]


def save_train_state(
    root: str | Path,
    model,
    optimizer,
    scheduler,
    iteration: int,
    consumed_samples: int,
    use_distributed_optimizer: bool,
    bridge=None,
) -> Path:
    """Save everything needed to resume at ``iteration`` into ``root/iter_XXXXXXX`` (all ranks call).

    With ``bridge`` (the ``AutoBridge`` the model came from), ``root`` also gets the provenance
    ``hfmb import`` writes (``bridge.json``, ``hf_config/``), so that ``hfmb export`` and ``hfmb verify``
    take the training checkpoint as they take an imported one. A save never replaces a complete
    checkpoint (``check_save_keeps_history``). A LoRA model saves its adapters, not the frozen base, and
    records ``train_state["lora"]`` (``lora_checkpoint.lora_record``: settings, and with ``bridge`` the base's HF folder).
    """
    metadata = optimizer_metadata(use_distributed_optimizer)
    train_state = {
        "consumed_samples": consumed_samples,
        "layout": layout(),
        "use_distributed_optimizer": use_distributed_optimizer,
        "optimizer_metadata": metadata,
        "lora": lora_checkpoint.lora_record(model, bridge),
    }
    state = _state_dict(model, optimizer, scheduler, iteration, train_state, metadata, is_loading=False)
    folder = megatron_checkpoint.save_checkpoint(root, state, iteration)
    if bridge is not None:
        on_rank0(lambda: _write_provenance_once(root, bridge, model), share=False)
    return folder


def _write_provenance_once(root: str | Path, bridge, model) -> None:
    from bridge.conversions import write_provenance
    from bridge.megatron.parallel import ParallelSizes

    if (Path(root) / megatron_checkpoint.SOURCE_INFO).exists():
        return
    saved = layout()
    sizes = ParallelSizes(tp=saved["tp"], pp=saved["pp"], vpp=parallel_state.get_virtual_pipeline_model_parallel_world_size())
    write_provenance(root, bridge, bridge.hf_folder, sizes, unwrap_chunks(model)[0].vocab_size)


@dataclass
class ResumeInfo:
    """Where a run continues after ``load_train_state``."""

    iteration: int
    consumed_samples: int
    loaded_optimizer: bool
    loaded_rng: bool
    folder: Path


def load_train_state(
    root: str | Path,
    model,
    optimizer,
    scheduler,
    use_distributed_optimizer: bool,
    iteration: int | None | str = "latest",
    bridge=None,
) -> ResumeInfo:
    """Resume from a checkpoint folder (``latest_checkpointed_iteration.txt`` picks the iteration). All ranks call.

    A weights-only checkpoint loads the model (with LoRA: the base weights; the adapters stay as
    initialised) and leaves optimizer, schedule and data at the start. A LoRA checkpoint resumes only a
    model with the same adapters (``lora_checkpoint.check_resume``, which warns about another base folder
    when ``bridge`` is given); it loads the adapters and their optimizer state, the base is the model's own.
    """
    iteration, folder = complete_iteration(root, iteration)
    check_mtp_layers(root, iteration, model)
    common = dist_checkpointing.load_common_state_dict(str(folder))
    saved = common.get("train_state")
    if saved is None:
        _load_weights_only(root, model, iteration)
        optimizer.reload_model_params()  # the optimizer's main params were taken before the weights changed
        logger.info("loaded model weights from %s (no training state: optimizer and schedule start fresh)", folder)
        return ResumeInfo(0, 0, False, False, folder)

    lora_checkpoint.check_resume(saved.get("lora"), model, folder, bridge)
    if saved["use_distributed_optimizer"] != use_distributed_optimizer:
        raise MegatronCheckpointError(
            f"{folder} was saved with use_distributed_optimizer={saved['use_distributed_optimizer']}; resume with the same setting"
        )
    check_optimizer_parts(saved["layout"], folder, model)
    same_layout = {k: saved["layout"][k] for k in ("tp", "pp")} == {k: layout()[k] for k in ("tp", "pp")}
    if not same_layout:
        logger.warning("checkpoint layout %s differs from this run's %s: the RNG state is not restored", saved["layout"], layout())
    metadata = saved["optimizer_metadata"]
    _allocate_optimizer_state(optimizer)
    state = _state_dict(model, optimizer, scheduler, common["iteration"], saved, metadata, is_loading=True, with_rng=same_layout)
    loaded = megatron_checkpoint.load_checkpoint(root, state, iteration)
    chunks = unwrap_chunks(model)
    keys = ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]
    for chunk, key in zip(chunks, keys):
        chunk.load_state_dict(loaded[key], strict=False)
    with _fully_reshardable_load_with_torch_adam(optimizer):
        optimizer.load_state_dict(loaded["optimizer"])
    _unshare_steps(optimizer)
    scheduler.load_state_dict(loaded["opt_param_scheduler"])
    if same_layout:
        _set_rng_state(loaded["rng_state"])
    resumed = int(loaded["iteration"])
    logger.info("resumed from %s at iteration %d (%d samples consumed)", folder, resumed, saved["consumed_samples"])
    return ResumeInfo(resumed, int(saved["consumed_samples"]), True, same_layout, folder)


def check_mtp_layers(root: str | Path, iteration: int | None, model) -> None:
    """Refuse, naming the option, a checkpoint whose multi-token-prediction layers (Megatron-Core's MTP block) the
    model lacks, or the reverse: a model built without them would skip them silently (and export stale ones)."""
    from bridge.megatron.foreign_checkpoint import stored_mtp_layers

    saved = stored_mtp_layers(root, iteration)
    built = unwrap_chunks(model)[0].config.mtp_num_layers or 0
    if saved != built:
        has = f"holds {saved} multi-token-prediction layers" if saved else "holds no multi-token-prediction layers"
        fix = "build the model with them (--mtp; mtp=True)" if saved else "build the model without them (no --mtp)"
        raise MegatronCheckpointError(f"{root} {has} and the model has {built}: {fix}")


def _load_weights_only(root: str | Path, model, iteration: int | None) -> None:
    """A checkpoint without training state into ``model``: all its weights, or with LoRA the base weights only."""
    if lora_checkpoint.lora_record(model) is None:
        megatron_checkpoint.load_model(root, model, iteration)
        return
    _, base = lora_checkpoint.split_model_state(model_state_dict(model))
    loaded = megatron_checkpoint.load_checkpoint(root, base, iteration)
    for chunk, key in zip(unwrap_chunks(model), base):
        chunk.load_state_dict(loaded[key], strict=False)
