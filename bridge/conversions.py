"""Checkpoint conversions as functions: HF folder → Megatron checkpoint, Megatron checkpoint → HF folder (the plan: ``conversion_plan``).

Each function runs on every rank of a torch.distributed world (under torchrun) or in one plain
process, and sets torch.distributed up when the caller has not. In one process the import and the
export stream tensor by tensor within ``max_memory`` (the checkpoint does not depend on the layout);
with several ranks, or ``stream=False``, each rank builds its shards of the model at ``sizes``.
Outputs are published atomically under ``bridge.hf.output_folder``'s rules. The ``hfmb`` command
line is a shell over these functions.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import logging
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.distributed as dist

from bridge.auto_bridge import AutoBridge
from bridge.engine.plan import count_nonfinite_weights
from bridge.hf import metadata
from bridge.hf.dtype_choice import export_rounding
from bridge.hf.export_encodings import export_encoding
from bridge.hf.folder import CheckpointError, dtype_named
from bridge.hf.output_folder import (
    HF_MODEL_FOLDER,
    MEGATRON_CHECKPOINT,
    FolderKind,
    OutputFolderError,
    OutputTarget,
    claimed_target,
    real_target,
)
from bridge.hf.weight_values import NonFinite
from bridge.megatron import checkpoint as mc
from bridge.megatron.builder import check_parallel_sizes
from bridge.megatron.foreign_checkpoint import check_fits, checkpoint_record, stored_mtp_layers
from bridge.megatron.parallel import ParallelSizes, init_distributed
from bridge.runtime.memory_budget import memory_budget
from bridge.runtime.progress import elapsed_bar
from bridge.runtime.rank_errors import on_rank0
from bridge.runtime.sizes import parse_size

if TYPE_CHECKING:
    from bridge.megatron.streaming import Streamed

logger = logging.getLogger(__name__)


def one_process() -> bool:
    """Whether this is a world of one process (plain, or torchrun with one rank): where conversions stream by default."""
    if dist.is_initialized():
        return dist.get_world_size() == 1
    return int(os.environ.get("WORLD_SIZE", "1")) == 1


def sizes_text(sizes: ParallelSizes | dict[str, Any]) -> str:
    """``tp=2 pp=2 vpp=1 ep=1`` for parallel sizes or a checkpoint's ``saved_with``."""
    values = sizes if isinstance(sizes, dict) else vars(sizes)
    return " ".join(f"{key}={values.get(key) or 1}" for key in ("tp", "pp", "vpp", "ep"))


def model_sizes(sizes: ParallelSizes) -> dict[str, Any]:
    """``to_megatron_model`` arguments for ``sizes``."""
    return {"tp": sizes.tp, "pp": sizes.pp, "vpp": sizes.vpp, "ep": sizes.ep, "etp": sizes.etp}


def _claim(stack: contextlib.ExitStack, out: Path, overwrite: bool, kind: FolderKind, check_first=None) -> OutputTarget | None:
    """Rank 0 claims ``out`` for the rest of the conversion; every rank raises a refusal. The target on rank 0, else None."""

    def claim() -> OutputTarget:
        if check_first is not None:
            check_first()
        return stack.enter_context(claimed_target(out, overwrite=overwrite, kind=kind))

    return on_rank0(claim, share=False)


# ---------------------------------------------------------------- HF → Megatron


@dataclass
class ImportResult:
    """What ``import_hf_checkpoint`` wrote."""

    out: Path
    architecture: str
    parameters: int
    dtype: torch.dtype
    how: str  # how it was converted, in words
    nonfinite: dict[str, NonFinite] = field(default_factory=dict)  # HF tensors holding NaN/Inf
    dtype_notes: list[str] = field(default_factory=list)  # a config/file dtype disagreement, a cast that rounds


def import_hf_checkpoint(
    hf: str | Path,
    out: str | Path,
    *,
    sizes: ParallelSizes = ParallelSizes(),
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    stream: bool | None = None,
    max_memory: int | str | None = None,
    mtp: bool = False,
) -> ImportResult:
    """An HF checkpoint (folder or Hub id) → a Megatron-Core dist checkpoint in Megatron-LM's layout at ``out``.

    Writes ``out/release/`` (iteration "release", which Megatron-LM's ``--load`` resumes from at
    any TP/PP), the tracker file, and ``hf_config/`` + ``bridge.json`` so that the export needs no
    HF folder. ``stream`` (default: in one process) converts tensor by tensor within
    ``max_memory`` (default: ``bridge.runtime.memory_budget``'s share of the available memory),
    padding the vocabulary as ``sizes.tp`` needs; otherwise each rank builds its shards at
    ``sizes``. ``mtp``: the multi-token-prediction layers become Megatron-Core's MTP block (``mtp.layers.*``, for a
    run with ``mtp_num_layers``) instead of being carried. All ranks call it.
    """
    stream = one_process() if stream is None else stream
    if max_memory is not None and not stream:
        raise ValueError("max_memory bounds a streamed conversion (one process); it cannot be combined with stream=False")
    budget = memory_budget(max_memory) if stream else None  # a typo fails before anything runs
    init_distributed()
    with contextlib.ExitStack() as stack:
        target = _claim(stack, Path(out), overwrite, MEGATRON_CHECKPOINT)
        bridge = AutoBridge.from_hf_pretrained(hf, dtype=dtype, mtp=mtp)
        check_parallel_sizes(bridge.model_bridge, sizes)  # the streamed conversion records them without building at them
        model = None if stream else bridge.to_megatron_model(**model_sizes(sizes))
        root: list[Any] = [target.temp_path() if target is not None else None]
        if not stream:
            dist.broadcast_object_list(root, src=0)
        tmp = Path(root[0])
        nonfinite: dict[str, NonFinite] = {}
        try:
            if stream:
                from bridge.megatron.streaming_import import import_checkpoint

                padded_vocab, streamed = import_checkpoint(
                    bridge, tmp, max_memory=budget, vocab_divisible_by=128 * sizes.tp, nonfinite=nonfinite
                )
                how = f"streamed in one process ({streamed.text()}), loads at any layout (vocabulary padded for tp={sizes.tp})"
            else:
                padded_vocab = model[0].vocab_size
                with elapsed_bar("saving Megatron checkpoint"):
                    mc.save_checkpoint(tmp, mc.release_state(mc.model_state_dict(model)))
                nonfinite = count_nonfinite_weights(bridge.plan(model), bridge.reader)
                how = f"at {sizes_text(sizes)} on {dist.get_world_size()} rank(s)"

            def publish() -> None:
                write_provenance(tmp, bridge, hf, sizes, padded_vocab)
                target.publish(tmp)

            on_rank0(publish)
        except BaseException:
            if target is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
    parameters = sum(math.prod(shape) for shape in bridge.reader.shapes().values())
    return ImportResult(
        Path(out).absolute(), bridge.model_bridge.architecture, parameters, bridge.dtype, how, nonfinite, bridge.dtype_choice.notes()
    )


def write_provenance(root: str | Path, bridge: AutoBridge, source: str | Path, sizes: ParallelSizes, padded_vocab: int) -> None:
    """``root/bridge.json`` and ``root/hf_config/``: the HF config, side files and dtypes a checkpoint exports back with.

    Every checkpoint the project writes carries them (``hfmb import``'s, and a training run's through
    ``save_train_state(..., bridge=...)``), so that ``hfmb export`` needs nothing else. One rank calls.
    """
    side = metadata.side_files(bridge.hf_folder, bridge.hf_config)
    mc.write_source_info(root, bridge.hf_folder, side, _source_info(bridge, source, sizes, padded_vocab))


def _source_info(bridge: AutoBridge, hf: str | Path, sizes: ParallelSizes, padded_vocab: int) -> dict[str, Any]:
    """``bridge.json``'s content: where the checkpoint came from and what exporting it back needs."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    return {
        "architecture": bridge.model_bridge.architecture,
        "source": str(hf),
        "source_folder": str(Path(bridge.hf_folder).absolute()),
        "saved_with": {**_saved_sizes(sizes), "world_size": world},
        "params_dtype": metadata.dtype_name(bridge.dtype),
        "vocab_size": bridge.model_bridge.vocab_size,
        "padded_vocab_size": padded_vocab,
        "tie_word_embeddings": bridge.model_bridge.tie_word_embeddings,
        "hf_dtypes": {name: metadata.dtype_name(d) for name, d in sorted(bridge.reader.dtypes().items())},
        "carried": sorted(bridge.carried_tensors),  # exported unchanged from the source folder (multi-token prediction)
        "dtype_cast": bridge.dtype_choice.cast_record(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _saved_sizes(sizes: ParallelSizes) -> dict[str, Any]:
    saved: dict[str, Any] = {"tp": sizes.tp, "pp": sizes.pp, "vpp": sizes.vpp}
    if sizes.ep != 1:
        saved["ep"] = sizes.ep
    return saved


# ---------------------------------------------------------------- Megatron → HF


@dataclass
class ExportResult:
    """What ``export_megatron_checkpoint`` wrote."""

    out: Path
    saved_with: dict[str, Any]  # the layout the checkpoint was saved at
    tensors: int
    shards: int
    dtype: str | None  # config.json's dtype
    load_checked: bool  # whether transformers loaded the result (with an empty load report) before it was published
    how: str
    rounded: list[str] = field(default_factory=list)  # why the weights are not the original's bit for bit (a cast asked for)


def export_megatron_checkpoint(
    ckpt: str | Path,
    out: str | Path,
    *,
    sizes: ParallelSizes = ParallelSizes(),
    iteration: int | str | None = "latest",
    dtype: torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    load_check: bool = True,
    stream: bool | None = None,
    max_memory: int | str | None = None,
    hf_config: str | Path | None = None,
    quantization: str | None = None,
) -> ExportResult:
    """A Megatron checkpoint written by ``import_hf_checkpoint`` (or a training run from one) → a complete HF folder at ``out``.

    A checkpoint written elsewhere (Megatron-LM, the reference bridge) exports when ``hf_config``
    names the HF folder (or config folder) it belongs to; it must hold every tensor of that config's
    model with its shape (``bridge.megatron.foreign_checkpoint``).

    Tensors are written in each one's dtype in the original HF checkpoint, or ``dtype``. The folder
    is published only after transformers loaded it with an empty load report (``load_check``; when
    streaming, if the weights fit half of ``max_memory``). ``stream`` (default: in one process)
    reads a few tensors at a time within ``max_memory`` from a checkpoint saved at any layout;
    otherwise the model is loaded at ``sizes``. ``iteration``: a number, None ("release") or
    ``"latest"``. All ranks call it. ``quantization="mxfp4"`` writes the weights the family stores in
    MXFP4 that way (gpt-oss's experts; ``bridge.hf.mxfp4_experts``); ``quantization="fp8"`` writes the weights
    a block-scaled FP8 source checkpoint held in FP8 back that way (it needs that folder: ``bridge.hf.fp8_block_weights``).
    """
    from bridge.checks.verify import check_loads_in_transformers

    stream = one_process() if stream is None else stream
    if max_memory is not None and not stream:
        raise ValueError("max_memory bounds a streamed conversion (one process); it cannot be combined with stream=False")
    ckpt, out = Path(ckpt).absolute(), Path(out).absolute()
    parse_size(max_shard_size)  # a typo fails before anything runs
    budget = memory_budget(max_memory) if stream else None
    init_distributed()

    def check_sources() -> None:
        checkpoint_record(ckpt, hf_config, iteration)
        real_ckpt, real_out = ckpt.resolve(), real_target(out)  # through symbolic links too
        if real_out == real_ckpt or real_out in real_ckpt.parents or real_ckpt in real_out.parents:
            raise OutputFolderError(f"the output {out} overlaps the checkpoint {ckpt}")

    with contextlib.ExitStack() as stack:
        _claim(stack, out, overwrite, HF_MODEL_FOLDER, check_sources)
        info, hf_folder = checkpoint_record(ckpt, hf_config, iteration)
        # MTP layers trained as Megatron-Core's MTP block are exported from it (else carried from the source folder)
        mtp = stored_mtp_layers(ckpt, iteration) > 0
        bridge = AutoBridge.from_hf_pretrained(hf_folder, dtype=dtype_named(info["params_dtype"]), mtp=mtp)
        source = Path(info["source_folder"]) if info.get("source_folder") else None
        encoding = export_encoding(bridge.model_bridge, source, quantization)
        config, side = metadata.folder_metadata(hf_folder, bridge.hf_config, dtype, encoding and encoding.config)
        source_dtypes = {name: dtype_named(d) for name, d in info.get("hf_dtypes", {}).items()}
        target_dtype = lambda name, current: dtype or source_dtypes.get(name, current)  # noqa: E731
        check = None
        if load_check and not _unloadable(encoding):
            check = functools.partial(check_loads_in_transformers, not_in_transformers=bridge.model_bridge.hf_not_in_transformers)
        carried, release = carried_from_source(info, source)
        folder = dict(  # what both exports write besides the model's tensors, and how
            config=config,
            side_files=side,
            target_dtype=target_dtype,
            max_shard_size=max_shard_size,
            overwrite=overwrite,
            encoding=encoding,
            carried=carried,
            release=release,
        )
        if stream:
            checked, streamed = _stream_export(bridge, ckpt, out, info, iteration, check, budget, folder)
            how = f"streamed ({streamed.text()})"
        else:
            from bridge.engine.folder_export import write_hf_folder

            model = load_megatron_checkpoint(bridge, ckpt, info, sizes, iteration)
            write_hf_folder(bridge.plan(model), out, check=_with_bar(check, "checking the folder (loading it in transformers)"), **folder)
            checked, how = check is not None, f"read at {sizes_text(sizes)}"
    index = metadata.read_json(out / "model.safetensors.index.json")
    shards = len(set(index["weight_map"].values()))
    rounded = export_rounding(info.get("dtype_cast"), source_dtypes, dtype)
    return ExportResult(out, info.get("saved_with", {}), len(index["weight_map"]), shards, config.get("dtype"), checked, how, rounded)


def _with_bar(check, desc: str):
    if check is None:
        return None

    def checking(folder: Path) -> None:
        with elapsed_bar(desc):
            check(folder)

    return checking


def carried_from_source(info: dict, source: Path | None) -> tuple[dict, Callable[[], None] | None]:
    """The tensors the checkpoint's HF source held that exports copy unchanged (``bridge.json``'s ``carried``:
    multi-token-prediction layers), read lazily from that folder, and the release of its reader's mapped window;
    refused, naming them and the folder, if it lacks them."""
    names = info.get("carried") or []
    if not names:
        return {}, None
    where = f"the HF folder the checkpoint was imported from ({source})"
    if source is None or not source.is_dir():
        raise CheckpointError(f"{len(names)} tensors ({names[0]} …) are exported unchanged from {where}, which is gone")
    reader = AutoBridge.from_hf_pretrained(source).reader
    missing = [name for name in names if name not in reader]
    if missing:
        raise CheckpointError(f"{where} no longer holds {missing[0]} (and {len(missing) - 1} more), which exports copy unchanged")
    return {name: reader.lazy(name) for name in names}, reader.release


def _unloadable(encoding) -> bool:
    """Whether transformers cannot load what ``encoding`` writes on this machine (it says why: logged), so that its load
    check would refuse a folder that is the source's own form."""
    reason = getattr(encoding, "transformers_load_problem", lambda: None)()
    if reason:
        logger.warning("transformers load check skipped: %s", reason)
    return bool(reason)


def _stream_export(bridge, ckpt: Path, out: Path, info: dict, iteration, check, budget, folder: dict) -> tuple[bool, Streamed]:
    """The bounded-memory export (one process) with ``folder``'s settings (``export_hf_folder``'s keywords); returns whether
    transformers' load check ran, and the peak it measured."""
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

    from bridge.megatron.streaming_export import export_hf_folder

    try:
        return export_hf_folder(
            bridge,
            ckpt,
            out,
            padded_vocab_size=int(info["padded_vocab_size"]),
            iteration=iteration,
            max_memory=budget,
            check=check,
            **folder,
        )
    except CheckpointException as err:  # dist_checkpointing's read errors: say what did not fit
        raise mc.MegatronCheckpointError(
            f"cannot read {ckpt} as the {bridge.model_bridge.architecture} model its hf_config/config.json describes: {_last_line(err)}"
        ) from err


def load_megatron_checkpoint(
    bridge: AutoBridge, ckpt: Path, info: dict, sizes: ParallelSizes, iteration: int | str | None = "latest"
) -> list:
    """Build the model at ``sizes`` (with the checkpoint's padded vocabulary) and load ``ckpt``'s weights into it. All ranks call."""
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

    model = bridge.to_megatron_model(**model_sizes(sizes), load_weights=False, padded_vocab_size=int(info["padded_vocab_size"]))
    check_fits(mc.model_state_dict(model), ckpt, iteration)
    try:
        with elapsed_bar("loading Megatron checkpoint"):
            mc.load_model(ckpt, model, iteration)
    except mc.MegatronCheckpointError:
        raise
    except (Exception, CheckpointException) as err:  # dist_checkpointing's errors: say what did not fit
        raise mc.MegatronCheckpointError(
            f"cannot load {ckpt} into the {bridge.model_bridge.architecture} model its hf_config/config.json describes "
            f"(at {sizes_text(sizes)}): {_last_line(err)}"
        ) from err
    return model


def _last_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[-1] if lines else type(err).__name__
