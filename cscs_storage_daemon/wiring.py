"""Wiring the shell around the core: registration with Waldur, the broker transports and the HTTP API.

Kept apart from `daemon.py` so the lifecycle reads top to bottom and each transport's construction is in one place.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

import structlog

from cscs_storage_daemon.config import OfferingConfig, effective_broker
from cscs_storage_daemon.transports.backoff import Backoff

if TYPE_CHECKING:
    from cscs_storage_daemon.daemon import Core, Daemon
    from cscs_storage_daemon.registration import Subscription
    from cscs_storage_daemon.runtime import OfferingRuntime

log = structlog.get_logger("cscs_storage_daemon.wiring")

#: How long the start sequence waits for the broker connections before it goes on (READY) without them.
CONNECT_WAIT = 30.0


def register_offering(core: Core, offering_config: OfferingConfig, offering: OfferingRuntime) -> list[Subscription]:
    """Register one offering's queue(s) with Waldur and route them to it (`replay` does the same, without a broker)."""
    from cscs_storage_daemon.registration import register

    legacy = core.config.daemon.event_mode == "legacy"
    subscriptions = register(offering.gateway, offering_config, core.config.daemon.event_mode)
    for sub in subscriptions:
        core.routes[sub.queue_name] = (offering, legacy)
        if sub.mqtt_topic:
            core.routes[sub.mqtt_topic] = (offering, legacy)
    return subscriptions


def connect_transports(daemon: Daemon, core: Core, recorder: Any = None) -> list[Any]:
    """Register every offering's queue(s) with Waldur, build one transport per offering, start them."""
    from cscs_storage_daemon.transports.mqtt import MqttTransport
    from cscs_storage_daemon.transports.stomp import StompTransport

    config = core.config
    transports: list[Any] = []
    submit = core.dispatcher.submit
    if recorder is not None:
        submit = recorder.wrap_delivery(submit)
    for offering_config, offering in zip(config.offerings, core.offerings, strict=True):
        endpoint = effective_broker(config, offering_config)
        subscriptions = register_offering(core, offering_config, offering)
        daemon.subscriptions[offering.slug] = subscriptions
        username = endpoint.username
        password = endpoint.password.get_secret_value() if endpoint.password else None
        if endpoint.protocol == "stomp":
            transport: Any = StompTransport(
                endpoint.host,
                endpoint.port,
                subscriptions=stomp_subscriptions(subscriptions, endpoint),
                websocket_path=endpoint.websocket_path,
                tls=endpoint.tls,
                verify_tls=endpoint.verify_ssl,
                prefetch=endpoint.prefetch,
                heartbeat_ms=endpoint.heartbeat_ms,
                backoff=Backoff(),
                name=f"stomp:{offering.slug}",
            )
        else:
            first = subscriptions[0]
            transport = MqttTransport(
                endpoint.host,
                endpoint.port,
                topics=[sub.mqtt_topic for sub in subscriptions if sub.mqtt_topic],
                # Stable across restarts (the persistent session keeps what arrives while the daemon is away) and
                # unique per registration (another agent identity must not take over this session).
                client_id=f"cscs-storage-{offering.uuid[:12]}-{first.username[:16]}",
                username=username or f"{first.vhost}:{first.username}",
                password=password or first.password,
                websocket_path=endpoint.websocket_path,
                tls=endpoint.tls,
                verify_tls=endpoint.verify_ssl,
                backoff=Backoff(),
                name=f"mqtt:{offering.slug}",
            )
        _hook(daemon, core, offering, offering_config, transport)
        transport.start(submit)
        transports.append(transport)
        log.info("broker.starting", offering=offering.slug, url=endpoint.url, queues=len(subscriptions))
    # READY follows the connection (events spec §5): the transports connect on their own threads, so wait for them
    # (bounded: a broker that is down at start must not keep the daemon from serving files and reconciling).
    deadline = time.monotonic() + CONNECT_WAIT
    while not all(t.connected for t in transports) and time.monotonic() < deadline:
        time.sleep(0.02)
    if not all(t.connected for t in transports):
        log.warning("broker.not_connected_at_start", waited=CONNECT_WAIT)
    return transports


def stomp_subscriptions(subscriptions: list[Any], endpoint: Any) -> list[Any]:
    """What a STOMP transport consumes for Waldur's registrations (a configured login overrides Waldur's)."""
    from cscs_storage_daemon.transports.stomp import StompSubscription

    password = endpoint.password.get_secret_value() if endpoint.password else None
    return [
        StompSubscription(
            destination=sub.destination,
            login=endpoint.username or sub.username,
            passcode=password or sub.password,
            vhost=endpoint.vhost or sub.vhost,
        )
        for sub in subscriptions
    ]


def _hook(daemon: Daemon, core: Core, offering: Any, offering_config: Any, transport: Any) -> None:
    name = getattr(transport, "name", "broker")
    state = {"connected_once": False}

    def on_connected(*_args: str) -> None:
        core.metrics.broker_connected.set(1)
        if daemon.health is not None:
            daemon.health.broker_connected(name)
        log.info("broker.connected", transport=name, offering=offering.slug)
        if state["connected_once"]:
            core.metrics.broker_reconnects.labels(name.split(":")[0]).inc()
            core.reconciler.request(offering, "reconnected")
        state["connected_once"] = True

    def on_disconnected(*_args: str) -> None:
        core.metrics.broker_connected.set(0)
        if daemon.health is not None:
            daemon.health.broker_disconnected(name)
        log.warning("broker.disconnected", transport=name, offering=offering.slug)

    def on_queue_missing(destination: str = "", *_args: str) -> None:
        from cscs_storage_daemon.registration import register

        log.warning("broker.queue_missing", transport=name, destination=destination)
        recorder = daemon.recorder
        try:
            with recorder.task("register", offering=offering.slug) if recorder is not None else nullcontext():
                subscriptions = register(offering.gateway, offering_config, core.config.daemon.event_mode)
        except Exception as exc:
            log.error("broker.reregister_failed", error=str(exc)[:300])
            return
        daemon.subscriptions[offering.slug] = subscriptions
        update = getattr(transport, "update_subscriptions", None)
        if update is not None:
            update(stomp_subscriptions(subscriptions, effective_broker(core.config, offering_config)))
        log.info("broker.reregistered", transport=name, queues=len(subscriptions))

    transport.on_connected = on_connected
    transport.on_disconnected = on_disconnected
    transport.on_queue_missing = on_queue_missing


def start_api(daemon: Daemon, core: Core, *, broker_required: bool = True) -> tuple[Any, Any]:
    """Start the HTTP API inside the process when `http.enabled`; returns (health, server)."""
    from cscs_storage_daemon.health import HealthState

    http = core.config.daemon.http
    health = HealthState(offerings=[o.slug for o in core.offerings], broker_required=broker_required)
    core.scheduler.on_written = lambda offering, at: health.snapshot_written(offering.slug, at)
    for offering in core.offerings:
        last = core.metrics.last_snapshot.labels(offering.slug)._value.get()
        if last:
            from datetime import UTC, datetime

            health.snapshot_written(offering.slug, datetime.fromtimestamp(last, UTC))
    if not http.enabled:
        return health, None
    from cscs_storage_daemon.api.server import build_server

    server = build_server(core, health)
    server.start()
    log.info("http.listening", listen=http.listen, port=server.port)
    return health, server
