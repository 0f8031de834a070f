"""The daemon holds nothing per order: what its core keeps in memory is bounded by the live resources.

At ~70 000 orders an hour, anything kept per order (a set of seen uuids, a dict of locks, a list of latencies, a
label per order) is a leak. The core is driven in-process (inline dispatcher, the fake Waldur without sockets) with
a steady-state mix - Update, Terminate of the oldest, Create to refill, plus redeliveries, resource events and
malformed bodies - and everything reachable from it is measured at two order counts, with the same live
resources both times (terminated ones forgotten by Waldur and reconciled away). Count-based, never timing-based.
"""

from __future__ import annotations

import gc
import json
import random
import sys
import types
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from cscs_storage_daemon.config import load_config
from cscs_storage_daemon.daemon import Core, build_core
from cscs_storage_daemon.testing.fake_waldur import FakeWaldur
from cscs_storage_daemon.transports.base import Delivery
from tests.fixtures.config_files import sample_offering
from tests.fixtures.inprocess_waldur import InProcessWaldur

LIVE = 20  # live resources per offering


def retained(root: object, *, stop: tuple[object, ...]) -> tuple[int, int]:
    """(objects, bytes) reachable from `root`, not following modules, classes, function globals or `stop`."""
    seen: set[int] = {id(s) for s in stop}
    queue = deque([root])
    count = size = 0
    while queue:
        obj = queue.popleft()
        if id(obj) in seen or isinstance(obj, (types.ModuleType, type)):
            continue
        seen.add(id(obj))
        count += 1
        size += sys.getsizeof(obj)
        if isinstance(obj, types.FunctionType):
            queue.extend(cell.cell_contents for cell in obj.__closure__ or () if _filled(cell))
            queue.extend(obj.__defaults__ or ())
            continue
        queue.extend(gc.get_referents(obj))
    return count, size


def _filled(cell: Any) -> bool:
    try:
        cell.cell_contents  # an empty cell raises
    except ValueError:
        return False
    return True


class Driver:
    def __init__(self, core: Core, fake: FakeWaldur, offerings: list[Any], live: dict[str, list[str]]) -> None:
        self.core, self.fake, self.offerings, self.live = core, fake, offerings, live
        self.rng = random.Random(5)
        self.orders = 0
        self.recent: deque[tuple[str, str]] = deque(maxlen=50)
        self.terminated: list[str] = []

    def deliver(self, body: dict[str, Any] | bytes) -> None:
        payload = body if isinstance(body, bytes) else json.dumps(body).encode()
        delivery = Delivery(transport="test", destination="/amq/queue/x", headers={}, body=payload)
        self.core.dispatcher.submit(delivery)
        assert delivery.outcome == "ack"

    def run(self, count: int) -> None:
        for n in range(count):
            # The last orders refill every offering: each ends with its LIVE resources.
            short = [o for o in self.live if len(self.live[o]) < LIVE]
            refill = n >= count - len(self.live)
            offering = short[0] if short and refill else self.rng.choice(self.offerings).uuid
            pool = self.live[offering]
            if len(pool) < LIVE:
                resource, order = self.fake.order_new_resource(offering, slug=f"r-{self.orders:06d}")
                resource_uuid = resource["uuid"]
                pool.append(resource_uuid)
            elif self.rng.random() < 0.15 and not refill:
                resource_uuid = pool.pop(0)
                order = self.fake.create_order(resource_uuid, "Terminate")
                self.terminated.append(resource_uuid)
            else:
                resource_uuid = self.rng.choice(pool)
                order = self.fake.create_order(resource_uuid, "Update", limits={"storage": self.rng.randint(11, 99)})
            self.orders += 1
            self.deliver({"object_type": "order", "order_uuid": order["uuid"], "offering_uuid": offering})
            assert self.fake.order_state(order["uuid"]) == "done"
            self.recent.append((order["uuid"], offering))
            roll = self.rng.random()
            if roll < 0.1:
                order_uuid, order_offering = self.rng.choice(self.recent)  # a redelivery: skipped via the ledger
                self.deliver({"object_type": "order", "order_uuid": order_uuid, "offering_uuid": order_offering})
            elif roll < 0.15:
                self.deliver(
                    {"object_type": "resource", "resource_uuid": self.rng.choice(pool), "offering_uuid": offering}
                )
            elif roll < 0.2:
                self.deliver(self.rng.choice([b"{not json", b"[1]", b'{"object_type": "nope"}', b"\xff"]))
            self.fake.clear_requests()

    def settle(self) -> None:
        """Waldur forgets the terminated resources, a reconciliation drops them: only the live ones are left."""
        for resource_uuid in self.terminated:
            self.fake.remove_resource(resource_uuid)
        self.terminated.clear()
        for offering in self.core.offerings:
            self.core.processor.reconcile(offering)
            assert len(offering.mirror) == LIVE
            self.core.scheduler.regenerate(offering)


@pytest.fixture
def driven(tmp_path: Path) -> Iterator[tuple[Core, Driver, FakeWaldur]]:
    fake = FakeWaldur().start()
    offerings = [fake.add_offering(slug=slug) for slug in ("capstor", "vast")]
    live = {
        o.uuid: [fake.add_resource(o.uuid, slug=f"base-{o.slug}-{i}")["uuid"] for i in range(LIVE)] for o in offerings
    }
    config = {
        "offerings": [
            sample_offering(
                o.slug,
                output_directory=tmp_path / "out" / o.slug,
                backend_settings={"snapshot_retention": 2},
                waldur_api_url=fake.url,
                waldur_api_token=fake.token,
                waldur_offering_uuid=o.uuid,
            )
            for o in offerings
        ],
        "daemon": {
            "broker": {"protocol": "stomp", "host": "127.0.0.1", "port": 61613, "tls": False},
            "state_directory": str(tmp_path / "state"),
            "removed_retention": 0,
            "retry": {"attempts": 2, "max_wait": 0.01, "total": 1, "timeout": 5},
            "http": {"enabled": False},
        },
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    core = build_core(load_config(str(path)), http_transport=InProcessWaldur(fake), inline=True)
    core.fill()
    try:
        yield core, Driver(core, fake, offerings, live), fake
    finally:
        core.close()
        fake.stop()


def test_what_the_core_holds_does_not_grow_with_the_orders(driven: tuple[Core, Driver, FakeWaldur]) -> None:
    core, driver, fake = driven
    driver.run(150)  # warm-up: caches of bounded size fill, every code path has run once
    driver.settle()
    gc.collect()
    objects_before, bytes_before = retained(core, stop=(fake,))
    driver.run(450)
    driver.settle()
    gc.collect()
    objects_after, bytes_after = retained(core, stop=(fake,))
    assert core.ledger.count() >= 600  # the orders are remembered on disk, not in memory
    # A set of order uuids alone would add ~130 bytes and 1 object per order: 450 orders, ~58 kB.
    assert objects_after - objects_before < 90, (objects_before, objects_after)
    assert bytes_after - bytes_before < 20_000, (bytes_before, bytes_after)
