"""The collector's pause around a listing: off meanwhile, and what it made goes to the oldest generation unexamined."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from cscs_storage_daemon.mapping import gc_paused, promote_to_oldest


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


@pytest.fixture
def no_automatic_collection() -> Iterator[None]:
    """No collection runs on its own during the test: where an object is says what the pause did, nothing else."""
    thresholds = gc.get_threshold()
    enabled = gc.isenabled()
    gc.enable()
    gc.set_threshold(1_000_000_000, 1_000_000, 1_000_000)
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)
        if not enabled:
            gc.disable()


def generation_of(obj: object) -> int | None:
    for generation in range(3):
        if any(o is obj for o in gc.get_objects(generation)):
            return generation
    return None  # frozen (or untracked)


@pytest.mark.usefixtures("no_automatic_collection")
def test_the_collector_is_off_during_the_pause_and_back_on_after() -> None:
    with gc_paused():
        assert not gc.isenabled()
        with gc_paused():  # nested (a page inside a listing)
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()
    gc.disable()
    try:
        with gc_paused():
            pass
        assert not gc.isenabled()  # off before, off after
    finally:
        gc.enable()


@pytest.mark.usefixtures("no_automatic_collection")
def test_what_the_pause_made_is_in_the_oldest_generation_after_it() -> None:
    before = [Node()]
    assert generation_of(before[0]) == 0
    with gc_paused():
        made = [{"target": {"targetItem": {}}} for _ in range(1000)]
        assert generation_of(made[-1]) == 0
        with gc_paused():
            inner = [Node()]
        assert generation_of(inner[0]) == 0  # the inner pause's end promotes nothing: the outer is still on
    assert generation_of(made[-1]) == 2
    assert generation_of(made[0]["target"]) == 2
    assert generation_of(inner[0]) == 2
    assert generation_of(before[0]) == 2  # everything tracked goes: a list splice, not a walk
    assert gc.get_freeze_count() == 0


@pytest.mark.usefixtures("no_automatic_collection")
def test_a_garbage_cycle_made_during_the_pause_is_freed_by_the_next_full_collection() -> None:
    with gc_paused():
        first, second = Node(), Node()
        first.other, second.other = second, first
        gone = weakref.ref(first)
        del first, second
    gc.collect(0)
    assert gone() is not None  # in the oldest generation: a young collection does not look at it
    gc.collect()
    assert gone() is None


@pytest.mark.usefixtures("no_automatic_collection")
def test_objects_someone_froze_stay_frozen_and_the_new_ones_join_them() -> None:
    """The replay freezes the capture it runs: a listing inside it must not hand the capture back to the
    collector (a full pass over it costs a second)."""
    capture = [Node()]
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        with gc_paused():
            made = [Node()]
        assert generation_of(capture[0]) is None and generation_of(made[0]) is None
        assert gc.get_freeze_count() > frozen
        promote_to_oldest()
        assert generation_of(capture[0]) is None
    finally:
        gc.unfreeze()
    assert generation_of(capture[0]) == 2 and generation_of(made[0]) == 2
