"""`GcFreezer`: what new connections built is frozen out of collections, and the garbage
among frozen objects is still collected once enough connections have gone.

Driven step by step (`tick`), with connection counts the test sets; the real collector
and its permanent generation, no double.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from collab.gc_pauses import ConnectionCounts, GcFreezer


class Cycle:
    """A connection's state in miniature: reachable only through a reference cycle."""

    def __init__(self) -> None:
        self.me = self


@pytest.fixture
def counts() -> Iterator[list[int]]:
    state = [0, 0, 0]  # opened, closed, open
    yield state
    gc.unfreeze()  # the rest of the test session's objects stay collectable


def freezer_for(state: list[int]) -> GcFreezer:
    return GcFreezer(lambda: ConnectionCounts(*state), closed_fraction=0.25, min_closed=4)


def test_what_new_connections_built_is_frozen_and_leaves_young_collections(
    counts: list[int],
) -> None:
    freezer = freezer_for(counts)
    freezer.full_collection()
    kept = [Cycle() for _ in range(1000)]  # what 10 connections built
    counts[:] = [10, 0, 10]
    frozen_before = gc.get_freeze_count()
    freezer.tick()
    assert gc.get_freeze_count() >= frozen_before + 1000
    assert not any(gc.is_tracked(k) and k in gc.get_objects(2) for k in kept[:3])
    assert freezer.freezes == 1 and freezer.full_collections == 1
    # Nothing new arrived: nothing is frozen.
    freezer.tick()
    assert freezer.freezes == 1


def test_garbage_among_frozen_objects_is_collected_once_a_quarter_have_left(
    counts: list[int],
) -> None:
    freezer = freezer_for(counts)
    freezer.full_collection()
    gone = Cycle()
    ref = weakref.ref(gone)
    counts[:] = [20, 0, 20]
    freezer.tick()  # frozen, with the connections that stay
    del gone
    gc.collect()
    assert ref() is not None, "a frozen cycle waits for the full collection"
    counts[:] = [20, 3, 17]  # 3 closed: fewer than a quarter of the 17 open
    freezer.tick()
    assert ref() is not None and freezer.full_collections == 1
    counts[:] = [20, 5, 15]  # 5 closed: more than a quarter of the 15 open
    freezer.tick()
    assert ref() is None
    assert freezer.full_collections == 2
    assert gc.get_freeze_count() > 0, "what stays is frozen again"


def test_a_crowd_that_doubles_the_frozen_objects_brings_a_full_collection(
    counts: list[int],
) -> None:
    """Frozen garbage must stay a fraction of the live state even when nobody leaves: a crowd
    that more than doubles what is frozen is followed by a full collection."""
    freezer = freezer_for(counts)
    freezer.full_collection()
    crowd = [Cycle() for _ in range(2 * gc.get_freeze_count() + 1000)]
    counts[:] = [len(crowd), 0, len(crowd)]
    freezer.tick()  # frozen with the rest, and the doubling noticed in the same step
    assert (freezer.freezes, freezer.full_collections) == (1, 2)
    freezer.tick()  # nobody came after the crowd: no pass over everything a step later
    assert (freezer.freezes, freezer.full_collections) == (1, 2)


def test_the_frozen_count_follows_without_walking_the_frozen_objects(
    counts: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A freeze step must not walk what was frozen before it (a stall per step of a crowd)."""
    freezer = freezer_for(counts)
    freezer.full_collection()
    walks: list[int] = []
    count = gc.get_freeze_count

    def counted() -> int:
        walks.append(1)
        return count()

    monkeypatch.setattr(gc, "get_freeze_count", counted)
    for step in range(1, 4):
        kept = [Cycle() for _ in range(1000)]  # noqa: F841 - what a step's connections built
        counts[:] = [step, 0, step]
        freezer.tick()
    assert walks == [] and freezer.freezes == 3 and freezer.full_collections == 1
    assert abs(freezer._frozen - count()) < 0.05 * count(), "the count kept up"


def test_an_idle_tick_does_not_walk_the_frozen_objects(
    counts: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Counting the frozen objects walks all of them; an idle server ticks every second, and
    a walk over a crowd's objects is a stall of milliseconds for every room."""
    freezer = freezer_for(counts)
    freezer.full_collection()
    counts[:] = [10, 0, 10]
    freezer.tick()
    walks: list[int] = []
    count = gc.get_freeze_count

    def counted() -> int:
        walks.append(1)
        return count()

    monkeypatch.setattr(gc, "get_freeze_count", counted)
    for _ in range(5):
        freezer.tick()  # nobody came or went
    assert walks == [] and freezer.freezes == 1


def test_a_young_cycle_is_collected_before_freezing(counts: list[int]) -> None:
    freezer = freezer_for(counts)
    freezer.full_collection()
    young = Cycle()
    ref = weakref.ref(young)
    del young
    counts[:] = [1, 0, 1]
    freezer.tick()
    assert ref() is None, "garbage made since the last step is not frozen"


async def test_start_freezes_start_up_and_close_unfreezes(counts: list[int]) -> None:
    freezer = freezer_for(counts)
    freezer.start()
    assert gc.get_freeze_count() > 0
    await freezer.close()
    assert gc.get_freeze_count() == 0
