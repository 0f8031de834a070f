"""Memory probe: the daemon's core in this process, tens of thousands of orders, heap compared between checkpoints.

    uv run python bench/memprobe.py --orders 40000 --checkpoints 10000,40000 [--frames 8] [--top 25]

Not a test (never run in CI). Where `bench/soak.py` measures the RSS of a real daemon process, this finds *what*
grows: it builds the same core as `run` (`build_core`: ledger, mirrors, processor, dispatcher with its workers,
snapshot scheduler, reconciler) plus the HTTP API, against the fake Waldur on loopback, and drives it with the
soak's steady-state mix - Update (70 %), Terminate of the oldest live resource (15 %), Create to refill, so the
live count stays put - plus redelivered order events, resource events, syncs, malformed bodies and API reads.
Terminated resources leave Waldur's listing `--forget-after` orders after they are done, and the mirror drops
them `--removed-retention` seconds later, as in the soak. No broker: deliveries go straight to
`Dispatcher.submit` (the transports are read, not driven, here).

At each checkpoint (a count of orders) it collects garbage and takes a tracemalloc snapshot; at the end it prints
the allocation sites that grew most between the first and last checkpoints, and the object counts by type that
grew. A structure that holds something per order shows up as growth proportional to the orders in between.
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import os
import random
import socket
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from cscs_storage_daemon import logs  # noqa: E402
from cscs_storage_daemon.config import load_config  # noqa: E402
from cscs_storage_daemon.daemon import build_core  # noqa: E402
from cscs_storage_daemon.health import HealthState  # noqa: E402
from cscs_storage_daemon.testing.fake_waldur import FakeWaldur  # noqa: E402
from cscs_storage_daemon.transports.base import Delivery  # noqa: E402
from tests.fixtures.inprocess_waldur import InProcessWaldur  # noqa: E402

STORAGE_COMPONENT = {"measured_unit": "TB", "accounting_type": "limit", "label": "Storage", "unit_factor": 1}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def type_counts() -> collections.Counter[str]:
    counts: collections.Counter[str] = collections.Counter()
    for obj in gc.get_objects():
        counts[type(obj).__qualname__] += 1
    return counts


class Probe:
    def __init__(self, args: argparse.Namespace, root: Path) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.fake = FakeWaldur(seed=args.seed).start()
        self.offerings = [self.fake.add_offering(slug=slug) for slug in ("capstor", "vast")]
        self.live: dict[str, list[str]] = {
            o.uuid: [
                self.fake.add_resource(o.uuid, slug=f"base-{o.slug}-{i:04d}", backend_id=f"base-{i:04d}")["uuid"]
                for i in range(args.resources)
            ]
            for o in self.offerings
        }
        self.recent_orders: collections.deque[tuple[str, str]] = collections.deque(maxlen=2000)
        self.terminated: collections.deque[tuple[int, str]] = collections.deque()
        self.serial = 0
        self.orders = 0
        self.counts: collections.Counter[str] = collections.Counter()
        config_path = root / "config.yaml"
        config_path.write_text(
            yaml.safe_dump(
                {
                    "offerings": [
                        {
                            "name": f"CSCS {o.slug}",
                            "waldur_api_url": self.fake.url,
                            "waldur_api_token": self.fake.token,
                            "waldur_offering_uuid": o.uuid,
                            "backend_type": "cscs-hpc-storage",
                            "backend_settings": {
                                "output_directory": str(root / "out" / o.slug),
                                "snapshot_retention": 5,
                            },
                            "backend_components": {"storage": dict(STORAGE_COMPONENT)},
                        }
                        for o in self.offerings
                    ],
                    "daemon": {
                        "event_mode": "unified",
                        "broker": {"protocol": "stomp", "host": "127.0.0.1", "port": 61613, "tls": False},
                        "state_directory": str(root / "state"),
                        "workers": 4,
                        "reconcile_interval": 3600,
                        "removed_retention": args.removed_retention,
                        "snapshot": {"quiet": 0.2, "max_wait": 1, "heartbeat": 3600},
                        "retry": {"attempts": 6, "max_wait": 0.2, "total": 30, "timeout": 5},
                        "http": {"enabled": True, "listen": f"127.0.0.1:{free_port()}", "auth": "none"},
                    },
                },
                sort_keys=False,
            )
        )
        self.log_file = open(os.devnull, "w")  # the log lines are rendered, then dropped
        logs.configure(level="info", fmt="json", stream=self.log_file)
        self.config = load_config(str(config_path))
        transport = None if args.loopback else InProcessWaldur(self.fake)
        self.core = build_core(self.config, http_transport=transport)
        self.core.fill()
        self.core.dispatcher.start()
        self.core.scheduler.start()
        self.core.reconciler.start()
        from cscs_storage_daemon.api.server import build_server

        self.health = HealthState(offerings=[o.slug for o in self.core.offerings], broker_required=False)
        self.core.scheduler.on_written = lambda offering, at: self.health.snapshot_written(offering.slug, at)
        for offering in self.core.offerings:
            self.health.snapshot_written(offering.slug)
        self.health.set_ready(True)
        self.server = build_server(self.core, self.health)
        self.server.start()
        self.api = httpx.Client(base_url=f"http://127.0.0.1:{self.server.port}", timeout=10)

    # -- load --------------------------------------------------------------------------------------------------

    def deliver(self, body: str | bytes) -> None:
        self.serial += 1
        self.core.dispatcher.submit(
            Delivery(
                transport="probe",
                destination="/amq/queue/probe",
                headers={"message-id": f"m-{self.serial}", "redelivered": "false"},
                body=body.encode() if isinstance(body, str) else body,
            )
        )

    def order_event(self, order_uuid: str, offering: str, state: str = "pending-provider") -> None:
        self.deliver(
            json.dumps(
                {"order_uuid": order_uuid, "order_state": state, "offering_uuid": offering, "object_type": "order"}
            )
        )

    def batch(self, size: int) -> None:
        """`size` new orders on distinct resources, plus the other traffic, then wait until all are handled."""
        done: list[tuple[str, str, str, str]] = []  # (order, type, offering, resource)
        for _ in range(size):
            offering = self.rng.choice(list(self.live))
            pool = self.live[offering]
            roll = self.rng.random()
            if len(pool) < self.args.resources or not pool:
                resource, order = self.fake.order_new_resource(
                    offering, slug=f"order-{self.orders:06d}", storage=10 + self.orders % 50
                )
                kind, resource_uuid = "Create", resource["uuid"]
            elif roll < 0.15:
                resource_uuid = pool.pop(0)
                order, kind = self.fake.create_order(resource_uuid, "Terminate"), "Terminate"
            else:
                resource_uuid = pool.pop(self.rng.randrange(len(pool)))
                limits = {"storage": self.rng.randint(11, 500)}
                order, kind = self.fake.create_order(resource_uuid, "Update", limits=limits), "Update"
            self.order_event(order["uuid"], offering)
            done.append((order["uuid"], kind, offering, resource_uuid))
            self.recent_orders.append((order["uuid"], offering))
            self.orders += 1
            self.counts[kind] += 1
            if self.rng.random() < 0.18:
                self.other_event()
        self.wait_idle()
        self.fake.clear_requests()
        for order_uuid, kind, offering, resource_uuid in done:
            state = self.fake.order_state(order_uuid)
            if state != "done":
                self.counts[f"not_done_{state}"] += 1
            if kind == "Terminate" and state == "done":
                self.terminated.append((self.orders, resource_uuid))
            else:
                self.live[offering].append(resource_uuid)
        while self.terminated and self.terminated[0][0] < self.orders - self.args.forget_after:
            _at, resource_uuid = self.terminated.popleft()
            self.fake.remove_resource(resource_uuid)

    def other_event(self) -> None:
        roll = self.rng.random()
        offering = self.rng.choice(self.offerings).uuid
        if roll < 0.55 and self.recent_orders:
            order_uuid, order_offering = self.rng.choice(self.recent_orders)
            self.order_event(order_uuid, order_offering, self.rng.choice(["pending-provider", "executing", "done"]))
            self.counts["redelivered"] += 1
        elif roll < 0.80:
            pool = self.live[offering]
            if pool:
                body = {"object_type": "resource", "resource_uuid": self.rng.choice(pool), "offering_uuid": offering}
                self.deliver(json.dumps(body))
                self.counts["resource_events"] += 1
        elif roll < 0.87:
            self.deliver(json.dumps({"object_type": "offering_resources_sync", "offering_uuid": offering}))
            self.counts["syncs"] += 1
        else:
            self.deliver(self.rng.choice([b"\xff\xfe not utf-8", b"{not json", b"[1, 2]", b'{"object_type": "x"}']))
            self.counts["malformed"] += 1
        if self.rng.random() < 0.3:
            slug = self.rng.choice(self.core.offerings).slug
            for path in ("/healthz", f"/api/storage-resources/?storage_system={slug}&page_size=50"):
                self.counts[f"api_{self.api.get(path).status_code}"] += 1

    def wait_idle(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while self.core.dispatcher.in_flight and time.monotonic() < deadline:
            time.sleep(0.002)

    def close(self) -> None:
        self.api.close()
        self.server.stop()
        self.core.reconciler.stop()
        self.core.scheduler.stop(flush=False)
        self.core.dispatcher.stop(5)
        self.core.close()
        self.fake.stop()
        self.log_file.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orders", type=int, default=40000)
    parser.add_argument("--checkpoints", default="10000,40000", help="order counts at which to snapshot the heap")
    parser.add_argument("--resources", type=int, default=150, help="live resources per offering")
    parser.add_argument("--batch", type=int, default=40, help="orders in flight at once")
    parser.add_argument("--forget-after", type=int, default=3000, help="orders until Waldur forgets a terminated one")
    parser.add_argument("--removed-retention", type=float, default=30.0, help="the mirror's removed_retention (s)")
    parser.add_argument("--frames", type=int, default=6, help="tracemalloc frames per allocation (0: no tracing)")
    parser.add_argument(
        "--trace-start",
        type=int,
        default=0,
        help="orders before tracing starts (tracing is ~20x slower; compare checkpoints after it, not before)",
    )
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--loopback", action="store_true", help="real HTTP to the fake Waldur (default: in-process)")
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args(argv)
    checkpoints = sorted(int(c) for c in args.checkpoints.split(","))
    root = args.workdir or Path(tempfile.mkdtemp(prefix="memprobe-"))
    root.mkdir(parents=True, exist_ok=True)
    probe = Probe(args, root)
    snapshots: list[tuple[int, tracemalloc.Snapshot | None, collections.Counter[str], float]] = []
    started = time.monotonic()
    try:
        for checkpoint in checkpoints:
            if args.frames and not tracemalloc.is_tracing() and args.trace_start <= checkpoint:
                while probe.orders < args.trace_start:
                    probe.batch(min(args.batch, args.trace_start - probe.orders))
                tracemalloc.start(args.frames)
                print(f"[{time.monotonic() - started:7.1f}s] tracing from {probe.orders} orders", flush=True)
            while probe.orders < min(checkpoint, args.orders):
                probe.batch(min(args.batch, checkpoint - probe.orders))
            gc.collect()
            snap = tracemalloc.take_snapshot() if tracemalloc.is_tracing() else None
            counts = type_counts()
            snapshots.append((probe.orders, snap, counts, rss_mb()))
            traced = tracemalloc.get_traced_memory()[0] / 2**20
            print(
                f"[{time.monotonic() - started:7.1f}s] {probe.orders} orders: RSS {rss_mb():.1f} MB, "
                f"traced {traced:.1f} MB, threads {threading.active_count()}, {dict(probe.counts)}",
                flush=True,
            )
    finally:
        probe.close()
    (n0, snap0, counts0, rss0), (n1, snap1, counts1, rss1) = snapshots[0], snapshots[-1]
    orders = max(1, n1 - n0)
    print(f"\nfrom {n0} to {n1} orders: RSS {rss0:.1f} -> {rss1:.1f} MB ({(rss1 - rss0) * 1024 / orders:.3f} kB/order)")
    if snap0 is not None and snap1 is not None:
        # Only what the daemon holds: not the fake Waldur's state, nor this driver's.
        ignore = [
            tracemalloc.Filter(False, tracemalloc.__file__),
            tracemalloc.Filter(False, "<frozen importlib*"),
            tracemalloc.Filter(False, "*/cscs_storage_daemon/testing/*", all_frames=True),
            tracemalloc.Filter(False, __file__, all_frames=True),
        ]
        stats = snap1.filter_traces(ignore).compare_to(snap0.filter_traces(ignore), "traceback")
        print(f"\ntop {args.top} allocation sites by growth:")
        for stat in stats[: args.top]:
            print(f"  {stat.size_diff / 1024:+9.1f} kB  {stat.count_diff:+7d} blocks  ({stat.size / 1024:.1f} kB now)")
            for line in stat.traceback.format()[-2 * args.frames :]:
                print(f"        {line}")
    grown = sorted(((counts1[t] - counts0[t], t) for t in counts1), reverse=True)[: args.top]
    print("\nobject counts by type that grew most:")
    for diff, name in grown:
        print(f"  {diff:+8d}  {name} ({counts1[name]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
