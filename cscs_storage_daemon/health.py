"""What /healthz reports (spec http-api.md "GET /healthz").

`HealthState` is the small, thread-safe record the daemon updates as things happen: the broker connection (per
transport), the last all.json per offering and the ready flag. `healthz` is the pure function that turns a `view`
of it into the HTTP status and body, so the rules are tested without a server or a clock.

Rules: 200 when the daemon is ready, every configured offering has had a snapshot, and the broker is connected or
has been down for at most ``healthz_broker_grace`` seconds; 503 otherwise, with the same body, ``status``
``"unavailable"`` and a ``failing`` list naming each failing part (``ready``, ``broker``,
``offerings.<slug>.last_snapshot``).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from cscs_storage_daemon import __version__
from cscs_storage_daemon.clock import Clock, SystemClock

__all__ = ["BROKER_NOT_USED", "HealthState", "HealthView", "healthz"]

BROKER_NOT_USED = "not used"


@dataclass(frozen=True, slots=True)
class HealthView:
    """A consistent copy of a `HealthState` at one moment."""

    version: str
    ready: bool
    broker_required: bool
    broker_connected: bool
    broker_disconnected_since: datetime | None  # earliest moment a transport still down went down
    offerings: tuple[str, ...]  # configured slugs, in config order
    snapshots: Mapping[str, datetime] = field(default_factory=dict)


class HealthState:
    """Thread-safe health record; every method may be called from any thread.

    ``broker_required=False`` (the ``serve`` command, replay) leaves the broker out of the verdict; the body then
    says ``"broker": "not used"``. Several transports are tracked by name: the broker counts as connected only
    while all of them are, and as down since the earliest moment one still down went down. A transport that has
    never reported counts as down since the state was created.
    """

    def __init__(
        self,
        *,
        offerings: Iterable[str] = (),
        version: str = __version__,
        broker_required: bool = True,
        clock: Clock | None = None,
    ) -> None:
        self._clock = clock or SystemClock()
        self._lock = threading.Lock()
        self._version = version
        self._broker_required = broker_required
        self._offerings: list[str] = list(dict.fromkeys(offerings))
        self._ready = False
        self._created = self._clock.now()
        # transport name -> (connected, since)
        self._transports: dict[str, tuple[bool, datetime]] = {}
        self._snapshots: dict[str, datetime] = {}

    # -- updates --------------------------------------------------------------------------------------------------

    def set_ready(self, ready: bool = True) -> None:
        with self._lock:
            self._ready = ready

    def add_offering(self, slug: str) -> None:
        """Declare an offering whose snapshot /healthz waits for (also done by `snapshot_written`)."""
        with self._lock:
            if slug not in self._offerings:
                self._offerings.append(slug)

    def set_broker_connected(self, connected: bool, transport: str = "broker", *, at: datetime | None = None) -> None:
        """Record a transport's state. Idempotent: repeating the current state keeps its original ``since``, so it
        can be called on every event and from a polling loop alike."""
        when = at or self._clock.now()
        with self._lock:
            previous = self._transports.get(transport)
            if previous is None or previous[0] != connected:
                self._transports[transport] = (connected, when)

    def broker_connected(self, transport: str = "broker") -> None:
        self.set_broker_connected(True, transport)

    def broker_disconnected(self, transport: str = "broker") -> None:
        self.set_broker_connected(False, transport)

    def snapshot_written(self, slug: str, at: datetime | None = None) -> None:
        """An all.json of `slug` is durable (at `at`, default now)."""
        when = at or self._clock.now()
        with self._lock:
            if slug not in self._offerings:
                self._offerings.append(slug)
            self._snapshots[slug] = when

    # -- reading --------------------------------------------------------------------------------------------------

    @property
    def version(self) -> str:
        return self._version

    @property
    def ready(self) -> bool:
        with self._lock:
            return self._ready

    def view(self) -> HealthView:
        with self._lock:
            transports = dict(self._transports)
            if transports:
                down = [since for connected, since in transports.values() if not connected]
                connected = not down
                since = min(down) if down else None
            else:
                connected, since = False, self._created
            return HealthView(
                version=self._version,
                ready=self._ready,
                broker_required=self._broker_required,
                broker_connected=connected,
                broker_disconnected_since=since,
                offerings=tuple(self._offerings),
                snapshots=dict(self._snapshots),
            )


def _iso(moment: datetime) -> str:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat()


def healthz(
    view: HealthView,
    *,
    now: datetime,
    grace: float,
    resources: Mapping[str, int],
) -> tuple[int, dict[str, Any]]:
    """The /healthz HTTP status and body.

    `resources` gives the number of resources served per offering slug (slugs missing from it count 0); the
    offerings listed are those of `view` followed by any others in `resources`.
    """
    failing: list[str] = []
    if not view.ready:
        failing.append("ready")

    body: dict[str, Any] = {"status": "ok", "version": view.version}
    if not view.broker_required:
        body["broker"] = BROKER_NOT_USED
    elif view.broker_connected:
        body["broker"] = "connected"
    else:
        body["broker"] = "disconnected"
        since = view.broker_disconnected_since
        if since is not None:
            body["broker_disconnected_since"] = _iso(since)
        down_for = (now - since).total_seconds() if since is not None else float("inf")
        if down_for > grace:
            failing.append("broker")

    offerings: dict[str, dict[str, Any]] = {}
    for slug in dict.fromkeys([*view.offerings, *resources]):
        last = view.snapshots.get(slug)
        offerings[slug] = {"resources": int(resources.get(slug, 0)), "last_snapshot": _iso(last) if last else None}
        if last is None:
            failing.append(f"offerings.{slug}.last_snapshot")
    body["offerings"] = offerings

    if failing:
        body["status"] = "unavailable"
        body["failing"] = failing
        return 503, body
    return 200, body
