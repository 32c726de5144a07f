"""Which global ranks hold what at some parallel sizes, computed in one process without any process group.

Megatron-Core numbers ranks with its ``RankGenerator`` in the order ``tp-cp-ep-dp-pp``: one
generator for the dense layers (TP, DP, PP) and one for the routed experts (expert-TP, EP, expert-DP,
PP). ``RankLayout`` asks the same generators, so its groups are the ones
``parallel_state.initialize_model_parallel`` builds on a world of that size; ``hfmb plan`` uses it to
say which ranks hold each parameter without starting them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from megatron.core.parallel_state import RankGenerator

from bridge.megatron.parallel import ParallelSizes

ORDER = "tp-cp-ep-dp-pp"  # initialize_model_parallel's default, which the bridge never changes


def smallest_world(sizes: ParallelSizes) -> int:
    """The smallest world both the dense (tp×pp) and the expert (etp×ep×pp) layouts divide."""
    return math.lcm(sizes.tp * sizes.pp, sizes.expert_tp * sizes.ep * sizes.pp)


@dataclass(frozen=True)
class Holders:
    """The global ranks holding one parameter."""

    owner: int  # TP (ETP) rank 0 of data-parallel replica 0: the rank that speaks for it (``PlanEntry.owner``)
    group: tuple[int, ...]  # the owner's TP (ETP) group, in TP-rank order (``PlanEntry.group``)
    ranks: tuple[int, ...]  # every rank holding a shard or a copy of it (all TP ranks of all data-parallel replicas), ascending


class RankLayout:
    """The rank groups of a world of ``world`` ranks at ``sizes``, as Megatron-Core builds them.

    Raises ``ParallelConfigError`` when the world is not a multiple of what the sizes need.
    """

    def __init__(self, sizes: ParallelSizes, world: int):
        sizes.check_world(world)
        self.sizes, self.world = sizes, world
        dense = RankGenerator(tp=sizes.tp, ep=1, dp=world // (sizes.tp * sizes.pp), pp=sizes.pp, cp=1, order=ORDER)
        expert_dp = world // (sizes.expert_tp * sizes.ep * sizes.pp)
        expert = RankGenerator(tp=sizes.expert_tp, ep=sizes.ep, dp=expert_dp, pp=sizes.pp, cp=1, order=ORDER)
        self._dense = _coordinates(dense, world, ("tp", "dp", "pp"))
        self._expert = _coordinates(expert, world, ("tp", "ep", "dp", "pp"))

    @property
    def data_parallel(self) -> int:
        return self.world // (self.sizes.tp * self.sizes.pp)

    def dense(self, pp_rank: int) -> Holders:
        """The holders of a dense (non-expert) parameter of pipeline stage ``pp_rank``."""
        return _holders(self._dense, pp=pp_rank)

    def expert(self, pp_rank: int, ep_rank: int) -> Holders:
        """The holders of a routed expert's parameter of pipeline stage ``pp_rank`` placed on expert-parallel rank ``ep_rank``."""
        return _holders(self._expert, pp=pp_rank, ep=ep_rank)


def _coordinates(generator: RankGenerator, world: int, tokens: tuple[str, ...]) -> list[dict[str, int]]:
    """Each global rank's index along each of ``tokens`` (its position in its group of that kind)."""
    coords: list[dict[str, int]] = [{} for _ in range(world)]
    for token in tokens:
        for group in generator.get_ranks(token):
            for index, rank in enumerate(group):
                coords[rank][token] = index
    return coords


def _holders(coords: list[dict[str, int]], **where: int) -> Holders:
    ranks = tuple(rank for rank, c in enumerate(coords) if all(c[key] == value for key, value in where.items()))
    group = tuple(sorted((rank for rank in ranks if coords[rank]["dp"] == 0), key=lambda rank: coords[rank]["tp"]))
    return Holders(owner=group[0], group=group, ranks=ranks)
