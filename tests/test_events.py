"""From a delivered body to a typed event or a dead letter (events spec §1 "Bad input", §3). Pure: no I/O."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cscs_storage_daemon.events import (
    HANDLED_TYPES,
    OBSERVABLE_TYPES,
    SKIPPED_ORDER_STATES,
    DeadLetter,
    IgnoredEvent,
    OrderEvent,
    ResourceEvent,
    SyncEvent,
    normalise_uuid,
    object_type_from_destination,
    parse_event,
    preview,
)

GOLDEN = Path("/work/shared/golden/events")
OFFERING = "e2ef0000000000000000000000000001"
ORDER = "0a1b2c3d4e5f40718293a4b5c6d7e8f9"
RESOURCE = "6a7b8c9d0e1f4cd74859a0b1c2d3e4f5"
ORDER_QUEUE = f"/queue/subscription_01ffee00000000000000000000000000_offering_{OFFERING}_order"
UNIFIED_QUEUE = "/queue/consumer_c0ffee00c0ffee00c0ffee00c0ffee00"
STABLE_REASONS = {
    "not_utf8",
    "not_json",
    "not_object",
    "missing_object_type",
    "unknown_object_type",
    "bad_uuid",
    "bad_field",
}
ANY_EVENT = (OrderEvent, ResourceEvent, SyncEvent, IgnoredEvent, DeadLetter)


def load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((GOLDEN / name).read_text())
    return data


LEGACY_FILES = sorted(p.name for p in GOLDEN.glob("*.json") if p.name != "unified_consumer_queue.json")
LEGACY_CASES = [
    pytest.param(name, i, id=f"{name[:-5]}-{i}") for name in LEGACY_FILES for i in range(len(load(name)["examples"]))
]
UNIFIED_CASES = [
    pytest.param(i, id=example["name"]) for i, example in enumerate(load("unified_consumer_queue.json")["examples"])
]


def expected_event(object_type: str, payload: dict[str, Any]) -> object:
    """What the daemon should make of a golden payload of `object_type`."""
    offering = normalise_uuid(payload.get("offering_uuid"))
    if object_type == "order":
        return OrderEvent(
            order_uuid=payload["order_uuid"],
            order_state=payload.get("order_state"),
            resource_uuid=payload.get("resource_uuid") or None,
            offering_uuid=offering,
        )
    if object_type == "resource":
        return ResourceEvent(resource_uuid=payload["resource_uuid"], offering_uuid=offering)
    if object_type == "offering_resources_sync":
        return SyncEvent(offering_uuid=offering)
    return IgnoredEvent(object_type=object_type, offering_uuid=offering)


def parse(payload: Any, *, legacy: bool = False, destination: str = UNIFIED_QUEUE) -> object:
    return parse_event(json.dumps(payload).encode(), destination=destination, legacy=legacy)


def reason(result: object) -> str:
    assert isinstance(result, DeadLetter), result
    assert result.reason in STABLE_REASONS
    return result.reason


# ---------------------------------------------------------------------------------------------------- golden bodies


def test_golden_files_cover_every_handled_type() -> None:
    types = {load(name)["object_type"] for name in LEGACY_FILES}
    assert types >= HANDLED_TYPES
    assert types <= OBSERVABLE_TYPES


@pytest.mark.parametrize(("name", "index"), LEGACY_CASES)
def test_golden_legacy_bodies(name: str, index: int) -> None:
    """Legacy mode: the object type comes from the queue name in the `destination` header."""
    golden = load(name)
    example = golden["examples"][index]
    body = example["body"].encode("utf-8")
    assert json.loads(body) == example["payload"]
    event = parse_event(body, destination=golden["message_destination_header"], legacy=True)
    assert event == expected_event(golden["object_type"], example["payload"])


@pytest.mark.parametrize(("name", "index"), LEGACY_CASES)
def test_golden_bodies_with_object_type_added_in_unified_mode(name: str, index: int) -> None:
    """Unified mode: the same bodies with `object_type` stamped in, as Mastermind's unified path does."""
    golden = load(name)
    payload = {**golden["examples"][index]["payload"], "object_type": golden["object_type"]}
    assert parse(payload) == expected_event(golden["object_type"], payload)


@pytest.mark.parametrize(("name", "index"), LEGACY_CASES)
def test_golden_legacy_bodies_lack_object_type_in_unified_mode(name: str, index: int) -> None:
    golden = load(name)
    body = golden["examples"][index]["body"].encode("utf-8")
    assert reason(parse_event(body, destination=UNIFIED_QUEUE, legacy=False)) == "missing_object_type"


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("index", UNIFIED_CASES)
def test_golden_unified_bodies(index: int, legacy: bool) -> None:
    """`object_type` inside the body decides, in either mode."""
    golden = load("unified_consumer_queue.json")
    example = golden["examples"][index]
    event = parse_event(example["body"].encode(), destination=golden["message_destination_header"], legacy=legacy)
    assert event == expected_event(example["payload"]["object_type"], example["payload"])


def test_unified_order_carries_the_resource_uuid() -> None:
    example = load("unified_consumer_queue.json")["examples"][0]
    event = parse_event(example["body"].encode(), destination=UNIFIED_QUEUE, legacy=False)
    assert isinstance(event, OrderEvent)
    assert event.resource_uuid == RESOURCE
    assert event.key == RESOURCE  # events of one resource are serialised on this key


def test_legacy_order_is_keyed_by_the_order() -> None:
    event = parse({"order_uuid": ORDER, "order_state": "executing"}, legacy=True, destination=ORDER_QUEUE)
    assert isinstance(event, OrderEvent)
    assert event.resource_uuid is None
    assert event.key == ORDER


@pytest.mark.parametrize(
    ("destination", "object_type"),
    [
        (ORDER_QUEUE, "order"),
        (ORDER_QUEUE.replace("/queue/", "/amq/queue/"), "order"),
        (ORDER_QUEUE.removeprefix("/queue/"), "order"),
        (f"/queue/subscription_03ffee00000000000000000000000000_offering_{OFFERING}_resource", "resource"),
        (
            f"/queue/subscription_09ffee00000000000000000000000000_offering_{OFFERING}_offering_resources_sync",
            "offering_resources_sync",
        ),
        (f"subscription/01ffee00000000000000000000000000/offering/{OFFERING}/order", "order"),
        (f"subscription/03ffee00000000000000000000000000/offering/{OFFERING}/resource", "resource"),
        (UNIFIED_QUEUE, None),
        ("", None),
        ("/topic/order", None),
    ],
)
def test_object_type_from_destination(destination: str, object_type: str | None) -> None:
    assert object_type_from_destination(destination) == object_type


def test_golden_destinations_and_topics() -> None:
    for name in LEGACY_FILES:
        golden = load(name)
        for key in ("message_destination_header", "consumer_subscribe_destination", "mqtt_topic_legacy"):
            assert object_type_from_destination(golden[key]) == golden["object_type"], (name, key)


# ---------------------------------------------------------------------------------------------------- order states


def test_skip_list_is_the_spec_list() -> None:
    assert (
        frozenset(
            {"done", "erred", "canceled", "rejected", "pending-consumer", "pending-project", "pending-start-date"}
        )
        == SKIPPED_ORDER_STATES
    )


@pytest.mark.parametrize("state", sorted(SKIPPED_ORDER_STATES))
def test_skipped_states_parse_and_are_marked_skippable(state: str) -> None:
    event = parse({"order_uuid": ORDER, "order_state": state}, legacy=True, destination=ORDER_QUEUE)
    assert isinstance(event, OrderEvent)
    assert event.order_state in SKIPPED_ORDER_STATES


@pytest.mark.parametrize("state", ["pending-provider", "executing", None, ""])
def test_actionable_states_are_not_skipped(state: str | None) -> None:
    payload: dict[str, Any] = {"order_uuid": ORDER}
    if state is not None:
        payload["order_state"] = state
    event = parse(payload, legacy=True, destination=ORDER_QUEUE)
    assert isinstance(event, OrderEvent)
    assert event.order_state == state
    assert event.order_state not in SKIPPED_ORDER_STATES


# ---------------------------------------------------------------------------------------------------- uuids


@pytest.mark.parametrize(
    "raw",
    [ORDER, ORDER.upper(), "0a1b2c3d-4e5f-4071-8293-a4b5c6d7e8f9", "0A1B2C3D-4E5F-4071-8293-A4B5C6D7E8F9"],
)
def test_uuids_are_normalised(raw: str) -> None:
    event = parse({"object_type": "order", "order_uuid": raw, "offering_uuid": OFFERING.upper()})
    assert event == OrderEvent(ORDER, None, None, OFFERING)


def test_periodic_limits_dashed_resource_uuid_is_accepted() -> None:
    golden = load("resource_periodic_limits.json")
    payload = {**golden["examples"][0]["payload"], "object_type": "resource"}
    event = parse(payload)
    assert isinstance(event, ResourceEvent)
    assert event.resource_uuid == payload["resource_uuid"].replace("-", "")


# ---------------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"\xff\xfe{}", "not_utf8"),
        (b'{"object_type": "order", "order_uuid": "' + ORDER.encode() + b'", "x": "\xc3"}', "not_utf8"),
        (b"\xed\xa0\x80", "not_utf8"),  # an encoded surrogate is not UTF-8
        (b"", "not_json"),
        (b"{oops", "not_json"),
        (b'{"object_type": "order",}', "not_json"),
        (b"\xef\xbb\xbf{}", "not_json"),  # a BOM
        (b"1" * 5000, "not_json"),  # beyond Python's int-from-string limit
        (b"[]", "not_object"),
        (b'["order"]', "not_object"),
        (b"42", "not_object"),
        (b"4.2e1", "not_object"),
        (b'"order"', "not_object"),
        (b"null", "not_object"),
        (b"true", "not_object"),
    ],
)
def test_bad_bodies(body: bytes, expected: str) -> None:
    for legacy in (False, True):
        assert reason(parse_event(body, destination=ORDER_QUEUE, legacy=legacy)) == expected


@pytest.mark.parametrize(
    "extra",
    [b'"big": 123456789012345678901234567890', b'"nan": NaN', b'"inf": -Infinity', b'"twice": 1, "twice": 2'],
)
def test_json_orjson_refuses_is_read_like_the_standard_library(extra: bytes) -> None:
    """orjson reads a body first; what it refuses and JSON allows is the standard library's to read."""
    body = b'{"object_type": "order", "order_uuid": "' + ORDER.encode() + b'", ' + extra + b"}"
    assert parse_event(body, destination=ORDER_QUEUE, legacy=False) == OrderEvent(ORDER, None, None, None)


@pytest.mark.parametrize(
    ("payload", "legacy", "expected"),
    [
        ({"order_uuid": ORDER}, False, "missing_object_type"),
        ({"object_type": None, "order_uuid": ORDER}, False, "missing_object_type"),
        ({"object_type": "invoice", "order_uuid": ORDER}, False, "unknown_object_type"),
        ({"object_type": "invoice", "order_uuid": ORDER}, True, "unknown_object_type"),  # the body wins
        ({"object_type": "ORDER", "order_uuid": ORDER}, False, "unknown_object_type"),
        ({"object_type": "", "order_uuid": ORDER}, False, "unknown_object_type"),
        ({"object_type": 1, "order_uuid": ORDER}, False, "unknown_object_type"),
        ({"object_type": ["order"], "order_uuid": ORDER}, False, "unknown_object_type"),
        ({"object_type": {"order": 1}, "order_uuid": ORDER}, False, "unknown_object_type"),
        ({"object_type": True, "order_uuid": ORDER}, False, "unknown_object_type"),
        ({"object_type": "order"}, False, "bad_uuid"),
        ({"object_type": "order", "order_uuid": None}, False, "bad_uuid"),
        ({"object_type": "order", "order_uuid": ""}, False, "bad_uuid"),
        ({"object_type": "order", "order_uuid": ORDER[:-1]}, False, "bad_uuid"),
        ({"object_type": "order", "order_uuid": ORDER + "0"}, False, "bad_uuid"),
        ({"object_type": "order", "order_uuid": ORDER[:-1] + "g"}, False, "bad_uuid"),
        ({"object_type": "order", "order_uuid": "../../etc/passwd"}, False, "bad_uuid"),
        ({"object_type": "order", "order_uuid": 12345}, False, "bad_uuid"),
        ({"object_type": "order", "order_uuid": [ORDER]}, False, "bad_uuid"),
        ({"object_type": "order", "order_uuid": ORDER + "-" * 100}, False, "bad_uuid"),
        ({"object_type": "order", "order_uuid": ORDER, "resource_uuid": "nope"}, False, "bad_uuid"),
        ({"object_type": "order", "order_uuid": ORDER, "resource_uuid": 7}, False, "bad_uuid"),
        ({"object_type": "order", "order_uuid": ORDER, "offering_uuid": "x"}, False, "bad_uuid"),
        ({"object_type": "order", "order_uuid": ORDER, "order_state": 3}, False, "bad_field"),
        ({"object_type": "order", "order_uuid": ORDER, "order_state": ["done"]}, False, "bad_field"),
        ({"object_type": "resource"}, False, "bad_uuid"),
        ({"object_type": "resource", "resource_uuid": ""}, False, "bad_uuid"),
        ({"object_type": "resource", "resource_uuid": "nope"}, False, "bad_uuid"),
        ({"object_type": "resource", "resource_uuid": {"uuid": RESOURCE}}, False, "bad_uuid"),
        ({"object_type": "resource", "resource_uuid": RESOURCE, "offering_uuid": 1}, False, "bad_uuid"),
        ({"object_type": "offering_resources_sync", "offering_uuid": "x"}, False, "bad_uuid"),
        ({"object_type": "user_role", "offering_uuid": "x"}, False, "bad_uuid"),
    ],
)
def test_bad_payloads(payload: dict[str, Any], legacy: bool, expected: str) -> None:
    assert reason(parse(payload, legacy=legacy, destination=ORDER_QUEUE)) == expected


def test_legacy_without_a_recognisable_destination() -> None:
    result = parse({"order_uuid": ORDER}, legacy=True, destination="/queue/somewhere_else")
    assert reason(result) == "missing_object_type"


def test_legacy_destination_of_another_type_decides() -> None:
    destination = f"/queue/subscription_03ffee00000000000000000000000000_offering_{OFFERING}_resource"
    assert reason(parse({"order_uuid": ORDER}, legacy=True, destination=destination)) == "bad_uuid"
    event = parse({"resource_uuid": RESOURCE}, legacy=True, destination=destination)
    assert event == ResourceEvent(RESOURCE, None)


def test_optional_fields_may_be_absent_or_empty() -> None:
    assert parse({"object_type": "order", "order_uuid": ORDER, "resource_uuid": ""}) == OrderEvent(
        ORDER, None, None, None
    )
    assert parse({"object_type": "order", "order_uuid": ORDER, "resource_uuid": None}) == OrderEvent(
        ORDER, None, None, None
    )
    assert parse({"object_type": "offering_resources_sync"}) == SyncEvent(None)


def test_dead_letter_details_are_short_and_do_not_echo_the_body() -> None:
    secret_body = b'{"object_type": "' + b"x" * 10_000 + b'"}'
    result = parse_event(secret_body, destination=UNIFIED_QUEUE, legacy=False)
    assert isinstance(result, DeadLetter)
    assert len(result.detail) < 200


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 100_000 + b"]" * 100_000,
        b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
        b"[" * 100_000,
        b'{"object_type": "order", "order_uuid": "'
        + ORDER.encode()
        + b'", "x": '
        + b"[" * 100_000
        + b"]" * 100_000
        + b"}",
    ],
    ids=["arrays", "objects", "unterminated", "inside-a-valid-order"],
)
def test_deeply_nested_json_does_not_raise(body: bytes) -> None:
    assert reason(parse_event(body, destination=ORDER_QUEUE, legacy=True)) == "not_json"


def test_preview_is_200_bytes_and_safe() -> None:
    assert preview(b"a" * 1000) == "a" * 200
    assert preview(b"\xff\xfeabc") == "\\xff\\xfeabc"
    assert preview("é".encode() * 150).startswith("é")


# ---------------------------------------------------------------------------------------------------- properties

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12,
)
UUID_LIKE = st.sampled_from([ORDER, ORDER.upper(), "0a1b2c3d-4e5f-4071-8293-a4b5c6d7e8f9", "", "zz"]) | JSON_VALUES
PAYLOADS = st.fixed_dictionaries(
    {},
    optional={
        "object_type": st.sampled_from(sorted(OBSERVABLE_TYPES)) | JSON_VALUES,
        "order_uuid": UUID_LIKE,
        "resource_uuid": UUID_LIKE,
        "offering_uuid": UUID_LIKE,
        "order_state": st.sampled_from(sorted(SKIPPED_ORDER_STATES)) | JSON_VALUES,
    },
)
DESTINATIONS = st.sampled_from([ORDER_QUEUE, UNIFIED_QUEUE, ""]) | st.text(max_size=40)


def check_result(result: object) -> None:
    assert isinstance(result, ANY_EVENT)
    if isinstance(result, DeadLetter):
        assert result.reason in STABLE_REASONS
        assert isinstance(result.detail, str)
    elif isinstance(result, OrderEvent):
        assert normalise_uuid(result.order_uuid) == result.order_uuid
    elif isinstance(result, ResourceEvent):
        assert normalise_uuid(result.resource_uuid) == result.resource_uuid


@settings(max_examples=300, deadline=None)
@given(body=st.binary(max_size=300), destination=DESTINATIONS, legacy=st.booleans())
def test_arbitrary_bytes_never_raise(body: bytes, destination: str, legacy: bool) -> None:
    check_result(parse_event(body, destination=destination, legacy=legacy))


@settings(max_examples=300, deadline=None)
@given(value=JSON_VALUES, destination=DESTINATIONS, legacy=st.booleans())
def test_arbitrary_json_values_never_raise(value: Any, destination: str, legacy: bool) -> None:
    check_result(parse_event(json.dumps(value).encode(), destination=destination, legacy=legacy))


@settings(max_examples=500, deadline=None)
@given(payload=PAYLOADS, destination=DESTINATIONS, legacy=st.booleans())
def test_arbitrary_event_like_payloads_never_raise(payload: dict[str, Any], destination: str, legacy: bool) -> None:
    result = parse_event(json.dumps(payload).encode(), destination=destination, legacy=legacy)
    check_result(result)
    if not isinstance(result, DeadLetter):
        assert result.object_type in OBSERVABLE_TYPES
