"""``AutoBridge``: the user-facing entry point, HF checkpoint ⇄ Megatron-Core ``GPTModel`` chunks."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Iterator

import torch
from transformers import PretrainedConfig

from bridge.engine import folder_export
from bridge.engine import load as engine_load
from bridge.engine.export import export_tensors
from bridge.engine.plan import TransferPlan, matching, validate_checkpoint
from bridge.hf import metadata as export_metadata
from bridge.hf.dtype_choice import DtypeChoice, choose_param_dtype
from bridge.hf.export_encodings import export_encoding
from bridge.hf.folder import CheckpointError, read_hf_config, resolve_hf_folder
from bridge.hf.fp8_block_weights import fp8_views, quantization_config
from bridge.hf.mxfp4_experts import Mxfp4Experts
from bridge.hf.reader import SafetensorsReader
from bridge.lora.peft_folder import export_adapter_weights
from bridge.megatron import builder as megatron_builder
from bridge.megatron import parallel
from bridge.megatron.parallel import ParallelSizes
from bridge.model_bridge import ModelBridge
from bridge.models import bridge_for

logger = logging.getLogger(__name__)


def _config_dtype(hf_config: PretrainedConfig) -> torch.dtype | None:
    dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return dtype if isinstance(dtype, torch.dtype) else None


def reader_views(model_bridge: ModelBridge, hf_config: PretrainedConfig, dtype: torch.dtype | None = None) -> tuple:
    """The views a checkpoint's reader presents its tensors through: the FP8 weights' when its config declares block-scaled
    FP8 (decoded to ``dtype``, bfloat16 by default), then the family's own layouts.

    The one place both the in-memory and the streamed conversions get them. Refuses a ``quantization_config`` whose
    ``quant_method`` the bridge does not read for this family, by name, before any weight moves.
    """
    config = quantization_config(hf_config)
    method = config.get("quant_method") if config else None
    readable = {"fp8"} | ({"mxfp4"} if any(isinstance(view, Mxfp4Experts) for view in model_bridge.hf_views) else set())
    if method is not None and method not in readable:
        raise CheckpointError(
            f"config.json's quantization_config.quant_method is {method!r}, which the bridge does not read for "
            f"{model_bridge.architecture} (it reads: {', '.join(sorted(readable))})"
        )
    return (*fp8_views(hf_config, dtype), *model_bridge.hf_views)


class AutoBridge:
    """Detects the architecture of an HF checkpoint and moves its weights into and out of Megatron-Core.

    >>> bridge = AutoBridge.from_hf_pretrained("meta-llama/Llama-3.2-1B", dtype=torch.bfloat16)
    >>> model = bridge.to_megatron_model(tp=2, pp=2)        # under torchrun --nproc-per-node=4
    >>> bridge.save_hf_pretrained(model, "out")
    """

    def __init__(self, hf_folder: Path, hf_config: PretrainedConfig, model_bridge: ModelBridge, dtype: torch.dtype | None = None):
        self.hf_folder = hf_folder
        self.hf_config = hf_config
        self.model_bridge = model_bridge
        self._requested_dtype = dtype
        self._dtype_choice: DtypeChoice | None = None
        self._reader: SafetensorsReader | None = None

    @classmethod
    def from_hf_pretrained(
        cls, path_or_id: str | Path, dtype: torch.dtype | None = None, trust_remote_code: bool = False, mtp: bool = False
    ) -> "AutoBridge":
        """A bridge for a local HF folder or a Hub repo id.

        ``dtype`` casts the weights (rounding those it cannot hold exactly); by default the parameters
        get the stored dtypes, whatever the config says (``bridge.hf.dtype_choice``). ``mtp``: build the
        checkpoint's multi-token-prediction layers as Megatron-Core's MTP block, to train them (DeepSeek-V3,
        GLM-4.5; ``ModelBridge.with_mtp_layers``); without it exports carry them unchanged.
        """
        folder = resolve_hf_folder(path_or_id)
        hf_config = read_hf_config(folder, trust_remote_code=trust_remote_code)
        model_bridge = bridge_for(hf_config)
        return cls(folder, hf_config, model_bridge.with_mtp_layers() if mtp else model_bridge, dtype)

    @property
    def dtype(self) -> torch.dtype:
        """The Megatron parameters' dtype: the one asked for, else one that holds every stored weight exactly."""
        return self._requested_dtype or self.dtype_choice.params

    @property
    def dtype_choice(self) -> DtypeChoice:
        """How the parameters' dtype relates to the stored weights and the config (reads the file headers)."""
        if self._dtype_choice is None:
            ignore = [re.compile(pattern) for pattern in self.model_bridge.hf_ignore]
            # Tensors that are not weights, those Megatron-Core keeps in float32 whatever the parameters' dtype (the
            # router's expert bias) and those carried unchanged into exports do not decide it.
            aside = set(matching(self.reader.names(), (*self.model_bridge.hf_fp32_weights, *self.model_bridge.hf_carried)))
            stored = {
                name: dtype
                for name, dtype in self.reader.dtypes().items()
                if dtype.is_floating_point and not any(p.fullmatch(name) for p in ignore) and name not in aside
            }
            self._dtype_choice = choose_param_dtype(stored, _config_dtype(self.hf_config), self._requested_dtype)
        return self._dtype_choice

    @property
    def reader_views(self) -> tuple:
        """The views the checkpoint's tensors are read through (``reader_views``); FP8 weights decode to the dtype asked for."""
        return reader_views(self.model_bridge, self.hf_config, self._requested_dtype)

    @property
    def reader(self) -> SafetensorsReader:
        if self._reader is None:
            self._reader = SafetensorsReader(self.hf_folder, self.reader_views)
        return self._reader

    def transformer_config(
        self, sizes: ParallelSizes = ParallelSizes(), initialize_weights: bool = False, sequence_parallel: bool | None = None
    ):
        """The Megatron-Core ``TransformerConfig`` this checkpoint becomes at these parallel sizes."""
        return megatron_builder.build_transformer_config(
            self.model_bridge, sizes, dtype=self.dtype, initialize_weights=initialize_weights, sequence_parallel=sequence_parallel
        )

    def to_megatron_model(
        self,
        tp: int = 1,
        pp: int = 1,
        vpp: int | None = None,
        ep: int = 1,
        etp: int | None = None,
        load_weights: bool = True,
        sequence_parallel: bool | None = None,
        make_vocab_size_divisible_by: int = 128,
        load_strategy: str = "slice",
        seed: int = 1234,
        padded_vocab_size: int | None = None,
    ) -> list[torch.nn.Module]:
        """This rank's ``GPTModel`` chunks (one per virtual pipeline stage), weights loaded from the checkpoint.

        ``ep`` splits routed experts, ``etp`` is their tensor-parallel size (default ``tp``).
        The vocabulary is padded as Megatron-LM pads it (``make_vocab_size_divisible_by`` × ``tp``),
        or to exactly ``padded_vocab_size`` rows (an existing Megatron checkpoint's).
        Sets up torch.distributed and Megatron-Core's parallel state when the caller has not.
        """
        sizes = ParallelSizes(tp=tp, pp=pp, vpp=vpp, ep=ep, etp=etp)
        config = self.transformer_config(sizes, initialize_weights=not load_weights, sequence_parallel=sequence_parallel)
        vocab = megatron_builder.vocab_rows(self.model_bridge.vocab_size, tp, make_vocab_size_divisible_by, padded_vocab_size)
        if load_weights:
            self.reader  # open the files (and fail on a broken folder) before building anything
        parallel.initialize_parallel(sizes, seed=seed)
        chunks = megatron_builder.build_gpt_chunks(self.model_bridge, config, vocab)
        if load_weights:
            self.load_hf_weights(chunks, strategy=load_strategy)
        return chunks

    def plan(self, model) -> TransferPlan:
        return TransferPlan.build(model, self.model_bridge.mapping_registry(), self.model_bridge.vocab_size)

    def load_hf_weights(self, model, strategy: str = "slice") -> None:
        """Load the checkpoint into a model built by the caller (all ranks call this together)."""
        plan = self.plan(model)
        validate_checkpoint(plan, self.reader, self.model_bridge.hf_ignore, self.model_bridge.hf_carried)
        engine_load.load_checkpoint(plan, self.reader, strategy=strategy)

    @property
    def carried_tensors(self) -> dict:
        """The checkpoint's tensors exports copy unchanged (``ModelBridge.hf_carried``: multi-token-prediction layers), lazily."""
        names = matching(self.reader.names(), self.model_bridge.hf_carried)
        return {name: self.reader.lazy(name) for name in names}

    def export_hf_weights(
        self, model, dtype: torch.dtype | None = None, adapters_only: bool = False
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Stream HF (name, tensor) pairs from the model. Every rank must iterate; only the writing rank gets pairs.

        Tensors come in the source checkpoint's dtype for that name (or ``dtype`` when given). Where
        no conversion is needed (TP=1, same dtype) a tensor shares memory with the model's
        parameter rather than copying it: ``clone()`` what you keep while training goes on.
        ``adapters_only`` streams the LoRA adapters instead, under peft's names and in their own dtype
        (an RL loop that syncs only adapters to its inference engine).
        """
        if adapters_only:
            yield from export_adapter_weights(model, self, dtype)
            return
        plan = self.plan(model)
        source_dtypes = self.reader.dtypes() if dtype is None else {}
        for name, tensor in export_tensors(plan):
            yield name, tensor.to(dtype or source_dtypes.get(name, tensor.dtype))

    def save_hf_pretrained(
        self,
        model,
        out_dir: str | Path,
        max_shard_size: int | str = "5GB",
        overwrite: bool = False,
        dtype: torch.dtype | None = None,
        quantization: str | None = None,
    ) -> None:
        """Write a complete HF folder (weights, config, generation config, tokenizer files) atomically.

        All ranks call it. The ranks holding the model's shards write them in parallel when they
        share a filesystem (``bridge.engine.folder_export``); tensors are written in the source checkpoint's
        dtype for that name (or ``dtype`` when given); ``quantization="mxfp4"`` writes the weights the family
        stores in MXFP4 that way (gpt-oss's experts), ``quantization="fp8"`` the weights a block-scaled FP8 source
        held in FP8 (``bridge.hf.fp8_block_weights``), rank 0 writing every tensor.
        """
        source_dtypes = self.reader.dtypes() if dtype is None else {}
        encoding = export_encoding(self.model_bridge, Path(self.hf_folder), quantization)
        config, side_files = export_metadata.folder_metadata(self.hf_folder, self.hf_config, dtype, encoding and encoding.config)
        folder_export.write_hf_folder(
            self.plan(model),
            out_dir,
            config=config,
            side_files=side_files,
            target_dtype=lambda name, current: dtype or source_dtypes.get(name, current),
            max_shard_size=max_shard_size,
            overwrite=overwrite,
            encoding=encoding,
            carried=self.carried_tensors,
            release=self.reader.release,
        )
