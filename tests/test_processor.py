"""The order state machine against the fake Waldur over real HTTP: which calls an order costs, and what it leaves."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cscs_storage_daemon.config import config_from_data
from cscs_storage_daemon.daemon import Core, build_core
from cscs_storage_daemon.testing.fake_waldur import FakeWaldur
from cscs_storage_daemon.testing.sample_data import populate
from tests.fixtures.config_files import sample_offering


@pytest.fixture
def core_and_fake(tmp_path: Path) -> Iterator[tuple[Core, FakeWaldur]]:
    with FakeWaldur(seed=3) as fake:
        offering = populate(fake, ["capstor"], n=2, seed=3).offerings[0]
        config = config_from_data(
            {
                "offerings": [
                    sample_offering(
                        "capstor",
                        output_directory=tmp_path / "out",
                        waldur_api_url=fake.url,
                        waldur_api_token=fake.token,
                        waldur_offering_uuid=offering.uuid,
                    )
                ],
                "daemon": {"state_directory": str(tmp_path / "state"), "http": {"enabled": False}},
            },
            source="<test>",
            expand_env=False,
        )
        core = build_core(config, inline=True)
        try:
            core.fill()
            yield core, fake
        finally:
            core.close()


def calls(fake: FakeWaldur) -> list[str]:
    """``GET marketplace-orders``, ``POST marketplace-orders/approve_by_provider``: endpoint and action, no uuids."""
    shown = []
    for request in fake.requests:
        parts = request.path.strip("/").split("/")  # api, endpoint, uuid, action
        shown.append(f"{request.method} {'/'.join([parts[1], *parts[3:]])}")
    return shown


def test_a_pending_create_order_costs_five_calls_and_ends_done(core_and_fake: tuple[Core, FakeWaldur]) -> None:
    core, fake = core_and_fake
    runtime = core.offerings[0]
    _raw, order = fake.order_new_resource(runtime.uuid, slug="new-project", storage=7)
    fake.clear_requests()
    outcome = core.processor.handle_order(runtime, order["uuid"], "pending-provider")
    assert outcome.outcome == "done" and outcome.order_type == "create"
    # Approved with 200 means executing (Waldur's only transition for it): the order is not read a second time.
    assert calls(fake) == [
        "GET marketplace-orders",
        "POST marketplace-orders/approve_by_provider",
        "GET marketplace-provider-resources",
        "POST marketplace-provider-resources/set_backend_id",
        "POST marketplace-orders/set_state_done",
    ]
    assert fake.order_state(order["uuid"]) == "done"
    files = list(runtime.writer.directory.glob(f"*create_{order['uuid'].replace('-', '')}.json"))
    assert len(files) == 1
    storage: Any = json.loads(files[0].read_text())["result"]["storageResources"][0]
    assert storage["status"] != "removing"
    assert [q["quota"] for q in storage["quotas"] if q["type"] == "space"] == [7.0, 7.0]


def test_an_order_approved_by_someone_else_is_read_again(core_and_fake: tuple[Core, FakeWaldur]) -> None:
    core, fake = core_and_fake
    runtime = core.offerings[0]
    _raw, order = fake.order_new_resource(runtime.uuid, slug="raced", storage=3)
    current = dict(core.offerings[0].gateway.get_order(order["uuid"]))
    fake.set_order_state(order["uuid"], "executing")  # approved elsewhere after our read
    fake.clear_requests()
    outcome = core.processor.handle_order(runtime, order["uuid"], None, order=current)
    assert outcome.outcome == "done"
    assert calls(fake)[:2] == ["POST marketplace-orders/approve_by_provider", "GET marketplace-orders"]
    assert fake.requests[0].status == 409
