"""Soak: the daemon as a real process on the real RabbitMQ for a long while, at a steady event rate, with faults.

    uv run python bench/soak.py --duration 1200 --rate 20 --faults on [--seed 1] [--resources 150] [--json out.json]

Not a test (never run in CI): it prints figures. What runs:

* a fake Waldur in this process (real HTTP on loopback) that provisions the local RabbitMQ like Mastermind, two
  offerings (``capstor``, ``vast``) with ``--resources`` live resources each;
* the daemon, ``python -m cscs_storage_daemon.cli run`` (tests/fixtures/daemon_process.py's `DaemonProcess`), with
  its HTTP API on, JSON logs to files, the token only in its environment, and the ``Environment=`` of
  systemd/cscs-storage-daemon.service (as deployed: ``MALLOC_ARENA_MAX``; ``--env NAME=VALUE`` adds or overrides,
  ``--no-unit-env`` leaves the unit's out);
* a load generator at ``--rate`` events per second, published as Mastermind publishes (one STOMP connection per
  message): 85 % new orders - Update of a live resource, Create of a new one and Terminate of an old one, balanced
  so the number of live resources stays put (a steady state: memory growth then means a leak, not more data) -
  and 15 % other traffic: the event of an earlier order again (a redelivery: it must not make a second file),
  resource events, offering_resources_sync, malformed bodies (dead letters). Terminated resources leave Waldur's
  listing ``--forget-after`` (300) seconds after their order is done (the daemon would keep them as ``removed``
  for ``removed_retention``, 600 s here);
* with ``--faults on``, at random (exponential gaps): every broker connection of the vhost closed
  (``rabbitmqctl close_all_connections``, mean gap 60 s), Waldur answering 5xx on half of its calls for 5-20 s
  (mean gap 90 s), and the daemon SIGKILLed and restarted (the first time between 5 % and 20 % of the run,
  then at a mean gap of 240 s, only in the first quarter: the second half is then one process at least a quarter
  of the run old, whose memory slope is the figure - the pooled slope over every run is printed too);
* a sampler reading the daemon's VmRSS, threads and open file descriptors from /proc every ``--sample`` seconds,
  and an API poller (/healthz and a page of /api/storage-resources/ every 5 s).

At the end the faults stop, the load stops, the daemon gets up to ``--drain`` seconds to finish, then: orders
sent / written (at least one file) / done in Waldur, duplicates (more than one file for an order), lost (not done
with exactly one file), erred, Waldur told ``done`` before the file existed (checked all along), reconnects,
restarts, dead letters, all.json against a fresh ``sync``, the token in any file, the exit code of a final SIGTERM,
peak RSS and RSS growth per hour (least-squares slope over the second half, ignoring the first minute after each
start). The goal: zero lost, zero duplicates, RSS growth under 5 MB per hour.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from cscs_storage_daemon.testing.fake_waldur import FakeWaldur  # noqa: E402
from tests.fixtures.brokers import Brokers, close_vhost_connections, port_open  # noqa: E402
from tests.fixtures.daemon_process import (  # noqa: E402
    TOKEN_ENV,
    DaemonProcess,
    Harness,
    OrderSpec,
    PlannedOrder,
    WaldurPublisher,
    distinctive_token,
    write_config,
)

WARM_UP = 60.0  # seconds after each start left out of the RSS regression (imports, first fill, caches)
UNIT = ROOT / "systemd" / "cscs-storage-daemon.service"


def unit_environment(unit: Path = UNIT) -> dict[str, str]:
    """The ``Environment=`` assignments of the systemd unit: the daemon is measured as it is deployed."""
    env: dict[str, str] = {}
    for line in unit.read_text().splitlines():
        key, _, value = line.strip().partition("=")
        if key == "Environment":
            for item in shlex.split(value):
                name, _, text = item.partition("=")
                env[name] = text
    return env


# --------------------------------------------------------------------------------------------------------------
# memory samples


@dataclass(frozen=True)
class Sample:
    t: float  # seconds since the soak started
    pid: int
    rss_kb: int
    threads: int
    fds: int


def read_proc(pid: int) -> tuple[int, int, int] | None:
    """(VmRSS kB, threads, open fds) of a process, or None if it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None
    values = {}
    for line in status.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "Threads"):
            values[key] = int(rest.split()[0])
    if "VmRSS" not in values:
        return None
    return values["VmRSS"], values.get("Threads", 0), fds


def pooled_slope(groups: Sequence[Sequence[tuple[float, float]]]) -> float | None:
    """Least-squares slope shared by several runs (each with its own intercept): the within-run regression."""
    num = den = 0.0
    for points in groups:
        if len(points) < 3:
            continue
        mean_t = sum(t for t, _ in points) / len(points)
        mean_y = sum(y for _, y in points) / len(points)
        num += sum((t - mean_t) * (y - mean_y) for t, y in points)
        den += sum((t - mean_t) ** 2 for t, _ in points)
    return num / den if den else None


def rss_growth(samples: Sequence[Sample], start: float, starts: dict[int, float]) -> dict[str, Any]:
    """RSS growth in MB/hour from the samples at t >= `start`, each run past its warm-up: the slope shared by the
    runs in the window, the slope of the longest one, and that run's slope over the last half of the window (with
    `start` at half-time: the last quarter of the soak), which tells a leak (steady) from a warm-up (fading)."""
    groups: dict[int, list[tuple[float, float]]] = collections.defaultdict(list)
    fd_groups: dict[int, list[tuple[float, float]]] = collections.defaultdict(list)
    for s in samples:
        if s.t >= start and s.t >= starts.get(s.pid, 0.0) + WARM_UP:
            groups[s.pid].append((s.t, s.rss_kb / 1024.0))
            fd_groups[s.pid].append((s.t, float(s.fds)))
    pooled = pooled_slope(list(groups.values()))
    longest = max(groups.values(), key=len, default=[])
    single = pooled_slope([longest])
    end = samples[-1].t if samples else start
    tail = pooled_slope([[p for p in longest if p[0] >= start + (end - start) / 2]])
    fd_slope = pooled_slope(list(fd_groups.values()))

    def per_hour(slope: float | None) -> float | None:
        return None if slope is None else slope * 3600

    return {
        "pooled_mb_per_hour": per_hour(pooled),
        "longest_run_mb_per_hour": per_hour(single),
        "longest_run_last_half_mb_per_hour": per_hour(tail),
        "longest_run_minutes": (longest[-1][0] - longest[0][0]) / 60 if len(longest) > 1 else 0.0,
        "runs_in_window": len(groups),
        "points": sum(len(g) for g in groups.values()),
        "fds_per_hour": per_hour(fd_slope),
    }


# --------------------------------------------------------------------------------------------------------------
# the soak


@dataclass
class Soak:
    args: argparse.Namespace
    harness: Harness
    rng: random.Random
    started: float = field(default_factory=time.monotonic)
    samples: list[Sample] = field(default_factory=list)
    run_starts: dict[int, float] = field(default_factory=dict)  # pid -> t of its start
    stop: threading.Event = field(default_factory=threading.Event)
    load_over: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    live: dict[str, list[str]] = field(default_factory=dict)  # offering uuid -> live resources, no order in flight
    busy: dict[str, tuple[str, str, str]] = field(default_factory=dict)  # resource -> (order, type, offering)
    terminated: list[tuple[float, str]] = field(default_factory=list)  # (t done seen, resource uuid)
    counts: collections.Counter[str] = field(default_factory=collections.Counter)
    fault_log: list[tuple[float, str]] = field(default_factory=list)
    api_errors: collections.Counter[str] = field(default_factory=collections.Counter)
    api_url: str = ""

    def now(self) -> float:
        return time.monotonic() - self.started

    def note(self, what: str) -> None:
        self.fault_log.append((self.now(), what))
        print(f"[{self.now():7.1f}s] {what}", flush=True)

    # -- load ------------------------------------------------------------------------------------------------------

    def pick_order(self) -> OrderSpec | None:
        """Update (70 %), Terminate of the oldest (15 %), Create to refill: the live count stays near its target."""
        with self.lock:
            offering = self.rng.choice(list(self.live))
            pool = self.live[offering]
            if len(pool) + self._busy_in(offering) < self.args.resources:
                return OrderSpec("Create", offering)
            if not pool:
                return None  # every resource has an order in flight: try again next tick
            if self.rng.random() < 0.15:
                return OrderSpec("Terminate", offering, pool.pop(0))
            resource = pool.pop(self.rng.randrange(len(pool)))
            return OrderSpec("Update", offering, resource, limit=self.rng.randint(11, 500))

    def _busy_in(self, offering: str) -> int:
        return sum(1 for _o, _t, off in self.busy.values() if off == offering)

    def new_order(self) -> None:
        spec = self.pick_order()
        if spec is None:
            with self.lock:
                self.counts["ticks_without_a_free_resource"] += 1
            return
        order = self.harness.create_order(spec)
        with self.lock:
            self.busy[order.resource_uuid] = (order.uuid, order.type, order.offering_uuid)
        self.harness.publisher.publish_order(order)
        with self.lock:
            self.counts["orders_sent"] += 1
            self.counts[f"orders_{order.type.lower()}"] += 1

    def other_event(self) -> None:
        h = self.harness
        roll = self.rng.random()
        with self.lock:
            orders = list(h.orders[-2000:])
        offering = self.rng.choice(h.offerings).uuid
        if roll < 0.55 and orders:
            order = self.rng.choice(orders)
            state = self.rng.choice(["pending-provider", "executing", "done"])
            h.publisher.publish_order(order, state)
            kind = "redelivered_order_events"
        elif roll < 0.80:
            with self.lock:
                pool = self.live[offering]
                resource = self.rng.choice(pool) if pool else None
            if resource is None:
                return
            body = {"object_type": "resource", "resource_uuid": resource, "offering_uuid": offering}
            h.publisher.publish(offering, json.dumps(body), "resource")
            kind = "resource_events"
        elif roll < 0.87:
            body = {"object_type": "offering_resources_sync", "offering_uuid": offering}
            h.publisher.publish(offering, json.dumps(body), "offering_resources_sync")
            kind = "sync_events"
        else:
            garbage = self.rng.choice([b"\xff\xfe not utf-8", b"{not json", b"[1, 2]", b'{"object_type": "nope"}'])
            h.publisher.publish(offering, garbage)
            kind = "malformed_events"
        with self.lock:
            self.counts[kind] += 1

    def one_event(self) -> None:
        try:
            if self.rng.random() < 0.85:
                self.new_order()
            else:
                self.other_event()
        except Exception as exc:  # a publisher that gave up, a fake hiccup: counted, never fatal
            with self.lock:
                self.counts["generator_errors"] += 1
            print(f"[{self.now():7.1f}s] generator error: {type(exc).__name__}: {str(exc)[:200]}", flush=True)

    def generate(self, until: float) -> None:
        """Events at --rate on a pool of publisher threads; if publishing stalls (broker away), the generator waits
        for a free thread instead of queueing without bound (the achieved rate is reported)."""
        slots = threading.BoundedSemaphore(64)
        interval = 1.0 / self.args.rate
        next_at = time.monotonic()
        with ThreadPoolExecutor(max_workers=32, thread_name_prefix="publish") as pool:
            while not self.stop.is_set() and self.now() < until:
                delay = next_at - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                next_at = max(next_at + interval, time.monotonic() - 1.0)
                slots.acquire()
                future = pool.submit(self.one_event)
                future.add_done_callback(lambda _f: slots.release())
                with self.lock:
                    self.counts["events_generated"] += 1

    # -- bookkeeping -----------------------------------------------------------------------------------------------

    def housekeeping(self) -> None:
        """Every second: resources whose order is done go back to the live pool (or, terminated, to the list of
        those Waldur forgets after --forget-after)."""
        fake = self.harness.fake
        while not self.stop.wait(1.0):
            with self.lock:
                items = list(self.busy.items())
            for resource, (order_uuid, kind, offering) in items:
                state = fake.order_state(order_uuid)
                if state not in ("done", "erred", "canceled", "rejected"):
                    continue
                with self.lock:
                    del self.busy[resource]
                    if kind == "Terminate" and state == "done":
                        self.terminated.append((self.now(), resource))
                    else:
                        self.live[offering].append(resource)
            if self.load_over.is_set():
                continue  # Waldur stops forgetting: the final comparison with a fresh sync needs a still listing
            cutoff = self.now() - self.args.forget_after
            with self.lock:
                gone = [r for t, r in self.terminated if t < cutoff]
                self.terminated = [(t, r) for t, r in self.terminated if t >= cutoff]
            for resource in gone:
                with contextlib.suppress(KeyError):
                    fake.remove_resource(resource)

    def sample(self) -> None:
        while not self.stop.wait(self.args.sample):
            daemon = self.harness.daemon
            if not daemon.runs:
                continue
            pid = daemon.current.pid
            values = read_proc(pid)
            if values is not None:
                self.samples.append(Sample(self.now(), pid, *values))

    def poll_api(self) -> None:
        with httpx.Client(base_url=self.api_url, timeout=10) as client:
            while not self.stop.wait(5.0):
                for path in ("/healthz", f"/api/storage-resources/?storage_system={self.harness.offerings[0].slug}"):
                    try:
                        status = client.get(path).status_code
                        self.api_errors[str(status)] += 1
                    except httpx.HTTPError as exc:
                        self.api_errors[type(exc).__name__] += 1

    # -- faults ----------------------------------------------------------------------------------------------------

    def restart(self) -> None:
        """Start the daemon again, as systemd would (Restart=on-failure): until it is READY."""
        daemon = self.harness.daemon
        for attempt in range(1, 11):
            try:
                run = daemon.start(timeout=300)
            except AssertionError as exc:
                self.counts["failed_starts"] += 1
                self.note(f"daemon start {attempt} failed: {str(exc).splitlines()[0]}")
                if daemon.alive:
                    daemon.kill()
                time.sleep(5)
                continue
            self.run_starts[run.pid] = self.now()
            self.note(f"daemon (re)started (pid {run.pid}), READY")
            return
        raise RuntimeError("the daemon would not start again")

    def faults(self, until: float) -> None:
        rng = random.Random(self.rng.random())
        kills_until = self.args.duration / 4  # then one process to the end: its memory slope is the figure
        due = {
            "connections": self.now() + rng.expovariate(1 / 60) * self.args.fault_scale,
            "waldur_5xx": self.now() + rng.expovariate(1 / 90) * self.args.fault_scale,
            # the first one surely (between 5 % and 20 % of the run), more at random until a quarter of it
            "sigkill": self.now() + rng.uniform(0.05, 0.2) * self.args.duration,
        }
        while not self.stop.wait(0.5) and self.now() < until:
            now = self.now()
            for kind, at in list(due.items()):
                if now < at:
                    continue
                if kind == "connections":
                    try:
                        close_vhost_connections(self.harness.vhost, "soak")
                        self.note("fault: every broker connection of the vhost closed")
                        self.counts["fault_connections_closed"] += 1
                    except (RuntimeError, subprocess.TimeoutExpired) as exc:
                        self.note(f"fault: closing connections failed: {exc}")
                    due[kind] = now + rng.expovariate(1 / 60) * self.args.fault_scale
                elif kind == "waldur_5xx":
                    length = rng.uniform(5, 20)
                    self.harness.fake.set_faults(error_rate=0.5, error_statuses=(500, 502, 503))
                    self.note(f"fault: Waldur answers 5xx on half of its calls for {length:.0f}s")
                    self.counts["fault_waldur_bursts"] += 1
                    if self.stop.wait(length):
                        break
                    self.harness.fake.clear_faults()
                    due[kind] = self.now() + rng.expovariate(1 / 90) * self.args.fault_scale
                elif kind == "sigkill":
                    if now > kills_until:
                        del due[kind]
                        continue
                    self.note("fault: daemon SIGKILLed")
                    self.harness.daemon.kill()
                    self.counts["fault_sigkills"] += 1
                    self.restart()
                    due[kind] = self.now() + rng.expovariate(1 / 240) * self.args.fault_scale
        self.harness.fake.clear_faults()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def build(args: argparse.Namespace, root: Path, brokers: Brokers) -> Harness:
    token = distinctive_token()
    fake = FakeWaldur(
        token=token,
        provision_rabbitmq=True,
        rabbitmq_api=brokers.management_url,
        rabbitmq_user=brokers.admin_user,
        rabbitmq_password=brokers.admin_password,
        seed=args.seed,
    ).start()
    offerings = [fake.add_offering(slug=slug) for slug in ("capstor", "vast")]
    existing = {
        o.uuid: [
            fake.add_resource(o.uuid, slug=f"base-{o.slug}-{i:04d}", backend_id=f"base-{i:04d}")["uuid"]
            for i in range(args.resources)
        ]
        for o in offerings
    }
    port = free_port()
    settings: dict[str, Any] = {
        "event_mode": "unified",
        "workers": 4,
        "reconcile_interval": 60,
        "removed_retention": 600,
        "shutdown_timeout": 30,
        "snapshot": {"quiet": 1, "max_wait": 5, "heartbeat": 3600},
        "retry": {"attempts": 6, "max_wait": 1, "total": 30, "timeout": 5},
        "http": {"enabled": True, "listen": f"127.0.0.1:{port}", "auth": "none"},
        "log": {"format": "json", "level": "info"},
    }
    out, state = root / "out", root / "state"
    config_path, sync_config = root / "config.yaml", root / "sync-config.yaml"
    write_config(config_path, fake, offerings, out, state, settings, brokers=brokers)
    write_config(sync_config, fake, offerings, root / "sync", root / "sync-state", settings, brokers=brokers)
    return Harness(
        root=root,
        fake=fake,
        brokers=brokers,
        offerings=offerings,
        existing=existing,
        token=token,
        config_path=config_path,
        sync_config_path=sync_config,
        output_root=out,
        state_dir=state,
        daemon_settings=settings,
        daemon=DaemonProcess(config_path, root / "logs", env={TOKEN_ENV: token, **daemon_environment(args)}),
        publisher=WaldurPublisher(fake, brokers, give_up_after=180.0),
    )


def daemon_environment(args: argparse.Namespace) -> dict[str, str]:
    """The unit's ``Environment=`` (unless --no-unit-env), then each --env."""
    return {**({} if args.no_unit_env else unit_environment()), **dict(args.env or [])}


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 1.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def report(soak: Soak, final_exit: int | None, elapsed_load: float) -> dict[str, Any]:
    h = soak.harness
    orders: list[PlannedOrder] = list(h.orders)
    states = h.states(orders)
    files = h.file_counts()
    state_counts = collections.Counter(states.values())
    written = sum(1 for o in orders if files[o.uuid] >= 1)
    duplicates = sum(1 for o in orders if files[o.uuid] > 1)
    lost = sum(1 for o in orders if not (states[o.uuid] == "done" and files[o.uuid] == 1))
    records = h.daemon.records()
    # The transport and the daemon both log broker.connected; the daemon's line names the offering.
    connected = sum(1 for r in records if r.get("event") == "broker.connected" and "offering" in r)
    runs = len(h.daemon.runs)
    dead_letters = sum(1 for r in records if r.get("event") == "event.dead_lettered")
    crashes = [r for r in records if "raw" in r or r.get("event") in ("event.failed", "snapshot.failed")]
    half = soak.args.duration / 2
    rss = [s.rss_kb for s in soak.samples]
    growth = rss_growth(soak.samples, half, soak.run_starts)
    snapshot_match: Any
    try:
        h.wait_snapshots_match_sync(timeout=120)
        snapshot_match = True
    except AssertionError as exc:
        snapshot_match = f"no: {str(exc)[:300]}"
    figures = {
        "duration_s": soak.args.duration,
        "rate_target": soak.args.rate,
        "rate_achieved": soak.counts["events_generated"] / max(elapsed_load, 1e-9),
        "faults": soak.args.faults,
        "daemon_env": {k: v for k, v in daemon_environment(soak.args).items() if k != TOKEN_ENV},
        "orders_sent": len(orders),
        "orders_by_type": dict(collections.Counter(o.type for o in orders)),
        "orders_written": written,
        "orders_done": state_counts.get("done", 0),
        "order_states": dict(state_counts),
        "duplicates": duplicates,
        "lost": lost,
        "done_before_file_violations": len(set(h.violations)),
        "other_events": {
            k: soak.counts[k]
            for k in ("redelivered_order_events", "resource_events", "sync_events", "malformed_events")
        },
        "dead_letters_logged": dead_letters,
        "publish_retries": h.publisher.retries,
        "publish_given_up": len(h.publisher.failed),
        "generator_errors": soak.counts["generator_errors"],
        "ticks_without_a_free_resource": soak.counts["ticks_without_a_free_resource"],
        "reconnects": connected - runs * len(h.offerings),
        "daemon_runs": runs,
        "faults_injected": {k: v for k, v in soak.counts.items() if k.startswith("fault_")},
        "unexpected_log_records": len(crashes),
        "all_json_equals_fresh_sync": snapshot_match,
        "files_with_token": h.files_containing_token(),
        "final_sigterm_exit": final_exit,
        "api_answers": dict(soak.api_errors),
        "rss_peak_mb": max(rss) / 1024 if rss else None,
        "rss_first_mb": rss[0] / 1024 if rss else None,
        "rss_last_mb": rss[-1] / 1024 if rss else None,
        "rss_growth": growth,
        "threads_last": soak.samples[-1].threads if soak.samples else None,
        "fds_last": soak.samples[-1].fds if soak.samples else None,
        "samples": len(soak.samples),
        "rss_samples": [(round(s.t, 1), s.pid, s.rss_kb, s.threads, s.fds) for s in soak.samples],
        "run_starts": soak.run_starts,
        "fault_log": soak.fault_log,
    }
    return figures


def print_report(figures: dict[str, Any]) -> None:
    g = figures["rss_growth"]

    def mb(value: float | None) -> str:
        return "n/a" if value is None else f"{value:+.2f} MB/h"

    lines = [
        "",
        "=" * 78,
        f"soak: {figures['duration_s']:.0f} s at {figures['rate_target']:g} events/s "
        f"(achieved {figures['rate_achieved']:.1f}/s), faults {figures['faults']}, env {figures['daemon_env']}",
        "-" * 78,
        f"orders sent      {figures['orders_sent']:>8}   {figures['orders_by_type']}",
        f"orders written   {figures['orders_written']:>8}   (at least one order file)",
        f"orders done      {figures['orders_done']:>8}   states {figures['order_states']}",
        f"duplicates       {figures['duplicates']:>8}   (orders with more than one file)",
        f"lost             {figures['lost']:>8}   (not done with exactly one file)",
        f"done before file {figures['done_before_file_violations']:>8}",
        f"reconnects       {figures['reconnects']:>8}   daemon runs {figures['daemon_runs']}, "
        f"faults {figures['faults_injected']}",
        f"other events     {figures['other_events']}, dead letters logged {figures['dead_letters_logged']}",
        f"publishing       retries {figures['publish_retries']}, given up {figures['publish_given_up']}, "
        f"generator errors {figures['generator_errors']}, "
        f"ticks without a free resource {figures['ticks_without_a_free_resource']}",
        f"all.json == sync {figures['all_json_equals_fresh_sync']}",
        f"token in files   {figures['files_with_token'] or 'none'}",
        f"unexpected logs  {figures['unexpected_log_records']}",
        f"final SIGTERM    exit {figures['final_sigterm_exit']}",
        f"API answers      {figures['api_answers']}",
        f"RSS              peak {figures['rss_peak_mb']:.1f} MB, first {figures['rss_first_mb']:.1f} MB, "
        f"last {figures['rss_last_mb']:.1f} MB ({figures['samples']} samples)"
        if figures["rss_peak_mb"] is not None
        else "RSS              no samples",
        f"RSS growth       {mb(g['longest_run_mb_per_hour'])} over the second half "
        f"({g['longest_run_minutes']:.1f} min of one run); pooled over {g['runs_in_window']} run(s): "
        f"{mb(g['pooled_mb_per_hour'])}; last quarter {mb(g['longest_run_last_half_mb_per_hour'])}; "
        f"fds {g['fds_per_hour'] and round(g['fds_per_hour'], 2)}/h, "
        f"threads {figures['threads_last']}, fds {figures['fds_last']}",
        "=" * 78,
    ]
    print("\n".join(lines), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=1200.0, help="seconds of load (default 1200)")
    parser.add_argument("--rate", type=float, default=20.0, help="events per second (default 20)")
    parser.add_argument("--faults", choices=("on", "off"), default="on", help="inject random faults (default on)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--resources", type=int, default=150, help="live resources per offering (default 150)")
    parser.add_argument(
        "--forget-after", type=float, default=300.0, help="Waldur drops a terminated resource this long after (300)"
    )
    parser.add_argument("--sample", type=float, default=3.0, help="seconds between RSS samples (default 3)")
    parser.add_argument("--fault-scale", type=float, default=1.0, help="multiplies the mean gaps between faults")
    parser.add_argument("--drain", type=float, default=600.0, help="seconds allowed to finish after the load")
    parser.add_argument(
        "--env",
        type=lambda text: tuple(text.split("=", 1)),
        action="append",
        metavar="NAME=VALUE",
        help="an environment variable for the daemon (e.g. MALLOC_ARENA_MAX=2), over the unit's; repeatable",
    )
    parser.add_argument(
        "--no-unit-env",
        action="store_true",
        help="do not give the daemon the Environment= of systemd/cscs-storage-daemon.service",
    )
    parser.add_argument("--workdir", type=Path, help="keep everything here (default: a temporary directory)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)

    brokers = Brokers()
    if not (port_open(brokers.stomp_port) and port_open(int(brokers.management_url.rsplit(":", 1)[1]))):
        print("RabbitMQ (STOMP 61613, management 15672) does not answer on 127.0.0.1", file=sys.stderr)
        return 2
    root = args.workdir or Path(tempfile.mkdtemp(prefix="cscs-soak-"))
    root.mkdir(parents=True, exist_ok=True)
    print(f"soak in {root}: {args.duration:.0f} s at {args.rate:g}/s, faults {args.faults}", flush=True)
    harness = build(args, root, brokers)
    soak = Soak(args, harness, random.Random(args.seed))
    soak.live = {o.uuid: list(harness.existing[o.uuid]) for o in harness.offerings}
    soak.api_url = f"http://{harness.daemon_settings['http']['listen']}"
    final_exit: int | None = None
    threads: list[threading.Thread] = []
    try:
        run = harness.daemon.start(timeout=300)
        soak.started = time.monotonic()
        soak.run_starts[run.pid] = 0.0
        stop_invariants = harness.watch_invariants(interval=2.0)
        for target in (soak.housekeeping, soak.sample, soak.poll_api):
            thread = threading.Thread(target=target, daemon=True, name=target.__name__)
            thread.start()
            threads.append(thread)
        if args.faults == "on":
            fault_thread = threading.Thread(target=soak.faults, args=(args.duration,), daemon=True, name="faults")
            fault_thread.start()
        else:
            fault_thread = None

        def progress() -> None:
            while not soak.stop.wait(60.0):
                rss = soak.samples[-1].rss_kb / 1024 if soak.samples else 0.0
                states = collections.Counter(harness.states(list(harness.orders)).values())
                print(
                    f"[{soak.now():7.1f}s] sent {len(harness.orders)}, done {states.get('done', 0)}, "
                    f"busy {len(soak.busy)}, rss {rss:.1f} MB",
                    flush=True,
                )

        threading.Thread(target=progress, daemon=True, name="progress").start()
        soak.generate(until=args.duration)
        elapsed_load = soak.now()
        soak.load_over.set()
        if fault_thread is not None:
            fault_thread.join(60)
        harness.fake.clear_faults()
        print(f"[{soak.now():7.1f}s] load over; draining", flush=True)
        if not harness.daemon.alive:
            soak.restart()

        def settled() -> bool:
            return all(s in ("done", "erred") for s in harness.states(list(harness.orders)).values())

        if not wait_until(settled, args.drain, 2.0):
            print(f"[{soak.now():7.1f}s] not every order settled within {args.drain:.0f} s", flush=True)
        for offering in harness.offerings:  # a reconciliation pass now: Waldur's listing changed under the daemon
            body = {"object_type": "offering_resources_sync", "offering_uuid": offering.uuid}
            harness.publisher.publish(offering.uuid, json.dumps(body), "offering_resources_sync")
        time.sleep(8)  # the pass, then a debounced all.json after the last change
        violations = stop_invariants()
        harness.violations[:] = violations
        soak.stop.set()
        for thread in threads:
            thread.join(10)
        figures = report(soak, None, elapsed_load)
        harness.daemon.send(signal.SIGTERM)
        final_exit = harness.daemon.wait_exit(120)
        figures["final_sigterm_exit"] = final_exit
        figures["files_with_token"] = harness.files_containing_token()
        print_report(figures)
        if args.json:
            args.json.write_text(json.dumps(figures, indent=2, default=str) + "\n")
        ok = (
            figures["lost"] == 0
            and figures["duplicates"] == 0
            and not figures["files_with_token"]
            and final_exit == 0
            and (figures["rss_growth"]["longest_run_mb_per_hour"] or 0.0) < 5.0
        )
        return 0 if ok else 1
    finally:
        soak.stop.set()
        harness.daemon.close()
        harness.fake.stop()


if __name__ == "__main__":
    sys.exit(main())
