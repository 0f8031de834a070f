"""Event benchmark on the real RabbitMQ and the fake Waldur (issue 3, item 8). Not part of the test suite.

Runs the daemon as a real subprocess (`cscs-storage-daemon run`), the fake Waldur in a subprocess of its own (its CPU
and its GIL apart from everything else) and publisher processes that send every message as Waldur does: one fresh
STOMP connection per message to ``/amq/queue/<name>`` with Waldur's headers (`publish_stomp_like_waldur`, the same
code the tests use); each publisher process runs a pool of threads, since one such publish takes ~50 ms of wall time
(most of it waiting for the DISCONNECT receipt) for ~1.3 ms of CPU. It prints:

1. event-to-file latency (p50 / p99 / max) at a steady rate (default 50 orders/s): from the publish call (its
   CONNECT round trip included) to the order file's mtime (the daemon writes, fsyncs and renames it; rename keeps
   the mtime);
2. the highest sustained order rate with nothing lost: stages of increasing offered rate, each checked for every
   order done with exactly one file. Per stage, the CPU used (``/proc/<pid>/stat``) by the daemon, RabbitMQ (every
   ``beam.smp``), the fake Waldur and the publishers, as % of one core; the whole machine's utilisation
   (``/proc/stat``, 100 % per core) and what the named parties do not explain ("other": the kernel's share of
   loopback networking, Mosquitto, anything else running); the fake Waldur's request rate; the daemon's CPU-ms per
   order. Stages stop at the first one not sustained. For that (top) stage: which party saturates first (the whole
   machine at ≥ 90 % of every core, or a single-GIL Python process, the daemon or the fake Waldur, at ≥ 90 % of one
   core) and the CPU budget: the four parties' CPU-ms per order, hence the most orders/s the cores could carry with
   nothing else running, and the most the daemon's one GIL could;
3. the number of all.json writes caused by a burst of 10 000 resource events (published the same way).

    uv run python bench/bench_events.py [--steady-seconds 20] [--rates 100,150,200,250,300,400] [--publishers 2]
        [--workers 4] [--burst 10000]

Figures on the 2-core development machine (shared with other test runs: "other") are in docs/reliability.md
("Event benchmark").
"""

from __future__ import annotations

import argparse
import fcntl
import json
import math
import multiprocessing
import os
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import yaml

from cscs_storage_daemon.testing.fake_waldur import FakeWaldur
from cscs_storage_daemon.testing.publishers import publish_stomp_like_waldur
from cscs_storage_daemon.testing.sample_data import populate

CLK_TCK = os.sysconf("SC_CLK_TCK")
NCPU = os.cpu_count() or 1
#: The test suite's machine-wide broker lock (tests/fixtures/daemon_process.py): held shared for the whole run, so a
#: test elsewhere on this machine does not `rabbitmqctl stop_app` the broker in the middle of a stage.
BROKER_LOCK = Path(tempfile.gettempdir()) / "cscs-storage-daemon-tests-broker.lock"
PUBLISH_SECONDS = 0.1  # wall time budgeted per Waldur-like publish when sizing the publisher thread pools


# -- CPU accounting -------------------------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process (all its threads), 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def beam_pids() -> list[int]:
    """RabbitMQ's Erlang VM(s)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == "beam.smp":
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs from /proc/stat (idle and iowait are not busy)."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    total = sum(values[:8])  # user nice system idle iowait irq softirq steal (guest is inside user)
    return total - values[3] - values[4], total


class CpuMeter:
    """CPU used by named groups of processes and by the whole machine between `start` and `stop`."""

    def __init__(self, parties: dict[str, Callable[[], Sequence[int]]]) -> None:
        self.parties = parties
        self._before: dict[str, dict[int, float]] = {}
        self._machine: tuple[int, int] = (0, 0)
        self._t0 = 0.0
        self.seconds: dict[str, float] = {}
        self.wall = 0.0
        self.machine_percent = 0.0

    def start(self) -> None:
        self._t0 = time.monotonic()
        self._machine = machine_ticks()
        self._before = {name: {pid: cpu_seconds(pid) for pid in pids()} for name, pids in self.parties.items()}

    def stop(self) -> None:
        self.wall = time.monotonic() - self._t0
        busy, total = machine_ticks()
        self.machine_percent = 100.0 * NCPU * (busy - self._machine[0]) / max(1, total - self._machine[1])
        self.seconds = {
            name: sum(cpu_seconds(pid) - self._before[name].get(pid, 0.0) for pid in pids())
            for name, pids in self.parties.items()
        }

    def percent(self, name: str) -> float:
        return 100.0 * self.seconds[name] / self.wall

    @property
    def other_percent(self) -> float:
        return self.machine_percent - sum(self.percent(name) for name in self.seconds)


# -- the fake Waldur, in its own process ----------------------------------------------------------------------------


def fake_main(conn: Connection, resources: int) -> None:
    """Serve the fake Waldur and answer the benchmark's commands on `conn` until "stop"."""
    with FakeWaldur(provision_rabbitmq=True) as fake:
        population = populate(fake, ["capstor"], n=resources, seed=5)
        offering = population.offerings[0]
        conn.send(
            {
                "url": fake.url,
                "token": fake.token,
                "offering_uuid": offering.uuid,
                "offering_slug": offering.slug,
                "resources": [r["uuid"] for r in population.resources],
            }
        )
        while True:
            command, *args = conn.recv()
            if command == "stop":
                conn.send(None)
                return
            if command == "orders":  # [(resource uuid, storage)] -> order uuids (pending-provider Updates)
                conn.send([fake.create_order(r, "Update", limits={"storage": s})["uuid"] for r, s in args[0]])
            elif command == "pending":  # order uuids -> those not done yet
                conn.send([u for u in args[0] if fake.order_state(u) != "done"])
            elif command == "update_resources":
                for uuid in args[0]:
                    fake.update_resource(uuid, limits=args[1])
                conn.send(None)
            elif command == "consumer":
                conn.send(fake.consumers()[0])
            elif command == "requests":
                conn.send(len(fake.requests))
            else:
                conn.send(RuntimeError(f"unknown command {command!r}"))


class FakeProcess:
    def __init__(self, ctx: Any, resources: int) -> None:
        self._conn, child = ctx.Pipe()
        self.process = ctx.Process(target=fake_main, args=(child, resources), name="fake-waldur", daemon=True)
        self.process.start()
        self.info: dict[str, Any] = self._conn.recv()
        self._lock = threading.Lock()

    def call(self, *command: Any) -> Any:
        with self._lock:
            self._conn.send(command)
            answer = self._conn.recv()
        if isinstance(answer, Exception):
            raise answer
        return answer

    def stop(self) -> None:
        self.call("stop")
        self.process.join(30)


# -- the publishers: Waldur-like publishes from processes running thread pools ----------------------------------------


@dataclass(frozen=True)
class Job:
    key: str  # what the answer is keyed by (the order uuid)
    due: float  # seconds after the stage's start
    body: str


def publish_jobs(vhost: str, queue_name: str, start_at: float, threads: int, jobs: list[Job]) -> tuple[Any, ...]:
    """Publish each job at its due time from a pool of `threads`; returns ([(key, sent wall time or None on
    failure)], how many failed, a few of the errors)."""
    todo: queue.Queue[tuple[int, Job] | None] = queue.Queue()
    for item in enumerate(jobs):
        todo.put(item)
    sent: list[tuple[str, float | None]] = [(job.key, None) for job in jobs]
    errors: list[str] = []

    def work() -> None:
        while (item := todo.get()) is not None:
            index, job = item
            delay = start_at + job.due - time.time()
            if delay > 0:
                time.sleep(delay)
            at = time.time()
            try:
                publish_stomp_like_waldur("127.0.0.1", 61613, vhost, "guest", "guest", queue_name, job.body)
            except Exception as exc:  # counted as lost; the first few are shown
                errors.append(repr(exc)[:200])
                continue
            sent[index] = (job.key, at)

    pool = [threading.Thread(target=work, daemon=True) for _ in range(threads)]
    for thread in pool:
        todo.put(None)
        thread.start()
    for thread in pool:
        thread.join()
    return sent, len(errors), errors[:3]


def publisher_main(conn: Connection, vhost: str, queue_name: str) -> None:
    """Per stage: receive (start time, threads, jobs), publish them, send back what `publish_jobs` returns."""
    while (message := conn.recv()) is not None:
        conn.send(publish_jobs(vhost, queue_name, *message))


class Publishers:
    def __init__(self, ctx: Any, count: int, vhost: str, queue_name: str) -> None:
        self.conns: list[Connection] = []
        self.processes = []
        for index in range(count):
            parent, child = ctx.Pipe()
            process = ctx.Process(
                target=publisher_main, args=(child, vhost, queue_name), name=f"publisher-{index}", daemon=True
            )
            process.start()
            self.conns.append(parent)
            self.processes.append(process)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes if p.pid is not None]

    def start(self, jobs: list[Job], rate: float, lead: float = 0.5) -> float:
        """Hand out the jobs round-robin; publishing starts `lead` seconds from now. Returns the start time."""
        start_at = time.time() + lead
        share = len(self.conns)
        threads = max(2, math.ceil(rate * PUBLISH_SECONDS / share) + 2)
        for index, conn in enumerate(self.conns):
            conn.send((start_at, threads, jobs[index::share]))
        return start_at

    def collect(self) -> tuple[dict[str, float | None], int, list[str]]:
        """{key: sent wall time, None when the publish failed}, how many failed, a few of their errors."""
        sent: dict[str, float | None] = {}
        failed = 0
        examples: list[str] = []
        for conn in self.conns:
            part, part_failed, part_examples = conn.recv()
            sent.update(part)
            failed += part_failed
            examples.extend(part_examples)
        return sent, failed, examples[:3]

    def close(self) -> None:
        for conn in self.conns:
            conn.send(None)
        for process in self.processes:
            process.join(10)


# -- stages ---------------------------------------------------------------------------------------------------------


def wait_ready(sock: socket.socket, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if b"READY=1" in sock.recv(4096):
                return
        except TimeoutError:
            continue
    raise SystemExit("daemon did not become ready")


def order_body(order_uuid: str, offering_uuid: str) -> str:
    return json.dumps(
        {
            "order_uuid": order_uuid,
            "order_state": "pending-provider",
            "offering_uuid": offering_uuid,
            "object_type": "order",
        }
    )


@dataclass
class Stage:
    count: int
    elapsed: float  # from the first scheduled publish until every order is done (or the deadline)
    latencies: list[float]  # of the orders done with exactly one file
    publish_errors: list[str]
    published: float  # orders/s the publishers managed: count / (last publish - first publish)

    @property
    def lost(self) -> int:
        return self.count - len(self.latencies)


def run_orders(fake: FakeProcess, pubs: Publishers, out: Path, rate: float, count: int, first: int) -> Stage:
    """Publish `count` Update orders at `rate`/s (created in the fake Waldur beforehand, pending-provider)."""
    resources = fake.info["resources"]
    wanted = [(resources[(first + i) % len(resources)], 10 + (first + i) % 50) for i in range(count)]
    uuids: list[str] = fake.call("orders", wanted)
    jobs = [Job(uuid, i / rate, order_body(uuid, fake.info["offering_uuid"])) for i, uuid in enumerate(uuids)]
    start_at = pubs.start(jobs, rate)
    time.sleep(max(0.0, start_at - time.time()))
    start = time.monotonic()
    deadline = start + count / rate + 120
    pending = list(uuids)
    while pending and time.monotonic() < deadline:
        time.sleep(0.1)
        pending = fake.call("pending", pending)
    elapsed = time.monotonic() - start
    sent, _failed, errors = pubs.collect()
    files: dict[str, list[Path]] = {}
    for path in out.glob("*.json"):
        files.setdefault(path.stem.rsplit("_", 1)[-1], []).append(path)
    latencies = []
    for uuid in uuids:
        at = sent.get(uuid)
        found = files.get(uuid, [])
        if at is not None and len(found) == 1 and uuid not in pending:
            latencies.append(found[0].stat().st_mtime - at)
    times = [at for at in sent.values() if at is not None]
    published = len(times) / (max(times) - min(times)) if len(times) > 1 and max(times) > min(times) else math.nan
    return Stage(count, elapsed, latencies, errors, published)


def pct(values: list[float], p: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def saturation(meter: CpuMeter, gil_bound: Sequence[str]) -> str:
    if meter.machine_percent >= 0.9 * 100 * NCPU:
        return f"the whole machine ({meter.machine_percent:.0f} % of {100 * NCPU} %)"
    hot = [name for name in gil_bound if meter.percent(name) >= 90]
    if hot:
        return ", ".join(f"{name} ({meter.percent(name):.0f} % of one core, one GIL)" for name in hot)
    return (
        f"nothing CPU-bound (machine {meter.machine_percent:.0f} % of {100 * NCPU} %): the daemon's workers, each "
        "waiting on Waldur's answers and fsyncs, are then the likely limit (try --workers)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steady-rate", type=float, default=50)
    parser.add_argument("--steady-seconds", type=float, default=20)
    parser.add_argument("--rates", default="100,150,200,250,300,400")
    parser.add_argument("--stage-seconds", type=float, default=10)
    parser.add_argument("--burst", type=int, default=10_000)
    parser.add_argument("--resources", type=int, default=2000)
    parser.add_argument("--publishers", type=int, default=2, help="publisher processes (each a thread pool)")
    parser.add_argument("--workers", type=int, default=4, help="the daemon's `daemon.workers`")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a SIGTERM still stops the daemon and the fake
    lock = os.open(BROKER_LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    fcntl.flock(lock, fcntl.LOCK_SH)

    ctx = multiprocessing.get_context("spawn")
    tmp = Path(tempfile.mkdtemp(prefix="bench-events-"))
    notify_path = tmp / "notify.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.settimeout(0.5)
    fake = FakeProcess(ctx, args.resources)
    out = tmp / "out" / fake.info["offering_slug"]
    config = {
        "offerings": [
            {
                "name": "bench",
                "waldur_api_url": fake.info["url"],
                "waldur_api_token": fake.info["token"],
                "waldur_offering_uuid": fake.info["offering_uuid"],
                "backend_type": "cscs-hpc-storage",
                "backend_settings": {"output_directory": str(out)},
                "backend_components": {
                    "storage": {"measured_unit": "TB", "accounting_type": "limit", "label": "Storage"}
                },
            }
        ],
        "daemon": {
            "broker": {"protocol": "stomp", "host": "127.0.0.1", "port": 61613, "tls": False, "prefetch": 50},
            "state_directory": str(tmp / "state"),
            "workers": args.workers,
            "reconcile_interval": 3600,  # no pass picks up the orders created ahead of a stage
            "http": {"enabled": False},
            "log": {"format": "json", "level": "info"},
        },
    }
    config_path = tmp / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    log_path = tmp / "daemon.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cscs_storage_daemon.cli", "run", "-c", str(config_path)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=os.environ | {"NOTIFY_SOCKET": str(notify_path)},
        )
    pubs: Publishers | None = None
    try:
        wait_ready(notify)
        consumer = fake.call("consumer")
        pubs = Publishers(ctx, args.publishers, consumer["vhost"], consumer["queue_name"])
        first = 0

        publisher_pids = pubs.pids
        meter = CpuMeter(
            {
                "daemon": lambda: [proc.pid],
                "RabbitMQ": beam_pids,
                "fake Waldur": lambda: [fake.process.pid],
                "publishers": lambda: publisher_pids,
                "bench": lambda: [os.getpid()],
            }
        )

        n = int(args.steady_rate * args.steady_seconds)
        meter.start()
        stage = run_orders(fake, pubs, out, args.steady_rate, n, first)
        meter.stop()
        first += n
        print(
            f"steady {args.steady_rate:.0f} orders/s, {n} orders: event-to-file latency "
            f"p50 {pct(stage.latencies, 50) * 1000:.1f} ms, p99 {pct(stage.latencies, 99) * 1000:.1f} ms, "
            f"max {max(stage.latencies, default=math.nan) * 1000:.1f} ms "
            f"({len(stage.latencies)}/{n} done with exactly one file); machine {meter.machine_percent:.0f} % "
            f"of {100 * NCPU} %, other load {meter.other_percent:.0f} %",
            flush=True,
        )
        meter = CpuMeter(meter.parties)
        best = 0.0
        top: tuple[float, CpuMeter, int] | None = None
        for rate in [float(r) for r in args.rates.split(",")]:
            count = int(rate * args.stage_seconds)
            requests0 = fake.call("requests")
            meter.start()
            stage = run_orders(fake, pubs, out, rate, count, first)
            meter.stop()
            first += count
            requests = fake.call("requests") - requests0
            achieved = count / stage.elapsed
            sustained = stage.lost == 0 and achieved >= 0.9 * rate
            parties = ", ".join(f"{name} {meter.percent(name):.0f} %" for name in meter.seconds)
            print(
                f"offered {rate:.0f}/s (published at {stage.published:.0f}/s): {count} orders done in "
                f"{stage.elapsed:.1f} s = {achieved:.0f} orders/s, "
                f"lost/duplicated {stage.lost}, p50 {pct(stage.latencies, 50) * 1000:.0f} ms, "
                f"p99 {pct(stage.latencies, 99) * 1000:.0f} ms"
                + (f", publish errors e.g. {stage.publish_errors}" if stage.publish_errors else "")
                + f"\n    CPU (% of one core): {parties}, other {meter.other_percent:.0f} %; "
                f"machine {meter.machine_percent:.0f} % of {100 * NCPU} %"
                f"\n    fake Waldur {requests / stage.elapsed:.0f} requests/s ({requests / count:.1f} per order); "
                f"daemon {meter.seconds['daemon'] * 1000 / count:.2f} CPU-ms/order, RabbitMQ "
                f"{meter.seconds['RabbitMQ'] * 1000 / count:.2f}, fake Waldur "
                f"{meter.seconds['fake Waldur'] * 1000 / count:.2f}, publishers "
                f"{meter.seconds['publishers'] * 1000 / count:.2f}",
                flush=True,
            )
            if sustained:
                best = max(best, achieved)
            top = (rate, meter, count)
            meter = CpuMeter(meter.parties)
            if not sustained:
                break
        print(f"highest sustained rate with nothing lost: {best:.0f} orders/s")
        if top is not None:
            top_rate, top_meter, top_count = top
            print(f"saturated first at offered {top_rate:.0f}/s: {saturation(top_meter, ['daemon', 'fake Waldur'])}")
            per_order = {
                name: top_meter.seconds[name] * 1000 / top_count
                for name in ("daemon", "RabbitMQ", "fake Waldur", "publishers")
            }
            total = sum(per_order.values())
            other = top_meter.other_percent
            print(
                f"CPU budget at that stage: {total:.1f} CPU-ms per order for the four parties "
                f"({', '.join(f'{k} {v:.2f}' for k, v in per_order.items())}): at most {1000 * NCPU / total:.0f} "
                f"orders/s on {NCPU} cores with nothing else running; the daemon alone (one GIL) at most "
                f"{1000 / per_order['daemon']:.0f}/s"
                + (f"; other load took {other:.0f} % meanwhile" if other > 20 else "")
            )

        if args.burst <= 0:
            return 0
        # Burst: change every resource in Waldur, then 10 000 resource events.
        resources = fake.info["resources"]
        fake.call("update_resources", resources, {"storage": 77})
        before = log_path.read_text().count('"snapshot.written"')
        offering_uuid = fake.info["offering_uuid"]
        jobs = [
            Job(
                str(i),
                0.0,
                json.dumps(
                    {"resource_uuid": resources[i % len(resources)], "offering_uuid": offering_uuid}
                    | {"object_type": "resource"}
                ),
            )
            for i in range(args.burst)
        ]
        start_at = pubs.start(jobs, rate=1000)
        time.sleep(max(0.0, start_at - time.time()))
        start = time.monotonic()
        sent, failed, _examples = pubs.collect()
        published = time.monotonic() - start

        def settled() -> bool:
            return log_path.read_text().count('"resource.updated"') >= sum(1 for at in sent.values() if at)

        deadline = time.monotonic() + 300
        while not settled() and time.monotonic() < deadline:
            time.sleep(0.5)
        handled = time.monotonic() - start
        time.sleep(35)  # past max_wait: every write the burst causes has happened
        writes = log_path.read_text().count('"snapshot.written"') - before
        print(
            f"burst of {args.burst} resource events (published in {published:.1f} s, "
            f"{failed} publish errors) handled in {handled:.1f} s "
            f"({args.burst / handled:.0f} events/s); all.json writes caused: {writes}"
        )
    finally:
        if pubs is not None:
            pubs.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        fake.stop()
        print(f"daemon exit code {proc.returncode}; log {log_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
