"""`run`: the event daemon's lifecycle (events spec §5).

Start: config is already valid (the CLI exits 78 otherwise); open the ledger, read each provider offering (its
slug), fill the mirror, write a first all.json, connect, reconcile, then READY=1, `daemon.ready`, /healthz 200.
SIGTERM/SIGINT drain and exit 0; SIGHUP reloads what can change live.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import httpx
import structlog

from cscs_storage_daemon import __version__
from cscs_storage_daemon.clock import Clock, SystemClock
from cscs_storage_daemon.config import Config, ConfigError, DaemonSettings, OfferingConfig, load_config
from cscs_storage_daemon.debounce import DebounceRules
from cscs_storage_daemon.dispatcher import DeadLetterLog, Dispatcher
from cscs_storage_daemon.gateway import WaldurError
from cscs_storage_daemon.ledger import Ledger, OrderLedger
from cscs_storage_daemon.memory import MemoryTrimmer
from cscs_storage_daemon.metrics import Metrics
from cscs_storage_daemon.processor import Processor
from cscs_storage_daemon.reconciler import Reconciler
from cscs_storage_daemon.retry import RetryInfo, RetryPolicy
from cscs_storage_daemon.runtime import OfferingRuntime, open_offering
from cscs_storage_daemon.sdnotify import Notifier
from cscs_storage_daemon.snapshots import SnapshotScheduler
from cscs_storage_daemon.stamps import StampRecorder, Stamps

if TYPE_CHECKING:
    from cscs_storage_daemon.capture import CaptureWriter

log = structlog.get_logger("cscs_storage_daemon.daemon")


def _warn(event: str, fields: dict[str, Any]) -> None:
    log.warning(event, **fields)


@dataclass
class Core:
    """Everything the daemon runs except the transports: also what `replay` and `serve` build."""

    config: Config
    offerings: list[OfferingRuntime]
    ledger: OrderLedger
    metrics: Metrics
    stamps: Stamps
    processor: Processor
    scheduler: SnapshotScheduler
    reconciler: Reconciler
    dispatcher: Dispatcher
    dead_letters: DeadLetterLog
    routes: dict[str, tuple[OfferingRuntime, bool]] = field(default_factory=dict)

    def route(self, delivery: Any) -> tuple[OfferingRuntime | None, bool]:
        """Which offering a delivery belongs to, by its queue name or MQTT topic."""
        destination: str = delivery.destination
        name = destination.rsplit("/", 1)[-1] if destination.startswith("/") else destination
        found = self.routes.get(name) or self.routes.get(destination)
        if found is None:
            return None, self.config.daemon.event_mode == "legacy"
        return found

    def by_uuid(self) -> dict[str, OfferingRuntime]:
        return {o.uuid: o for o in self.offerings}

    def fill(self) -> None:
        """Fill every mirror from every page and write the first all.json of each offering."""
        for offering in self.offerings:
            changes = offering.read_all()
            self.processor._after_change(offering, changes)
            self.scheduler.regenerate(offering, force=True)

    def close(self) -> None:
        for offering in self.offerings:
            offering.gateway.close()
        self.ledger.close()


def build_core(
    config: Config,
    *,
    clock: Clock | None = None,
    metrics: Metrics | None = None,
    http_transport: Any = None,
    stamp_recorder: StampRecorder | None = None,
    output_root: Path | None = None,
    inline: bool = False,
    http_transport_for: Callable[[OfferingConfig], httpx.BaseTransport] | None = None,
    stamps: Stamps | None = None,
    retry: RetryPolicy | None = None,
    retry_hook: Callable[[RetryInfo], None] | None = None,
    ledger: OrderLedger | None = None,
) -> Core:
    """The core of `run`. The keyword hooks are for the capture and the replay: a transport per offering, the stamp
    source, the retry policy and a hook before every retry, and the ledger."""
    clock = stamps.clock if stamps is not None else clock or SystemClock()
    metrics = metrics or Metrics()
    settings = config.daemon
    state_dir = Path(settings.state_directory)
    state_dir.mkdir(parents=True, exist_ok=True)

    def on_retry(info: RetryInfo) -> None:
        metrics.waldur_retries.labels(info.reason).inc()
        if retry_hook is not None:
            retry_hook(info)

    offerings: list[OfferingRuntime] = []
    for offering_config in config.offerings:
        runtime = open_offering(
            offering_config,
            retry=retry or config.daemon.retry.policy(),
            timeout=settings.retry.timeout,
            removed_retention=settings.removed_retention,
            transport=http_transport_for(offering_config) if http_transport_for is not None else http_transport,
            on_retry=on_retry,
            warn=_warn,
        )
        if output_root is not None:
            from cscs_storage_daemon.writer import OutputWriter

            runtime.writer = OutputWriter(output_root / runtime.slug, file_mode=runtime.writer.file_mode)
        offerings.append(runtime)
    ledger = ledger or Ledger(state_dir / "ledger.sqlite3")
    stamps = stamps or Stamps(clock, stamp_recorder)
    scheduler = SnapshotScheduler(
        offerings,
        rules=DebounceRules(settings.snapshot.quiet, settings.snapshot.max_wait, settings.snapshot.heartbeat),
        stamps=stamps,
        metrics=metrics,
    )
    processor = Processor(
        ledger=ledger,
        stamps=stamps,
        metrics=metrics,
        auto_approve=settings.auto_approve,
        complete_orders=settings.complete_orders,
        on_mirror_change=scheduler.changed,
    )
    reconciler = Reconciler(offerings, processor=processor, metrics=metrics, interval=settings.reconcile_interval)
    dead_letters = DeadLetterLog(state_dir / "dead-letter.jsonl")
    core = Core(
        config=config,
        offerings=offerings,
        ledger=ledger,
        metrics=metrics,
        stamps=stamps,
        processor=processor,
        scheduler=scheduler,
        reconciler=reconciler,
        dispatcher=None,  # type: ignore[arg-type]  # set just below: it needs the core's router
        dead_letters=dead_letters,
    )
    core.dispatcher = Dispatcher(
        processor=processor,
        route=core.route,
        offerings=core.by_uuid(),
        dead_letters=dead_letters,
        metrics=metrics,
        request_reconcile=reconciler.request,
        workers=settings.workers,
        inline=inline,
    )
    return core


class Daemon:
    def __init__(self, config: Config, *, record: str | None = None, notifier: Notifier | None = None) -> None:
        self.config = config
        self.record = record
        self.notifier = notifier or Notifier()
        self._stop = threading.Event()
        self._reload = threading.Event()
        self.transports: list[Any] = []
        self.subscriptions: dict[str, list[Any]] = {}
        self.api_server: Any = None
        self.health: Any = None
        self.core: Core | None = None
        self.recorder: CaptureWriter | None = None
        self.exit_code = 0

    # -- signals -----------------------------------------------------------------------------------------------

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if signum == signal.SIGHUP:
            self._reload.set()
        else:
            self._stop.set()

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)

    def request_stop(self) -> None:
        self._stop.set()

    # -- lifecycle ---------------------------------------------------------------------------------------------

    def start(self) -> None:
        from cscs_storage_daemon.wiring import connect_transports, start_api

        recorder = None
        if self.record:
            from cscs_storage_daemon.capture import CaptureWriter

            recorder = CaptureWriter.open(self.record, self.config)
        self.recorder = recorder
        log.info("daemon.starting", version=__version__, offerings=len(self.config.offerings))
        # With --record, everything the start sequence does is one task of the capture; `replay` repeats the same
        # sequence (build_core, fill, registration, reconciliation), without the broker and the API.
        with recorder.task("start") if recorder is not None else nullcontext():
            core = build_core(
                self.config,
                http_transport_for=recorder.transport_for if recorder else None,
                stamps=recorder.stamps(SystemClock()) if recorder else None,
            )
            if recorder is not None:
                recorder.attach(core)
            self.core = core
            core.fill()
            core.dispatcher.start()
            core.scheduler.start()
            self.health, self.api_server = start_api(self, core)
            self.transports = connect_transports(self, core, recorder)
            for offering in core.offerings:
                core.reconciler.run_once(offering, "start")
        core.reconciler.start()
        if self.health is not None:
            self.health.set_ready(True)
        self.notifier.ready(status=f"{len(core.offerings)} offering(s), mirror filled")
        log.info("daemon.ready", version=__version__, offerings=[o.slug for o in core.offerings])

    def healthy(self) -> bool:
        core = self.core
        if core is None:
            return False
        return (
            core.dispatcher.alive
            and core.scheduler.alive
            and core.reconciler.alive
            and all(getattr(t, "alive", True) for t in self.transports)
        )

    def loop(self) -> None:
        interval = self.notifier.watchdog_interval() or 5.0
        trimmer = MemoryTrimmer()
        while not self._stop.wait(min(interval, 1.0)):
            trimmer.due()
            if self._reload.is_set():
                self._reload.clear()
                self.reload()
            if self.healthy():
                self.notifier.watchdog()
            else:
                log.error("daemon.unhealthy")

    def reload(self) -> None:
        self.notifier.reloading()
        source = self.config.source
        try:
            new = load_config(source)
        except ConfigError as exc:
            log.error("config.reload_failed", error=str(exc))
            self.notifier.ready()
            return
        core = self.core
        assert core is not None
        d = new.daemon
        apply_live_settings(core, d)
        if self.recorder is not None:
            self.recorder.record_reload(new)
        from cscs_storage_daemon import logs

        logs.configure(level=d.log.level, fmt=d.log.format)
        fixed = []
        old = self.config.daemon
        for name in ("broker", "event_mode", "state_directory", "workers", "http"):
            if getattr(old, name) != getattr(d, name):
                fixed.append(f"daemon.{name}")
        if [o.model_dump() for o in new.offerings] != [o.model_dump() for o in self.config.offerings]:
            fixed.append("offerings")
        if fixed:
            log.warning("config.reload_needs_restart", keys=fixed)
        self.config = new
        log.info("config.reloaded")
        self.notifier.ready()

    def shutdown(self) -> None:
        core = self.core
        self.notifier.stopping()
        log.info("daemon.stopping")
        timeout = self.config.daemon.shutdown_timeout
        if core is not None:
            core.reconciler.request_stop()  # a reconciliation pass takes no further order after SIGTERM
            drained = core.dispatcher.stop(timeout)
            if not drained:
                log.warning("daemon.drain_timeout", in_flight=core.dispatcher.in_flight)
        for transport in self.transports:
            try:
                transport.stop(timeout=5.0)
            except Exception:
                log.exception("broker.stop_failed")
        if core is not None:
            core.reconciler.stop()
            core.scheduler.stop(flush=True)
        if self.api_server is not None:
            self.api_server.stop(timeout=5.0)
        if core is not None:
            core.close()
        recorder = getattr(self, "recorder", None)
        if recorder is not None:
            recorder.close()
        log.info("daemon.stopped")


def apply_live_settings(core: Core, d: DaemonSettings) -> None:
    """What a reload changes in a running core (also replayed from a capture's `reload` records)."""
    core.processor.auto_approve = d.auto_approve
    core.processor.complete_orders = d.complete_orders
    core.reconciler.interval = d.reconcile_interval
    core.scheduler.rules = DebounceRules(d.snapshot.quiet, d.snapshot.max_wait, d.snapshot.heartbeat)
    for debouncer in core.scheduler._debouncers.values():
        debouncer.rules = core.scheduler.rules


def run_daemon(config: Config, *, record: str | None = None) -> int:
    daemon = Daemon(config, record=record)
    daemon.install_signal_handlers()
    try:
        daemon.start()
    except ConfigError as exc:  # found only at start (an API token file that cannot be read, say)
        print(f"configuration error: {exc}", file=sys.stderr)
        log.error("daemon.start_failed", error=str(exc)[:500], reason="configuration")
        daemon.shutdown()
        return 78
    except (WaldurError, OSError, ValueError) as exc:
        log.error("daemon.start_failed", error=str(exc)[:500])
        daemon.shutdown()
        return 1
    try:
        daemon.loop()
    finally:
        daemon.shutdown()
    return daemon.exit_code


def serve_once(
    config: Config, *, stop: threading.Event | None = None, on_ready: Callable[[int], None] | None = None
) -> int:
    """`serve`: fill the mirror with one sync and serve the HTTP API, for a read-only host without a broker."""
    from cscs_storage_daemon.wiring import start_api

    daemon = Daemon(config)
    daemon.install_signal_handlers() if stop is None else None
    core = build_core(config)
    daemon.core = core
    try:
        for offering in core.offerings:
            core.processor._after_change(offering, offering.read_all())
    except WaldurError as exc:
        log.error("serve.sync_failed", error=str(exc)[:500])
        core.close()
        return 1
    daemon.health, daemon.api_server = start_api(daemon, core, broker_required=False)
    if daemon.health is not None:
        for offering in core.offerings:
            daemon.health.snapshot_written(offering.slug, SystemClock().now())
        daemon.health.set_ready(True)
    log.info("daemon.ready", mode="serve", offerings=[o.slug for o in core.offerings])
    if on_ready is not None and daemon.api_server is not None:
        on_ready(daemon.api_server.port)
    event = stop or daemon._stop
    while not event.wait(1.0):
        pass
    if daemon.api_server is not None:
        daemon.api_server.stop(timeout=5.0)
    core.close()
    return 0


def wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
