"""Registration with Waldur (agent identity, unified queue, legacy subscriptions) against the fake Waldur, and
against the real local RabbitMQ the fake provisions like Mastermind."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
import pytest
import stomp
from waldur_api_client.models import AgentIdentity, AgentQueueRegistrationResponse, EventSubscription
from waldur_api_client.models import EventSubscriptionQueue as EventSubscriptionQueueModel

from cscs_storage_daemon.gateway import WaldurError, WaldurGateway, WaldurRejected
from cscs_storage_daemon.registration import (
    OBJECT_TYPES,
    Subscription,
    destination,
    identity_name,
    legacy_mqtt_topic,
    legacy_queue_name,
    legacy_subscription,
    register,
    unified_subscription,
)
from cscs_storage_daemon.retry import RetryPolicy
from cscs_storage_daemon.testing.fake_waldur import QUEUE_ARGUMENTS, FakeWaldur
from cscs_storage_daemon.testing.publishers import publish_stomp_like_waldur
from tests.fixtures.waldur import FAST_RETRY

GOLDEN_API = Path(os.environ.get("GOLDEN_DIR", "/work/shared/golden")) / "api"
needs_golden = pytest.mark.skipif(not GOLDEN_API.is_dir(), reason="golden API files not available")


def golden(name: str) -> Any:
    return json.loads((GOLDEN_API / name).read_text())


# -- pure naming -----------------------------------------------------------------------------------------------

SUB = "c2a3b14f-de5e-4c6b-9f7a-8b9c0d1e2f3a"
OFFERING = "8c2b5f0e-7a1d-4c3b-9e6f-1a2b3c4d5e6f"


def test_names_strip_dashes() -> None:
    assert legacy_queue_name(SUB, OFFERING, "order") == (
        "subscription_c2a3b14fde5e4c6b9f7a8b9c0d1e2f3a_offering_8c2b5f0e7a1d4c3b9e6f1a2b3c4d5e6f_order"
    )
    assert legacy_queue_name(UUID(SUB), UUID(OFFERING), "order") == legacy_queue_name(SUB, OFFERING, "order")
    assert legacy_mqtt_topic(SUB, OFFERING, "resource") == (
        "subscription/c2a3b14fde5e4c6b9f7a8b9c0d1e2f3a/offering/8c2b5f0e7a1d4c3b9e6f1a2b3c4d5e6f/resource"
    )
    assert destination("consumer_abc") == "/amq/queue/consumer_abc"
    assert identity_name(OFFERING) == "agent-8c2b5f0e7a1d4c3b9e6f1a2b3c4d5e6f"
    with pytest.raises(ValueError):
        legacy_queue_name("not-a-uuid", OFFERING, "order")


@needs_golden
def test_legacy_subscription_from_the_golden_answers() -> None:
    queue = golden("event_subscription_queue.json")
    sub = legacy_subscription(golden("event_subscription.json"), OFFERING, "order", "tok")
    assert sub.queue_name == queue["queue_name"]
    assert sub.vhost == queue["vhost"]
    assert sub.username == "c2a3b14fde5e4c6b9f7a8b9c0d1e2f3a"
    assert sub.password == "tok"
    assert sub.destination == f"/amq/queue/{queue['queue_name']}"
    assert sub.object_type == "order"
    assert sub.mqtt_username == f"{queue['vhost']}:c2a3b14fde5e4c6b9f7a8b9c0d1e2f3a"


@needs_golden
def test_unified_subscription_from_the_golden_answer() -> None:
    registration = golden("agent_queue_registration.json")
    sub = unified_subscription(registration, OFFERING, "tok")
    assert (sub.queue_name, sub.vhost, sub.username) == (
        registration["queue_name"],
        registration["vhost"],
        registration["rmq_username"],
    )
    assert sub.object_type is None
    assert sub.destination == f"/amq/queue/{registration['queue_name']}"


def test_password_is_not_in_the_repr() -> None:
    sub = unified_subscription(
        {"queue_name": "consumer_1", "vhost": "v", "rmq_username": "u"}, OFFERING, "very-secret-token"
    )
    assert "very-secret-token" not in repr(sub)
    assert "very-secret-token" not in str(sub)
    assert "very-secret-token" not in repr([sub])


def test_unusable_queue_name_is_refused() -> None:
    with pytest.raises(ValueError):
        unified_subscription({"queue_name": "a/b", "vhost": "v", "rmq_username": "u"}, OFFERING, "t")


# -- against the fake (no broker) ------------------------------------------------------------------------------


def gateway_for(fake: FakeWaldur) -> WaldurGateway:
    return WaldurGateway(fake.url, fake.token, retry=FAST_RETRY, timeout=10.0)


def test_unified_registration(fake_waldur: FakeWaldur) -> None:
    offering = fake_waldur.add_offering(slug="capstor")
    with gateway_for(fake_waldur) as gateway:
        subs = register(gateway, offering.uuid, "unified")
        again = register(gateway, str(UUID(offering.uuid)), "unified")
    assert subs == again
    (sub,) = subs
    (consumer,) = fake_waldur.consumers()
    assert sub.queue_name == consumer["queue_name"] == f"consumer_{consumer['uuid']}"
    assert sub.username == consumer["rmq_username"]
    assert sub.vhost == fake_waldur.user_uuid
    assert sub.password == fake_waldur.token
    assert sub.object_type is None
    assert consumer["observable_object_types"] == list(OBJECT_TYPES)
    calls = [(r.method, r.path.split("/")[-2], r.status) for r in fake_waldur.requests]
    assert calls == [
        ("GET", "marketplace-site-agent-identities", 200),
        ("POST", "marketplace-site-agent-identities", 201),
        ("POST", "register_queue", 201),
        ("GET", "marketplace-site-agent-identities", 200),
        ("PUT", consumer["identity_uuid"], 200),
        ("POST", "register_queue", 200),
    ]
    (identity,) = fake_waldur.identities()
    assert identity["name"] == f"agent-{offering.uuid}"
    assert identity["offering"] == offering.uuid
    create = fake_waldur.requests[1].body
    assert create["offering"] == offering.uuid
    assert create["dependencies"][0]["package"] == "waldur-api-client"
    assert "last_restarted" in create
    assert fake_waldur.requests[2].body == {"object_types": list(OBJECT_TYPES)}
    assert fake_waldur.message_targets(offering.uuid, "order")[0].destination == sub.destination


def test_legacy_registration(fake_waldur: FakeWaldur) -> None:
    offering = fake_waldur.add_offering(slug="capstor")
    with gateway_for(fake_waldur) as gateway:
        subs = register(gateway, offering.uuid, "legacy")
        again = register(gateway, offering.uuid, "legacy")
    assert subs == again
    assert [s.object_type for s in subs] == list(OBJECT_TYPES)
    rows = {row["queue_name"]: row for row in fake_waldur.subscription_queues()}
    for sub in subs:
        assert sub.vhost == fake_waldur.user_uuid
        assert sub.queue_name == legacy_queue_name(sub.username, offering.uuid, str(sub.object_type))
        assert sub.queue_name in rows
        assert rows[sub.queue_name]["event_subscription_uuid"] == sub.username == sub.subscription_uuid
        assert sub.mqtt_topic == f"subscription/{sub.username}/offering/{offering.uuid}/{sub.object_type}"
    assert len(fake_waldur.subscriptions()) == 3
    statuses = [r.status for r in fake_waldur.requests if "register_event_subscription" in r.path]
    assert statuses == [201, 201, 201, 200, 200, 200]
    statuses = [r.status for r in fake_waldur.requests if "create_queue" in r.path]
    assert statuses == [201, 201, 201, 200, 200, 200]
    targets = fake_waldur.message_targets(offering.uuid, "resource")
    assert [t.queue_name for t in targets] == [subs[1].queue_name]


def test_register_accepts_a_config_like_object(fake_waldur: FakeWaldur) -> None:
    offering = fake_waldur.add_offering()

    class Config:
        offering_uuid_hex = offering.uuid

    with gateway_for(fake_waldur) as gateway:
        (sub,) = register(gateway, Config(), "unified", object_types=["order"], password="other")
    assert sub.password == "other"
    assert fake_waldur.consumers()[0]["observable_object_types"] == ["order"]
    with gateway_for(fake_waldur) as gateway, pytest.raises(ValueError):
        register(gateway, offering.uuid, "broadcast")  # type: ignore[arg-type]


def test_fake_registration_bodies_parse_with_the_client_models(fake_waldur: FakeWaldur) -> None:
    offering = fake_waldur.add_offering()
    with gateway_for(fake_waldur) as gateway:
        identity = gateway.ensure_agent_identity(offering.uuid)
        AgentIdentity.from_dict(identity)
        AgentQueueRegistrationResponse.from_dict(gateway.register_queue(identity["uuid"], ["order"]))
        subscription = gateway.register_event_subscription(identity["uuid"], "order")
        EventSubscription.from_dict(subscription)
        queue = gateway.create_queue(subscription["uuid"], offering.uuid, "order")
        EventSubscriptionQueueModel.from_dict(queue)
        assert gateway.get_current_user()["uuid"] == fake_waldur.user_uuid
        gateway.delete_event_subscription(subscription["uuid"])
    assert fake_waldur.requests[-1].status == 204
    assert fake_waldur.subscriptions() == []


def test_register_queue_none_keeps_the_filter(fake_waldur: FakeWaldur) -> None:
    offering = fake_waldur.add_offering()
    with gateway_for(fake_waldur) as gateway:
        identity = gateway.ensure_agent_identity(offering.uuid)
        gateway.register_queue(identity["uuid"], ["order", "resource"])
        kept = gateway.register_queue(identity["uuid"], None)
        assert kept["observable_object_types"] == ["order", "resource"]
        assert fake_waldur.requests[-1].body == {}
        everything = gateway.register_queue(identity["uuid"], [])
        assert everything["observable_object_types"] == []


def test_registration_errors_are_rejections(fake_waldur: FakeWaldur) -> None:
    with gateway_for(fake_waldur) as gateway:
        with pytest.raises(WaldurRejected) as info:  # offering unknown to Waldur
            gateway.ensure_agent_identity("0" * 32)
        assert info.value.status == 400
        assert "does not exist" in str(info.value)
        with pytest.raises(WaldurRejected) as info:
            gateway.register_queue("1" * 32, ["order"])
        assert info.value.status == 404
        with pytest.raises(ValueError):
            gateway.register_event_subscription("1" * 32, "not_a_type")


def test_a_registration_answer_missing_required_keys_is_an_error() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "GET":
            return httpx.Response(200, json=[], headers={"X-Result-Count": "0"})
        if request.url.path.endswith("register_queue/"):
            return httpx.Response(201, json={"queue_name": "consumer_1"})
        return httpx.Response(
            201,
            json={
                "uuid": "e4c5d36bfa7a4e8d9b9c0d1e2f3a4b5c",
                "url": "https://w/api/x/",
                "offering": OFFERING.replace("-", ""),
                "created_by": None,
                "name": "agent",
                "created": "2025-03-01T12:00:00Z",
                "modified": "2025-03-01T12:00:00Z",
                "services": [],
                "compatibility": {"status": "compatible", "message": ""},
            },
        )

    gateway = WaldurGateway(
        "https://w.example.com/api/", "tok", transport=httpx.MockTransport(handler), retry=RetryPolicy(attempts=1)
    )
    with gateway, pytest.raises(WaldurError, match="AgentQueueRegistrationResponse"):
        register(gateway, OFFERING, "unified")


# -- against the real RabbitMQ ----------------------------------------------------------------------------------


def management(fake: FakeWaldur) -> httpx.Client:
    assert fake.rabbit is not None
    return httpx.Client(base_url=f"{fake.rabbit.api}/api", auth=("guest", "guest"), timeout=10.0)


def assert_provisioned(fake: FakeWaldur, sub: Subscription) -> None:
    with management(fake) as api:
        assert api.get(f"/vhosts/{sub.vhost}").status_code == 200
        user = api.get(f"/users/{sub.username}")
        assert user.status_code == 200
        permissions = {p["user"]: p for p in api.get(f"/vhosts/{sub.vhost}/permissions").json()}
        for who in (sub.username, "guest"):
            assert (permissions[who]["configure"], permissions[who]["write"], permissions[who]["read"]) == (
                ".*",
                ".*",
                ".*",
            )
        queue = api.get(f"/queues/{sub.vhost}/{sub.queue_name}").json()
        assert queue["durable"] is True
        assert queue["auto_delete"] is False
        assert queue["arguments"] == QUEUE_ARGUMENTS
        assert "x-queue-type" not in queue["arguments"]
        assert "x-expires" not in queue["arguments"]


class _Collector(stomp.ConnectionListener):  # type: ignore[misc]
    def __init__(self) -> None:
        self.bodies: list[str] = []
        self.errors: list[str] = []
        self.received = threading.Event()

    def on_message(self, frame: Any) -> None:
        self.bodies.append(frame.body)
        self.received.set()

    def on_error(self, frame: Any) -> None:
        self.errors.append(str(frame.headers.get("message", "")))


def consume_one(brokers: Any, sub: Subscription, publish: Callable[[], None]) -> list[str]:
    """Log in with the subscription's credentials, subscribe, let ``publish`` send, return what arrived."""
    connection = stomp.Connection12([(brokers.host, brokers.stomp_port)], vhost=sub.vhost, heartbeats=(0, 0))
    collector = _Collector()
    connection.set_listener("collector", collector)
    connection.connect(sub.username, sub.password, wait=True)
    try:
        connection.subscribe(destination=sub.destination, id="t", ack="auto")
        publish()
        assert collector.received.wait(10), collector.errors
    finally:
        connection.disconnect()
    return collector.bodies


@pytest.mark.broker
def test_unified_registration_provisions_rabbitmq(fake_waldur_rabbit: FakeWaldur, brokers: Any) -> None:
    fake = fake_waldur_rabbit
    offering = fake.add_offering(slug="capstor")
    with gateway_for(fake) as gateway:
        (sub,) = register(gateway, offering.uuid, "unified")
    assert_provisioned(fake, sub)
    body = json.dumps({"order_uuid": "6acd4b9f7c8e4dab9f0a1b2c3d4e5f61", "order_state": "pending-provider"})
    (target,) = fake.message_targets(offering.uuid, "order")

    def publish() -> None:
        publish_stomp_like_waldur(
            brokers.host, brokers.stomp_port, target.vhost, "guest", "guest", target.queue_name, body
        )

    assert consume_one(brokers, sub, publish) == [body]


@pytest.mark.broker
def test_legacy_registration_provisions_rabbitmq(fake_waldur_rabbit: FakeWaldur, brokers: Any) -> None:
    fake = fake_waldur_rabbit
    offering = fake.add_offering(slug="capstor")
    with gateway_for(fake) as gateway:
        subs = register(gateway, offering.uuid, "legacy")
        assert register(gateway, offering.uuid, "legacy") == subs
    assert len(subs) == 3
    for sub in subs:
        assert_provisioned(fake, sub)
    order_sub = subs[0]
    body = json.dumps({"order_uuid": "6acd4b9f7c8e4dab9f0a1b2c3d4e5f61", "order_state": "executing"})

    def publish() -> None:
        publish_stomp_like_waldur(
            brokers.host, brokers.stomp_port, order_sub.vhost, "guest", "guest", order_sub.queue_name, body
        )

    assert consume_one(brokers, order_sub, publish) == [body]


@pytest.mark.broker
def test_legacy_reregistration_after_the_rabbitmq_user_vanished(fake_waldur_rabbit: FakeWaldur) -> None:
    fake = fake_waldur_rabbit
    offering = fake.add_offering(slug="capstor")
    with gateway_for(fake) as gateway:
        (first,) = register(gateway, offering.uuid, "legacy", object_types=["order"])
        assert fake.rabbit is not None
        fake.rabbit.delete_user(first.username)
        (second,) = register(gateway, offering.uuid, "legacy", object_types=["order"])
    assert second.username != first.username
    assert second.queue_name != first.queue_name
    assert_provisioned(fake, second)
    with management(fake) as api:
        assert api.get(f"/queues/{first.vhost}/{first.queue_name}").status_code == 404


@pytest.mark.broker
def test_queue_recreated_when_deleted_on_the_broker(fake_waldur_rabbit: FakeWaldur) -> None:
    fake = fake_waldur_rabbit
    offering = fake.add_offering(slug="capstor")
    with gateway_for(fake) as gateway:
        (sub,) = register(gateway, offering.uuid, "unified")
        assert fake.rabbit is not None
        fake.rabbit.delete_queue(sub.vhost, sub.queue_name)
        assert register(gateway, offering.uuid, "unified") == [sub]
    assert_provisioned(fake, sub)


@pytest.mark.broker
def test_rabbitmq_objects_are_removed_when_the_fake_stops(brokers: Any) -> None:
    fake = FakeWaldur(provision_rabbitmq=True, rabbitmq_api=brokers.management_url).start()
    try:
        offering = fake.add_offering()
        with gateway_for(fake) as gateway:
            (sub,) = register(gateway, offering.uuid, "unified")
    finally:
        fake.stop()
    with httpx.Client(base_url=f"{brokers.management_url}/api", auth=("guest", "guest")) as api:
        assert api.get(f"/vhosts/{sub.vhost}").status_code == 404
        assert api.get(f"/users/{sub.username}").status_code == 404
