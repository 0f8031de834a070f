"""`run --record FILE`: the capture — everything the daemon received and everything that decided what it wrote.

A capture is JSON Lines, one record per line, appended and flushed record by record (a crash loses at most the last
line). Every record has ``v`` (the format version), ``seq`` (monotonic within the file), ``time`` (ISO UTC),
``mono`` (the monotonic clock) and ``kind``:

* ``header`` — first: the effective configuration (secrets masked) and the daemon version;
* ``event`` — a delivery as received: transport, destination, headers, body (UTF-8 text, else base64);
* ``http`` — one Waldur exchange: method, path with query, request body, status, the response headers that matter,
  response body; or ``error`` (connect error, timeout...) when no answer came, so a replay repeats the retries;
* ``stamp`` — a clock reading that ended up in a file (``stamp``: ``order`` / ``snapshot``, ``key``, ``reading``);
  a ``snapshot`` stamp is an all.json regeneration (the scheduler reads the clock only when it regenerates);
* ``task`` / ``done`` — the start and the end of one unit of work that is not an event: the start sequence, a
  reconciliation pass, an all.json regeneration, a re-registration;
* ``mirror`` and ``lock`` — the order in which work running in parallel changed the mirror and took an order's lock;
* ``ledger`` — an order's ledger row written by an earlier run, the first time this run looks it up;
* ``write_error`` — a file write that failed; ``reload`` — a SIGHUP reload; ``end`` — a clean stop.

Every record made while handling an event or a task carries ``task``: the ``seq`` of the event or task record it
belongs to. The daemon runs workers, the reconciler and the snapshot timer in parallel; with the task of every
record and the order of the points where their work meets (HTTP answers, stamps, mirror changes, order locks), a
replay runs the same work in the same interleaving and writes the same files.

The API token never reaches the file: no request header is recorded, and every line is scrubbed of every configured
secret before it is written, as a last defence.
"""

from __future__ import annotations

import base64
import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

import httpx
import orjson
import structlog

from cscs_storage_daemon import __version__
from cscs_storage_daemon.clock import Clock
from cscs_storage_daemon.config import Config, render_effective_config
from cscs_storage_daemon.ledger import Ledger, OrderRecord
from cscs_storage_daemon.mirror import Change, OfferingMirror
from cscs_storage_daemon.stamps import Stamps
from cscs_storage_daemon.writer import OutputWriter

if TYPE_CHECKING:
    from cscs_storage_daemon.config import OfferingConfig
    from cscs_storage_daemon.daemon import Core
    from cscs_storage_daemon.runtime import OfferingRuntime
    from cscs_storage_daemon.transports.base import Delivery

log = structlog.get_logger("cscs_storage_daemon.capture")

FORMAT_VERSION = 1
#: Response headers a replay needs (pagination, retry hints, the body's type); nothing else is recorded.
RESPONSE_HEADERS = ("content-type", "link", "x-result-count", "retry-after")
#: Request body fields the gateway fills from the wall clock (not from `Stamps`); ignored when matching requests.
VOLATILE_BODY_FIELDS = frozenset({"last_restarted"})
#: Delivery headers never recorded, whatever a broker puts there.
_SECRET_HEADER_WORDS = ("authorization", "passcode", "password", "token", "cookie", "secret")
MASK = b"***"


# --------------------------------------------------------------------------------------------------------------
# Bodies and request keys (shared with the replay)


def encode_body(data: bytes) -> tuple[str, str]:
    """``(text, encoding)``: the body as text when it is valid UTF-8, else base64."""
    try:
        return data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        return base64.b64encode(data).decode("ascii"), "base64"


def decode_body(text: str, encoding: str | None) -> bytes:
    if encoding == "base64":
        return base64.b64decode(text.encode("ascii"), validate=True)
    if encoding not in (None, "utf-8"):
        raise ValueError(f"unknown body_encoding {encoding!r}")
    return text.encode("utf-8")


def request_path(request: httpx.Request) -> str:
    """Path and query as sent (percent-encoded), without scheme and host."""
    return request.url.raw_path.decode("ascii")


def body_key(body: bytes) -> str:
    """What of a request body identifies the request: JSON minus `VOLATILE_BODY_FIELDS`, canonically ordered."""
    if not body:
        return ""
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body.decode("utf-8", errors="backslashreplace")
    if isinstance(value, dict):
        value = {k: v for k, v in value.items() if k not in VOLATILE_BODY_FIELDS}
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode("utf-8")


def describe_request(method: str, path: str, body: bytes | str = b"") -> str:
    text = body.decode("utf-8", errors="replace") if isinstance(body, bytes) else body
    shown = f" with body {text[:120]}" if text else ""
    return f"{method} {path}{shown}"


def _uuid_of(raw: Mapping[str, Any]) -> str:
    return str(raw.get("uuid", ""))[:64]


# --------------------------------------------------------------------------------------------------------------
# Points where parallel work meets: mirror changes and order locks. The same subclasses serve the capture (which
# records the order) and the replay (which enforces it).


class Gate(Protocol):
    def mirror_change(self, slug: str, op: str, uuid: str | None) -> AbstractContextManager[object]:
        """Brackets one change of a mirror (nested changes, like the applies of a full listing, are part of it)."""
        ...

    def acquire(self, lock: Any, slot: int) -> None:
        """Take the order lock `slot` (`lock` is a plain `threading.Lock`)."""
        ...


class GatedMirror(OfferingMirror):
    """The offering's mirror, with every change passing through a `Gate`."""

    _gate: Gate

    @classmethod
    def wrap(cls, mirror: OfferingMirror, gate: Gate) -> GatedMirror:
        """The same mirror (same entries, same lock) with gated changes; use it instead of `mirror` from now on."""
        gated = cls.__new__(cls)
        gated.__dict__.update(mirror.__dict__)
        gated._gate = gate
        return gated

    def apply(self, raw: Mapping[str, Any]) -> Change:
        with self._gate.mirror_change(self.slug, "apply", _uuid_of(raw)):
            return super().apply(raw)

    def replace_all(self, raws: Any) -> list[Change]:
        with self._gate.mirror_change(self.slug, "replace_all", None):
            return super().replace_all(raws)

    def remove(self, uuid: str) -> bool:
        with self._gate.mirror_change(self.slug, "remove", str(uuid)[:64]):
            return super().remove(uuid)

    def expire_removed(self) -> list[str]:
        with self._gate.mirror_change(self.slug, "expire_removed", None):
            return super().expire_removed()


class GatedLock:
    """An order lock of the processor whose acquisitions pass through a `Gate`."""

    def __init__(self, slot: int, gate: Gate) -> None:
        self.slot = slot
        self._gate = gate
        self._lock = threading.Lock()

    def __enter__(self) -> bool:
        self._gate.acquire(self._lock, self.slot)
        return True

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


def gate_core(core: Core, gate: Gate) -> None:
    """Route the core's mirror changes and order locks through `gate` (before anything uses them)."""
    for offering in core.offerings:
        offering.mirror = GatedMirror.wrap(offering.mirror, gate)
    processor: Any = core.processor
    processor._order_locks = [GatedLock(slot, gate) for slot in range(len(processor._order_locks))]


# --------------------------------------------------------------------------------------------------------------
# The writer


class _Local(threading.local):
    def __init__(self) -> None:
        self.task: int | None = None
        self.mirror_depth = 0


@dataclass
class CaptureStats:
    records: int = 0
    events: int = 0
    exchanges: int = 0
    stamps: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)


class CaptureWriter:
    """Appends records to a capture file; thread-safe. Build it with `CaptureWriter.open`."""

    def __init__(self, handle: Any, path: Path, secrets: list[str], *, first_seq: int = 0) -> None:
        self.path = path
        self._handle = handle
        self._io = threading.Lock()
        # Mirror changes and the all.json stamp + mirror read are ordered under this lock, so the file tells which
        # changes an all.json saw.
        self._order = threading.RLock()
        self._seq = first_seq
        self._closed = False
        self._local = _Local()
        self._deliveries: dict[int, int] = {}  # id(delivery) → seq of its event record
        self._secrets = self._secret_forms(secrets)
        self.stats = CaptureStats()

    @staticmethod
    def _secret_forms(secrets: list[str]) -> list[bytes]:
        forms: set[bytes] = set()
        for secret in secrets:
            if len(secret) < 4:  # the same floor as the log redaction: shorter would garble everything
                continue
            forms.add(secret.encode("utf-8"))
            forms.add(orjson.dumps(secret)[1:-1])  # as it appears inside a JSON string
        return sorted(forms, key=len, reverse=True)

    @classmethod
    def open(cls, path: str | os.PathLike[str], config: Config) -> CaptureWriter:
        """Open (append to) the capture at `path` and write its header with the effective configuration."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        first_seq = _prepare_append(target)
        handle = open(target, "ab")
        secrets = [o.waldur_api_token.get_secret_value() for o in config.offerings]
        password = config.daemon.broker.password
        if password is not None:
            secrets.append(password.get_secret_value())
        writer = cls(handle, target, secrets, first_seq=first_seq)
        writer._write(
            {
                "kind": "header",
                "version": __version__,
                "format": "cscs-storage-daemon capture",
                "config": render_effective_config(config),
            },
            task=False,
        )
        log.info("capture.opened", path=str(target), seq=first_seq)
        return writer

    # -- low level ---------------------------------------------------------------------------------------------

    def _write(self, record: dict[str, Any], *, task: bool | int = True, own_task: bool = False) -> int:
        """Write one record; returns its seq (-1 once closed). `task=True` tags it with the thread's task."""
        head: dict[str, Any] = {"v": FORMAT_VERSION}
        with self._io:
            if self._closed:
                return -1
            seq = self._seq
            self._seq += 1
            head["seq"] = seq
            head["time"] = datetime.now(UTC).isoformat()
            head["mono"] = round(time.monotonic(), 6)
            head["kind"] = record.pop("kind")
            if own_task:
                head["task"] = seq
            elif task is True:
                current = self._local.task
                if current is not None:
                    head["task"] = current
            elif task is not False:
                head["task"] = task
            head.update(record)
            line = orjson.dumps(head)
            for secret in self._secrets:
                if secret in line:
                    line = line.replace(secret, MASK)
            try:
                self._handle.write(line + b"\n")
                self._handle.flush()
            except (OSError, ValueError) as exc:
                # A capture must never take the daemon down (a full disk, say): stop recording, carry on.
                self._closed = True
                log.error("capture.write_failed", path=str(self.path), error=f"{type(exc).__name__}: {exc}")
                return -1
            stats = self.stats
            stats.records += 1
            stats.by_kind[head["kind"]] = stats.by_kind.get(head["kind"], 0) + 1
        return seq

    def close(self) -> None:
        """Write the `end` record and close the file (later records are dropped)."""
        self._write({"kind": "end"}, task=False)
        with self._io:
            if self._handle.closed:
                return
            self._closed = True
            with contextlib.suppress(OSError, ValueError):
                self._handle.flush()
                os.fsync(self._handle.fileno())
            with contextlib.suppress(OSError):
                self._handle.close()
        log.info("capture.closed", path=str(self.path), records=self.stats.records)

    @property
    def current_task(self) -> int | None:
        return self._local.task

    # -- tasks -------------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def task(self, run: str, **info: Any) -> Iterator[int | None]:
        """One unit of work that is not an event (`start`, `reconcile`, `snapshot`, `register`). Nested in
        another task (the start sequence's reconciliation, say), it is part of that one."""
        if self._local.task is not None:
            yield self._local.task
            return
        seq = self._write({"kind": "task", "run": run, **info}, own_task=True)
        self._local.task = seq if seq >= 0 else None
        try:
            yield seq
        finally:
            self._local.task = None
            if seq >= 0:
                self._write({"kind": "done"}, task=seq)

    @contextlib.contextmanager
    def event_scope(self, delivery: Delivery) -> Iterator[int | None]:
        """The handling of one delivery (installed as the dispatcher's `task_scope`)."""
        seq = self._deliveries.pop(id(delivery), None)
        if seq is None or self._local.task is not None:
            yield None
            return
        self._local.task = seq
        try:
            yield seq
        finally:
            self._local.task = None
            self._write({"kind": "done"}, task=seq)

    def wrap_delivery(self, submit: Callable[[Delivery], None]) -> Callable[[Delivery], None]:
        """A `submit` that records the delivery as received, then hands it on (never raises)."""

        def recorded(delivery: Delivery) -> None:
            try:
                seq = self.record_event(delivery)
            except Exception:  # a capture problem must not stop the intake
                log.exception("capture.event_failed", destination=delivery.destination)
            else:
                if seq >= 0:
                    self._deliveries[id(delivery)] = seq
            submit(delivery)

        return recorded

    def record_event(self, delivery: Delivery) -> int:
        text, encoding = encode_body(delivery.body)
        headers = {k: v for k, v in delivery.headers.items() if not any(w in k.lower() for w in _SECRET_HEADER_WORDS)}
        self.stats.events += 1
        return self._write(
            {
                "kind": "event",
                "transport": delivery.transport,
                "destination": delivery.destination,
                "headers": headers,
                "body": text,
                "body_encoding": encoding,
            },
            own_task=True,
        )

    # -- stamps ------------------------------------------------------------------------------------------------

    def record_stamp(self, kind: str, key: str, reading: datetime) -> None:
        """The `Stamps` recorder: one reading that ends up in a file name and `meta.date`."""
        self.stats.stamps += 1
        self._write({"kind": "stamp", "stamp": kind, "key": key, "reading": reading.isoformat()})

    @contextlib.contextmanager
    def ordered(self) -> Iterator[None]:
        """The all.json stamp and its mirror read, atomic with respect to recorded mirror changes."""
        with self._order:
            yield

    def stamps(self, clock: Clock) -> Stamps:
        return Stamps(clock, self.record_stamp, section=self.ordered)

    # -- HTTP ----------------------------------------------------------------------------------------------------

    def http_transport(self, verify: bool = True) -> RecordingTransport:
        """An httpx transport that sends through a real one and records every exchange."""
        return RecordingTransport(httpx.HTTPTransport(verify=verify), self)

    def transport_for(self, offering: OfferingConfig) -> RecordingTransport:
        return self.http_transport(verify=offering.verify_ssl)

    # -- the Gate (mirror changes and order locks) ------------------------------------------------------------

    @contextlib.contextmanager
    def mirror_change(self, slug: str, op: str, uuid: str | None) -> Iterator[None]:
        local = self._local
        with self._order:
            local.mirror_depth += 1
            try:
                yield
            finally:
                local.mirror_depth -= 1
            if local.mirror_depth == 0:
                record: dict[str, Any] = {"kind": "mirror", "offering": slug, "op": op}
                if uuid is not None:
                    record["uuid"] = uuid
                self._write(record)

    def acquire(self, lock: Any, slot: int) -> None:
        lock.acquire()
        self._write({"kind": "lock", "slot": slot})

    # -- wiring ------------------------------------------------------------------------------------------------

    def attach(self, core: Core) -> None:
        """Record what the core's parallel parts do (call right after `build_core`, before `fill`)."""
        gate_core(core, self)
        if not isinstance(core.ledger, Ledger):
            raise TypeError("a capture records a core with a SQLite ledger (the live daemon's)")
        ledger = RecordingLedger.wrap(core.ledger, self)
        core.ledger = ledger
        core.processor.ledger = ledger
        for offering in core.offerings:
            offering.writer = RecordingWriter.wrap(offering.writer, self, offering.slug)
        core.dispatcher.task_scope = self.event_scope
        reconciler: Any = core.reconciler
        scheduler: Any = core.scheduler
        run_once = reconciler.run_once
        regenerate = scheduler.regenerate

        def recorded_run_once(offering: OfferingRuntime, reason: str) -> bool:
            with self.task("reconcile", offering=offering.slug, reason=reason):
                return cast(bool, run_once(offering, reason))

        def recorded_regenerate(offering: OfferingRuntime, *, force: bool = False) -> bool:
            with self.task("snapshot", offering=offering.slug, force=force):
                return cast(bool, regenerate(offering, force=force))

        reconciler.run_once = recorded_run_once
        scheduler.regenerate = recorded_regenerate

    def record_reload(self, config: Config) -> None:
        self._write({"kind": "reload", "config": render_effective_config(config)}, task=False)


class RecordingTransport(httpx.BaseTransport):
    """Sends through `inner` and records each exchange, or the transport error that ended it."""

    def __init__(self, inner: httpx.BaseTransport, writer: CaptureWriter) -> None:
        self._inner = inner
        self._writer = writer

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        body = request.read()
        record: dict[str, Any] = {"kind": "http", "method": request.method, "path": request_path(request)}
        if body:
            text, encoding = encode_body(body)
            record["request_body"] = text
            if encoding != "utf-8":
                record["request_body_encoding"] = encoding
        try:
            response = self._inner.handle_request(request)
            try:
                content = response.read()
            finally:
                response.close()
        except httpx.TransportError as exc:
            record["error"] = type(exc).__name__
            record["message"] = str(exc)[:300]
            self._writer.stats.exchanges += 1
            self._writer._write(record)
            raise
        headers = {name: response.headers[name] for name in RESPONSE_HEADERS if name in response.headers}
        text, encoding = encode_body(content)
        record["status"] = response.status_code
        record["headers"] = headers
        record["body"] = text
        if encoding != "utf-8":
            record["body_encoding"] = encoding
        self._writer.stats.exchanges += 1
        self._writer._write(record)
        passed = [
            (k, v)
            for k, v in response.headers.multi_items()
            if k.lower() not in ("content-encoding", "content-length", "transfer-encoding")
        ]
        return httpx.Response(response.status_code, headers=passed, content=content, request=request)

    def close(self) -> None:
        self._inner.close()


class RecordingWriter(OutputWriter):
    """The offering's writer, recording the writes that fail (a replay fails them at the same point)."""

    _recorder: CaptureWriter
    _slug: str

    @classmethod
    def wrap(cls, writer: OutputWriter, recorder: CaptureWriter, slug: str) -> RecordingWriter:
        wrapped = cls(writer.directory, file_mode=writer.file_mode, dir_mode=writer.dir_mode)
        wrapped._recorder = recorder
        wrapped._slug = slug
        return wrapped

    def write(self, name: str, data: bytes) -> Path:
        try:
            return super().write(name, data)
        except OSError as exc:
            self._recorder._write(
                {
                    "kind": "write_error",
                    "offering": self._slug,
                    "file": name,
                    "errno": exc.errno,
                    "error": f"{type(exc).__name__}: {exc.strerror or exc}",
                }
            )
            raise


class RecordingLedger(Ledger):
    """The order ledger, recording each row that already existed when this run first looked at it (written by an
    earlier run): a replay starts from an empty ledger and needs those rows to decide as the live run did. Rows this
    run writes are not recorded — the replay writes them again."""

    _recorder: CaptureWriter
    _looked_at: set[str]
    _seen_lock: threading.Lock

    @classmethod
    def wrap(cls, ledger: Ledger, recorder: CaptureWriter) -> RecordingLedger:
        wrapped = cls.__new__(cls)
        wrapped.__dict__.update(ledger.__dict__)
        wrapped._recorder = recorder
        wrapped._looked_at = set()
        wrapped._seen_lock = threading.Lock()
        return wrapped

    def get(self, order_uuid: str) -> OrderRecord | None:
        record = super().get(order_uuid)
        with self._seen_lock:
            first = order_uuid not in self._looked_at
            self._looked_at.add(order_uuid)
        if first and record is not None:
            self._recorder._write({"kind": "ledger", **asdict(record)})
        return record


def _prepare_append(path: Path) -> int:
    """The next seq for a capture that may already exist; a torn last line (a crash) is cut off first."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return 0
    if size == 0:
        return 0
    with open(path, "rb+") as handle:
        tail_start = max(0, size - (1 << 16))
        handle.seek(tail_start)
        tail = handle.read()
        if not tail.endswith(b"\n"):
            cut = tail.rfind(b"\n")
            keep = tail_start + cut + 1 if cut >= 0 else tail_start
            if cut < 0 and tail_start > 0:
                return 0  # a last line longer than the tail: leave the file alone, restart the numbering
            handle.truncate(keep)
            log.warning("capture.torn_line_removed", path=str(path), bytes=size - keep)
            tail = tail[: keep - tail_start]
        lines = tail.rstrip(b"\n").rsplit(b"\n", 1)
        try:
            last = orjson.loads(lines[-1]) if lines and lines[-1] else None
        except orjson.JSONDecodeError:
            return 0
    if isinstance(last, dict) and isinstance(last.get("seq"), int):
        return int(last["seq"]) + 1
    return 0
