"""Registration with Waldur: the broker credentials and queue(s) of one offering, obtained as the site agent does.

1. find or create the agent identity ``agent-<offering hex>`` (update it when found);
2. *unified* (default): ``register_queue`` with the object types ``order``, ``resource``,
   ``offering_resources_sync`` → one queue ``{rmq_username, queue_name, vhost}``; login = ``rmq_username``;
   *legacy*: per object type ``register_event_subscription`` then ``create_queue``; queue
   ``subscription_<sub hex>_offering_<offering hex>_<type>``, vhost = the user's uuid hex, login = the subscription
   uuid hex. As the site agent does, the names are recomputed from the uuids rather than taken from the answer.

The broker password is always the Waldur API token. `Subscription` keeps it out of its repr.

The naming functions are pure; `register` is the only part that talks to Waldur (through the gateway).
"""

from __future__ import annotations

import uuid as uuid_mod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import structlog

if TYPE_CHECKING:
    from cscs_storage_daemon.gateway import WaldurGateway

log = structlog.get_logger(__name__)

EventMode = Literal["unified", "legacy"]

#: What the storage daemon listens to (spec events §1).
OBJECT_TYPES: tuple[str, ...] = ("order", "resource", "offering_resources_sync")


@dataclass(frozen=True)
class Subscription:
    """Where and how to consume one queue. ``object_type`` is None for the unified queue (every body carries
    ``object_type``); in legacy mode it is the queue's type (also the suffix of its name)."""

    object_type: str | None
    queue_name: str
    vhost: str
    username: str
    password: str = field(repr=False)
    destination: str
    mqtt_topic: str
    offering_uuid: str = ""
    subscription_uuid: str | None = None  # legacy only

    @property
    def mqtt_username(self) -> str:
        """RabbitMQ's MQTT login names the vhost: ``<vhost>:<username>``."""
        return f"{self.vhost}:{self.username}"


def _hex(value: str | uuid_mod.UUID) -> str:
    if isinstance(value, uuid_mod.UUID):
        return value.hex
    return uuid_mod.UUID(str(value).strip()).hex


def identity_name(offering_uuid: str | uuid_mod.UUID) -> str:
    return f"agent-{_hex(offering_uuid)}"


def legacy_queue_name(
    subscription_uuid: str | uuid_mod.UUID, offering_uuid: str | uuid_mod.UUID, object_type: str
) -> str:
    """``subscription_<sub hex>_offering_<offering hex>_<type>`` (Mastermind parses it with lowercase hex only)."""
    return f"subscription_{_hex(subscription_uuid)}_offering_{_hex(offering_uuid)}_{object_type}"


def legacy_mqtt_topic(
    subscription_uuid: str | uuid_mod.UUID, offering_uuid: str | uuid_mod.UUID, object_type: str
) -> str:
    return f"subscription/{_hex(subscription_uuid)}/offering/{_hex(offering_uuid)}/{object_type}"


def destination(queue_name: str) -> str:
    """The STOMP destination: ``/amq/queue/<name>`` never declares the queue (``/queue/`` would, and clash)."""
    return f"/amq/queue/{queue_name}"


def legacy_subscription(
    event_subscription: Mapping[str, Any], offering_uuid: str | uuid_mod.UUID, object_type: str, password: str
) -> Subscription:
    """The `Subscription` of one legacy (subscription, offering, type): vhost = user uuid hex, login = sub hex."""
    sub_hex = _hex(str(event_subscription["uuid"]))
    offering_hex = _hex(offering_uuid)
    queue = legacy_queue_name(sub_hex, offering_hex, object_type)
    return Subscription(
        object_type=object_type,
        queue_name=queue,
        vhost=_hex(str(event_subscription["user_uuid"])),
        username=sub_hex,
        password=password,
        destination=destination(queue),
        mqtt_topic=legacy_mqtt_topic(sub_hex, offering_hex, object_type),
        offering_uuid=offering_hex,
        subscription_uuid=sub_hex,
    )


def unified_subscription(
    registration: Mapping[str, Any], offering_uuid: str | uuid_mod.UUID, password: str
) -> Subscription:
    """The `Subscription` of a unified queue registration ``{rmq_username, queue_name, vhost}``."""
    queue = str(registration["queue_name"])
    if not queue or "/" in queue:
        raise ValueError(f"unusable queue name from Waldur: {queue[:80]!r}")
    return Subscription(
        object_type=None,
        queue_name=queue,
        vhost=str(registration["vhost"]),
        username=str(registration["rmq_username"]),
        password=password,
        destination=destination(queue),
        mqtt_topic=queue,  # Mastermind's topic for a unified queue is the queue name
        offering_uuid=_hex(offering_uuid),
    )


def _offering_hex(offering: Any) -> str:
    """An offering uuid from a uuid string, a `UUID`, a mapping with ``uuid`` or a config with ``offering_uuid_hex``."""
    if isinstance(offering, (str, uuid_mod.UUID)):
        return _hex(offering)
    if isinstance(offering, Mapping):
        return _hex(str(offering["uuid"]))
    value = getattr(offering, "offering_uuid_hex", None) or getattr(offering, "uuid", None)
    if value is None:
        raise TypeError(f"cannot find an offering uuid in {type(offering).__name__}")
    return _hex(str(value))


def register(
    gateway: WaldurGateway,
    offering: Any,
    mode: EventMode = "unified",
    *,
    object_types: Sequence[str] = OBJECT_TYPES,
    password: str | None = None,
) -> list[Subscription]:
    """Register the offering's agent with Waldur and return its queue(s).

    ``offering``: the offering uuid, or an object carrying it (``OfferingConfig.offering_uuid_hex``, a mapping with
    ``uuid``). ``password`` defaults to the gateway's token (which is what Waldur sets as the broker password).
    Raises the gateway's `WaldurError`s.
    """
    if mode not in ("unified", "legacy"):
        raise ValueError(f"unknown event mode {mode!r}")
    offering_hex = _offering_hex(offering)
    secret = password if password is not None else gateway.token
    identity = gateway.ensure_agent_identity(offering_hex, name=identity_name(offering_hex))
    identity_uuid = str(identity["uuid"])
    if mode == "unified":
        registration = gateway.register_queue(identity_uuid, list(object_types))
        subscription = unified_subscription(registration, offering_hex, secret)
        log.info(
            "waldur.registered",
            mode=mode,
            offering=offering_hex,
            queue=subscription.queue_name,
            vhost=subscription.vhost,
            object_types=list(object_types),
        )
        return [subscription]
    subscriptions: list[Subscription] = []
    for object_type in object_types:
        event_subscription = gateway.register_event_subscription(
            identity_uuid,
            object_type,
            description=f"cscs-storage-daemon: {object_type} events of offering {offering_hex}",
        )
        gateway.create_queue(str(event_subscription["uuid"]), offering_hex, object_type)
        subscriptions.append(legacy_subscription(event_subscription, offering_hex, object_type, secret))
    log.info(
        "waldur.registered",
        mode=mode,
        offering=offering_hex,
        queues=[s.queue_name for s in subscriptions],
        vhost=subscriptions[0].vhost if subscriptions else None,
    )
    return subscriptions
