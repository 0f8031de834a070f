"""Event benchmark on the real RabbitMQ and the fake Waldur (issue 3, item 8). Not part of the test suite.

Runs the daemon as a real subprocess (`cscs-storage-daemon run`), publishes orders as Waldur does and prints:
1. event-to-file latency (p50 / p99 / max) at a steady rate (default 50 orders/s): from the publish call to the
   order file's mtime (the daemon writes, fsyncs and renames it; rename keeps the mtime);
2. the highest sustained order rate with nothing lost: stages of increasing offered rate, each checked for every
   order done with exactly one file, and the daemon's CPU-ms per order (from /proc/<pid>/stat);
3. the number of all.json writes caused by a burst of 10 000 resource events.

    uv run python bench/bench_events.py [--steady-seconds 20] [--rates 100,200,300,400,600]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import stomp
import yaml

from cscs_storage_daemon.testing.fake_waldur import FakeWaldur
from cscs_storage_daemon.testing.sample_data import populate

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


class Publisher:
    """A persistent STOMP 1.2 connection sending exactly Waldur's SEND frame (one connection per message is what
    Waldur does; at several hundred messages/s the benchmark's own connection set-up would dominate)."""

    def __init__(self, vhost: str, queue: str) -> None:
        self.queue = queue
        self.conn = stomp.Connection12([("127.0.0.1", 61613)], vhost=vhost, heartbeats=(0, 0))
        self.conn.connect("guest", "guest", wait=True)

    def send(self, body: str) -> None:
        self.conn.send(
            destination=f"/amq/queue/{self.queue}",
            body=body,
            headers={"persistent": "true", "durable": "true", "auto-delete": "false"},
            content_type="application/json",
        )

    def close(self) -> None:
        self.conn.disconnect()


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


def file_of(out: Path, order_uuid: str) -> list[Path]:
    return list(out.glob(f"*_{order_uuid}.json"))


def run_orders(
    fake: FakeWaldur, pub: Publisher, offering: Any, resources: list[str], out: Path, rate: float, count: int
) -> tuple[list[float], float, list[str]]:
    """Publish `count` Update orders at `rate`/s; return latencies (s), seconds until all done, order uuids."""
    orders: list[tuple[str, float]] = []
    interval = 1.0 / rate
    start = time.monotonic()
    for i in range(count):
        order = fake.create_order(resources[i % len(resources)], "Update", limits={"storage": 10 + i % 50})
        sent = time.time()
        pub.send(order_body(order["uuid"], offering.uuid))
        orders.append((order["uuid"], sent))
        delay = start + (i + 1) * interval - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    deadline = time.monotonic() + 120
    pending = {uuid for uuid, _ in orders}
    while pending and time.monotonic() < deadline:
        time.sleep(0.2)  # the fake Waldur shares this process: polling must not starve it
        pending = {uuid for uuid in pending if fake.order_state(uuid) != "done"}
    elapsed = time.monotonic() - start
    latencies = []
    for uuid, sent in orders:
        files = file_of(out, uuid)
        if len(files) == 1:
            latencies.append(files[0].stat().st_mtime - sent)
    return latencies, elapsed, [uuid for uuid, _ in orders] if not pending else sorted(pending)


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steady-rate", type=float, default=50)
    parser.add_argument("--steady-seconds", type=float, default=20)
    parser.add_argument("--rates", default="100,200,300,400,600")
    parser.add_argument("--stage-seconds", type=float, default=10)
    parser.add_argument("--burst", type=int, default=10_000)
    parser.add_argument("--resources", type=int, default=2000)
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-events-"))
    notify_path = tmp / "notify.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.settimeout(0.5)
    with FakeWaldur(provision_rabbitmq=True) as fake:
        population = populate(fake, ["capstor"], n=args.resources, seed=5)
        offering = population.offerings[0]
        resources = [r["uuid"] for r in population.resources]
        out = tmp / "out" / offering.slug
        config = {
            "offerings": [
                {
                    "name": "bench",
                    "waldur_api_url": fake.url,
                    "waldur_api_token": fake.token,
                    "waldur_offering_uuid": offering.uuid,
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
                "workers": 4,
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
        try:
            wait_ready(notify)
            consumer = fake.consumers()[0]
            pub = Publisher(consumer["vhost"], consumer["queue_name"])

            n = int(args.steady_rate * args.steady_seconds)
            latencies, _elapsed, _ = run_orders(fake, pub, offering, resources, out, args.steady_rate, n)
            print(
                f"steady {args.steady_rate:.0f} orders/s, {n} orders: event-to-file latency "
                f"p50 {pct(latencies, 50) * 1000:.1f} ms, p99 {pct(latencies, 99) * 1000:.1f} ms, "
                f"max {max(latencies) * 1000:.1f} ms ({len(latencies)}/{n} with exactly one file)"
            )

            best = 0.0
            for rate in [float(r) for r in args.rates.split(",")]:
                count = int(rate * args.stage_seconds)
                cpu0 = cpu_seconds(proc.pid)
                own0 = time.process_time()
                latencies, elapsed, _orders = run_orders(fake, pub, offering, resources, out, rate, count)
                cpu = cpu_seconds(proc.pid) - cpu0
                own = time.process_time() - own0
                lost = count - len(latencies)
                achieved = count / elapsed
                print(
                    f"offered {rate:.0f}/s: {count} orders done in {elapsed:.1f} s = {achieved:.0f} orders/s, "
                    f"lost/duplicated {lost}, p99 {pct(latencies, 99) * 1000:.0f} ms, "
                    f"daemon CPU {cpu * 1000 / count:.2f} ms/order, fake Waldur + publisher CPU "
                    f"{own * 1000 / count:.2f} ms/order"
                )
                if lost == 0 and achieved >= 0.9 * rate:
                    best = max(best, achieved)
            print(f"highest sustained rate with nothing lost: {best:.0f} orders/s")
            pub.close()

            if args.burst <= 0:
                return 0
            # Burst: change every resource in Waldur, then 10 000 resource events.
            for uuid in resources:
                fake.update_resource(uuid, limits={"storage": 77})
            before = log_path.read_text().count('"snapshot.written"')
            pub = Publisher(consumer["vhost"], consumer["queue_name"])
            start = time.monotonic()
            for i in range(args.burst):
                uuid = resources[i % len(resources)]
                pub.send(json.dumps({"resource_uuid": uuid, "offering_uuid": offering.uuid, "object_type": "resource"}))
            pub.close()
            done = threading.Event()

            def settled() -> bool:
                text = log_path.read_text()
                return text.count('"resource.updated"') >= args.burst

            deadline = time.monotonic() + 300
            while not settled() and time.monotonic() < deadline:
                time.sleep(0.5)
            handled = time.monotonic() - start
            time.sleep(35)  # past max_wait: every write the burst causes has happened
            done.set()
            writes = log_path.read_text().count('"snapshot.written"') - before
            print(
                f"burst of {args.burst} resource events handled in {handled:.1f} s "
                f"({args.burst / handled:.0f} events/s); all.json writes caused: {writes}"
            )
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
            print(f"daemon exit code {proc.returncode}; log {log_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
