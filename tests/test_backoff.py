"""Reconnect-delay policy (pure): exponential growth, 60 s cap, jitter within bounds, never gives up."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cscs_storage_daemon.transports.backoff import Backoff


def test_defaults_are_one_to_sixty_seconds() -> None:
    policy = Backoff()
    assert (policy.initial, policy.maximum, policy.multiplier) == (1.0, 60.0, 2.0)


def test_ceiling_grows_exponentially_then_caps_at_sixty() -> None:
    policy = Backoff()
    assert [policy.ceiling(n) for n in range(8)] == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0]


def test_delay_spans_floor_to_ceiling() -> None:
    policy = Backoff()
    assert policy.delay(3, rand=lambda: 0.0) == 1.0
    assert policy.delay(3, rand=lambda: 0.999999) == pytest.approx(8.0, rel=1e-5)
    assert policy.delay(0, rand=lambda: 0.7) == 1.0  # first retry: exactly the floor
    assert policy.delay(100, rand=lambda: 0.5) == pytest.approx(30.5)


@given(attempt=st.integers(min_value=0, max_value=10**12), fraction=st.floats(min_value=0.0, max_value=1.0))
def test_delay_always_within_bounds(attempt: int, fraction: float) -> None:
    policy = Backoff()
    delay = policy.delay(attempt, rand=lambda: fraction)
    assert 1.0 <= delay <= min(60.0, 2.0 ** min(attempt, 64))


def test_jitter_spreads_delays() -> None:
    policy = Backoff()
    rng = random.Random(42)
    delays = [policy.delay(6, rand=rng.random) for _ in range(1000)]
    assert min(delays) >= 1.0 and max(delays) <= 60.0
    assert len({round(d, 3) for d in delays}) > 900  # actually random, not a fixed schedule
    assert min(delays) < 10.0 and max(delays) > 50.0  # uses the whole range ("full" jitter)


def test_never_gives_up() -> None:
    policy = Backoff(initial=0.05, maximum=0.2)
    delays = list(itertools.islice(policy.delays(), 100_000))  # an endless iterator: no attempt limit
    assert len(delays) == 100_000
    assert all(0.05 <= d <= 0.2 for d in delays)
    assert policy.ceiling(10**9) == 0.2  # huge attempt numbers do not overflow


def test_is_pure_and_deterministic_with_injected_randomness() -> None:
    policy = Backoff()
    values = [0.1, 0.9, 0.5]

    def run() -> list[float]:
        it = iter(values)
        return [policy.delay(n, rand=lambda: next(it)) for n in range(len(values))]

    first, second = run(), run()
    assert first == second


@pytest.mark.parametrize(
    "kwargs",
    [
        {"initial": 0},
        {"initial": -1},
        {"initial": 2, "maximum": 1},
        {"multiplier": 0.5},
        {"maximum": float("inf")},
    ],
)
def test_rejects_nonsense(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        Backoff(**kwargs)


def test_constant_policy() -> None:
    assert Backoff(initial=5, maximum=5).delay(50) == 5
    assert Backoff(initial=2, maximum=60, multiplier=1).ceiling(30) == 2


def test_negative_attempt_is_an_error() -> None:
    with pytest.raises(ValueError):
        Backoff().ceiling(-1)
