"""Fuzzing the intake and the feed (issue 6, item 2): whatever arrives, the daemon never dies, nothing is lost.

Two targets, each driven by hypothesis through the real code:

* **Deliveries** — event bodies and headers (random JSON, wrong types, huge strings, invalid UTF-8, unknown object
  types, valid-looking orders with garbage uuids, orders that exist in Waldur) go through the real `Dispatcher` of a
  `build_core` core: real `Processor`, SQLite ledger, dead-letter file, output writer, and a `FakeWaldur` over real
  HTTP. Checked per delivery: `submit` never raises; the delivery is acknowledged exactly once (one ``ack()`` call,
  no ``nack()``); a bad input leaves exactly one new ``dead-letter.jsonl`` line holding its body; a valid event of a
  type the daemon does not act on is counted as ignored; a valid event is processed (an order that exists in Waldur
  gets exactly one order file and ends ``done``); no handler ever fails with an unexpected exception.
  Once inline (unified queue), once with four worker lanes (legacy queues, object type from the queue name).
* **Resources** — random Waldur resource JSON (valid, nearly valid, garbage, duplicate uuids in other spellings)
  through `OfferingMirror` and `SnapshotScheduler.regenerate`: neither raises; every invalid resource is reported
  (`Change.error`), a valid one is in all.json exactly as `map_resource` maps it, an invalid one keeps its last valid
  object or is left out, in the feed order.

Examples (10 000 in all, derandomized so CI is reproducible): 5 000 + 1 000 + 4 000, several inputs each.
``FUZZ_SCALE=10 pytest tests/test_fuzz.py`` runs ten times as many; ``FUZZ_RANDOM=1`` draws new ones each run.
"""

from __future__ import annotations

import base64
import io
import json
import os
import random
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import structlog
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cscs_storage_daemon import logs
from cscs_storage_daemon.clock import FixedClock
from cscs_storage_daemon.config import load_config
from cscs_storage_daemon.daemon import Core, build_core, wait_for
from cscs_storage_daemon.debounce import DebounceRules
from cscs_storage_daemon.events import HANDLED_TYPES, OBSERVABLE_TYPES
from cscs_storage_daemon.mapping import InvalidResource, MappingSettings, map_resource
from cscs_storage_daemon.metrics import Metrics
from cscs_storage_daemon.mirror import Change, OfferingMirror
from cscs_storage_daemon.numbers import uuid_hex
from cscs_storage_daemon.runtime import OfferingRuntime
from cscs_storage_daemon.snapshots import SnapshotScheduler
from cscs_storage_daemon.stamps import Stamps
from cscs_storage_daemon.testing.fake_waldur import FakeWaldur
from cscs_storage_daemon.testing.sample_data import ORDER_STATES, populate
from cscs_storage_daemon.transports.base import Delivery
from cscs_storage_daemon.wiring import register_offering
from cscs_storage_daemon.writer import OutputWriter

SCALE = float(os.environ.get("FUZZ_SCALE", "1"))
RANDOM = os.environ.get("FUZZ_RANDOM", "") not in ("", "0")


INLINE_EXAMPLES, WORKER_EXAMPLES, RESOURCE_EXAMPLES = 6_000, 1_000, 3_000  # 10 000 hypothesis examples
INPUTS: dict[str, int] = {}  # what each test fed in (several inputs per example in two of them)


def fuzz_settings(examples: int) -> settings:
    """A CI profile: a fixed number of examples, derandomized, no example database, no deadline."""
    return settings(
        max_examples=max(1, int(examples * SCALE)),
        derandomize=not RANDOM,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )


STABLE_REASONS = {
    "not_utf8",
    "not_json",
    "not_object",
    "missing_object_type",
    "unknown_object_type",
    "bad_uuid",
    "bad_field",
}
UNEXPECTED_FAILURES = ('"event.failed"', '"event.intake_failed"', '"event.waldur_error"')

# ------------------------------------------------------------------------------------------------ strategies
#
# The fast path: nasty values are built once, from a fixed seed, into pools (edge cases by hand, the rest from a
# random JSON / text generator), and hypothesis picks and combines them. Every choice is still hypothesis's (so it
# explores, replays and shrinks), but an example costs a dozen draws instead of hundreds: 10 000 fit in CI.

HEX = "0123456789abcdef"
_rng = random.Random(20250601)


def _random_char(rng: random.Random) -> str:
    plane = rng.randrange(5)
    if plane == 0:
        return chr(rng.randrange(0x20))  # control characters, NUL
    if plane == 1:
        return chr(rng.randrange(0x20, 0x7F))
    if plane == 2:
        return chr(rng.randrange(0x80, 0x800))
    if plane == 3:
        return chr(rng.randrange(0x800, 0x10000))  # includes lone surrogates
    return chr(rng.randrange(0x10000, 0x110000))


def _random_text(rng: random.Random) -> str:
    return "".join(_random_char(rng) for _ in range(rng.choice([0, 1, 2, 3, 6, 12, 40])))


def _random_json(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(9 if depth < 3 else 7)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.choice([0, -1, 1, 2**31, -(2**63), 2**64, 10**400, -(10**400), rng.randrange(-1000, 10**6)])
    if kind == 3:
        return rng.choice([0.0, -0.0, 1e-5, 1.5, 1e308, -1e308, float("nan"), float("inf"), rng.uniform(-1e9, 1e9)])
    if kind in (4, 5, 6):
        return _random_text(rng)
    if kind == 7:
        return [_random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {_random_text(rng): _random_json(rng, depth + 1) for _ in range(rng.randrange(4))}


HUGE = ["x" * 100_000, "é\n" * 30_000, "a" * 16_384, "\x00" * 70_000]
EDGE_TEXT = [
    "",
    " ",
    "\x00",
    "\n",
    "\t",
    "\x7f",
    "\u0085",
    "\u2028",
    "\ud800",
    "\udfff",
    "\ufeff",
    "é",
    "日本",
    "😀",
    ".",
    "..",
    "/",
    "../../etc/passwd",
    "null",
    "true",
    "0",
    "-1",
    "1e309",
    "NaN",
    "%00",
    "\\u0000",
    "<script>",
    "' OR 1=1",
]
TEXT_POOL = [*EDGE_TEXT, *HUGE, *(_random_text(_rng) for _ in range(300))]
JSON_POOL = [
    *EDGE_TEXT,
    None,
    True,
    False,
    0,
    -1,
    10**400,
    1e-7,
    float("nan"),
    float("-inf"),
    [],
    {},
    [[[[[]]]]],
    {"": {"": {}}},
    *(_random_json(_rng) for _ in range(500)),
]
WRONG_TYPES = [v for v in JSON_POOL if v is not None and not isinstance(v, str)]
EVENT_KEYS = {"object_type", "order_uuid", "resource_uuid", "offering_uuid", "order_state"}
JUNK_POOL: list[dict[str, Any]] = [{}] + [
    {_rng.choice(TEXT_POOL): _rng.choice(JSON_POOL + HUGE) for _ in range(_rng.randrange(1, 4))} for _ in range(200)
]
JUNK_POOL = [{k: v for k, v in junk.items() if k not in EVENT_KEYS} for junk in JUNK_POOL]
HEADER_NAMES = [
    "message-id",
    "x-message-id",
    "redelivered",
    "destination",
    "subscription",
    "content-type",
    "content-length",
    "ack",
    "persistent",
    "authorization",
    "passcode",
]
HEADER_POOL: list[dict[str, str]] = [{}] + [
    {
        _rng.choice(HEADER_NAMES + TEXT_POOL[:60]): _rng.choice([*TEXT_POOL, "true", "false", "1"])
        for _ in range(_rng.randrange(1, 5))
    }
    for _ in range(200)
]
RAW_POOL = [
    b"",
    b"\x00",
    b"\xff" * 10,
    b"[" * 100_000,
    b'{"a":' * 50_000,
    b'{"object_type": "order"',
    b"\xef\xbb\xbf{}",
    '{"object_type": "order"}'.encode("utf-16"),
    b"null",
    b"1e999999",
    b'"order"',
    b"{}" + b" " * 70_000,
    *(_rng.randbytes(_rng.randrange(300)) for _ in range(100)),
]
NOT_HEX = ["g", "z", "G", "x", " ", "\x00", "\n", "０", "٣", "\ud800", "é", "/", ".", "😀", "{"]
FIXED_GARBAGE = ["", " ", "null", "None", "0" * 31, "0" * 33, "../../../etc/passwd", "０" * 32, "\x00" * 32, *HUGE[:3]]
SPELLINGS: list[Callable[[str], str]] = [
    lambda h: h,
    lambda h: str(uuid.UUID(h)),
    lambda h: h.upper(),
    lambda h: str(uuid.UUID(h)).upper(),
]


def _garble(choice: tuple[str, int, int, str]) -> str:
    """Something that is not a UUID by the spec's rule (32 hex digits once dashes are removed), by construction."""
    h, how, at, bad = choice
    if how == 0:
        return h[:at]
    if how == 1:
        return h + h[: at + 1]
    if how == 2:
        return h[:at] + bad + h[at + 1 :]
    if how == 3:
        return h + bad
    if how == 4:
        return "{" + h + "}"
    if how == 5:
        return f"urn:uuid:{uuid.UUID(h)}"
    if how == 6:
        return bad + h
    return FIXED_GARBAGE[at % len(FIXED_GARBAGE)]


hex32 = st.binary(min_size=16, max_size=16).map(bytes.hex)
valid_uuid = st.tuples(hex32, st.sampled_from(SPELLINGS)).map(lambda t: t[1](t[0]))
garbage_uuid = st.tuples(hex32, st.integers(0, 7), st.integers(0, 31), st.sampled_from(NOT_HEX)).map(_garble)
texts = st.sampled_from(TEXT_POOL)
json_values = st.sampled_from(JSON_POOL)
wrong_types = st.sampled_from(WRONG_TYPES)
junk_fields = st.sampled_from(JUNK_POOL)
headers = st.sampled_from(HEADER_POOL)
IGNORABLE = sorted(OBSERVABLE_TYPES - HANDLED_TYPES)
UNKNOWN_TYPES = [t for t in TEXT_POOL if t not in OBSERVABLE_TYPES] + [
    "Order",
    "ORDER",
    " order",
    "order\x00",
    "order\n",
    "resources",
    "orders",
    "call",
    "proposal",
]
unknown_object_type = st.sampled_from(UNKNOWN_TYPES)


@dataclass
class Case:
    """One delivery and what must become of it: ``dead`` | ``ignored`` | ``processed`` | ``real`` | ``any``."""

    expect: str
    payload: dict[str, Any] | None = None  # rendered to JSON at submit time (``real`` fills in the order)
    raw: bytes | None = None
    destination: str = "@unified"  # "@unified", "@order", "@resource", ... are resolved by the harness
    headers: dict[str, str] = field(default_factory=dict)
    ascii_json: bool = True
    foreign: bool = False  # a handled type naming another offering: ignored unless its queue says it is ours

    def body(self) -> bytes:
        if self.raw is not None:
            return self.raw
        try:
            return json.dumps(self.payload, ensure_ascii=self.ascii_json).encode()
        except UnicodeEncodeError:  # a lone surrogate: only its \ud800 escape is valid UTF-8
            return json.dumps(self.payload).encode()


# The case builders below are plain functions of hypothesis's `draw`: only `cases` is a strategy, built once per
# test, so no strategy object is made per example.

ORDER_STATE_VALUES = [None, *ORDER_STATES, *TEXT_POOL[:80], *HUGE]
BAD_UTF8 = [b"\xff", b"\xfe", b"\x80", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf8\x88\x80\x80", b"\xc3("]
NOT_JSON = ["{", "{'a': 1}", "NaN]", "order", "", "{}}", '{"object_type": order}', "[1,]", "\x00", "tru"]
DESTINATIONS = ["@unified", "@unified", "@order", "@resource", "", "/", "/queue/", *TEXT_POOL[:40], HUGE[0]]
maybe_offering = st.integers(0, 2)
spelling = st.sampled_from(SPELLINGS)


def offering_field(draw: st.DrawFn, ours: str) -> dict[str, Any]:
    """No offering_uuid, null, or ours in any spelling."""
    choice = draw(maybe_offering)
    if choice == 0:
        return {}
    if choice == 1:
        return {"offering_uuid": None}
    return {"offering_uuid": draw(spelling)(ours)}


def processed_case(draw: st.DrawFn, ours: str) -> Case:
    """Valid events for our offering: orders and resources unknown to Waldur (404), syncs."""
    kind = draw(st.sampled_from(["order", "order", "resource", "offering_resources_sync"]))
    payload: dict[str, Any] = {**draw(junk_fields), "object_type": kind, **offering_field(draw, ours)}
    if kind == "order":
        payload["order_uuid"] = draw(valid_uuid)
        state = draw(st.sampled_from(ORDER_STATE_VALUES))
        if state is not None or draw(st.booleans()):
            payload["order_state"] = state
        payload["resource_uuid"] = draw(st.sampled_from([None, ""]) | valid_uuid)
    elif kind == "resource":
        payload["resource_uuid"] = draw(valid_uuid)
    return Case("processed", payload, ascii_json=draw(st.booleans()))


def ignored_case(draw: st.DrawFn, ours: str) -> Case:
    """Valid events the daemon does not act on: other Waldur types, and handled types of a foreign offering."""
    if draw(st.booleans()):
        payload = {**draw(junk_fields), "object_type": draw(st.sampled_from(IGNORABLE)), **offering_field(draw, ours)}
        return Case("ignored", payload)
    foreign = draw(hex32)
    if foreign == ours:
        foreign = ours[::-1]
    payload = {
        "object_type": draw(st.sampled_from(sorted(HANDLED_TYPES))),
        "offering_uuid": draw(spelling)(foreign),
        "order_uuid": draw(valid_uuid),
        "resource_uuid": draw(valid_uuid),
    }
    return Case("ignored", payload, foreign=True)


def dead_case(draw: st.DrawFn, ours: str) -> Case:
    """Bad input of every kind the spec names; each must be dead-lettered."""
    kind = draw(st.integers(0, 10))
    base: dict[str, Any] = {"object_type": "order", "order_uuid": draw(valid_uuid), **offering_field(draw, ours)}
    if kind == 0:  # invalid UTF-8 spliced into an otherwise valid body
        body = json.dumps(base, ensure_ascii=draw(st.booleans())).encode()
        at = draw(st.integers(0, len(body)))
        raw = body[:at] + draw(st.sampled_from(BAD_UTF8)) + body[at:]
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            return Case("dead", raw=raw)
        return Case("any", raw=raw)  # pragma: no cover - every splice above breaks UTF-8
    if kind == 1:  # not JSON at all
        text = draw(st.sampled_from(NOT_JSON + TEXT_POOL))
        raw = text.encode("utf-8", "surrogatepass")
        try:
            json.loads(raw)
        except ValueError:
            return Case("dead", raw=raw)
        return Case("any", raw=raw)
    if kind == 2:  # JSON, but not an object
        return Case("dead", raw=json.dumps(draw(st.sampled_from(WRONG_TYPES + TEXT_POOL + [None, [base]]))).encode())
    if kind == 3:  # no object_type (unified queue)
        base.pop("object_type")
        return Case("dead", {**draw(junk_fields), **base})
    if kind == 4:  # object_type of the wrong type, or null
        return Case("dead", {**base, "object_type": draw(wrong_types | st.none())})
    if kind == 5:  # not a Waldur observable type
        return Case("dead", {**base, "object_type": draw(unknown_object_type)})
    if kind == 6:  # a valid-looking order with a garbage or wrongly typed order uuid
        return Case("dead", {**base, "order_uuid": draw(garbage_uuid | wrong_types | st.none())})
    if kind == 7:  # garbage offering uuid
        return Case("dead", {**base, "offering_uuid": draw(garbage_uuid | wrong_types)})
    if kind == 8:  # garbage resource uuid on an order (null and "" mean "absent")
        return Case("dead", {**base, "resource_uuid": draw(garbage_uuid.filter(bool) | wrong_types)})
    if kind == 9:  # an order state that is not a string
        return Case("dead", {**base, "order_state": draw(wrong_types)})
    payload = {"object_type": "resource", "resource_uuid": draw(garbage_uuid | wrong_types | st.none())}
    return Case("dead", {**payload, **offering_field(draw, ours)})


EVENTISH_VALUES = st.sampled_from(sorted(OBSERVABLE_TYPES)) | json_values | valid_uuid | garbage_uuid


def any_case(draw: st.DrawFn) -> Case:
    """Anything at all: raw bytes, random JSON values, random event-ish dictionaries."""
    choice = draw(st.integers(0, 3))
    if choice == 0:
        return Case("any", raw=draw(st.binary(max_size=300)))
    if choice == 1:
        return Case("any", raw=draw(st.sampled_from(RAW_POOL)))
    if choice == 2:
        return Case("any", raw=json.dumps(draw(json_values)).encode())
    keys = draw(st.lists(st.sampled_from(sorted(EVENT_KEYS) + TEXT_POOL[:20]), max_size=5))
    return Case("any", {key: draw(EVENTISH_VALUES) for key in keys})


@st.composite
def cases(draw: st.DrawFn, ours: str, *, legacy: bool = False) -> Case:
    weights = draw(st.integers(0, 99))
    if weights < 3:
        case = Case("real", {"object_type": "order"})
    elif weights < 40:
        case = dead_case(draw, ours)
    elif weights < 55:
        case = ignored_case(draw, ours)
    elif weights < 80:
        case = processed_case(draw, ours)
    else:
        case = any_case(draw)
    case.headers = dict(draw(headers))
    payload = case.payload
    kind = payload.get("object_type") if payload is not None else None
    typed = isinstance(kind, str) and kind in HANDLED_TYPES and case.expect != "dead"
    if legacy and typed and payload is not None and draw(st.booleans()):
        # Legacy queues: the body has no object_type, the queue name says it.
        case.destination = "@" + payload.pop("object_type")
    elif legacy and payload is not None and payload.get("object_type") is None:
        # No object_type and a queue that names none: nothing says what it is.
        case.destination = draw(st.sampled_from(["@nowhere", "/queue/elsewhere", *TEXT_POOL[:40]]))
    else:
        case.destination = draw(st.sampled_from(DESTINATIONS))
    return case


# ------------------------------------------------------------------------------------------------ the harness


class CountingDelivery(Delivery):
    """A delivery that counts every ack() / nack() call (the real one only acts on the first)."""

    __slots__ = ("acks", "nacks")

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.acks = 0
        self.nacks = 0

    def ack(self) -> bool:
        self.acks += 1
        return super().ack()

    def nack(self, requeue: bool = True) -> bool:
        self.nacks += 1
        return super().nack(requeue)


class Tally:
    """Stands in for a labelled prometheus Counter and keeps a running total over every label (cheap to read)."""

    def __init__(self, counter: Any) -> None:
        self.counter = counter
        self.total = 0.0

    def labels(self, *args: str, **kwargs: str) -> Tally._Child:
        return Tally._Child(self, self.counter.labels(*args, **kwargs))

    class _Child:
        def __init__(self, tally: Tally, child: Any) -> None:
            self.tally, self.child = tally, child

        def inc(self, amount: float = 1.0) -> None:
            self.tally.total += amount
            self.child.inc(amount)


@dataclass
class Harness:
    fake: FakeWaldur
    core: Core
    offering_uuid: str
    destinations: dict[str, str]
    registered: set[str]
    log_stream: io.StringIO
    out: Path
    dead_path: Path
    dead_offset: int = 0
    real_orders: list[str] = field(default_factory=list)

    @property
    def runtime(self) -> OfferingRuntime:
        return self.core.offerings[0]

    def counts(self) -> tuple[int, float, float]:
        metrics: Any = self.core.metrics
        return self.core.dead_letters.count, metrics.events_received.total, metrics.events_ignored.total

    def delivery(self, case: Case) -> CountingDelivery:
        if case.expect == "real":
            assert case.payload is not None
            resource, order = self.fake.order_new_resource(self.offering_uuid, slug=f"fuzz-{len(self.real_orders)}")
            self.real_orders.append(order["uuid"])
            case.payload["order_uuid"] = str(uuid.UUID(order["uuid"])) if len(self.real_orders) % 2 else order["uuid"]
            case.payload["order_state"] = "pending-provider"
            if self.core.config.daemon.event_mode == "unified":
                case.payload["resource_uuid"] = resource["uuid"]
        destination = self.destinations.get(case.destination, case.destination)
        return CountingDelivery(transport="fuzz", destination=destination, headers=case.headers, body=case.body())

    def expected(self, case: Case, delivery: Delivery) -> str:
        """A foreign offering's event on one of our queues is ours (the queue decides; Waldur's order then says
        whose it is); elsewhere it is ignored."""
        if case.foreign:
            return "processed" if delivery.destination in self.registered else "ignored"
        return case.expect

    def new_dead_letters(self) -> list[dict[str, Any]]:
        with open(self.dead_path, "rb") if self.dead_path.exists() else io.BytesIO() as handle:
            handle.seek(self.dead_offset)
            data = handle.read()
        self.dead_offset += len(data)
        return [json.loads(line) for line in data.splitlines()]

    def check_logs(self) -> None:
        text = self.log_stream.getvalue()
        self.log_stream.seek(0)
        self.log_stream.truncate()
        for marker in UNEXPECTED_FAILURES:
            assert marker not in text, text[text.index(marker) - 2000 : text.index(marker) + 2000]

    def order_files(self, order_uuid: str) -> list[Path]:
        return sorted(self.out.glob(f"*_{order_uuid}.json"))


def _config(tmp: Path, fake: FakeWaldur, offering_uuid: str, *, mode: str, workers: int) -> Path:
    data = {
        "offerings": [
            {
                "name": "CSCS capstor",
                "waldur_api_url": fake.url,
                "waldur_api_token": fake.token,
                "waldur_offering_uuid": offering_uuid,
                "backend_type": "cscs-hpc-storage",
                "backend_settings": {"output_directory": str(tmp / "out")},
                "backend_components": {
                    "storage": {"measured_unit": "TB", "accounting_type": "limit", "label": "Storage", "unit_factor": 1}
                },
            }
        ],
        "daemon": {
            "event_mode": mode,
            "workers": workers,
            "state_directory": str(tmp / "state"),
            "retry": {"attempts": 2, "max_wait": 0.01, "total": 5, "timeout": 5},
            "http": {"enabled": False},
        },
    }
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def log_stream() -> Iterator[io.StringIO]:
    """JSON logs into memory for the module (rendering and redaction run as in production); restored after."""
    saved = structlog.get_config()
    stream = io.StringIO()
    logs.configure(level="info", fmt="json", stream=stream)
    yield stream
    structlog.configure(**saved)


def _harness(
    tmp_path_factory: pytest.TempPathFactory, log_stream: io.StringIO, *, mode: str, workers: int, inline: bool
) -> Iterator[Harness]:
    tmp = tmp_path_factory.mktemp(f"fuzz-{mode}")
    with FakeWaldur(seed=6) as fake:
        offering = populate(fake, ["capstor"], n=3, seed=6).offerings[0]
        config = load_config(_config(tmp, fake, offering.uuid, mode=mode, workers=workers))
        core = build_core(config, inline=inline)
        metrics: Any = core.metrics
        metrics.events_received = Tally(metrics.events_received)
        metrics.events_ignored = Tally(metrics.events_ignored)
        subscriptions = register_offering(core, config.offerings[0], core.offerings[0])
        destinations: dict[str, str] = {}
        for sub in subscriptions:
            destinations["@" + (sub.object_type or "unified")] = sub.destination
        for name in ("@unified", "@order", "@resource", "@offering_resources_sync", "@nowhere"):
            destinations.setdefault(name, f"/amq/queue/not-registered-{name[1:]}")
        core.fill()
        if not inline:
            core.dispatcher.start()
        registered = {sub.destination for sub in subscriptions}
        dead_path = tmp / "state" / "dead-letter.jsonl"
        harness = Harness(fake, core, offering.uuid, destinations, registered, log_stream, tmp / "out", dead_path)
        try:
            yield harness
        finally:
            core.dispatcher.stop(10)
            core.close()


@pytest.fixture(scope="module")
def unified(tmp_path_factory: pytest.TempPathFactory, log_stream: io.StringIO) -> Iterator[Harness]:
    yield from _harness(tmp_path_factory, log_stream, mode="unified", workers=1, inline=True)


@pytest.fixture(scope="module")
def legacy_workers(tmp_path_factory: pytest.TempPathFactory, log_stream: io.StringIO) -> Iterator[Harness]:
    yield from _harness(tmp_path_factory, log_stream, mode="legacy", workers=4, inline=False)


def check_real_orders(h: Harness) -> None:
    """Every order that existed in Waldur: exactly one order file, done in Waldur; no other order files."""
    for order_uuid in h.real_orders:
        assert len(h.order_files(order_uuid)) == 1, order_uuid
        assert h.fake.order_state(order_uuid) == "done"
    order_files = [p for p in h.out.iterdir() if not p.name.endswith("-all.json")]
    assert len(order_files) == len(h.real_orders)


# ------------------------------------------------------------------------------------------------ deliveries


def test_inline_dispatcher_survives_fuzzed_deliveries(unified: Harness) -> None:
    h = unified
    seen: dict[str, int] = {}

    @fuzz_settings(INLINE_EXAMPLES)
    @given(case=cases(h.offering_uuid))
    def run(case: Case) -> None:
        delivery = h.delivery(case)
        before = h.counts()
        h.core.dispatcher.submit(delivery)  # inline: handled before it returns; must never raise
        dead, received, ignored = (a - b for a, b in zip(h.counts(), before, strict=True))
        assert (delivery.acks, delivery.nacks) == (1, 0), case
        assert delivery.outcome == "ack"
        lines = h.new_dead_letters()
        assert len(lines) == dead
        assert dead + received == 1 and ignored <= received, (case, dead, received, ignored)
        outcome = "dead" if dead else "ignored" if ignored else "processed"
        if dead:
            (line,) = lines
            assert base64.b64decode(line["body_base64"]) == delivery.body
            assert line["destination"] == delivery.destination
            assert line["reason"] in STABLE_REASONS
        if case.expect == "real":
            assert outcome == "processed"
            order_uuid = h.real_orders[-1]
            assert h.fake.order_state(order_uuid) == "done"
            assert len(h.order_files(order_uuid)) == 1
        elif case.expect != "any":
            assert outcome == h.expected(case, delivery), (case, outcome, lines)
        seen[case.expect] = seen.get(case.expect, 0) + 1
        h.check_logs()

    run()
    assert h.core.dispatcher.handled == sum(seen.values())
    assert all(seen.get(kind, 0) > 0 for kind in ("dead", "ignored", "processed", "real", "any")), seen
    check_real_orders(h)
    assert h.core.dispatcher.alive
    INPUTS["deliveries (inline)"] = sum(seen.values())


def test_worker_dispatcher_survives_fuzzed_batches_on_legacy_queues(legacy_workers: Harness) -> None:
    h = legacy_workers
    ours = h.offering_uuid
    sent: list[tuple[Case, CountingDelivery]] = []

    @fuzz_settings(WORKER_EXAMPLES)
    @given(batch=st.lists(cases(ours, legacy=True), min_size=1, max_size=12))
    def run(batch: list[Case]) -> None:
        before = h.counts()
        handled = h.core.dispatcher.handled
        deliveries = [(case, h.delivery(case)) for case in batch]
        for _case, delivery in deliveries:
            h.core.dispatcher.submit(delivery)  # the receiver thread's call: queue and return
        assert wait_for(lambda: h.core.dispatcher.handled == handled + len(batch), 60, interval=0.001)
        dead, received, ignored = (a - b for a, b in zip(h.counts(), before, strict=True))
        assert dead + received == len(batch)
        lines = h.new_dead_letters()
        assert len(lines) == dead
        dead_letters = [(line["destination"], base64.b64decode(line["body_base64"])) for line in lines]
        for case, delivery in deliveries:
            assert (delivery.acks, delivery.nacks) == (1, 0), case
            key = (delivery.destination, delivery.body)
            if case.expect == "dead":
                assert key in dead_letters, case
            elif case.expect in ("ignored", "processed", "real"):
                assert key not in dead_letters, case
        assert ignored >= sum(h.expected(case, delivery) == "ignored" for case, delivery in deliveries)
        sent.extend(deliveries)
        h.check_logs()

    run()
    assert {case.expect for case, _ in sent} >= {"dead", "ignored", "processed", "real", "any"}
    check_real_orders(h)
    assert h.core.dispatcher.alive
    INPUTS["deliveries (4 workers)"] = len(sent)


# ------------------------------------------------------------------------------------------------ resources

NOW = datetime(2025, 3, 14, 9, 26, 53, tzinfo=UTC)


def waldur_resource(n: int) -> dict[str, Any]:
    """A valid Waldur marketplace resource, shaped like the API's (plus fields the mapping does not read)."""
    return {
        "url": f"https://waldur.example.org/api/marketplace-resources/{n:032x}/",
        "uuid": f"{n:032x}",
        "name": f"resource {n}",
        "slug": f"res-{n}",
        "state": "OK",
        "created": f"2025-01-{1 + n % 28:02d}T10:00:00.000000Z",
        "modified": "2025-02-01T10:00:00.000000Z",
        "offering_slug": "capstor",
        "customer_slug": "mch",
        "project_slug": "msclimate",
        "backend_id": "",
        "limits": {"storage": 10 + n},
        "attributes": {"permissions": "2770", "storage_data_type": ["store", "users", "scratch", "archive"][n % 4]},
        "options": {},
        "backend_metadata": {},
        "end_date": None,
    }


RESOURCE_KEYS = [
    "uuid",
    "slug",
    "state",
    "created",
    "offering_slug",
    "customer_slug",
    "project_slug",
    "limits",
    "attributes",
    "options",
    "backend_metadata",
]
NESTED = {
    "attributes": ["permissions", "storage_data_type"],
    "options": ["permissions", "soft_quota_space", "hard_quota_space", "soft_quota_inodes", "hard_quota_indoes"],
    "limits": ["storage", "cpu"],
    "backend_metadata": ["project_item", "user_item"],
}
EVIL = [
    "",
    ".",
    "..",
    "../x",
    "a/b",
    "/",
    "x\x00y",
    "line\nbreak",
    "tab\t",
    "\x7f",
    "\u0085",
    "\ud800",
    "ok-slug",
    "...",
    "2770",
    "0777",
    "775\n",
    "8888",
    "100",
    "-5",
    "1e3",
    "nan",
    ".5",
    "Terminated",
    "OK",
    "Erred",
    "USERS",
    "scratch",
    1e-5,
    1e20,
    -1.0,
    0,
    10**20,
    10**400,
    True,
    float("nan"),
    float("inf"),
]
field_values = st.sampled_from(EVIL + JSON_POOL + HUGE)


@st.composite
def raw_resources(draw: st.DrawFn) -> dict[str, Any]:
    n = draw(st.integers(0, 15))  # few uuids, so duplicates (and their spellings) meet in one batch
    resource = waldur_resource(n)
    resource["uuid"] = draw(spelling)(resource["uuid"])
    for _ in range(draw(st.integers(0, 3))):
        choice = draw(st.integers(0, 9))
        if choice < 6:
            top = draw(st.sampled_from(sorted(NESTED)))
            nested = dict(resource[top]) if isinstance(resource.get(top), dict) else {}
            nested[draw(st.sampled_from(NESTED[top]))] = draw(field_values)
            resource[top] = nested
        elif choice < 9:
            resource[draw(st.sampled_from(RESOURCE_KEYS))] = draw(field_values)
        else:
            resource.pop(draw(st.sampled_from(RESOURCE_KEYS)), None)
    return resource


JUNK_RESOURCES = [
    {_rng.choice(RESOURCE_KEYS + TEXT_POOL[:5]): _rng.choice(EVIL + JSON_POOL) for _ in range(_rng.randrange(12))}
    for _ in range(300)
]
any_resource = raw_resources() | st.sampled_from(JUNK_RESOURCES)


@dataclass
class Model:
    """What the feed must hold: uuid → (created of the latest JSON, last valid storage object or None)."""

    entries: dict[str, tuple[str, dict[str, Any] | None]] = field(default_factory=dict)

    def apply(self, raw: dict[str, Any], change: Change, mapping: MappingSettings) -> str | None:
        try:
            storage: dict[str, Any] | None = map_resource(raw, mapping)
        except InvalidResource:
            storage = None
        key = uuid_hex(raw.get("uuid")) if isinstance(raw.get("uuid"), str) else None
        if storage is None:
            assert isinstance(change.error, InvalidResource), (raw, change)
            assert change.error.field is not None and str(change.error)
        else:
            assert change.error is None, (raw, change)
        if key is None:
            assert storage is None  # an unusable uuid is always an invalid resource
            return None
        created = raw.get("created")
        kept = self.entries.get(key, ("", None))[1]
        if storage is None:
            assert change.stale == (kept is not None)
        self.entries[key] = (created if isinstance(created, str) else "", storage if storage is not None else kept)
        return key

    def feed(self) -> list[dict[str, Any]]:
        order = sorted(self.entries.items(), key=lambda item: (item[1][0], item[0]))
        return [storage for _key, (_created, storage) in order if storage is not None]


@pytest.fixture(scope="module")
def feed(tmp_path_factory: pytest.TempPathFactory) -> tuple[OfferingRuntime, SnapshotScheduler]:
    mapping = MappingSettings()
    runtime = OfferingRuntime(
        uuid="8c2b5f0e7a1d4c3b9e6f1a2b3c4d5e6f",
        slug="capstor",
        name="Capstor",
        settings=mapping,
        zone=ZoneInfo("Europe/Zurich"),
        snapshot_retention=5,
        gateway=None,  # type: ignore[arg-type]  # the mirror and the scheduler never talk to Waldur
        mirror=OfferingMirror("capstor", mapping),
        writer=OutputWriter(tmp_path_factory.mktemp("fuzz-feed") / "out"),
    )
    scheduler = SnapshotScheduler(
        [runtime], rules=DebounceRules(2.0, 30.0, 3600.0), stamps=Stamps(FixedClock(NOW)), metrics=Metrics()
    )
    return runtime, scheduler


def test_random_resources_through_the_mirror_and_all_json(feed: tuple[OfferingRuntime, SnapshotScheduler]) -> None:
    runtime, scheduler = feed
    counts = {"valid": 0, "invalid": 0, "stale": 0}

    @fuzz_settings(RESOURCE_EXAMPLES)
    @given(
        rounds=st.lists(st.lists(any_resource, max_size=4), min_size=1, max_size=2),
        full_listing=st.booleans(),
    )
    def run(rounds: list[list[dict[str, Any]]], full_listing: bool) -> None:
        mirror = OfferingMirror("capstor", runtime.settings)
        runtime.mirror = mirror
        model = Model()
        for batch in rounds:
            changes = mirror.replace_all(batch) if full_listing else [mirror.apply(raw) for raw in batch]
            seen: set[str] = set()
            for raw, change in zip(batch, changes, strict=False):
                key = model.apply(raw, change, runtime.settings)
                if key is not None:
                    seen.add(key)
                counts["valid" if change.error is None else "stale" if change.stale else "invalid"] += 1
            if full_listing:
                model.entries = {k: v for k, v in model.entries.items() if k in seen}
            assert mirror.storage_objects() == model.feed()
        assert scheduler.regenerate(runtime, force=True)  # never raises, always writes when forced
        names = runtime.writer.snapshot_names()
        document = json.loads((runtime.writer.directory / names[-1]).read_bytes())
        assert document["result"]["storageResources"] == json.loads(json.dumps(model.feed()))
        assert document["result"]["paginate"]["total"] == len(model.feed())

    run()
    assert all(counts.values()), counts
    INPUTS["resources"] = sum(counts.values())
    assert len(runtime.writer.snapshot_names()) == 1  # one minute, one file, replaced each time


def test_fuzz_volume() -> None:
    """What the fuzz tests above fed in (run with them; `-k` selections of a single test skip this)."""
    if len(INPUTS) < 3:
        pytest.skip(f"only part of the fuzz module ran: {INPUTS}")
    assert sum(INPUTS.values()) >= 10_000 * SCALE, INPUTS
