"""``hfmb plan`` in one process (issue 19, item 3): every rank's parameters derived from the TP=PP=1 meta model.

The fast tests check the rank numbering against Megatron-Core's layout written out by hand. The
distributed one builds each layout for real on 4 ranks (``TransferPlan.build``, as the plan did
before) and checks that ``derive_plan`` finds the same entries (names, kinds, local shapes, dtypes,
stages, owners, TP groups, in the same order), the same holders and the same mapping contexts.
The CLI tests check that ``hfmb plan`` starts no rank and says something first.
"""

from __future__ import annotations

import re

import pytest

from bridge.megatron.parallel import ParallelConfigError, ParallelSizes
from bridge.megatron.rank_layout import RankLayout, smallest_world
from bridge.runtime.local_launch import run_distributed
from tests.commands import hfmb

# ---------------------------------------------------------------- rank numbering (no process)


def test_dense_holders_follow_megatrons_order_tp_then_dp_then_pp():
    layout = RankLayout(ParallelSizes(tp=2, pp=2), 8)  # dp=2: rank = tp + 2·dp + 4·pp
    first, last = layout.dense(0), layout.dense(1)
    assert (first.owner, first.group, first.ranks) == (0, (0, 1), (0, 1, 2, 3))
    assert (last.owner, last.group, last.ranks) == (4, (4, 5), (4, 5, 6, 7))
    assert layout.data_parallel == 2


def test_expert_holders_are_placed_by_ep_within_each_stage():
    layout = RankLayout(ParallelSizes(tp=2, ep=2), 4)  # experts: rank = etp + 2·ep
    assert (layout.expert(0, 0).ranks, layout.expert(0, 1).ranks) == ((0, 1), (2, 3))
    assert (layout.expert(0, 1).owner, layout.expert(0, 1).group) == (2, (2, 3))
    pp = RankLayout(ParallelSizes(ep=2, pp=2), 4)  # dense dp=2; experts: rank = ep + 2·pp
    assert (pp.expert(1, 1).owner, pp.expert(1, 1).ranks, pp.dense(1).ranks) == (3, (3,), (2, 3))
    wide = RankLayout(ParallelSizes(ep=2), 4)  # expert-dp=2: ep 1 is ranks 1 and 3, speaking through 1
    assert (wide.expert(0, 1).owner, wide.expert(0, 1).group, wide.expert(0, 1).ranks) == (1, (1,), (1, 3))


def test_smallest_world_and_a_world_the_sizes_do_not_divide():
    assert smallest_world(ParallelSizes(tp=2, pp=2)) == 4
    assert smallest_world(ParallelSizes(tp=2, ep=4)) == 8
    assert smallest_world(ParallelSizes(tp=2, ep=2, etp=1)) == 2
    with pytest.raises(ParallelConfigError, match="not divisible by tp×pp"):
        RankLayout(ParallelSizes(tp=2, pp=2), 6)


# ---------------------------------------------------------------- against the plan the ranks build

# (checkpoint, sizes) built for real on 4 ranks and derived in one process
LAYOUTS = [
    ("llama", dict(tp=1, pp=1)),
    ("llama", dict(tp=2, pp=1)),
    ("llama", dict(tp=2, pp=2)),
    ("llama", dict(tp=1, pp=2, vpp=2)),
    ("qwen2", dict(tp=2, pp=2)),  # tied: the last stage's own output_layer.weight
    ("phi3", dict(tp=2, pp=1)),  # fused qkv_proj / gate_up_proj
    ("mixtral", dict(tp=2, ep=2)),
    ("mixtral", dict(tp=1, pp=2, ep=2)),
    ("qwen2_moe", dict(tp=1, ep=2)),  # shared experts, a dense layer among sparse ones, expert-dp=2
    ("qwen2_moe", dict(tp=2, pp=2, ep=2, etp=1)),
]
WORLD = 4


def _compare_layouts(folders: dict[str, str]) -> list[tuple[str, str | None]]:
    """On every rank: each layout's plan as the ranks build it, then derived from the TP=1 model on rank 0; (layout, difference or None)."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    from bridge.auto_bridge import AutoBridge
    from bridge.conversions import model_sizes
    from bridge.engine.derived_plan import derive_plan

    found = []
    for name, kwargs in LAYOUTS:
        sizes = ParallelSizes(**kwargs)
        bridge = AutoBridge.from_hf_pretrained(folders[name])
        with torch.device("meta"):
            model = bridge.to_megatron_model(**model_sizes(sizes), load_weights=False)
        built = bridge.plan(model)
        held: list = [None] * dist.get_world_size()
        dist.all_gather_object(held, set(built.local))
        padded = model[0].vocab_size
        parallel_state.destroy_model_parallel()
        with torch.device("meta"):
            whole = bridge.to_megatron_model(load_weights=False, padded_vocab_size=padded)
        if dist.get_rank() != 0:
            parallel_state.destroy_model_parallel()
            continue
        registry, vocab = bridge.model_bridge.mapping_registry(), bridge.model_bridge.vocab_size
        derived = derive_plan(whole, registry, vocab, bridge.transformer_config(sizes), RankLayout(sizes, WORLD))
        parallel_state.destroy_model_parallel()
        holders = {entry.name: tuple(rank for rank, names in enumerate(held) if entry.name in names) for entry in built.entries}
        found.append((f"{name} {kwargs}", _difference(built, derived, holders)))
    return found


def _difference(built, derived, holders) -> str | None:
    mine = derived.plan
    if [e.name for e in built.entries] != [e.name for e in mine.entries]:
        return f"names or order differ: {[e.name for e in built.entries]} vs {[e.name for e in mine.entries]}"
    for real, ours in zip(built.entries, mine.entries):
        if real != ours:
            return f"{real} vs {ours}"
    if holders != derived.holders:
        return f"holders {holders} vs {derived.holders}"
    if (built.ctx, built.expert_ctx) != (mine.ctx, mine.expert_ctx):
        return f"contexts {built.ctx, built.expert_ctx} vs {mine.ctx, mine.expert_ctx}"
    return None


@pytest.mark.distributed
def test_derived_plan_is_the_plan_the_ranks_build(tiny_checkpoints, tiny_moe_checkpoints):
    folders = {name: str(path) for name, path in {**tiny_checkpoints, **tiny_moe_checkpoints}.items()}
    results = run_distributed(_compare_layouts, WORLD, folders, timeout=1200)[0]
    assert [layout for layout, _ in results] == [f"{name} {kwargs}" for name, kwargs in LAYOUTS]
    assert {layout: difference for layout, difference in results if difference} == {}


# ---------------------------------------------------------------- the command


@pytest.mark.distributed
def test_plan_starts_no_rank_and_speaks_first(tiny_checkpoints):
    result = hfmb("plan", str(tiny_checkpoints["llama"]), "--tp", "2", "--pp", "2", "--nproc", "8")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "starting" not in result.stderr and "local ranks" not in result.stderr
    assert result.stderr.startswith(f"reading the config of {tiny_checkpoints['llama']}")
    assert "parallel: tp=2 pp=2 vpp=1 ep=1 on 8 rank(s) (dp=2)" in result.stdout
    assert re.search(r"model\.norm\.weight .* pp1 ranks 4-7\n", result.stdout)
    assert "plan OK: 39 HF tensors → 27 Megatron parameters on 8 rank(s)" in result.stdout


@pytest.mark.distributed
def test_plan_checks_the_sizes_before_building_anything(tiny_checkpoints):
    result = hfmb("plan", str(tiny_checkpoints["llama"]), "--tp", "3")
    assert result.returncode == 2
    assert "num_attention_heads = 4 is not divisible by tp = 3" in result.stderr
    assert "building the model" not in result.stderr
