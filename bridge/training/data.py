"""Training data on Megatron-Core's own dataset stack.

- ``preprocess``: tokenize a JSONL or plain-text corpus with the model's HF tokenizer into
  Megatron's indexed format (``<prefix>.bin`` / ``<prefix>.idx``, ``IndexedDatasetBuilder``), one
  document per JSON line (``json_key``) or per non-empty text line, each ended by the EOS token.
  Run it as ``python -m bridge.training.data --input corpus.jsonl --tokenizer MODEL --output-prefix data/corpus``.
- ``build_gpt_dataset``: ``GPTDataset`` (blended when several prefixes are given) through
  ``BlendedMegatronDatasetBuilder``.
- ``PretrainingSampler`` / ``train_data_iterator``: Megatron-LM's ``MegatronPretrainingSampler``
  semantics, so every TP×PP×DP layout sees the same global batches (global batch = consecutive
  samples; DP rank r takes micro-batch r of each group of DP micro-batches) and a resumed run
  continues at ``consumed_samples``.
- ``write_demo_corpus`` / ``prepare_demo``: a small deterministic corpus over the tiny checkpoints'
  words and a tiny Llama checkpoint, for the demo and the tests (no network).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

logger = logging.getLogger(__name__)


# --- tokenizer ------------------------------------------------------------------------------------


class MegatronTokenizerAdapter:
    """The few attributes Megatron-Core's GPT datasets read from a tokenizer, backed by an HF tokenizer.

    ``GPTDataset`` needs ``eod`` (document separator), ``vocab_size`` and, to build its cache key,
    ``unique_identifiers``. ``pad`` is deliberately absent: Megatron then pads with -1, which
    never collides with a real token (HF tokenizers often reuse EOS as pad).
    """

    def __init__(self, hf_tokenizer, name: str = ""):
        self.hf_tokenizer = hf_tokenizer
        eod = hf_tokenizer.eos_token_id
        if eod is None:
            raise ValueError(f"tokenizer {name or type(hf_tokenizer).__name__} has no EOS token to separate documents")
        self.eod = int(eod)
        self.eos = self.eod
        self.vocab_size = len(hf_tokenizer)
        self.unique_identifiers = {"class": type(hf_tokenizer).__name__, "name": str(name), "vocab_size": self.vocab_size, "eod": self.eod}

    def tokenize(self, text: str) -> list[int]:
        return self.hf_tokenizer(text, add_special_tokens=False)["input_ids"]

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.hf_tokenizer.decode(list(ids))


def load_tokenizer(path_or_id: str | Path) -> MegatronTokenizerAdapter:
    """The HF tokenizer of a model folder (or Hub id), wrapped for Megatron's datasets."""
    from transformers import AutoTokenizer

    return MegatronTokenizerAdapter(AutoTokenizer.from_pretrained(str(path_or_id)), name=str(path_or_id))


# --- preprocessing --------------------------------------------------------------------------------


def iter_documents(paths: Iterable[str | Path], json_key: str = "text") -> Iterator[str]:
    """Documents of a corpus: ``.jsonl``/``.json`` files give one per line (field ``json_key``), other files one per non-empty line."""
    for path in paths:
        path = Path(path)
        jsonl = path.suffix in (".jsonl", ".json")
        with path.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, 1):
                line = line.strip()
                if not line:
                    continue
                if not jsonl:
                    yield line
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{number}: not a JSON line ({err})") from err
                if json_key not in record:
                    raise ValueError(f"{path}:{number}: no field {json_key!r} (fields: {sorted(record)})")
                yield record[json_key]


def preprocess(
    inputs: Sequence[str | Path],
    tokenizer: MegatronTokenizerAdapter | str | Path,
    output_prefix: str | Path,
    json_key: str = "text",
    append_eod: bool = True,
) -> Path:
    """Tokenize ``inputs`` into ``<output_prefix>.bin/.idx`` (Megatron's indexed dataset); returns the prefix.

    Both files are written under temporary names and renamed at the end, ``.idx`` last, so a
    prefix whose ``.idx`` exists is complete.
    """
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    if not isinstance(tokenizer, MegatronTokenizerAdapter):
        tokenizer = load_tokenizer(tokenizer)
    prefix = Path(output_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    tmp_bin, tmp_idx = Path(f"{prefix}.bin.tmp"), Path(f"{prefix}.idx.tmp")
    builder = IndexedDatasetBuilder(str(tmp_bin), dtype=DType.optimal_dtype(tokenizer.vocab_size))
    documents = tokens = 0
    for text in iter_documents(inputs, json_key):
        ids = tokenizer.tokenize(text)
        if append_eod:
            ids.append(tokenizer.eod)
        if not ids:
            continue
        builder.add_document(np.asarray(ids, dtype=np.int64), [len(ids)])
        documents += 1
        tokens += len(ids)
    builder.finalize(str(tmp_idx))
    if documents == 0:
        raise ValueError(f"no documents in {', '.join(map(str, inputs))}")
    os.replace(tmp_bin, f"{prefix}.bin")
    os.replace(tmp_idx, f"{prefix}.idx")
    logger.info("wrote %s.bin/.idx: %d documents, %d tokens", prefix, documents, tokens)
    return prefix


def write_demo_corpus(path: str | Path, num_documents: int = 400, vocab_size: int = 250, seed: int = 0) -> Path:
    """A JSONL corpus over the tiny tokenizer's words ``w3 … w{vocab_size-1}`` with a learnable pattern.

    Each document walks the word list from a random start with a small random stride, so the next
    word follows from the previous two: a model's loss drops visibly within a few dozen steps.
    """
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(3, vocab_size)]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        for _ in range(num_documents):
            start, stride, length = rng.randrange(len(words)), rng.choice((1, 2, 3)), rng.randrange(16, 96)
            text = " ".join(words[(start + i * stride) % len(words)] for i in range(length))
            out.write(json.dumps({"text": text}) + "\n")
    return path


def prepare_demo(workdir: str | Path) -> tuple[Path, list[str]]:
    """A tiny fp32 Llama checkpoint (with its tokenizer) and a two-corpus blend, preprocessed (call on one rank).

    Returns the HF folder and the data paths in Megatron-LM's ``--data-path`` form
    (``weight prefix weight prefix``). What already exists in ``workdir`` is reused, so a resumed
    demo trains the same model on the same data.
    """
    from bridge.demo_model import build_demo_checkpoint

    workdir = Path(workdir)
    hf_folder = workdir / "hf_tiny_llama"
    if not (hf_folder / "config.json").exists():
        build_demo_checkpoint(hf_folder, dtype=torch.float32)
    data_paths = []
    for name, weight, seed in (("corpus_a", "0.7", 0), ("corpus_b", "0.3", 1)):
        prefix = workdir / "data" / name
        if not Path(f"{prefix}.idx").exists():
            corpus = write_demo_corpus(workdir / "data" / f"{name}.jsonl", seed=seed)
            preprocess([corpus], hf_folder, prefix)
        data_paths += [weight, str(prefix)]
    return hf_folder, data_paths


# --- datasets -------------------------------------------------------------------------------------


def parse_blend(data_paths: Sequence[str]) -> tuple[list[str], list[float] | None]:
    """Megatron-LM's ``--data-path`` convention: ``[prefix, ...]`` or ``[weight, prefix, weight, prefix, ...]``."""
    from megatron.core.datasets.utils import get_blend_from_list

    blend = get_blend_from_list(list(data_paths))
    if blend is None or not blend[0]:
        raise ValueError("no data path given")
    for prefix in blend[0]:
        if not Path(f"{prefix}.idx").exists() or not Path(f"{prefix}.bin").exists():
            raise FileNotFoundError(f"{prefix}.bin/.idx not found: run the preprocessing first (python -m bridge.training.data ...)")
    return blend


def build_gpt_dataset(
    data_paths: Sequence[str],
    tokenizer: MegatronTokenizerAdapter,
    seq_length: int,
    num_samples: int,
    seed: int = 1234,
    cache_dir: str | Path | None = None,
):
    """The training ``GPTDataset`` (a ``BlendedDataset`` for several prefixes) with at least ``num_samples`` samples.

    All ranks call this together (the builder writes its index caches on rank 0 first). Samples are
    ``seq_length + 1`` tokens drawn across document boundaries; ``tokens``/``labels`` are the
    shifted halves, the loss mask is all ones (``eod_mask_loss=False``) except Megatron's padding.
    """
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    blend = parse_blend(data_paths)
    cache = Path(cache_dir) if cache_dir is not None else Path(blend[0][0]).parent / "cache"
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=blend,
        split="100,0,0",
        path_to_cache=str(cache),
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,  # the attention builds its causal mask itself
    )
    train, _, _ = BlendedMegatronDatasetBuilder(GPTDataset, [num_samples, 0, 0], lambda: True, config).build()
    return train


class PretrainingSampler:
    """Megatron-LM's ``MegatronPretrainingSampler``: consecutive samples from ``consumed_samples`` on.

    Each step of DP micro-batches takes the next ``micro_batch_size × dp_size`` indices and hands
    this DP rank its slice, so the global batch (and the loss) does not depend on the layout.
    """

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int):
        if consumed_samples >= total_samples:
            raise ValueError(f"no samples left: consumed {consumed_samples} of {total_samples}")
        self.total_samples, self.consumed_samples = total_samples, consumed_samples
        self.micro_batch_size, self.dp_rank, self.dp_size = micro_batch_size, dp_rank, dp_size

    def __len__(self) -> int:
        return (self.total_samples - self.consumed_samples) // (self.micro_batch_size * self.dp_size)

    def __iter__(self) -> Iterator[list[int]]:
        step = self.micro_batch_size * self.dp_size
        start = self.dp_rank * self.micro_batch_size
        for first in range(self.consumed_samples, self.total_samples - step + 1, step):
            yield list(range(first + start, first + start + self.micro_batch_size))


def train_data_iterator(
    dataset, consumed_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Micro-batches (dicts of ``tokens``, ``labels``, ``loss_mask``, ``position_ids``) for this DP rank."""
    sampler = PretrainingSampler(len(dataset), consumed_samples, micro_batch_size, dp_rank, dp_size)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=0)
    return iter(loader)


def build_train_iterators(
    dataset, model: Sequence, micro_batch_size: int, consumed_samples: int = 0
) -> list[Iterator[dict[str, torch.Tensor]]]:
    """One iterator per model chunk (what the schedules take), each over this DP rank's micro-batches."""
    from megatron.core import parallel_state

    dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    return [train_data_iterator(dataset, consumed_samples, micro_batch_size, dp_rank, dp_size) for _ in model]


# --- command line ---------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Tokenize a JSONL or text corpus into Megatron's indexed format (.bin/.idx).")
    parser.add_argument(
        "--input", nargs="+", required=True, help="JSONL files (one JSON object per line) or text files (one document per line)"
    )
    parser.add_argument("--tokenizer", required=True, help="HF model folder or Hub id whose tokenizer to use")
    parser.add_argument("--output-prefix", required=True, help="writes <prefix>.bin and <prefix>.idx")
    parser.add_argument("--json-key", default="text")
    parser.add_argument("--no-append-eod", action="store_true", help="do not end every document with the EOS token")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    prefix = preprocess(args.input, args.tokenizer, args.output_prefix, json_key=args.json_key, append_eod=not args.no_append_eod)
    print(f"wrote {prefix}.bin and {prefix}.idx")


if __name__ == "__main__":
    main()
