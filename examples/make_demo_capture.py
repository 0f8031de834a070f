"""Make `examples/demo-capture.jsonl`: a capture of a live daemon run with a small, realistic story.

The daemon runs for real (`Daemon(config, record=...)`, as `cscs-storage-daemon run --record` runs it) against the
project's fake Waldur, on the local RabbitMQ (STOMP on 127.0.0.1:61613, management on :15672, guest/guest), with
three storage systems — capstor, vast, iopsstor — and five resources each. Events are published exactly as Waldur
publishes them. The story:

1. capstor, vast and iopsstor each get a new storage resource (Create orders, approved and completed);
2. the capstor one grows to 50 TB (an Update order);
3. on vast, Waldur changes an existing resource's quota (a `resource` event);
4. the iopsstor resource is given back (a Terminate order);
5. a capstor order for a resource with an impossible permission (`8888`) is set to erred — no file;
6. on vast, a resource is terminated in Waldur (a `resource` event: it stays in all.json as `removed`);
7. a malformed message arrives on iopsstor (dead-lettered, the daemon carries on);
8. the first Create event is delivered again (no second file);
9. an `offering_resources_sync` event on vast (a full reconciliation pass).

Then the daemon is stopped, the capture is replayed into a scratch directory, and the replay must give the files
the live run wrote (names and bytes) before the capture is copied to the destination.

Run it from the repository root (it needs the brokers; the demo that replays it does not):

    uv run python examples/make_demo_capture.py [--output examples/demo-capture.jsonl]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

from cscs_storage_daemon import logs
from cscs_storage_daemon.config import load_config
from cscs_storage_daemon.daemon import Daemon
from cscs_storage_daemon.replay import replay
from cscs_storage_daemon.sdnotify import Notifier
from cscs_storage_daemon.testing.fake_waldur import FakeWaldur
from cscs_storage_daemon.testing.publishers import publish_stomp_like_waldur
from cscs_storage_daemon.testing.sample_data import populate

SYSTEMS = ["capstor", "vast", "iopsstor"]
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "demo-capture.jsonl"
MAX_BYTES = 1_000_000


def wait_until(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("the live daemon did not get there in time")
        time.sleep(0.05)


@contextlib.contextmanager
def working_directory(path: Path) -> Iterator[None]:
    previous = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def config_data(fake: FakeWaldur, offerings: list[Any]) -> dict[str, Any]:
    """Relative paths (the run happens in a scratch directory), so the capture's header shows no temporary path."""
    return {
        "offerings": [
            {
                "name": f"CSCS {o.slug.capitalize()}",
                "waldur_api_url": fake.url,
                "waldur_api_token": fake.token,
                "waldur_offering_uuid": o.uuid,
                "backend_type": "cscs-hpc-storage",
                "stomp_enabled": True,
                "websocket_use_tls": False,
                "backend_settings": {"output_directory": f"live-output/{o.slug}", "storage_file_system": "lustre"},
                "backend_components": {
                    "storage": {"measured_unit": "TB", "accounting_type": "limit", "label": "Storage", "unit_factor": 1}
                },
            }
            for o in offerings
        ],
        "daemon": {
            "broker": {"protocol": "stomp", "host": "127.0.0.1", "port": 61613, "tls": False},
            "state_directory": "state",
            "snapshot": {"quiet": 0.5, "max_wait": 5, "heartbeat": 3600},
            "http": {"enabled": False},
            "log": {"level": "warning"},
        },
    }


class Story:
    def __init__(self, fake: FakeWaldur, daemon: Daemon, offerings: list[Any]) -> None:
        self.fake = fake
        self.daemon = daemon
        self.by_slug = {o.slug: o for o in offerings}

    def say(self, text: str) -> None:
        print(f"  - {text}")

    def publish(self, slug: str, body: str | bytes) -> None:
        sub = self.daemon.subscriptions[slug][0]
        publish_stomp_like_waldur("127.0.0.1", 61613, sub.vhost, "guest", "guest", sub.queue_name, body)

    def order_event(self, slug: str, order_uuid: str, state: str = "pending-provider") -> None:
        offering = self.by_slug[slug]
        body = {"order_uuid": order_uuid, "order_state": state, "offering_uuid": offering.uuid, "object_type": "order"}
        self.publish(slug, json.dumps(body))

    def resource_event(self, slug: str, resource_uuid: str) -> None:
        offering = self.by_slug[slug]
        body = {"resource_uuid": resource_uuid, "offering_uuid": offering.uuid, "object_type": "resource"}
        self.publish(slug, json.dumps(body))

    def settled(self, order_uuid: str, state: str = "done") -> None:
        wait_until(lambda: self.fake.order_state(order_uuid) == state)

    def idle(self) -> None:
        core = self.daemon.core
        assert core is not None
        wait_until(lambda: core.dispatcher.in_flight == 0)
        wait_until(lambda: not any(core.scheduler.pending(o.slug) for o in core.offerings))

    def run(self) -> None:
        fake = self.fake
        created: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
        for slug, name, size in (
            ("capstor", "climate-runs", 20),
            ("vast", "ml-datasets", 80),
            ("iopsstor", "scratch", 5),
        ):
            resource, order = fake.order_new_resource(self.by_slug[slug].uuid, slug=name, storage=size)
            created[slug] = (resource, order)
            self.say(f"{slug}: Create order for {name} ({size} TB)")
            self.order_event(slug, order["uuid"])
            self.settled(order["uuid"])
        self.idle()

        capstor_resource, capstor_create = created["capstor"]
        update = fake.create_order(capstor_resource["uuid"], "Update", limits={"storage": 50})
        self.say("capstor: Update order, climate-runs grows to 50 TB")
        self.order_event("capstor", update["uuid"])
        self.settled(update["uuid"])

        vast_existing = fake.resource_uuids(self.by_slug["vast"].uuid)[0]
        fake.update_resource(vast_existing, limits={"storage": 120})
        self.say("vast: Waldur raises an existing resource's quota to 120 TB (resource event)")
        self.resource_event("vast", vast_existing)
        self.idle()

        iops_resource, _iops_create = created["iopsstor"]
        terminate = fake.create_order(iops_resource["uuid"], "Terminate")
        self.say("iopsstor: Terminate order for scratch")
        self.order_event("iopsstor", terminate["uuid"])
        self.settled(terminate["uuid"])

        _bad, bad_order = fake.order_new_resource(self.by_slug["capstor"].uuid, slug="bad-perms", permissions="8888")
        self.say("capstor: Create order for a resource with permissions 8888 (invalid: the order errs, no file)")
        self.order_event("capstor", bad_order["uuid"])
        self.settled(bad_order["uuid"], "erred")

        vast_gone = fake.resource_uuids(self.by_slug["vast"].uuid)[1]
        fake.set_resource_state(vast_gone, "Terminated")
        self.say("vast: a resource is terminated in Waldur (resource event: all.json shows it as removed)")
        self.resource_event("vast", vast_gone)

        self.say("iopsstor: a malformed message (dead-lettered, acknowledged)")
        self.publish("iopsstor", b'{"object_type": "order", "order_uuid": "not-a-uuid"')

        self.say("capstor: the first Create event is delivered again (no second file)")
        self.order_event("capstor", capstor_create["uuid"], "executing")

        self.say("vast: offering_resources_sync (a full reconciliation pass)")
        self.publish(
            "vast", json.dumps({"object_type": "offering_resources_sync", "offering_uuid": self.by_slug["vast"].uuid})
        )
        self.idle()
        state = Path("state") / "dead-letter.jsonl"
        wait_until(state.exists)
        time.sleep(1.0)  # the last debounced all.json
        self.idle()


def files_of(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.glob("*/*"))
        if p.is_file() and not p.name.startswith(".") and not p.parent.name.startswith(".")
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    destination: Path = args.output.resolve()
    logs.configure(level="warning", fmt="console", stream=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="cscs-demo-capture-") as scratch, working_directory(Path(scratch)):
        with FakeWaldur(provision_rabbitmq=True, seed=2026) as fake:
            population = populate(fake, SYSTEMS, n=5, seed=2026)
            Path("config.yaml").write_text(yaml.safe_dump(config_data(fake, population.offerings)))
            config = load_config("config.yaml")
            daemon = Daemon(config, record="capture.jsonl", notifier=Notifier(None))
            print("Recording a live run (fake Waldur, local RabbitMQ):")
            daemon.start()
            loop = threading.Thread(target=daemon.loop, daemon=True)
            loop.start()
            try:
                Story(fake, daemon, population.offerings).run()
            finally:
                daemon.request_stop()
                loop.join(10)
                daemon.shutdown()
        live = files_of(Path("live-output"))
        logs.configure(level="critical", fmt="console", stream=sys.stderr)  # the replay repeats the live log lines
        replayed_dir = Path("replayed")
        summary = replay("capture.jsonl", replayed_dir)
        replayed = files_of(replayed_dir)
        if replayed != live:
            print("the replay does not give the live files:", sorted(set(live) ^ set(replayed)), file=sys.stderr)
            return 1
        size = Path("capture.jsonl").stat().st_size
        if size > MAX_BYTES:
            print(f"the capture is {size} bytes, more than {MAX_BYTES}", file=sys.stderr)
            return 1
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile("capture.jsonl", destination)
    print(f"\nWrote {destination} ({size} bytes, {summary.event_count} events); its replay gives the live files:")
    for name in sorted(live):
        print(f"  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
