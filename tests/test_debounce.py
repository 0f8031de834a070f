"""The debounce rules of all.json (events spec §4). Pure: times go in, decisions come out."""

from __future__ import annotations

from cscs_storage_daemon.debounce import Debouncer, DebounceRules

RULES = DebounceRules(quiet=2.0, max_wait=30.0, heartbeat=3600.0)


def written_at(t: float) -> Debouncer:
    """A debouncer whose last file was written at `t`, with nothing unsaved."""
    d = Debouncer(RULES)
    d.finished(t, wrote=True)
    return d


def regenerate(d: Debouncer, now: float, *, ok: bool = True) -> None:
    taken = d.started()
    if ok:
        d.finished(now, wrote=True)
    else:
        d.failed(taken, now)


def test_defaults_follow_the_spec() -> None:
    assert DebounceRules() == DebounceRules(quiet=2.0, max_wait=30.0, heartbeat=3600.0)


def test_nothing_due_before_anything_happened() -> None:
    d = Debouncer(RULES)
    assert not d.pending
    assert d.due_at() is None
    assert not d.is_due(1e9)
    assert d.heartbeat_due(0.0)  # nothing was ever written: the first write is never skipped as "unchanged"


def test_trailing_edge_after_quiet() -> None:
    d = written_at(0.0)
    d.changed(100.0)
    assert d.pending
    assert not d.is_due(101.9)
    assert d.is_due(102.0)


def test_each_change_restarts_the_quiet_period() -> None:
    d = written_at(0.0)
    d.changed(100.0)
    d.changed(101.5)
    assert not d.is_due(102.0)
    assert not d.is_due(103.4)
    assert d.is_due(103.5)


def test_max_wait_caps_a_continuous_stream_of_changes() -> None:
    d = written_at(0.0)
    t = 100.0
    due_times = []
    while t < 200.0:
        d.changed(t)
        if d.is_due(t):
            due_times.append(t)
            regenerate(d, t)
        t += 0.5  # a change every 0.5 s: never 2 s of quiet
    # never quiet, yet written every 30 s after the first unsaved change
    assert due_times == [130.0, 160.5, 191.0]


def test_max_wait_counts_from_the_first_unsaved_change() -> None:
    d = written_at(0.0)
    d.changed(100.0)
    d.changed(129.0)
    assert d.due_at() == 130.0


def test_a_change_during_a_regeneration_stays_pending() -> None:
    d = written_at(0.0)
    d.changed(100.0)
    taken = d.started()
    assert taken == (100.0, 100.0)
    assert not d.pending
    d.changed(102.5)  # arrives while the file is being written
    d.finished(102.6, wrote=True)
    assert d.pending
    assert d.due_at() == 104.5


def test_heartbeat_due_after_the_interval_without_changes() -> None:
    d = written_at(1000.0)
    assert not d.pending
    assert d.due_at() == 4600.0
    assert not d.is_due(4599.0)
    assert not d.heartbeat_due(4599.0)
    assert d.is_due(4600.0)
    assert d.heartbeat_due(4600.0)


def test_unchanged_content_skipped_does_not_reset_the_heartbeat() -> None:
    d = written_at(1000.0)
    d.changed(2000.0)
    d.started()
    d.finished(2002.0, wrote=False)  # content equal to the last file: nothing written
    assert d.due_at() == 4600.0


def test_a_write_resets_the_heartbeat() -> None:
    d = written_at(1000.0)
    d.changed(2000.0)
    regenerate(d, 2002.0)
    assert d.due_at() == 2002.0 + 3600.0


def test_failure_gives_the_changes_back_and_retries_after_quiet() -> None:
    d = written_at(0.0)
    d.changed(100.0)
    regenerate(d, 102.0, ok=False)
    assert d.pending
    assert not d.is_due(102.0)  # not immediately: no tight loop against a failing disk
    assert not d.is_due(103.9)
    assert d.is_due(104.0)
    regenerate(d, 104.0)
    assert not d.pending


def test_failed_heartbeat_is_retried_after_quiet_not_at_once() -> None:
    d = written_at(0.0)
    assert d.is_due(3600.0)
    regenerate(d, 3600.0, ok=False)
    assert not d.is_due(3600.0)
    assert d.is_due(3602.0)
    assert d.heartbeat_due(3602.0)  # the retry still writes unchanged content


def test_failed_first_write_is_retried() -> None:
    d = Debouncer(RULES)
    regenerate(d, 5.0, ok=False)  # the forced write at start failed
    assert d.due_at() == 7.0


def test_repeated_failures_keep_retrying_at_the_quiet_pace() -> None:
    d = written_at(0.0)
    d.changed(10.0)
    now = 12.0
    attempts = []
    for _ in range(5):
        assert d.is_due(now)
        attempts.append(now)
        regenerate(d, now, ok=False)
        assert not d.is_due(now)
        now = d.due_at() or 0.0
    assert attempts == [12.0, 14.0, 16.0, 18.0, 20.0]
