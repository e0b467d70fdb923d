"""The order in which training sees its records: a pure function of (``data.seed``, epoch, world size), so that a
resumed run continues exactly where the interrupted one stood, at the same or at another number of workers.

Each epoch starts from a permutation of the usable record indices (after the driver's text stage), dealt to the
ranks: rank r streams ``order[r::world]``. A rank's position is the number of rows of its stream it has consumed,
kept or skipped by the encode stage (skips make streams run unequally). A resume at another world size re-deals the
epoch's unconsumed rows, in their order, over the new ranks: nothing is lost and nothing is seen twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass
class EpochPosition:
    """Where an epoch stands: the rows being dealt, to how many ranks, and how far each rank's stream has gone."""

    order: list[int]  # record indices, dealt round-robin: rank r streams order[r::world]
    world: int
    consumed: list[int]  # per rank: rows of its stream taken (kept or skipped)

    def stream(self, rank: int) -> list[int]:
        """The record indices rank ``rank`` has still to read, in order."""
        return self.order[rank :: self.world][self.consumed[rank] :]


def epoch_order(indices: Sequence[int], seed: int, epoch: int) -> list[int]:
    """A permutation of ``indices`` drawn from (``seed``, ``epoch``) alone."""
    permutation = np.random.default_rng([seed, epoch]).permutation(len(indices))
    return [int(indices[i]) for i in permutation]


def start_epoch(indices: Sequence[int], seed: int, epoch: int, world: int) -> EpochPosition:
    """The position at the start of ``epoch``: its permutation, nothing consumed."""
    return EpochPosition(epoch_order(indices, seed, epoch), world, [0] * world)


def redeal(position: EpochPosition, world: int) -> EpochPosition:
    """``position`` continued at ``world`` ranks: unchanged at the same world size, else the unconsumed rows in their
    order, dealt afresh."""
    if world == position.world:
        return position
    taken = set()
    for rank, count in enumerate(position.consumed):
        taken.update(position.order[rank :: position.world][:count])
    return EpochPosition([i for i in position.order if i not in taken], world, [0] * world)
