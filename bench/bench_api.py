"""Benchmark: the HTTP API over a mirror of N resources (default 100 000), on loopback.

    uv run python bench/bench_api.py [-n 100000] [--requests 2000] [--clients 8] [--per-client 400]

The server runs in a child process (as it would for real clients: no GIL shared with the load generator); the
clients are threads of this process, each with its own keep-alive `httpx.Client`. The request mix is seeded and
bounded in count and time: unfiltered pages, pages filtered by data type, by state and status, by all three, page
sizes 100 (and some 500), a few pages past the end. Goal: p99 < 10 ms for one client at page_size 100.

Also timed in-process (no HTTP): what the first request after a mirror change pays (a new view, one filter
index, one page rendered).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from cscs_storage_daemon.mirror import OfferingMirror  # noqa: E402

DATA_TYPES = ("store", "scratch", "users", "archive")
STATES = ("OK", "Creating", "Updating", "Terminating", "Terminated", "Erred")
STATUSES = ("active", "pending", "removing", "removed", "error")
TIME_LIMIT = 120.0  # seconds per phase, whatever the counts


def build_mirror(n: int, slug: str = "capstor") -> OfferingMirror:
    from cscs_storage_daemon.mapping import MappingSettings
    from cscs_storage_daemon.testing.sample_data import generate_resources, offering_for

    mirror = OfferingMirror(slug, MappingSettings())
    mirror.replace_all(generate_resources(n, offering=offering_for(slug)))
    return mirror


# ------------------------------------------------------------------------------------------------------ server


def serve(n: int) -> None:
    """Child process: build the mirror, serve it on 127.0.0.1:0, print the port, run until stdin closes."""
    from cscs_storage_daemon.api import ApiServer, OfferingInfo, create_app
    from cscs_storage_daemon.health import HealthState
    from cscs_storage_daemon.logs import configure
    from cscs_storage_daemon.metrics import Metrics

    configure(level="warning", fmt="json", stream=sys.stderr)
    t0 = time.perf_counter()
    mirror = build_mirror(n)
    built = time.perf_counter() - t0
    health = HealthState(offerings=["capstor"], broker_required=False)
    health.snapshot_written("capstor")
    health.set_ready(True)
    app = create_app(
        offerings=[("capstor", mirror, OfferingInfo(uuid="0" * 32, api_url="https://waldur.example.org/api/"))],
        health=health,
        metrics=Metrics(),
    )
    server = ApiServer(app, "127.0.0.1:0")
    server.start()
    print(json.dumps({"port": server.port, "mirror_seconds": round(built, 2), "resources": len(mirror)}), flush=True)
    sys.stdin.read()  # the parent closes our stdin to stop us
    server.stop(timeout=5.0)


# ------------------------------------------------------------------------------------------------------ clients


def request_mix(rng: random.Random, total: int) -> list[dict[str, Any]]:
    """Seeded query parameters; page numbers stay mostly within the filtered set (estimated from the sample's
    weights), a few go past the end."""
    out: list[dict[str, Any]] = []
    for _ in range(total):
        kind = rng.random()
        params: dict[str, Any] = {"storage_system": "capstor"}
        size = 500 if rng.random() < 0.05 else 100
        if kind < 0.35:
            pages = max(1, total_for(None) // size)
        elif kind < 0.6:
            params["data_type"] = rng.choice(DATA_TYPES)
            pages = max(1, total_for("data_type") // size)
        elif kind < 0.8:
            params["state"] = "OK"
            params["status"] = "active"
            pages = max(1, total_for("state") // size)
        elif kind < 0.95:
            params["data_type"] = rng.choice(DATA_TYPES)
            params["state"] = rng.choice(STATES)
            params["status"] = rng.choice(STATUSES)
            pages = 3
        else:
            pages = 10**6  # past the end
        params["page"] = rng.randint(1, pages) if pages < 10**6 else pages
        params["page_size"] = size
        out.append(params)
    return out


_N = 100_000


def total_for(kind: str | None) -> int:
    if kind is None:
        return _N
    if kind == "data_type":
        return _N // 6
    return int(_N * 0.8)


def run_client(url: str, requests: list[dict[str, Any]], deadline: float) -> tuple[list[float], int, int]:
    """Latencies (seconds) of the requests sent before `deadline`, bytes received, non-200 answers."""
    latencies: list[float] = []
    received = 0
    errors = 0
    with httpx.Client(base_url=url, timeout=30.0) as client:
        for params in requests:
            if time.monotonic() > deadline:
                break
            t0 = time.perf_counter()
            response = client.get("/api/storage-resources/", params=params)
            body = response.content
            latencies.append(time.perf_counter() - t0)
            received += len(body)
            if response.status_code != 200:
                errors += 1
    return latencies, received, errors


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[index]


def phase(name: str, url: str, clients: int, per_client: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    plans = [request_mix(rng, per_client) for _ in range(clients)]
    results: list[tuple[list[float], int, int]] = [([], 0, 0)] * clients
    deadline = time.monotonic() + TIME_LIMIT

    def work(index: int) -> Callable[[], None]:
        def run() -> None:
            results[index] = run_client(url, plans[index], deadline)

        return run

    threads = [threading.Thread(target=work(i), name=f"client-{i}") for i in range(clients)]
    t0 = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - t0
    latencies = [value for result in results for value in result[0]]
    received = sum(result[1] for result in results)
    errors = sum(result[2] for result in results)
    row = {
        "phase": name,
        "clients": clients,
        "requests": len(latencies),
        "errors": errors,
        "p50_ms": round(percentile(latencies, 50) * 1000, 2),
        "p99_ms": round(percentile(latencies, 99) * 1000, 2),
        "max_ms": round(max(latencies) * 1000, 2) if latencies else None,
        "req_per_s": round(len(latencies) / elapsed, 1),
        "MB_per_s": round(received / elapsed / 1e6, 1),
    }
    print(json.dumps(row), flush=True)
    return row


# ------------------------------------------------------------------------------------------------ in-process


def time_rebuild(n: int) -> None:
    """What the first request after a mirror change pays, without HTTP: new view + one index + one page."""
    from cscs_storage_daemon.api.query import Filters, MirrorViews
    from cscs_storage_daemon.testing.sample_data import Project, make_resource, offering_for

    mirror = build_mirror(n)
    views = MirrorViews(mirror)
    view = views.current()
    view.storage_json(view.page(Filters(data_type="store"), 1, 100))  # warm: the previous version was served
    project = Project("a" * 32, "proj", "Project", "b" * 32, "cust", "Customer")
    samples, sort = [], []
    for i in range(5):
        resource = make_resource(offering_for("capstor"), project, uuid=f"{i:032x}", slug=f"bench-{i}")
        mirror.apply(resource)
        t0 = time.perf_counter()
        mirror.entries()  # the mirror re-sorts its entries after a change (its cost, paid by the next reader)
        t1 = time.perf_counter()
        view = views.current()
        page = view.page(Filters(data_type="store", state="OK"), 1, 100)
        view.storage_json(page)
        t2 = time.perf_counter()
        sort.append(t1 - t0)
        samples.append(t2 - t1)
    print(
        json.dumps(
            {
                "phase": "first request after a mirror change (in-process)",
                "resources": n,
                "mirror_resort_ms": round(sorted(sort)[len(sort) // 2] * 1000, 1),
                "view_index_page_ms": round(sorted(samples)[len(samples) // 2] * 1000, 1),
                "view_index_page_max_ms": round(max(samples) * 1000, 1),
            }
        ),
        flush=True,
    )


def main() -> int:
    global _N
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=100_000, help="resources in the mirror")
    parser.add_argument("--requests", type=int, default=2000, help="requests of the one-client phase")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--per-client", type=int, default=400, help="requests per client, concurrent phase")
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--no-rebuild", action="store_true", help="skip the in-process rebuild timing")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    _N = args.n
    if args.serve:
        serve(args.n)
        return 0

    child = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--serve", "-n", str(args.n)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        if not line:
            print("server did not start", file=sys.stderr)
            return 1
        info = json.loads(line)
        print(json.dumps({"server": info}), flush=True)
        url = f"http://127.0.0.1:{info['port']}"
        phase("warm-up (1 client, not a result)", url, 1, args.warmup, seed=1)
        phase("1 client", url, 1, args.requests, seed=2)
        phase(f"{args.clients} clients", url, args.clients, args.per_client, seed=3)
        phase("1 client again", url, 1, args.requests // 2, seed=4)
    finally:
        if child.stdin is not None:
            child.stdin.close()
        try:
            child.wait(timeout=15)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
    if not args.no_rebuild:
        time_rebuild(args.n)
    return 0


if __name__ == "__main__":
    sys.exit(main())
