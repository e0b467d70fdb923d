"""The sample order (``pipelines.train.order``) against a slow, obvious reference on random inputs: dealing is
round-robin, a resume at the same world size continues every stream, and at another one re-deals the unconsumed
rows in their order, so that over any sequence of interruptions each row of an epoch is consumed exactly once."""

from __future__ import annotations

import random

import pytest

from pipelines.train.order import EpochPosition, epoch_order, redeal, start_epoch


def dealt(order: list[int], world: int) -> list[list[int]]:
    """Cards dealt one at a time, to rank 0, 1, ..., world - 1, 0, ..."""
    hands: list[list[int]] = [[] for _ in range(world)]
    for i, row in enumerate(order):
        hands[i % world].append(row)
    return hands


def reference_redeal(order: list[int], world: int, consumed: list[int], new_world: int) -> list[list[int]]:
    """Each new rank's stream: the old streams' rest at the same world size, else the rows nobody consumed, in the
    epoch's order, dealt again."""
    hands = dealt(order, world)
    if new_world == world:
        return [hand[count:] for hand, count in zip(hands, consumed)]
    seen = [row for hand, count in zip(hands, consumed) for row in hand[:count]]
    return dealt([row for row in order if row not in seen], new_world)


@pytest.mark.parametrize("trial", range(200))
def test_redeal_matches_the_reference(trial):
    rng = random.Random(trial)
    order = rng.sample(range(1000), rng.randint(0, 60))
    world, new_world = rng.randint(1, 6), rng.randint(1, 6)
    consumed = [rng.randint(0, len(hand)) for hand in dealt(order, world)]
    position = redeal(EpochPosition(order, world, consumed), new_world)
    assert [position.stream(rank) for rank in range(new_world)] == reference_redeal(order, world, consumed, new_world)


@pytest.mark.parametrize("trial", range(50))
def test_interruptions_at_changing_world_sizes_consume_each_row_once(trial):
    """Ranks consume unequal random amounts (skips), the run is interrupted and resumed at a random world size, again
    and again: at the end every row of the epoch was consumed exactly once."""
    rng = random.Random(trial)
    indices = sorted(rng.sample(range(10_000), rng.randint(1, 80)))
    world = rng.randint(1, 5)
    position = start_epoch(indices, seed=trial, epoch=rng.randint(0, 3), world=world)
    consumed_rows: list[int] = []
    while any(position.stream(rank) for rank in range(position.world)):
        counts = list(position.consumed)
        for rank in range(position.world):
            taken = rng.randint(0, len(position.stream(rank)))
            consumed_rows += position.stream(rank)[:taken]
            counts[rank] += taken
        position = redeal(EpochPosition(position.order, position.world, counts), rng.randint(1, 5))
    assert sorted(consumed_rows) == indices


def test_the_epoch_order_is_a_permutation_drawn_from_seed_and_epoch_alone():
    indices = random.Random(0).sample(range(100_000), 500)
    first = epoch_order(indices, seed=3, epoch=0)
    assert sorted(first) == sorted(indices) and first != indices
    assert epoch_order(list(indices), seed=3, epoch=0) == first
    assert epoch_order(indices, seed=3, epoch=1) != first
    assert epoch_order(indices, seed=4, epoch=0) != first
    assert start_epoch(indices, seed=3, epoch=0, world=3) == EpochPosition(first, 3, [0, 0, 0])
