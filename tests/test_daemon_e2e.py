"""The daemon end to end on the real RabbitMQ (STOMP TCP and Web-STOMP) with the fake Waldur provisioning it.

Orders are published exactly as Waldur publishes them (one STOMP connection per message to /amq/queue/<name>).
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from cscs_storage_daemon.config import load_config
from cscs_storage_daemon.daemon import Daemon
from cscs_storage_daemon.sdnotify import Notifier
from cscs_storage_daemon.testing.fake_waldur import FakeWaldur
from cscs_storage_daemon.testing.publishers import publish_mqtt_like_waldur, publish_stomp_like_waldur
from cscs_storage_daemon.testing.sample_data import populate

pytestmark = pytest.mark.broker


def wait_until(predicate: Callable[[], bool], timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


@dataclass
class Live:
    fake: FakeWaldur
    daemon: Daemon
    offering: Any
    out: Path
    state: Path
    notify: socket.socket
    mode: str

    @property
    def websocket(self) -> bool:
        return self.mode.startswith("web-stomp")

    @property
    def legacy(self) -> bool:
        return self.mode.endswith("legacy")

    def publish(self, body: str | bytes, object_type: str = "order") -> None:
        """Publish as Waldur does: STOMP SEND to /amq/queue/<name>, or (old Waldur) MQTT QoS 0 to the topic."""
        subs = self.daemon.subscriptions[self.offering.slug]
        sub = next(s for s in subs if s.object_type in (None, object_type))
        if self.mode.startswith("mqtt"):
            publish_mqtt_like_waldur("127.0.0.1", 1883, sub.mqtt_topic, body, qos=0)
        else:
            publish_stomp_like_waldur("127.0.0.1", 61613, sub.vhost, "guest", "guest", sub.queue_name, body)

    def order_body(self, order_uuid: str, state: str = "pending-provider") -> str:
        body: dict[str, Any] = {"order_uuid": order_uuid, "order_state": state, "offering_uuid": self.offering.uuid}
        if not self.legacy:
            body["object_type"] = "order"
        return json.dumps(body)

    def order_files(self, order_uuid: str) -> list[Path]:
        return sorted((self.out / self.offering.slug).glob(f"*_{order_uuid}.json"))


MODES = ["stomp", "web-stomp", "stomp-legacy", "mqtt-legacy"]


def write_config(tmp_path: Path, fake: FakeWaldur, offering: Any, *, mode: str) -> Path:
    broker: dict[str, Any] = {"protocol": "stomp", "host": "127.0.0.1", "tls": False, "prefetch": 10}
    if mode.startswith("web-stomp"):
        broker |= {"port": 15674, "websocket_path": "/ws"}
    elif mode.startswith("mqtt"):
        broker |= {"protocol": "mqtt", "port": 1883}
    else:
        broker |= {"port": 61613}
    data = {
        "offerings": [
            {
                "name": "CSCS capstor",
                "waldur_api_url": fake.url,
                "waldur_api_token": fake.token,
                "waldur_offering_uuid": offering.uuid,
                "backend_type": "cscs-hpc-storage",
                "backend_settings": {"output_directory": str(tmp_path / "out" / offering.slug)},
                "backend_components": {
                    "storage": {"measured_unit": "TB", "accounting_type": "limit", "label": "Storage", "unit_factor": 1}
                },
            }
        ],
        "daemon": {
            "event_mode": "legacy" if mode.endswith("legacy") else "unified",
            "broker": broker,
            "state_directory": str(tmp_path / "state"),
            "snapshot": {"quiet": 0.2, "max_wait": 1, "heartbeat": 3600},
            "retry": {"attempts": 6, "max_wait": 0.2, "total": 20, "timeout": 5},
            "http": {"enabled": False},
        },
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(params=MODES)
def live(request: pytest.FixtureRequest, tmp_path: Path, brokers: Any) -> Iterator[Live]:
    mode = request.param
    notify_path = tmp_path / "notify.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.settimeout(0.1)
    with FakeWaldur(provision_rabbitmq=True) as fake:
        population = populate(fake, ["capstor"], n=5, seed=11)
        offering = population.offerings[0]
        config = load_config(write_config(tmp_path, fake, offering, mode=mode))
        daemon = Daemon(config, notifier=Notifier(str(notify_path)))
        daemon.start()
        loop = threading.Thread(target=daemon.loop, daemon=True)
        loop.start()
        try:
            yield Live(fake, daemon, offering, tmp_path / "out", tmp_path / "state", notify, mode)
        finally:
            daemon.request_stop()
            loop.join(10)
            daemon.shutdown()
            notify.close()


def received_notifications(sock: socket.socket) -> list[str]:
    lines: list[str] = []
    while True:
        try:
            lines.extend(sock.recv(4096).decode().splitlines())
        except TimeoutError:
            return lines


def test_ready_after_first_snapshot_and_watchdog(live: Live) -> None:
    snapshots = list((live.out / "capstor").glob("*-all.json"))
    assert len(snapshots) == 1
    assert len(json.loads(snapshots[0].read_text())["result"]["storageResources"]) == 5
    seen: list[str] = []
    assert wait_until(lambda: seen.extend(received_notifications(live.notify)) or "WATCHDOG=1" in seen, 10)
    assert "READY=1" in seen
    assert seen.index("READY=1") < seen.index("WATCHDOG=1")


def test_create_update_terminate_orders_flow_end_to_end(live: Live) -> None:
    fake = live.fake
    resource, order = fake.order_new_resource(live.offering.uuid, slug="climate-store")
    live.publish(live.order_body(order["uuid"]))
    assert wait_until(lambda: fake.order_state(order["uuid"]) == "done")
    files = live.order_files(order["uuid"])
    assert [f.name.split("-", 5)[-1] for f in files] == [f"create_{order['uuid']}.json"]
    document = json.loads(files[0].read_text())
    storage = document["result"]["storageResources"][0]
    assert storage["itemId"] == resource["uuid"]
    assert storage["mountPoint"]["default"].endswith("/climate-store")
    assert "paginate" not in document["result"]
    assert fake.resource(resource["uuid"])["backend_id"] == "climate-store"

    update = fake.create_order(resource["uuid"], "Update", limits={"storage": 42})
    live.publish(live.order_body(update["uuid"]))
    assert wait_until(lambda: fake.order_state(update["uuid"]) == "done")
    (update_file,) = live.order_files(update["uuid"])
    quotas = json.loads(update_file.read_text())["result"]["storageResources"][0]["quotas"]
    assert quotas[1]["quota"] == 42.0 and quotas[1]["type"] == "space"

    terminate = fake.create_order(resource["uuid"], "Terminate")
    live.publish(live.order_body(terminate["uuid"]))
    assert wait_until(lambda: fake.order_state(terminate["uuid"]) == "done")
    (terminate_file,) = live.order_files(terminate["uuid"])
    assert json.loads(terminate_file.read_text())["result"]["storageResources"][0]["status"] == "removing"

    # Redelivery of the same events never makes a second file.
    live.publish(live.order_body(order["uuid"], "executing"))
    live.publish(live.order_body(order["uuid"]))
    time.sleep(1.0)
    assert len(live.order_files(order["uuid"])) == 1
    # The debounced all.json follows the mirror.
    assert wait_until(lambda: any(resource["uuid"] in p.read_text() for p in (live.out / "capstor").glob("*-all.json")))


def test_invalid_resource_errs_its_order(live: Live) -> None:
    fake = live.fake
    _resource, order = fake.order_new_resource(live.offering.uuid, slug="bad-perms", permissions="8888")
    live.publish(live.order_body(order["uuid"]))
    assert wait_until(lambda: fake.order_state(order["uuid"]) == "erred")
    assert "attributes.permissions" in fake.order(order["uuid"])["error_message"]
    assert live.order_files(order["uuid"]) == []


def test_malformed_bodies_are_dead_lettered_and_the_daemon_goes_on(live: Live) -> None:
    bad = [
        b"not json",
        b"\xff\xfe\x00garbage",
        b"[1, 2]",
        b'{"object_type": "nope"}',
        b'{"object_type": 7, "order_uuid": "zzz"}',
        b'{"object_type": "order", "order_uuid": "zzz"}',
    ]
    for body in bad:
        live.publish(body)
    dead = live.state / "dead-letter.jsonl"
    assert wait_until(lambda: dead.exists() and len(dead.read_text().splitlines()) == len(bad))
    reasons = [json.loads(line)["reason"] for line in dead.read_text().splitlines()]
    assert set(reasons) >= {"not_json", "not_object", "unknown_object_type"}
    _resource, order = live.fake.order_new_resource(live.offering.uuid, slug="after-garbage")
    live.publish(live.order_body(order["uuid"]))
    assert wait_until(lambda: live.fake.order_state(order["uuid"]) == "done")
    assert live.daemon.healthy()


def test_queue_deleted_under_the_daemon_is_registered_again(live: Live, rabbit_admin: Any) -> None:
    if live.mode.startswith("mqtt"):
        pytest.skip("MQTT topics need no queue")
    fake = live.fake
    subs = live.daemon.subscriptions["capstor"]
    registrations = sum(1 for r in fake.requests if r.path.endswith(("/register_queue/", "/create_queue/")))
    rabbit_admin.delete_queue(subs[0].vhost, subs[0].queue_name)
    assert wait_until(
        lambda: (
            sum(1 for r in fake.requests if r.path.endswith(("/register_queue/", "/create_queue/"))) > registrations
        ),
        60,
    )
    assert wait_until(lambda: rabbit_admin.get_queue(subs[0].vhost, subs[0].queue_name).get("consumers", 0) >= 1, 60)
    _resource, order = fake.order_new_resource(live.offering.uuid, slug="after-requeue")
    live.publish(live.order_body(order["uuid"]))
    assert wait_until(lambda: fake.order_state(order["uuid"]) == "done")
