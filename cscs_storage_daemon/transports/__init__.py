"""Broker transports: deliver messages and acknowledge them, nothing else (see ``base``)."""

from .backoff import Backoff
from .base import Delivery, DeliveryCallback, Transport, TransportHooks, make_ssl_context
from .mqtt import MqttTransport, mqtt_topic
from .stomp import (
    AMQ_QUEUE_PREFIX,
    StompSubscription,
    StompTransport,
    legacy_queue_name,
    queue_destination,
    validate_destination,
)

__all__ = [
    "AMQ_QUEUE_PREFIX",
    "Backoff",
    "Delivery",
    "DeliveryCallback",
    "MqttTransport",
    "StompSubscription",
    "StompTransport",
    "Transport",
    "TransportHooks",
    "legacy_queue_name",
    "make_ssl_context",
    "mqtt_topic",
    "queue_destination",
    "validate_destination",
]
