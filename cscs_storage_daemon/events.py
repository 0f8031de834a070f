"""From a delivered message to a typed event, or a reason to dead-letter it (events spec §1 "Bad input").

Pure: bytes and headers in, an `Event` or a `DeadLetter` out. Nothing a body contains can raise from here.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal

import orjson

# Mastermind's ObservableObjectType values.
OBSERVABLE_TYPES = frozenset(
    {
        "order",
        "user_role",
        "resource",
        "offering_user",
        "importable_resources",
        "service_account",
        "course_account",
        "resource_periodic_limits",
        "offering_resources_sync",
        "resource_api_key_rotation",
        "resource_end_date_change_request",
        "user_profile",
        "user_ssh_key",
        "user_lifecycle",
        "service_provider_project_group",
    }
)
HANDLED_TYPES = frozenset({"order", "resource", "offering_resources_sync"})

# Order states that need no REST call at all.
SKIPPED_ORDER_STATES = frozenset(
    {"done", "erred", "canceled", "rejected", "pending-consumer", "pending-project", "pending-start-date"}
)

_QUEUE_SUFFIX = re.compile(r"^(?:/(?:amq/)?queue/)?subscription_[0-9a-f]+_offering_[0-9a-f]+_(?P<type>\w+)$")
_MQTT_TOPIC = re.compile(r"^subscription/[0-9a-f]+/offering/[0-9a-f]+/(?P<type>\w+)$")
PREVIEW_BYTES = 200


_HEX32 = re.compile(r"[0-9a-f]{32}")


def normalise_uuid(value: Any) -> str | None:
    """32 lower-case hex digits from a uuid with or without dashes, any case; None if it is not one."""
    if not isinstance(value, str) or len(value) > 64:
        return None
    if len(value) == 32 and _HEX32.fullmatch(value):
        return value  # already canonical (what Waldur sends in event bodies)
    text = value.replace("-", "").lower()
    return text if _HEX32.fullmatch(text) else None


@dataclass(frozen=True, slots=True)
class OrderEvent:
    order_uuid: str
    order_state: str | None
    resource_uuid: str | None  # unified bodies carry it; legacy ones do not
    offering_uuid: str | None
    object_type: Literal["order"] = "order"

    @property
    def key(self) -> str:
        return self.resource_uuid or self.order_uuid


@dataclass(frozen=True, slots=True)
class ResourceEvent:
    resource_uuid: str
    offering_uuid: str | None
    object_type: Literal["resource"] = "resource"

    @property
    def key(self) -> str:
        return self.resource_uuid


@dataclass(frozen=True, slots=True)
class SyncEvent:
    offering_uuid: str | None
    object_type: Literal["offering_resources_sync"] = "offering_resources_sync"

    @property
    def key(self) -> str:
        return "offering_resources_sync"


@dataclass(frozen=True, slots=True)
class IgnoredEvent:
    """A valid event of a Waldur type the daemon does not act on (`user_role`, say): acknowledged, counted."""

    object_type: str
    offering_uuid: str | None

    @property
    def key(self) -> str:
        return self.object_type


@dataclass(frozen=True, slots=True)
class DeadLetter:
    reason: str  # a stable short name, used as a metric label
    detail: str

    key = "dead-letter"


Event = OrderEvent | ResourceEvent | SyncEvent | IgnoredEvent


def object_type_from_destination(destination: str) -> str | None:
    """Legacy mode: the object type is the suffix of the queue name (or MQTT topic)."""
    match = _QUEUE_SUFFIX.match(destination) or _MQTT_TOPIC.match(destination)
    return match.group("type") if match else None


def preview(body: bytes) -> str:
    """The first 200 bytes of a body, safe to log."""
    return body[:PREVIEW_BYTES].decode("utf-8", errors="backslashreplace")


def parse_event(body: bytes, *, destination: str, legacy: bool) -> Event | DeadLetter:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        return DeadLetter("not_utf8", f"body is not UTF-8 ({exc.reason} at byte {exc.start})")
    try:
        payload = orjson.loads(text)  # the same value as the standard library's for what both read
    except orjson.JSONDecodeError:
        # What orjson refuses and JSON allows (integers past 64 bits, NaN): the standard library decides, and
        # words the error when it is not JSON.
        try:
            payload = json.loads(text)
        except (ValueError, RecursionError) as exc:
            return DeadLetter("not_json", f"body is not JSON: {str(exc)[:120]}")
    if not isinstance(payload, dict):
        return DeadLetter("not_object", f"body is a JSON {type(payload).__name__}, not an object")
    return event_from_payload(payload, destination=destination, legacy=legacy)


def event_from_payload(payload: dict[str, Any], *, destination: str, legacy: bool) -> Event | DeadLetter:
    object_type = payload.get("object_type")
    if legacy and object_type is None:
        object_type = object_type_from_destination(destination)
    if object_type is None:
        return DeadLetter("missing_object_type", "no object_type in the body")
    if not isinstance(object_type, str) or object_type not in OBSERVABLE_TYPES:
        shown = object_type if isinstance(object_type, str) else type(object_type).__name__
        return DeadLetter("unknown_object_type", f"object_type {str(shown)[:60]!r} is not a Waldur observable type")
    raw_offering = payload.get("offering_uuid")
    offering_uuid = normalise_uuid(raw_offering)
    if raw_offering is not None and offering_uuid is None:
        return DeadLetter("bad_uuid", "offering_uuid is not a UUID")
    if object_type == "order":
        order_uuid = normalise_uuid(payload.get("order_uuid"))
        if order_uuid is None:
            return DeadLetter("bad_uuid", "order_uuid is missing or not a UUID")
        state = payload.get("order_state")
        raw_resource = payload.get("resource_uuid")
        resource_uuid = normalise_uuid(raw_resource)
        if raw_resource not in (None, "") and resource_uuid is None:
            return DeadLetter("bad_uuid", "resource_uuid is not a UUID")
        if state is not None and not isinstance(state, str):
            return DeadLetter("bad_field", "order_state is not a string")
        return OrderEvent(order_uuid, state, resource_uuid, offering_uuid)
    if object_type == "resource":
        resource_uuid = normalise_uuid(payload.get("resource_uuid"))
        if resource_uuid is None:
            return DeadLetter("bad_uuid", "resource_uuid is missing or not a UUID")
        return ResourceEvent(resource_uuid, offering_uuid)
    if object_type == "offering_resources_sync":
        return SyncEvent(offering_uuid)
    return IgnoredEvent(object_type, offering_uuid)
