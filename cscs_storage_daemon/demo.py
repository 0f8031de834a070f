"""`demo`: the daemon at work, on a machine with nothing installed — no broker, no Waldur.

It replays `examples/demo-capture.jsonl`, a capture of a live run (the project's fake Waldur and a real RabbitMQ,
made by `examples/make_demo_capture.py`): orders created, updated and terminated on capstor, vast and iopsstor,
resource changes, an invalid resource and a malformed message. The replay runs the daemon's own code on the
recorded events and Waldur answers and writes what the live run wrote into `./demo-output/<system>/`; the demo then
prints what it wrote, and with `--serve` serves the HTTP API over the result until Ctrl-C.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from cscs_storage_daemon import logs
from cscs_storage_daemon.replay import Replayer, ReplayError

CAPTURE_ENV = "CSCS_DEMO_CAPTURE"
CAPTURE_NAME = "demo-capture.jsonl"


def demo_capture() -> Path:
    """The bundled capture: `$CSCS_DEMO_CAPTURE`, else `examples/demo-capture.jsonl` next to the package."""
    override = os.environ.get(CAPTURE_ENV)
    if override:
        return Path(override)
    return Path(__file__).resolve().parent.parent / "examples" / CAPTURE_NAME


def _describe(path: Path) -> str:
    """One line about a file the replay wrote: what kind, for which resource."""
    try:
        document = json.loads(path.read_bytes())
        resources = document["result"]["storageResources"]
    except (OSError, ValueError, KeyError, TypeError):
        return ""
    if path.name.endswith("-all.json"):
        removed = sum(1 for r in resources if r.get("status") == "removed")
        extra = f", {removed} removed" if removed else ""
        return f"all.json: {len(resources)} storage resources{extra}"
    if not resources:
        return ""
    resource = resources[0]
    quota = next((q.get("quota") for q in resource.get("quotas") or [] if q.get("type") == "space"), None)
    mount = (resource.get("mountPoint") or {}).get("default", "")
    size = f", {quota:g} TB" if isinstance(quota, int | float) else ""
    return f"{path.name.split('-')[5].split('_')[0]} order: {mount}{size} ({resource.get('status')})"


def run_demo(
    *,
    output_dir: str = "demo-output",
    serve: bool = False,
    listen: str = "127.0.0.1:8080",
    out: TextIO | None = None,
    stop: threading.Event | None = None,
    on_ready: Callable[[str], None] | None = None,
) -> int:
    """Replay the demo capture into `output_dir` and print what was written; with `serve`, serve the HTTP API on
    `listen` until Ctrl-C (or until `stop` is set; `on_ready` gets the server's URL)."""
    out = out or sys.stdout
    capture = demo_capture()
    target = Path(output_dir).resolve()
    if not capture.is_file():
        print(f"demo: the demo capture {capture} is missing (set {CAPTURE_ENV} to another capture)", file=sys.stderr)
        return 1
    replayer = Replayer(capture, target)
    try:
        # The replay repeats the live run's log lines (an invalid resource, a dead letter...); the summary below
        # says the same in plain words.
        logs.configure(level="critical", fmt="auto", stream=sys.stderr)
        try:
            summary = replayer.run()
        except ReplayError as exc:
            print(f"demo: {exc}", file=sys.stderr)
            return 1
        finally:
            logs.configure(level="warning", fmt="auto", stream=sys.stderr)
        print(
            f"Demo: replayed a recorded live run ({summary.event_count} events, {summary.exchanges} Waldur answers) "
            "through the daemon's own code — no broker, no Waldur needed.",
            file=out,
        )
        print(f"Wrote into {target}:", file=out)
        for slug in sorted({name.split("/", 1)[0] for name in summary.order_files + summary.snapshot_files}):
            print(f"  {slug}/", file=out)
            for name in sorted(p.name for p in (target / slug).iterdir() if not p.name.startswith(".")):
                print(f"    {name}  {_describe(target / slug / name)}", file=out)
        print(
            f"Also: {summary.orders.get('erred', 0)} order erred (invalid resource, no file), "
            f"{summary.dead_letters} malformed message dead-lettered "
            f"(see {target / '.replay-state' / 'dead-letter.jsonl'}).",
            file=out,
        )
        print("Replay any capture yourself: cscs-storage-daemon replay CAPTURE --output-dir DIR", file=out)
        if serve:
            return _serve(replayer, listen, out, stop=stop, on_ready=on_ready)
        return 0
    finally:
        replayer.close()


def _serve(
    replayer: Replayer,
    listen: str,
    out: TextIO,
    *,
    stop: threading.Event | None = None,
    on_ready: Callable[[str], None] | None = None,
) -> int:
    """Serve the HTTP API over the replayed mirrors until Ctrl-C (or `stop`)."""
    from datetime import UTC, datetime

    from cscs_storage_daemon.api.server import build_server
    from cscs_storage_daemon.health import HealthState

    core: Any = replayer.core
    if core is None:
        print("demo: the capture did not start a daemon; nothing to serve", file=sys.stderr)
        return 1
    health = HealthState(offerings=[o.slug for o in core.offerings], broker_required=False)
    for offering in core.offerings:
        last = core.metrics.last_snapshot.labels(offering.slug)._value.get()
        health.snapshot_written(offering.slug, datetime.fromtimestamp(last, UTC) if last else datetime.now(UTC))
    health.set_ready(True)
    server = build_server(core, health, listen=listen)
    server.start()
    first = core.offerings[0].slug
    print(f"\nServing the HTTP API on {server.url} (Ctrl-C to stop), for example:", file=out)
    print(f"  curl '{server.url}/api/storage-resources/?storage_system={first}'", file=out)
    print(f"  curl '{server.url}/healthz'", file=out)
    out.flush()
    if on_ready is not None:
        on_ready(server.url)
    event = stop or threading.Event()
    try:
        while not event.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        server.stop(timeout=5.0)
    return 0


if __name__ == "__main__":
    sys.exit(run_demo())
