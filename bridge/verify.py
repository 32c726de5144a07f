"""Checks a person can trust: two HF folders compared tensor by tensor, bit for bit."""

from __future__ import annotations

from pathlib import Path

import torch

from bridge.hf_checkpoint import SafetensorsReader


def load_hf_tensors(folder: str | Path) -> dict[str, torch.Tensor]:
    reader = SafetensorsReader(Path(folder))
    return {name: reader.lazy(name).narrow(0, 0, reader.lazy(name).shape[0]) for name in reader.names()}


def compare_tensors(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor]) -> list[str]:
    """Every difference in names, dtypes, shapes or values (bit for bit); empty when identical."""
    problems = [f"missing {n}" for n in sorted(set(expected) - set(actual))]
    problems += [f"extra {n}" for n in sorted(set(actual) - set(expected))]
    for name in sorted(set(expected) & set(actual)):
        a, b = expected[name], actual[name]
        if a.dtype != b.dtype or a.shape != b.shape:
            problems.append(f"{name}: {a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}")
        elif not torch.equal(a, b):
            problems.append(f"{name}: values differ (max abs diff {(a.double() - b.double()).abs().max().item():.3g})")
    return problems


def compare_hf_folders(expected: str | Path, actual: str | Path) -> list[str]:
    return compare_tensors(load_hf_tensors(expected), load_hf_tensors(actual))
