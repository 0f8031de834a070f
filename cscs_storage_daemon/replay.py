"""`replay CAPTURE --output-dir DIR`: re-run a capture offline — no broker, no Waldur (events spec §6).

The same code as `run` does the work: `build_core`, the start sequence of `Daemon.start` (fill, registration,
reconciliation), the `Dispatcher` (inline) and the `Processor` for every event, the `Reconciler` and the
`SnapshotScheduler` for the passes and all.json regenerations the capture recorded. What differs is underneath:

* Waldur is answered from the recorded exchanges (`ReplayTransport`); transport errors and 429/5xx answers are
  replayed too, so the retries happen again (without waiting), and a call gives up where the live one did;
* the clock follows the recorded times: stamps answer with the recorded readings, so file names and `meta.date`
  are the live ones; all.json is regenerated where the capture recorded a regeneration, never on a timer;
* the ledger is in memory, the state directory is `DIR/.replay-state`, and files are written without fsync.

Determinism. The live daemon runs workers, the reconciler and the snapshot timer in parallel. Every record of the
capture belongs to one task (an event's handling, the start sequence, a reconciliation pass, a regeneration) and the
capture orders the points where tasks meet: HTTP answers, stamps, mirror changes, order locks. The replay runs each
task on its own thread but lets exactly one run at a time, handing over at those points in capture order — so the
interleaving, and with it every file, is the live one. A task whose records are not interleaved with another's runs
directly on the replaying thread.

Anything the replay cannot answer from the capture is an error that names the request and the capture line
(`ReplayError`); a capture cut short (a crash) ends the tasks it cut, and is reported.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import itertools
import os
import queue
import shutil
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import orjson
import structlog

from cscs_storage_daemon.capture import (
    FORMAT_VERSION,
    RESPONSE_HEADERS,
    body_key,
    decode_body,
    describe_request,
    gate_core,
)
from cscs_storage_daemon.config import Config, config_from_rendered
from cscs_storage_daemon.envelope import SnapshotPieces, is_snapshot_file_name
from cscs_storage_daemon.ledger import MemoryLedger
from cscs_storage_daemon.metrics import Metrics
from cscs_storage_daemon.retry import RetryInfo, RetryPolicy, TransientHTTPStatus
from cscs_storage_daemon.stamps import Stamps
from cscs_storage_daemon.transports.base import Delivery
from cscs_storage_daemon.waldur_transport import Answer
from cscs_storage_daemon.writer import OutputWriter

if TYPE_CHECKING:
    from cscs_storage_daemon.daemon import Core

log = structlog.get_logger("cscs_storage_daemon.replay")

STATE_DIRECTORY = ".replay-state"
_RESPONSE_HEADERS = frozenset(RESPONSE_HEADERS)
_STR = frozenset({str})
POINT_KINDS = frozenset({"http", "stamp", "mirror", "lock", "write_error", "done"})
FREEZE_EVERY = 5_000  # tasks (events, mostly) between two `gc.freeze` while the replay runs
TASK_RUNS = frozenset({"start", "reconcile", "snapshot", "register"})


class ReplayError(Exception):
    """The capture cannot be replayed (unreadable, too new, or the daemon asked for something it does not hold)."""


class CaptureEnded(BaseException):
    """Raised in a task the capture stops recording before it finished; unwinds it like the live process did."""


# --------------------------------------------------------------------------------------------------------------
# Reading


@dataclass(slots=True, eq=False)
class Record:
    line: int
    seq: int
    kind: str
    task: int | None
    data: dict[str, Any]

    def describe(self) -> str:
        d = self.data
        if self.kind == "http":
            return describe_request(str(d.get("method")), str(d.get("path")), str(d.get("request_body") or ""))
        if self.kind == "stamp":
            return f"stamp {d.get('stamp')} {d.get('key')}"
        if self.kind == "mirror":
            return f"mirror {d.get('op')} {d.get('offering')} {d.get('uuid') or ''}".rstrip()
        if self.kind == "lock":
            return f"order lock {d.get('slot')}"
        if self.kind == "write_error":
            return f"failed write of {d.get('file')}"
        if self.kind == "task":
            return f"{d.get('run')} task"
        return self.kind


@dataclass
class Capture:
    path: Path
    records: list[Record]
    warnings: list[str] = field(default_factory=list)


def read_capture(path: str | os.PathLike[str]) -> Capture:
    """Parse a capture. A torn last line (a crash while writing it) is dropped with a warning; any other line that
    is not a record is an error naming its line number, and so is a format version newer than this daemon reads.

    Read line by line (buffered): the file is never all in memory beside its parsed records (a whole-file read and
    split held two more copies of it, and cost more than the parse)."""
    source = Path(path)
    # Hundreds of thousands of parsed records, trees without a cycle: the collector would walk them again and
    # again while they are built (half the time of the parse), for nothing.
    collecting = gc.isenabled()
    gc.disable()
    try:
        with open(source, "rb", buffering=1 << 20) as handle:
            records, warnings = _parse_lines(source, handle)
    except OSError as exc:
        raise ReplayError(f"cannot read capture {source}: {exc.strerror or exc}") from None
    finally:
        if collecting:
            gc.enable()
    if not records:
        raise ReplayError(f"{source}: empty capture")
    if records[0].kind != "header":
        raise ReplayError(f"{source}:{records[0].line}: a capture starts with a header record, not {records[0].kind!r}")
    return Capture(source, records, warnings)


def _parse_lines(source: Path, lines: Iterable[bytes]) -> tuple[list[Record], list[str]]:
    records: list[Record] = []
    warnings: list[str] = []
    loads, append = orjson.loads, records.append
    for number, raw in enumerate(lines, start=1):
        try:
            obj = loads(raw)
        except orjson.JSONDecodeError as exc:
            if raw.isspace():
                continue
            if not raw.endswith(b"\n"):  # only the last line can end without one
                warnings.append(f"{source}:{number}: the last line is incomplete (a crash while writing it?): ignored")
                break
            raise ReplayError(f"{source}:{number}: corrupt record ({exc}); the capture cannot be replayed") from None
        # The common case inline (a record as the capture writes it); `_record` says what is wrong with the others.
        if type(obj) is dict:
            version, kind, seq, task = obj.get("v"), obj.get("kind"), obj.get("seq"), obj.get("task")
            if (
                type(version) is int
                and version <= FORMAT_VERSION
                and type(kind) is str
                and type(seq) is int
                and (task is None or type(task) is int)
            ):
                append(Record(number, seq, kind, task, obj))
                continue
        append(_record(source, number, obj))
    return records, warnings


def _record(source: Path, number: int, obj: Any) -> Record:
    where = f"{source}:{number}"
    if not isinstance(obj, dict):
        raise ReplayError(f"{where}: corrupt record (a JSON {type(obj).__name__}, not an object)")
    version = obj.get("v")
    if not isinstance(version, int) or isinstance(version, bool):
        raise ReplayError(f"{where}: corrupt record (no format version 'v')")
    if version > FORMAT_VERSION:
        raise ReplayError(
            f"{where}: capture format version {version} is newer than this daemon reads (up to {FORMAT_VERSION}); "
            "replay it with a newer cscs-storage-daemon"
        )
    kind, seq, task = obj.get("kind"), obj.get("seq"), obj.get("task")
    if not isinstance(kind, str) or not isinstance(seq, int) or (task is not None and not isinstance(task, int)):
        raise ReplayError(f"{where}: corrupt record (kind, seq or task missing or of the wrong type)")
    return Record(number, seq, kind, task, obj)


# --------------------------------------------------------------------------------------------------------------
# Summary


@dataclass
class ReplaySummary:
    capture: str
    output_dir: str
    sessions: int = 0
    events: Counter[str] = field(default_factory=Counter)
    not_handled: int = 0
    exchanges: int = 0
    order_files: list[str] = field(default_factory=list)
    snapshot_writes: int = 0
    snapshot_files: list[str] = field(default_factory=list)
    dead_letters: int = 0
    orders: Counter[str] = field(default_factory=Counter)
    invalid_resources: int = 0
    errors: list[str] = field(default_factory=list)
    incomplete: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def event_count(self) -> int:
        return sum(self.events.values())

    def render(self) -> str:
        out = [f"Replayed {self.capture} into {self.output_dir}"]
        if self.sessions > 1:
            out.append(f"  daemon runs: {self.sessions}")
        types = ", ".join(f"{n} {kind}" for kind, n in sorted(self.events.items())) or "none"
        out.append(f"  events: {self.event_count} ({types})")
        if self.not_handled:
            out.append(f"  events never handled by the live run (it stopped first): {self.not_handled}")
        out.append(f"  Waldur exchanges answered from the capture: {self.exchanges}")
        outcomes = ", ".join(f"{n} {k}" for k, n in sorted(self.orders.items())) or "none"
        out.append(f"  orders: {outcomes}")
        out.append(f"  order files: {len(self.order_files)}")
        for name in self.order_files:
            out.append(f"    {name}")
        out.append(f"  all.json: {self.snapshot_writes} written, {len(self.snapshot_files)} file(s)")
        for name in self.snapshot_files:
            out.append(f"    {name}")
        out.append(f"  dead letters: {self.dead_letters}")
        out.append(f"  invalid resources reported: {self.invalid_resources}")
        out.append(f"  errors: {len(self.errors)}")
        out.extend(f"    {e}" for e in self.errors)
        if self.incomplete:
            out.append(f"  cut short by the end of the capture: {len(self.incomplete)}")
            out.extend(f"    {e}" for e in self.incomplete)
        for warning in self.warnings:
            out.append(f"  warning: {warning}")
        return "\n".join(out)


# --------------------------------------------------------------------------------------------------------------
# Tasks and the turn


_DRIVER: object = object()  # whose turn it is: the driver (the replaying thread) or a task


@dataclass(eq=False, slots=True)
class _Task:
    seq: int
    run: str  # event | start | reconcile | snapshot | register
    launch: Record
    points: list[int] = field(default_factory=list)  # indices into the session's records
    pos: int = 0
    done: bool = False  # the capture saw it finish
    launch_at: int | None = None
    contiguous: bool = False
    launched: bool = False
    finished: bool = False
    parked_at: int | None = None
    last: Record | None = None  # the last point it consumed
    last_http: Record | None = None  # the last Waldur exchange it consumed
    error: BaseException | None = None

    def name(self) -> str:
        if self.run == "event":
            return f"the event of line {self.launch.line}"
        return f"the {self.run} task of line {self.launch.line}"


class _Local(threading.local):
    def __init__(self) -> None:
        self.task: _Task | None = None
        self.mirror_depth = 0


class _Session:
    """One daemon run of the capture: from a header to the next header (or the end of the file)."""

    def __init__(self, header: Record, records: list[Record]) -> None:
        self.header = header
        self.records = records
        self.tasks: dict[int, _Task] = {}
        self.significant = [False] * len(records)
        self.orphans = 0
        self.clean_end = any(r.kind == "end" for r in records)
        self._index()

    def _index(self) -> None:
        tasks = self.tasks
        significant = self.significant
        get = tasks.get
        orphans = 0
        for index, record in enumerate(self.records):
            kind = record.kind
            if kind in POINT_KINDS:  # most records: tested first
                owner = get(record.task) if record.task is not None else None
                if owner is None:
                    orphans += 1
                    continue
                owner.points.append(index)
                if kind == "done":
                    owner.done = True
                if owner.launch_at is None:
                    owner.launch_at = index
                significant[index] = True
            elif kind == "event":
                tasks[record.seq] = _Task(record.seq, "event", record)
            elif kind == "task":
                run = str(record.data.get("run"))
                if run not in TASK_RUNS:
                    raise ReplayError(f"line {record.line}: unknown task {run!r}")
                task = _Task(record.seq, run, record, launch_at=index)
                tasks[record.seq] = task
                significant[index] = True
            elif kind == "reload":
                significant[index] = True
        self.orphans = orphans
        # A task runs straight through on the replaying thread when no other task's point falls inside its span.
        prefix = [0, *itertools.accumulate(significant)]
        end = len(self.records) - 1
        for task in tasks.values():
            if task.launch_at is None:
                continue
            last = task.points[-1] if task.done and task.points else end
            own = len(task.points) + (1 if task.run != "event" else 0)
            task.contiguous = prefix[last + 1] - prefix[task.launch_at] == own


# --------------------------------------------------------------------------------------------------------------
# The engine


class Replayer:
    """Replays a capture into `output_dir`. `run()` returns the summary; `core` stays open until `close()`."""

    def __init__(
        self,
        capture_path: str | os.PathLike[str],
        output_dir: str | os.PathLike[str],
        *,
        config_override: Config | None = None,
    ) -> None:
        self.capture_path = Path(capture_path)
        self.output_dir = Path(output_dir)
        self.config_override = config_override
        self.core: Core | None = None
        self.cores: list[Core] = []
        self.summary = ReplaySummary(str(self.capture_path), str(self.output_dir))
        self.ledger = MemoryLedger()
        self.written: list[tuple[str, str]] = []  # (offering slug, file name), in write order
        self.files = FileQueue(self._fail)
        self._local = _Local()
        self._cond = threading.Condition()
        self._turn: object = _DRIVER
        self._session: _Session | None = None
        self._records: list[Record] = []
        self._cursor = 0
        self._threads: list[threading.Thread] = []
        self._failure: BaseException | None = None
        self._aborting = False
        self._done = False
        self._config_now: Config | None = None
        self._times: dict[int, datetime] = {}
        self._mono0 = 0.0
        self._launches = 0

    # -- public ------------------------------------------------------------------------------------------------

    def run(self) -> ReplaySummary:
        started = time.perf_counter()
        # The parsed capture is most of the heap and lives until the end: it is parsed with the collector off (the
        # first allocation after would start a young collection over all of it) and frozen at once, out of the
        # collector's sight; what the replay builds is frozen as it goes (`FREEZE_EVERY`), and the young generation
        # is collected rarely: the daemon's garbage is freed by reference counting (a cycle is rare: an exception's
        # traceback). Measured: about 10% of the replay time on the benchmark capture, 5% more with these
        # thresholds, 3% more with the freezing. (No collection first: the capture holds no cycle, and a full pass
        # over it costs about a second; what little garbage there is stays frozen until the end.)
        thresholds = gc.get_threshold()
        collecting = gc.isenabled()
        gc.disable()
        try:
            capture = read_capture(self.capture_path)
            gc.freeze()
        finally:
            if collecting:
                gc.enable()
        summary = self.summary
        gc.set_threshold(max(thresholds[0], 1_000_000), max(thresholds[1], 1_000), max(thresholds[2], 1_000))
        try:
            summary.warnings.extend(capture.warnings)
            for warning in capture.warnings:
                log.warning("replay.truncated", detail=warning)
            state = self.output_dir / STATE_DIRECTORY
            shutil.rmtree(state, ignore_errors=True)
            state.mkdir(parents=True, exist_ok=True)
            sessions: list[tuple[Record, list[Record]]] = []
            for record in capture.records:
                if record.kind == "header":
                    sessions.append((record, []))
                else:
                    sessions[-1][1].append(record)
            for header, records in sessions:
                self._run_session(_Session(header, records), state)
            self.files.drain()
            summary.sessions = len(sessions)
            self._done = True
            self._summarise()  # before the capture is the collector's again: a full pass over it costs a second
        finally:
            self.files.close()
            gc.set_threshold(*thresholds)
            gc.unfreeze()
        summary.seconds = time.perf_counter() - started
        return summary

    def close(self) -> None:
        for core in self.cores:
            with contextlib.suppress(Exception):
                core.close()
        self.cores.clear()
        self.ledger.close()

    # -- sessions ----------------------------------------------------------------------------------------------

    def _config(self, header: Record, state: Path) -> Config:
        if self.config_override is not None:
            config = self.config_override
        else:
            rendered = header.data.get("config")
            if not isinstance(rendered, dict):
                raise ReplayError(f"line {header.line}: the header holds no configuration")
            # A replay serves nothing: the recorded `daemon.http` (its token file, its OIDC issuer) belongs to the
            # machine of the live run, and would only make the configuration fail to load here.
            recorded_daemon = rendered.get("daemon")
            daemon_section: dict[str, Any] = dict(recorded_daemon) if isinstance(recorded_daemon, dict) else {}
            rendered = {**rendered, "daemon": {**daemon_section, "http": {"enabled": False}}}
            try:
                config = config_from_rendered(rendered, source=f"{self.capture_path}:{header.line}")
            except Exception as exc:
                raise ReplayError(f"line {header.line}: the recorded configuration is not valid: {exc}") from None
        daemon = config.daemon.model_copy(update={"state_directory": state})
        return config.model_copy(update={"daemon": daemon})

    def _run_session(self, session: _Session, state: Path) -> None:
        self._session = session
        self._records = session.records
        self._cursor = 0
        self._times.clear()
        self._mono0 = float(session.header.data.get("mono") or 0.0)
        self._config_now = self._config(session.header, state)
        self.core = None
        self._seed_ledger(session)
        if session.orphans:
            self.summary.warnings.append(
                f"{session.orphans} record(s) after line {session.header.line} belong to no task and were skipped"
            )
        try:
            self._drive()
        finally:
            self._stop_threads()
        for task in session.tasks.values():
            if task.run == "event" and task.launch_at is None:
                self.summary.not_handled += 1

    def _seed_ledger(self, session: _Session) -> None:
        """The ledger rows an earlier run had written, as the capture met them (`ledger` records): the live run
        had them from its first moment, so the replay's ledger gets them before anything runs."""
        ledger = self.ledger
        for record in session.records:
            if record.kind != "ledger":
                continue
            d = record.data
            order_uuid = d.get("order_uuid")
            if not isinstance(order_uuid, str) or ledger.get(order_uuid) is not None:
                continue  # replayed already (an earlier run of the same capture wrote it)
            order_type, offering = str(d.get("order_type") or ""), str(d.get("offering") or "")
            if d.get("file_name"):
                ledger.record_intent(
                    order_uuid,
                    order_type=order_type,
                    offering=offering,
                    resource_uuid=str(d.get("resource_uuid") or ""),
                    file_name=str(d["file_name"]),
                )
            if d.get("written_at"):
                ledger.record_written(order_uuid, at=str(d["written_at"]))
            if d.get("completed_at"):
                ledger.record_completed(
                    order_uuid,
                    order_type=order_type,
                    offering=offering,
                    outcome=str(d.get("outcome") or ""),
                    at=str(d["completed_at"]),
                )

    def _drive(self) -> None:
        records = self._records
        session = self._session
        assert session is not None
        count = len(records)
        while True:
            index = self._cursor
            if index >= count:
                return
            record = records[index]
            if not session.significant[index]:
                self._cursor = index + 1
                continue
            kind = record.kind
            if kind == "reload":
                self._reload(record)
                self._cursor = index + 1
                continue
            if kind == "task":
                task = session.tasks[record.seq]
                self._cursor = index + 1
                self._launch(task)
                continue
            assert record.task is not None
            task = session.tasks[record.task]
            if not task.launched:
                self._launch(task)
            elif task.parked_at == index:
                self._hand(task)
            else:
                state = "already finished" if task.finished else "not waiting for it"
                raise ReplayError(
                    f"replay diverged at line {record.line}: the capture has {record.describe()} for {task.name()}, "
                    f"but in the replay that task is {state}"
                )

    # -- launching and the turn --------------------------------------------------------------------------------

    def _launch(self, task: _Task) -> None:
        task.launched = True
        self._launches += 1
        if not self._launches % FREEZE_EVERY:
            # What the replay built so far lives on (the mirror, the ledger, the session): out of the collector's
            # sight, as the capture is, instead of walked by the young collections it would trigger (~0.2 s each).
            gc.freeze()
        if task.run != "start" and self.core is None:
            raise ReplayError(f"line {task.launch.line}: {task.name()} comes before the daemon started")
        if task.contiguous:
            self._run_task(task)
            self._raise_failure()
            return
        thread = threading.Thread(target=self._thread_main, args=(task,), name=f"replay-{task.seq}", daemon=True)
        self._threads.append(thread)
        with self._cond:
            self._turn = task
            thread.start()
            while self._turn is not _DRIVER:
                self._cond.wait()
        self._raise_failure()

    def _hand(self, task: _Task) -> None:
        with self._cond:
            self._turn = task
            self._cond.notify_all()
            while self._turn is not _DRIVER:
                self._cond.wait()
        self._raise_failure()

    def _thread_main(self, task: _Task) -> None:
        with self._cond:
            while self._turn is not task:
                self._cond.wait()
        try:
            self._run_task(task)
        finally:
            with self._cond:
                self._turn = _DRIVER
                self._cond.notify_all()

    def _park(self, task: _Task, index: int) -> None:
        """Give the turn back until the driver reaches `index` (this task's next point)."""
        if self._local.task is not task or task.contiguous:
            record = self._records[index]
            raise self._fail(
                ReplayError(
                    f"replay diverged at line {record.line}: {task.name()} needs it ({record.describe()}), "
                    f"but the capture has other work first (line {self._records[self._cursor].line})"
                )
            )
        with self._cond:
            task.parked_at = index
            self._turn = _DRIVER
            self._cond.notify_all()
            while self._turn is not task:
                self._cond.wait()
            task.parked_at = None
            if self._aborting:
                raise CaptureEnded()

    def _fail(self, error: ReplayError) -> ReplayError:
        """Remember the first replay error: the daemon code between here and the driver may swallow it (the
        dispatcher logs and acknowledges any exception), the driver raises it once the task hands back."""
        if self._failure is None:
            self._failure = error
        return error

    def _raise_failure(self) -> None:
        if self._failure is not None:
            failure, self._failure = self._failure, None
            if isinstance(failure, ReplayError):
                raise failure
            raise ReplayError(f"replay failed: {type(failure).__name__}: {failure}") from failure

    def _stop_threads(self) -> None:
        """After an error: wake every parked task with `CaptureEnded`, one at a time, and wait for the threads."""
        self._aborting = True
        try:
            tasks = list(self._session.tasks.values()) if self._session else []
            for task in tasks:
                if task.parked_at is None:
                    continue
                with self._cond:
                    self._turn = task
                    self._cond.notify_all()
                    deadline = time.monotonic() + 10
                    while self._turn is not _DRIVER and time.monotonic() < deadline:
                        self._cond.wait(timeout=1)
            for thread in self._threads:
                thread.join(timeout=5)
            self._threads.clear()
        finally:
            self._aborting = False

    # -- running one task ----------------------------------------------------------------------------------------

    def _run_task(self, task: _Task) -> None:
        local = self._local
        previous = local.task
        local.task = task
        try:
            self._body(task)
            self._finish(task)
        except CaptureEnded:
            if not self._aborting:
                self.summary.incomplete.append(f"{task.name()} (last recorded at line {self._last_line(task)})")
        except ReplayError as exc:
            self._fail(exc)
        except BaseException as exc:
            if task.run == "start" and self.core is None:
                self._fail(ReplayError(f"the daemon did not start ({type(exc).__name__}: {str(exc)[:300]})"))
            else:
                self.summary.errors.append(f"{task.name()} failed: {type(exc).__name__}: {str(exc)[:300]}")
                with contextlib.suppress(CaptureEnded, ReplayError):
                    self._finish(task)
        finally:
            task.finished = True
            local.task = previous

    def _last_line(self, task: _Task) -> int:
        return task.last.line if task.last is not None else task.launch.line

    def _finish(self, task: _Task) -> None:
        """The task ended: its next record must be its `done` (when the capture saw it end)."""
        if self._failure is not None or task.pos >= len(task.points):
            return
        index = task.points[task.pos]
        record = self._records[index]
        if record.kind != "done":
            raise self._fail(
                ReplayError(
                    f"replay diverged: {task.name()} finished, but the capture continues it at line {record.line} "
                    f"({record.describe()})"
                )
            )
        self._consume(task, index)

    def _body(self, task: _Task) -> None:
        core = self.core
        data = task.launch.data
        if task.run == "event":
            assert core is not None
            self._event(core, task.launch)
            return
        if task.run == "start":
            self._start()
            return
        assert core is not None
        offering = self._offering(task.launch)
        if task.run == "reconcile":
            core.reconciler.run_once(offering, str(data.get("reason") or "replay"))
        elif task.run == "snapshot":
            core.scheduler.regenerate(offering, force=bool(data.get("force")))
        elif task.run == "register":
            from cscs_storage_daemon.registration import register

            offering_config = self._offering_config(offering.uuid)
            register(offering.gateway, offering_config, self.config.daemon.event_mode)

    @property
    def config(self) -> Config:
        """The configuration of the daemon run being replayed."""
        if self._config_now is None:
            raise ReplayError("no daemon run is being replayed")
        return self._config_now

    def _offering(self, record: Record) -> Any:
        slug = record.data.get("offering")
        assert self.core is not None
        for offering in self.core.offerings:
            if offering.slug == slug:
                return offering
        raise ReplayError(f"line {record.line}: no offering {slug!r} in the configuration")

    def _offering_config(self, uuid: str) -> Any:
        for offering_config in self.config.offerings:
            if offering_config.offering_uuid_hex == uuid:
                return offering_config
        raise ReplayError(f"no offering {uuid} in the configuration")

    def _start(self) -> None:
        """`Daemon.start` without the broker and the API: the same Waldur calls in the same order."""
        from cscs_storage_daemon.daemon import build_core
        from cscs_storage_daemon.wiring import register_offering

        config = self.config
        policy = config.daemon.retry
        core = build_core(
            config,
            metrics=Metrics(),
            http_transport=ReplayTransport(self),
            stamps=Stamps(ReplayClock(self), source=self._stamp),
            output_root=self.output_dir,
            inline=True,
            retry=RetryPolicy(attempts=policy.attempts, max_wait=0.0, total=1e12, initial=0.0),
            retry_hook=self._on_retry,
            ledger=self.ledger,
        )
        gate_core(core, self)
        clock = ReplayClock(self)
        for offering in core.offerings:
            offering.writer = ReplayWriter.wrap(offering.writer, self, offering.slug)
            offering.mirror._clock = clock.timestamp
        core.dispatcher.write_retry_delay = 0.0
        core.scheduler.keep_rendered = True  # every recorded regeneration renders only what changed since the last
        reconciler: Any = core.reconciler
        reconciler._stop = _PassStop(self)  # a pass stops taking orders where the live one did (SIGTERM)
        self.core = core
        self.cores.append(core)
        core.fill()
        for offering_config, offering in zip(config.offerings, core.offerings, strict=True):
            register_offering(core, offering_config, offering)
        for offering in core.offerings:
            core.reconciler.run_once(offering, "start")

    def _event(self, core: Core, record: Record) -> None:
        data = record.data
        try:
            body = decode_body(str(data.get("body", "")), data.get("body_encoding"))
        except ValueError as exc:
            raise ReplayError(f"line {record.line}: the event body cannot be decoded: {exc}") from None
        headers = data.get("headers")
        if type(headers) is not dict:
            headers = {}
        elif not _STR.issuperset(map(type, headers.values())):  # keys are strings: JSON's
            headers = {str(k): str(v) for k, v in headers.items()}
        delivery = Delivery(
            transport=str(data.get("transport", "replay")),
            destination=str(data.get("destination", "")),
            headers=dict(headers),
            body=body,
        )
        core.dispatcher.submit(delivery)  # counted by the core's metrics, read back in `_summarise`

    def _reload(self, record: Record) -> None:
        from cscs_storage_daemon.daemon import apply_live_settings

        rendered = record.data.get("config")
        if self.core is None or not isinstance(rendered, dict) or self.config_override is not None:
            return
        apply_live_settings(self.core, config_from_rendered(rendered).daemon)

    # -- points --------------------------------------------------------------------------------------------------

    def _current(self) -> _Task:
        task = self._local.task
        if task is None:
            raise self._fail(ReplayError("work outside any recorded task asked the capture for an answer"))
        if self._failure is not None:
            raise CaptureEnded()  # unwind quickly after an error somewhere
        return task

    def _next_point(self, task: _Task) -> Record | None:
        if task.pos < len(task.points):
            return self._records[task.points[task.pos]]
        return None

    def _point(self, kind: str, matches: Callable[[Record], bool], what: Callable[[], str]) -> Record:
        """The next recorded point of the current task, which must be `kind` and match; waits for its turn."""
        task = self._current()
        if task.pos >= len(task.points):
            if task.done:
                ended = f"the live one finished without it (its last record is line {self._last_line(task)})"
                if kind == "http":
                    raise self._fail(ReplayError(f"no recorded answer for {what()} ({task.name()}): {ended}"))
                raise self._fail(ReplayError(f"replay diverged: {task.name()} asks for {what()}, but {ended}"))
            raise CaptureEnded()
        index = task.points[task.pos]
        record = self._records[index]
        if record.kind != kind or not matches(record):
            raise self._fail(self._mismatch(task, record, kind, what()))
        self._consume(task, index)
        return record

    def _consume(self, task: _Task, index: int) -> None:
        cursor = self._cursor
        if cursor != index:
            significant = self._session.significant if self._session else []
            while cursor < index and not significant[cursor]:
                cursor += 1
            self._cursor = cursor
            if cursor != index:
                self._park(task, index)
        task.pos += 1
        task.last = self._records[index]
        self._cursor = index + 1

    def _mismatch(self, task: _Task, record: Record, kind: str, what: str) -> ReplayError:
        if kind == "http":
            previous = (
                f"the previous exchange of that task is at line {task.last_http.line}"
                if task.last_http is not None
                else f"that task made no exchange before (it starts at line {task.launch.line})"
            )
            return ReplayError(
                f"no recorded answer for {what} ({task.name()}): {previous}, and the capture continues it at "
                f"line {record.line} with {record.describe()}"
            )
        return ReplayError(
            f"replay diverged at line {record.line}: {task.name()} did {what}, but the capture has "
            f"{record.describe()} there"
        )

    # HTTP

    def http(self, method: str, path: str, body: bytes) -> Record:
        if self._local.task is None and self._done:
            return self._after_the_run(method, path)

        def matches(record: Record) -> bool:
            d = record.data
            if d.get("method") != method or d.get("path") != path:
                return False
            recorded = d.get("request_body")
            if not recorded and not body:
                return True
            raw = decode_body(str(recorded or ""), d.get("request_body_encoding"))
            return raw == body or body_key(raw) == body_key(body)

        record = self._point("http", matches, lambda: describe_request(method, path, body))
        self.summary.exchanges += 1
        task = self._local.task
        if task is not None:
            task.last_http = record
        return record

    def _after_the_run(self, method: str, path: str) -> Record:
        """Once the replay is over (`demo --serve` asking for the provider offering): the last recorded answer."""
        for record in reversed(self._records):
            if record.kind == "http" and record.data.get("method") == method and record.data.get("path") == path:
                if "status" in record.data:
                    return record
        raise ReplayError(f"no recorded answer for {describe_request(method, path)}")

    def _on_retry(self, info: RetryInfo) -> None:
        """Before a retry: go on if the live run retried (its next record is the same request), else give up."""
        task = self._current()
        last = task.last
        following = self._next_point(task)
        if last is None or last.kind != "http":
            return
        if following is None and not task.done:
            raise CaptureEnded()
        if (
            following is not None
            and following.kind == "http"
            and following.data.get("method") == last.data.get("method")
            and following.data.get("path") == last.data.get("path")
        ):
            return
        raise _failure_of(last)

    # stamps

    def _stamp(self, kind: str, key: str) -> datetime:
        record = self._point(
            "stamp",
            lambda r: r.data.get("stamp") == kind and r.data.get("key") == key,
            lambda: f"a {kind} stamp for {key}",
        )
        try:
            return datetime.fromisoformat(str(record.data["reading"]))
        except (KeyError, ValueError):
            raise ReplayError(f"line {record.line}: a stamp without a valid reading") from None

    # the Gate

    @contextlib.contextmanager
    def mirror_change(self, slug: str, op: str, uuid: str | None) -> Iterator[None]:
        local = self._local
        if local.mirror_depth == 0:
            self._point(
                "mirror",
                lambda r: r.data.get("offering") == slug and r.data.get("op") == op and r.data.get("uuid") == uuid,
                lambda: f"mirror {op} {slug} {uuid or ''}".rstrip(),
            )
        local.mirror_depth += 1
        try:
            yield
        finally:
            local.mirror_depth -= 1

    def acquire(self, lock: Any, slot: int) -> None:
        record = self._point("lock", lambda r: r.data.get("slot") == slot, lambda: f"order lock {slot}")
        if not lock.acquire(blocking=False):
            raise self._fail(ReplayError(f"replay diverged at line {record.line}: order lock {slot} is still held"))

    # writes

    def before_write(self, slug: str, name: str) -> None:
        """A write the live run saw fail fails here too."""
        task = self._local.task
        if task is None:
            return
        following = self._next_point(task)
        if (
            following is not None
            and following.kind == "write_error"
            and following.data.get("offering") == slug
            and following.data.get("file") == name
        ):
            self._consume(task, task.points[task.pos])
            errno = following.data.get("errno")
            raise OSError(errno if isinstance(errno, int) else 5, str(following.data.get("error") or "write failed"))

    # the clock

    def record_time(self) -> tuple[datetime, float]:
        return self.record_wall(), self.record_mono()

    def record_wall(self) -> datetime:
        """The recorded time of the record being replayed (now, when there is none)."""
        records = self._records
        if not records:
            return datetime.now(UTC)
        return self._wall_of(min(self._cursor, len(records) - 1))

    def record_mono(self) -> float:
        """The recorded monotonic clock of the record being replayed, from the start of its daemon run."""
        records = self._records
        if not records:
            return 0.0
        index = min(self._cursor, len(records) - 1)
        mono = records[index].data.get("mono")
        if isinstance(mono, int | float):
            return float(mono) - self._mono0
        header_time = datetime.fromisoformat(str(self._session.header.data.get("time"))) if self._session else None
        when = self._wall_of(index)
        return (when - header_time).total_seconds() if header_time is not None else 0.0

    def _wall_of(self, index: int) -> datetime:
        when = self._times.get(index)
        if when is None:
            record = self._records[index]
            try:
                when = datetime.fromisoformat(str(record.data.get("time")))
            except ValueError:
                raise ReplayError(f"line {record.line}: a record with a bad time") from None
            self._times[index] = when
        return when

    # -- summary -----------------------------------------------------------------------------------------------

    def _summarise(self) -> None:
        summary = self.summary
        order_files: dict[str, None] = {}  # ordered sets: first write order
        snapshots: dict[str, None] = {}
        for slug, name in self.written:
            path = f"{slug}/{name}"
            if is_snapshot_file_name(name):
                summary.snapshot_writes += 1
                snapshots[path] = None
            else:
                order_files[path] = None
        summary.order_files = list(order_files)
        summary.snapshot_files = [p for p in snapshots if (self.output_dir / p).exists()]
        received: Counter[str] = Counter()
        ignored: Counter[str] = Counter()
        for core in self.cores:
            summary.dead_letters += core.dead_letters.count
            for metric in core.metrics.registry.collect():
                for sample in metric.samples:
                    if sample.name == "cscs_events_received_total":
                        received[sample.labels["object_type"]] += int(sample.value)
                    elif sample.name == "cscs_events_ignored_total":
                        ignored[sample.labels["object_type"]] += int(sample.value)
                    elif sample.name == "cscs_events_dead_lettered_total":
                        summary.events["dead letter"] += int(sample.value)
                    elif sample.name == "cscs_orders_processed_total":
                        summary.orders[sample.labels["outcome"]] += int(sample.value)
                    elif sample.name == "cscs_invalid_resource_reports_total":
                        summary.invalid_resources += int(sample.value)
                    elif sample.name == "cscs_write_failures_total" and sample.value:
                        summary.errors.append(f"{int(sample.value)} {sample.labels['kind']} write(s) failed")
        for object_type, count in received.items():
            if count > ignored[object_type]:
                summary.events[object_type] += count - ignored[object_type]
            if ignored[object_type]:
                summary.events[f"ignored {object_type}"] += ignored[object_type]
        if summary.orders.get("erred"):
            summary.errors.append(f"{summary.orders['erred']} order(s) erred")


def _failure_of(record: Record) -> BaseException:
    """The exception the live call gave up with, rebuilt from its last recorded attempt."""
    error = record.data.get("error")
    if isinstance(error, str):
        return _transport_error(error, str(record.data.get("message") or error))
    status = record.data.get("status")
    return TransientHTTPStatus(int(status) if isinstance(status, int) else 503)


def _transport_error(name: str, message: str, request: httpx.Request | None = None) -> httpx.TransportError:
    cls = getattr(httpx, name, None)
    if not (isinstance(cls, type) and issubclass(cls, httpx.TransportError)):
        cls = httpx.TransportError
    return cls(message, request=request)


class _PassStop:
    """The reconciler's stop flag in a replay. A live pass checks it before each open order and stops taking orders
    after SIGTERM; every order it takes starts with an order lock, so the replay's pass goes on exactly when the
    capture's next record for it is an order lock."""

    def __init__(self, replayer: Replayer) -> None:
        self._replayer = replayer

    def is_set(self) -> bool:
        replayer = self._replayer
        task = replayer._local.task
        if task is None:
            return False
        following = replayer._next_point(task)
        return following is None or following.kind != "lock"

    def set(self) -> None:
        return None

    def wait(self, timeout: float | None = None) -> bool:
        return self.is_set()


class ReplayClock:
    """The time of the capture record being replayed (`Clock` protocol)."""

    def __init__(self, replayer: Replayer) -> None:
        self._replayer = replayer

    def now(self) -> datetime:
        return self._replayer.record_wall()

    def monotonic(self) -> float:
        return self._replayer.record_mono()

    def timestamp(self) -> float:
        return self.now().timestamp()


class ReplayTransport:
    """The gateway's `WaldurTransport` in a replay: every answer comes from the capture, no HTTP object is built."""

    def __init__(self, replayer: Replayer) -> None:
        self._replayer = replayer

    def send(self, method: str, target: str, body: bytes, headers: Mapping[str, str]) -> Answer:
        record = self._replayer.http(method, target, body)
        data = record.data
        error = data.get("error")
        if isinstance(error, str):
            raise _transport_error(error, str(data.get("message") or error))
        status = data.get("status")
        if not isinstance(status, int):
            raise ReplayError(f"line {record.line}: an exchange with neither a status nor an error")
        recorded = data.get("headers")
        if (
            type(recorded) is dict
            and _RESPONSE_HEADERS.issuperset(recorded)
            and _STR.issuperset(map(type, recorded.values()))
        ):
            kept = dict(recorded)  # as the capture writes them: lower-case names, string values
        elif isinstance(recorded, dict):
            kept = {k.lower(): str(v) for k, v in recorded.items() if k.lower() in RESPONSE_HEADERS}
        else:
            kept = {}
        text, encoding = data.get("body"), data.get("body_encoding")
        if encoding is None and type(text) is str:
            return Answer(status, kept, text.encode("utf-8"))  # UTF-8 text, the common case
        try:
            content = decode_body(str(text or ""), encoding)
        except ValueError as exc:
            raise ReplayError(f"line {record.line}: the response body cannot be decoded: {exc}") from None
        return Answer(status, kept, content)

    def close(self) -> None:
        pass


class FileQueue:
    """The replay's file writes (and snapshot pruning), made in order on one background thread.

    A replay is one thread of Python work; creating a file is mostly waiting for the file system (tens of
    microseconds on a quiet disk, a millisecond behind other processes' fsyncs). Handing the writes to a thread
    overlaps that wait with the next events. Anything that looks at an output directory `drain`s first (on the
    file thread itself there is nothing to wait for), and so does the end of the replay; the first failed write is
    raised there as a `ReplayError`.
    """

    def __init__(self, fail: Callable[[ReplayError], ReplayError]) -> None:
        self._fail = fail
        self._queue: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._idle = threading.Condition()
        self._pending = 0
        self._failure: str | None = None
        self._thread: threading.Thread | None = None

    def put(self, target: Path, data: bytes | list[bytes | memoryview], mode: int) -> None:
        """Write `data` (bytes, or buffers written one after the other) to `target`."""
        self.later(functools.partial(self._write, target, data, mode))

    def later(self, work: Callable[[], None]) -> None:
        """Run `work` on the file thread after everything queued before it."""
        self.check()
        with self._idle:
            self._pending += 1
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="replay-files", daemon=True)
            self._thread.start()
        self._queue.put(work)

    def drain(self) -> None:
        """Wait until every queued file is written; raise the first failure."""
        if threading.current_thread() is not self._thread:
            with self._idle:
                while self._pending:
                    self._idle.wait()
        self.check()

    def check(self) -> None:
        if self._failure is not None:
            raise self._fail(ReplayError(self._failure))

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def _write(self, target: Path, data: bytes | list[bytes | memoryview], mode: int) -> None:
        if self._failure is not None:
            return
        try:
            _write_in_place(target, data, mode)
        except OSError as exc:
            self._failure = f"the replay could not write {target}: {exc.strerror or exc}"

    def _run(self) -> None:
        while (work := self._queue.get()) is not None:
            try:
                work()
            except ReplayError:
                pass  # an earlier failure, already recorded
            except Exception as exc:  # never let the thread die: `drain` would wait for it forever
                if self._failure is None:
                    self._failure = f"the replay's file thread failed: {type(exc).__name__}: {exc}"
            finally:
                with self._idle:
                    self._pending -= 1
                    if not self._pending:
                        self._idle.notify_all()


def _write_in_place(target: Path, data: bytes | list[bytes | memoryview], mode: int) -> None:
    # Straight into place: a replay's output is a reproduction, not a feed read while it is written.
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        if isinstance(data, list):
            _write_buffers(fd, data)
        else:
            _write_all(fd, data)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


_IOV_MAX = 1024  # the least a POSIX system allows a writev


def _write_buffers(fd: int, buffers: list[bytes | memoryview]) -> None:
    """The buffers one after the other, a vectored write at a time (the copying is the kernel's, off the GIL)."""
    for start in range(0, len(buffers), _IOV_MAX):
        chunk = buffers[start : start + _IOV_MAX]
        written = os.writev(fd, chunk)
        if written == sum(map(len, chunk)):
            continue
        for buffer in chunk:  # a short write (a signal, a full disk): the rest of the chunk one by one
            size = len(buffer)
            if written >= size:
                written -= size
                continue
            _write_all(fd, memoryview(buffer)[written:])
            written = 0


class ReplayWriter(OutputWriter):
    """Writes like the live writer but without fsync, in the background (`FileQueue`), and fails where the live one
    did. What reads the directory back (the snapshot retention) sees every earlier write."""

    _replayer: Replayer
    _slug: str
    _ready: bool

    @classmethod
    def wrap(cls, writer: OutputWriter, replayer: Replayer, slug: str) -> ReplayWriter:
        wrapped = cls(writer.directory, file_mode=writer.file_mode, dir_mode=writer.dir_mode)
        wrapped._replayer = replayer
        wrapped._slug = slug
        wrapped._ready = False
        return wrapped

    def write(self, name: str, data: bytes) -> Path:
        return self._hand_over(name, data)

    def write_pieces(self, name: str, pieces: Iterable[bytes | memoryview]) -> Path:
        """The pieces handed to the file thread as they are (no join here): `SnapshotPieces.buffers`, or a list."""
        buffers: list[bytes | memoryview] = [*pieces.buffers()] if isinstance(pieces, SnapshotPieces) else [*pieces]
        return self._hand_over(name, buffers)

    def _hand_over(self, name: str, payload: bytes | list[bytes | memoryview]) -> Path:
        self._replayer.before_write(self._slug, name)
        target = self.path_of(name)
        if not self._ready:
            self.ensure_directory()
            self._ready = True
        self._replayer.files.put(target, payload, self.file_mode)
        self._replayer.written.append((self._slug, name))
        return target

    def exists(self, name: str) -> bool:
        self._replayer.files.drain()
        return super().exists(name)

    def snapshot_names(self) -> list[str]:
        self._replayer.files.drain()
        return super().snapshot_names()

    def prune_snapshots(self, keep: int) -> list[str]:
        """Pruned on the file thread after the writes before it (the main thread does not wait for them); what it
        removes is logged there, the caller is told nothing was."""
        self._replayer.files.later(functools.partial(self._prune, keep))
        return []

    def _prune(self, keep: int) -> None:
        try:
            pruned = super().prune_snapshots(keep)
        except OSError as exc:  # as live: a failed prune is reported, the replay goes on
            log.error("snapshot.prune_failed", offering=self._slug, error=f"{type(exc).__name__}: {exc}")
        else:
            if pruned:
                log.debug("snapshot.pruned", offering=self._slug, files=len(pruned))


# --------------------------------------------------------------------------------------------------------------
# Entry points


def replay(
    capture_path: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    *,
    config_override: Config | None = None,
) -> ReplaySummary:
    """Replay a capture into `output_dir` (each offering in `output_dir/<slug>/`). Raises `ReplayError`."""
    replayer = Replayer(capture_path, output_dir, config_override=config_override)
    try:
        return replayer.run()
    finally:
        replayer.close()


def run_replay_command(
    capture: str, *, output_dir: str, config_path: str | None = None, out: Any = None, err: Any = None
) -> int:
    """`cscs-storage-daemon replay`: 0 done, 1 the capture cannot be replayed, 78 a bad `-c` configuration."""
    out = out or sys.stdout
    err = err or sys.stderr
    override = None
    if config_path is not None:
        from cscs_storage_daemon.config import ConfigError, load_config

        try:
            override = load_config(config_path)
        except ConfigError as exc:
            print(f"configuration error: {exc}", file=err)
            return 78
    try:
        summary = replay(capture, output_dir, config_override=override)
    except ReplayError as exc:
        print(f"replay: {exc}", file=err)
        return 1
    print(summary.render(), file=out)
    return 0
