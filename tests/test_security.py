"""Security (issue 6, item 3): nothing escapes the output directory, files have their modes, no secret leaks, and
the HTTP API is neither open off loopback nor fed oversized input.

* **Paths** — resources whose slugs hold ``..``, ``/``, NUL or control characters, and orders with unusable type
  or resource uuid, go through the real processor against the fake Waldur (real HTTP): each such order is set
  ``erred`` with the field named, no file is written, no request leaves ``/api/``, and nothing at all is created
  outside the output and state directories (the working directory included). The writer itself refuses any name
  that is not a plain file name (hypothesis over arbitrary text) and replaces a planted symlink instead of
  following it.
* **Modes** — the output directory is 0750 and every file the configured ``file_mode`` (default 0640, ``"0600"``),
  whatever the umask.
* **The Waldur token** — never in the log (JSON lines, *without* the last-line redaction registered, so the
  daemon's own care is what is tested), the capture, any HTTP API response (debug mode included), ``check-config``
  output, a configuration error, a Waldur error or its chained causes, the start failure of a daemon whose token
  Waldur rejects; and `test_nothing_the_session_wrote_holds_a_waldur_token` greps everything the test session
  wrote (the base temporary directory) for every Waldur token the suite used, again when the session ends.
* **HTTP** — ``auth: none`` on a non-loopback listener exits 78 before anything is created; oversized query
  strings, parameter names and values, headers and bearer credentials are refused (414 / 422 / 400-431 / 401) and
  the server keeps serving.
* **systemd** — the unit's exposure score (2.0 or better) is `tests/test_systemd_unit.py`'s job, not repeated here.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import socket
import stat
import subprocess
import sys
import threading
import traceback
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cscs_storage_daemon import logs
from cscs_storage_daemon.config import ConfigError, load_config
from cscs_storage_daemon.daemon import Core, Daemon, build_core, wait_for
from cscs_storage_daemon.gateway import WaldurError, WaldurGateway
from cscs_storage_daemon.retry import RetryPolicy
from cscs_storage_daemon.testing.fake_waldur import FakeWaldur
from cscs_storage_daemon.testing.sample_data import populate
from cscs_storage_daemon.transports.base import Delivery
from cscs_storage_daemon.writer import OutputWriter
from tests.fixtures.config_files import TEST_TOKEN

TOKEN = "secTOKEN-6c1d0e3a9b8f4d21a7e5c3b2f1a0d9e8"  # this module's Waldur token: distinctive, greppable
BROKER_PASSWORD = "brokerPASSWORD-5e2c7a9d0b1f"
ORDER_FILE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}-\d{2}-\d{2}-(create|update|terminate)_[0-9a-f]{32}\.json$")
SNAPSHOT_RE = re.compile(r"^\d{4}-\d{2}-\d{2}-\d{2}-\d{2}-all\.json$")
STORAGE = {"storage": {"measured_unit": "TB", "accounting_type": "limit", "label": "Storage", "unit_factor": 1}}
FAST_RETRY = {"attempts": 3, "max_wait": 0.01, "total": 5, "timeout": 2}


# ------------------------------------------------------------------------------------------------ helpers


def write_config(
    path: Path,
    fake: FakeWaldur,
    offering_uuid: str,
    output: Path,
    state: Path,
    *,
    token: str | None = None,
    backend: dict[str, Any] | None = None,
    daemon: dict[str, Any] | None = None,
    offering: dict[str, Any] | None = None,
) -> Path:
    entry: dict[str, Any] = {
        "name": "CSCS capstor",
        "waldur_api_url": fake.url,
        "waldur_api_token": token if token is not None else fake.token,
        "waldur_offering_uuid": offering_uuid,
        "backend_type": "cscs-hpc-storage",
        "backend_settings": {"output_directory": str(output), **(backend or {})},
        "backend_components": STORAGE,
        **(offering or {}),
    }
    settings_: dict[str, Any] = {
        "state_directory": str(state),
        "retry": FAST_RETRY,
        "http": {"enabled": False},
        "log": {"format": "json"},
        **(daemon or {}),
    }
    path.write_text(yaml.safe_dump({"offerings": [entry], "daemon": settings_}, sort_keys=False))
    return path


@dataclass
class InProcess:
    """A daemon core (no broker) against a fake Waldur: events go straight into its inline dispatcher."""

    fake: FakeWaldur
    core: Core
    offering_uuid: str
    root: Path

    @property
    def out(self) -> Path:
        return self.core.offerings[0].writer.directory

    def submit(self, body: dict[str, Any] | bytes) -> Delivery:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        delivery = Delivery(transport="test", destination="/amq/queue/test", headers={}, body=data)
        self.core.dispatcher.submit(delivery)
        assert delivery.outcome == "ack"
        return delivery

    def order_event(self, order_uuid: str) -> Delivery:
        return self.submit({"object_type": "order", "order_uuid": order_uuid, "order_state": "pending-provider"})


@pytest.fixture
def in_process(tmp_path: Path) -> Iterator[Callable[..., InProcess]]:
    """``make(backend={...}, token=...)``: a fake Waldur with one offering and 3 resources, a core on it."""
    made: list[tuple[FakeWaldur, Core]] = []

    def make(
        *, backend: dict[str, Any] | None = None, daemon: dict[str, Any] | None = None, root: Path | None = None
    ) -> InProcess:
        root = root or tmp_path / "root"
        root.mkdir(parents=True, exist_ok=True)
        fake = FakeWaldur(token=TOKEN).start()
        offering = populate(fake, ["capstor"], n=3, seed=3).offerings[0]
        path = write_config(
            root / "config.yaml",
            fake,
            offering.uuid,
            root / "out" / "capstor",
            root / "state",
            backend=backend,
            daemon=daemon,
        )
        core = build_core(load_config(path), inline=True)
        made.append((fake, core))
        core.fill()
        return InProcess(fake, core, offering.uuid, root)

    yield make
    for fake, core in made:
        core.close()
        fake.stop()


def files_under(root: Path) -> list[Path]:
    return sorted(Path(d) / name for d, _dirs, names in os.walk(root) for name in names)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@contextlib.contextmanager
def umask(value: int) -> Iterator[None]:
    old = os.umask(value)
    try:
        yield
    finally:
        os.umask(old)


@contextlib.contextmanager
def json_logs() -> Iterator[io.StringIO]:
    """The daemon's JSON log configuration into memory (restored after). No secret is registered for redaction:
    what is tested is that the daemon never hands the token to a logger in the first place."""
    saved = structlog.get_config()
    stream = io.StringIO()
    logs.configure(level="debug", fmt="json", stream=stream)
    try:
        yield stream
    finally:
        structlog.configure(**saved)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m cscs_storage_daemon.cli ...`` as an operator runs it."""
    full_env = {k: v for k, v in os.environ.items() if k != "CREDENTIALS_DIRECTORY"} | (env or {})
    return subprocess.run(
        [sys.executable, "-m", "cscs_storage_daemon.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=full_env,
        cwd=str(cwd) if cwd else None,
        check=False,
    )


# ------------------------------------------------------------------------------------------------ paths

EVIL_VALUES = [
    "..",
    ".",
    "../../../escape",
    "a/b",
    "/abs",
    "x\x00y",
    "new\nline",
    "\x1b[31m",
    "\x7f",
    "tab\t",
    "\u0085",
]
EVIL_FIELDS = ["slug", "customer_slug", "project_slug", "offering_slug", "attributes.storage_data_type"]


def test_evil_slugs_never_make_a_path_outside_the_output_directory(
    in_process: Callable[..., InProcess], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    workdir = tmp_path / "work" / "cwd"  # a relative "../../x" from here would land in tmp_path/...
    workdir.mkdir(parents=True)
    monkeypatch.chdir(workdir)
    h = in_process(root=tmp_path / "work" / "root")
    fake = h.fake
    erred: dict[str, str] = {}
    for field in EVIL_FIELDS:
        for value in EVIL_VALUES:
            resource, order = fake.order_new_resource(h.offering_uuid, slug=f"evil-{len(erred)}")
            if field.startswith("attributes."):
                attributes = dict(resource.get("attributes") or {})
                attributes[field.split(".", 1)[1]] = value
                fake.update_resource(resource["uuid"], attributes=attributes)
            else:
                fake.update_resource(resource["uuid"], **{field: value})
            h.order_event(order["uuid"])
            h.submit({"object_type": "resource", "resource_uuid": resource["uuid"]})
            erred[order["uuid"]] = field
    _resource, good = fake.order_new_resource(h.offering_uuid, slug="control-order")
    h.order_event(good["uuid"])
    assert h.core.scheduler.regenerate(h.core.offerings[0], force=True)

    for order_uuid, field in erred.items():
        order = fake.order(order_uuid)
        assert order["state"] == "erred", (field, order["state"])
        assert field in order["error_message"]
        assert not list(h.out.glob(f"*_{order_uuid}.json"))
    assert fake.order_state(good["uuid"]) == "done"
    assert len(list(h.out.glob(f"*_{good['uuid']}.json"))) == 1

    # Nothing anywhere but the config, the output directory (order files and all.json only) and the state directory.
    root = h.root
    for path in files_under(tmp_path):
        assert path == root / "config.yaml" or h.out in path.parents or root / "state" in path.parents, path
    for path in files_under(h.out):
        assert path.parent == h.out and (ORDER_FILE_RE.match(path.name) or SNAPSHOT_RE.match(path.name)), path
    assert files_under(workdir) == []
    for name in sorted(p.name for p in h.out.iterdir() if SNAPSHOT_RE.match(p.name)):
        for storage in json.loads((h.out / name).read_text())["result"]["storageResources"]:
            mount = storage["mountPoint"]["default"]
            assert mount.isprintable() and all(part not in ("", ".", "..") for part in mount.split("/")[1:]), mount


@pytest.mark.parametrize(
    ("order_type", "resource_uuid"),
    [
        ("Create", "../../../api/users"),
        ("Create", "%2e%2e%2fapi%2fusers"),
        ("Create", "0" * 32 + "/../../users"),
        ("../Create", None),
        ("Create\x00", None),
        (None, None),
    ],
)
def test_unusable_order_fields_reach_neither_a_path_nor_a_waldur_url(
    in_process: Callable[..., InProcess], order_type: str | None, resource_uuid: str | None
) -> None:
    h = in_process()
    resource, order = h.fake.order_new_resource(h.offering_uuid, slug="target")
    h.fake.set_order_state(order["uuid"], "executing")
    listed = dict(order, state="executing", type=order_type)
    listed["marketplace_resource_uuid"] = resource_uuid if resource_uuid is not None else resource["uuid"]
    h.fake.clear_requests()
    # As a reconciliation pass hands over an order from Waldur's listing.
    outcome = h.core.processor.handle_order(h.core.offerings[0], order["uuid"], None, order=listed)
    assert outcome.outcome == "erred"
    assert h.fake.order_state(order["uuid"]) == "erred"
    assert not list(h.out.glob(f"*_{order['uuid']}.json"))
    for request in h.fake.requests:
        assert request.path.startswith("/api/") and ".." not in request.path and "%2e" not in request.path.lower()
        assert "users" not in request.path, request.path


NAMES = st.text(max_size=40) | st.sampled_from(
    ["..", ".", "", "/", "../x", "a/../../b", "/etc/passwd", "x\x00", ".hidden", "..\\x", "\n", "ok.json", "a" * 255]
)


def test_the_writer_never_writes_outside_its_directory(tmp_path: Path) -> None:
    directory = tmp_path / "deep" / "out"
    writer = OutputWriter(directory)
    written: set[str] = set()

    @settings(max_examples=300, derandomize=True, database=None, deadline=None, suppress_health_check=list(HealthCheck))
    @given(name=NAMES)
    def run(name: str) -> None:
        try:
            target = writer.write(name, b"{}\n")
        except ValueError:
            return  # refused: not a plain file name
        except OSError:
            return  # the file system refused it (too long, ...): nothing was created, checked below
        assert target.parent == directory and target.name == name
        written.add(name)

    run()
    assert {p.name for p in directory.iterdir()} == written
    for path in files_under(tmp_path):
        assert path.parent == directory, path


def test_a_planted_symlink_is_replaced_not_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside.json"
    outside.write_text("precious\n")
    directory = tmp_path / "out"
    directory.mkdir()
    (directory / "2025-01-01-00-00-all.json").symlink_to(outside)
    OutputWriter(directory).write("2025-01-01-00-00-all.json", b"{}\n")
    assert outside.read_text() == "precious\n"
    assert not (directory / "2025-01-01-00-00-all.json").is_symlink()
    assert (directory / "2025-01-01-00-00-all.json").read_bytes() == b"{}\n"


# ------------------------------------------------------------------------------------------------ modes


@pytest.mark.parametrize("mask", [0o000, 0o077], ids=["umask-000", "umask-077"])
@pytest.mark.parametrize(("file_mode", "expected"), [(None, 0o640), ("0600", 0o600), ("0644", 0o644)])
def test_output_files_and_directory_have_the_configured_modes(
    in_process: Callable[..., InProcess], mask: int, file_mode: str | None, expected: int
) -> None:
    with umask(mask):
        h = in_process(backend={"file_mode": file_mode} if file_mode else None)
        _resource, order = h.fake.order_new_resource(h.offering_uuid, slug="mode-check")
        h.order_event(order["uuid"])
        assert h.core.scheduler.regenerate(h.core.offerings[0], force=True)
    assert mode_of(h.out) == 0o750
    names = sorted(p.name for p in h.out.iterdir())
    assert any(ORDER_FILE_RE.match(n) for n in names) and any(SNAPSHOT_RE.match(n) for n in names)
    assert not [n for n in names if n.startswith(".")]  # no temporary file left behind
    for name in names:
        assert mode_of(h.out / name) == expected, (name, oct(mode_of(h.out / name)))


# ------------------------------------------------------------------------------------------------ the token


def assert_no_token(text: str | bytes, where: str, tokens: tuple[str, ...] = (TOKEN,)) -> None:
    data = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
    for token in tokens:
        assert token.encode() not in data, f"the token appears in {where}"


def test_waldur_errors_and_their_causes_never_carry_the_token(fake_waldur_factory: Callable[..., FakeWaldur]) -> None:
    fake = fake_waldur_factory(token=TOKEN)
    offering = fake.add_offering(slug="capstor")
    faults: list[Any] = [[401], [403], [404], [409], [500] * 3, [429] * 3, ["drop"] * 3, ["hang"] * 3]
    fake.set_faults(hang_seconds=3.0)
    seen = 0
    for script in faults:
        gateway = WaldurGateway(fake.url, TOKEN, retry=RetryPolicy(attempts=3, max_wait=0.01, total=5), timeout=0.5)
        fake.fail_next(*script)
        try:
            gateway.get_offering(offering.uuid)
        except WaldurError as exc:
            seen += 1
            rendered = "".join(traceback.format_exception(exc)) + repr(exc) + str(exc)
            rendered += repr(vars(exc)) if hasattr(exc, "__dict__") else ""
            assert_no_token(rendered, f"the error of {script}")
        finally:
            gateway.close()
    wrong = WaldurGateway(fake.url, "a-wrong-token-value-9f8e7d6c5b4a", retry=RetryPolicy(attempts=1))
    with pytest.raises(WaldurError) as caught:
        wrong.get_offering(offering.uuid)
    wrong.close()
    assert_no_token("".join(traceback.format_exception(caught.value)), "a rejected token's error", ("9f8e7d6c5b4a",))
    assert seen == len(faults)


def test_config_errors_never_echo_the_token(config_file_factory: Callable[..., Path], tmp_path: Path) -> None:
    def offering(**changes: Any) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "name": "CSCS capstor",
            "waldur_api_url": "https://waldur.example.org/api/",
            "waldur_api_token": TOKEN,
            "waldur_offering_uuid": str(uuid.uuid4()),
            "backend_type": "cscs-hpc-storage",
            "backend_settings": {"output_directory": str(tmp_path / "out")},
            "backend_components": STORAGE,
        }
        entry.update(changes)
        return entry

    cases = [
        offering(waldur_api_token=[TOKEN]),
        offering(waldur_api_token={"value": TOKEN}),
        offering(waldur_api_token=10**30),
        offering(waldur_api_tokn=TOKEN),
        offering(waldur_api_token_file=str(tmp_path / "missing-token-file")),
        # the token pasted into the wrong key: the error quotes the value, and must mask it
        offering(waldur_offering_uuid=TOKEN),
        offering(waldur_api_url=TOKEN),
        offering(verify_ssl=TOKEN),
        offering(backend_settings={"output_directory": str(tmp_path / "out"), "timezone": TOKEN}),
        offering(waldur_api_token="${SECURITY_TEST_TOKEN}", waldur_offering_uuid="${SECURITY_TEST_TOKEN}"),
    ]
    daemons: list[dict[str, Any] | None] = [None] * len(cases)
    cases += [offering(), offering(), offering()]
    daemons += [
        {"broker": {"password": [BROKER_PASSWORD]}},
        {"broker": {"pasword": BROKER_PASSWORD}},
        {"broker": {"password": BROKER_PASSWORD, "host": BROKER_PASSWORD + "/"}, "state_directory": 7},
    ]
    env = {"SECURITY_TEST_TOKEN": TOKEN}
    for index, (entry, daemon) in enumerate(zip(cases, daemons, strict=True)):
        path = config_file_factory(offerings=[entry], daemon=daemon, name=f"bad-{index}.yaml")
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("SECURITY_TEST_TOKEN", TOKEN)
            with pytest.raises(ConfigError) as caught:
                load_config(path)
        rendered = "".join(traceback.format_exception(caught.value))
        assert_no_token(rendered, f"config error {index}: {caught.value}", (TOKEN, BROKER_PASSWORD))
        result = cli("check-config", "-c", str(path), env=env)
        assert result.returncode == 78, result.stderr
        assert_no_token(result.stdout + result.stderr, f"check-config on bad config {index}", (TOKEN, BROKER_PASSWORD))


@pytest.mark.parametrize("source", ["literal", "environment", "file", "credential"])
def test_check_config_never_prints_the_token(
    config_file_factory: Callable[..., Path], tmp_path: Path, source: str
) -> None:
    token_file = tmp_path / "waldur-token"
    token_file.write_text(TOKEN + "\n")
    entry: dict[str, Any] = {
        "name": "CSCS capstor",
        "waldur_api_url": "https://waldur.example.org/api/",
        "waldur_offering_uuid": str(uuid.uuid4()),
        "backend_type": "cscs-hpc-storage",
        "backend_settings": {"output_directory": str(tmp_path / "out")},
        "backend_components": STORAGE,
    }
    env: dict[str, str] = {}
    if source == "literal":
        entry["waldur_api_token"] = TOKEN
    elif source == "environment":
        entry["waldur_api_token"] = "${SECURITY_TEST_TOKEN}"
        env["SECURITY_TEST_TOKEN"] = TOKEN
    elif source == "file":
        entry["waldur_api_token_file"] = str(token_file)
    else:
        env["CREDENTIALS_DIRECTORY"] = str(tmp_path)
    daemon = {"broker": {"username": "agent", "password": BROKER_PASSWORD}, "state_directory": str(tmp_path / "s")}
    path = config_file_factory(offerings=[entry], daemon=daemon)
    result = cli("check-config", "-c", str(path), env=env)
    assert result.returncode == 0, result.stderr
    assert_no_token(result.stdout + result.stderr, "check-config output", (TOKEN, BROKER_PASSWORD))
    assert "***" in result.stdout
    assert not (tmp_path / "out").exists() and not (tmp_path / "s").exists()


def test_a_daemon_whose_token_waldur_rejects_fails_without_showing_it(tmp_path: Path) -> None:
    with FakeWaldur(token="the-right-token-0123456789") as fake:
        offering = fake.add_offering(slug="capstor")
        path = write_config(tmp_path / "config.yaml", fake, offering.uuid, tmp_path / "out", tmp_path / "state")
        path.write_text(path.read_text().replace(fake.token, TOKEN))
        result = cli("run", "-c", str(path), cwd=tmp_path)
    assert result.returncode == 1
    assert "daemon.start_failed" in result.stdout
    assert_no_token(result.stdout + result.stderr, "a failed start's output")


@pytest.mark.broker
def test_the_token_stays_out_of_logs_the_capture_and_every_api_response(tmp_path: Path, brokers: Any) -> None:
    """A live daemon (real RabbitMQ, the STOMP passcode is the token) with --record and the HTTP API, through
    orders, Waldur faults with retries, a killed broker connection and debug requests."""
    pytest.importorskip("cscs_storage_daemon.capture")
    from tests.fixtures.brokers import close_vhost_connections

    port = free_port()
    with json_logs() as stream, FakeWaldur(token=TOKEN, provision_rabbitmq=True) as fake:
        offering = populate(fake, ["capstor"], n=5, seed=4).offerings[0]
        daemon_settings = {
            "broker": {"protocol": "stomp", "host": "127.0.0.1", "port": 61613, "tls": False},
            "snapshot": {"quiet": 0.2, "max_wait": 1, "heartbeat": 3600},
            "http": {"enabled": True, "listen": f"127.0.0.1:{port}", "auth": "none"},
        }
        path = write_config(
            tmp_path / "config.yaml", fake, offering.uuid, tmp_path / "out", tmp_path / "state", daemon=daemon_settings
        )
        capture = tmp_path / "capture.jsonl"
        daemon = Daemon(load_config(path), record=str(capture))
        daemon.start()
        loop = threading.Thread(target=daemon.loop, daemon=True)
        loop.start()
        responses: list[str] = []
        try:
            sub = daemon.subscriptions["capstor"][0]
            assert sub.password == TOKEN  # the token is in play on the broker side too

            def publish(order_uuid: str) -> None:
                body = {"object_type": "order", "order_uuid": order_uuid, "order_state": "pending-provider"}
                from cscs_storage_daemon.testing.publishers import publish_stomp_like_waldur

                publish_stomp_like_waldur(
                    "127.0.0.1", 61613, sub.vhost, "guest", "guest", sub.queue_name, json.dumps(body)
                )

            orders = []
            for i in range(4):
                if i == 1:
                    fake.fail_next(500, 503, "drop", 429)
                if i == 2:
                    close_vhost_connections(sub.vhost, "security test")
                _resource, order = fake.order_new_resource(offering.uuid, slug=f"sec-{i}")
                orders.append(order["uuid"])
                publish(order["uuid"])
            publish("not-a-uuid")  # a dead letter, logged with its preview
            assert wait_for(lambda: all(fake.order_state(o) == "done" for o in orders), 60)
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
                for url in [
                    "/api/storage-resources/?storage_system=capstor&debug=true",
                    "/api/storage-resources/?storage_system=capstor&debug=true&page_size=1&page=2",
                    "/api/storage-resources/?storage_system=capstor",
                    "/api/storage-resources/?storage_system=nope&debug=true",
                    "/api/storage-resources/",
                    "/healthz",
                    "/metrics",
                    "/openapi.json",
                    "/docs",
                ]:
                    response = client.get(url)
                    assert response.status_code in (200, 422), (url, response.status_code)
                    responses.append(f"{url}\n{response.headers}\n{response.text}")
                debug = client.get("/api/storage-resources/?storage_system=capstor&debug=true").json()
                assert debug["debug_mode"] is True and debug["raw_resources"]["resources"]
                assert "error" not in debug["waldur_offering_details"]
        finally:
            daemon.request_stop()
            loop.join(10)
            daemon.shutdown()
        log_text = stream.getvalue()
    assert '"event": "order.done"' in log_text and '"event": "waldur.retry"' in log_text
    assert_no_token(log_text, "the log")
    assert log_text.count('"event": "broker.connected"') >= 2  # the killed connection came back
    assert '"event": "event.dead_lettered"' in log_text
    for text in responses:
        assert_no_token(text, f"an HTTP response ({text.splitlines()[0]})")
    assert capture.exists() and b'"kind":"http"' in capture.read_bytes()
    for path in files_under(tmp_path):
        if path.name != "config.yaml":
            assert_no_token(path.read_bytes(), str(path.relative_to(tmp_path)))


# ------------------------------------------------------------------------------------------------ HTTP


def test_an_unauthenticated_api_off_loopback_refuses_to_start(tmp_path: Path) -> None:
    with FakeWaldur(token=TOKEN) as fake:
        offering = fake.add_offering(slug="capstor")
        path = write_config(
            tmp_path / "config.yaml",
            fake,
            offering.uuid,
            tmp_path / "out",
            tmp_path / "state",
            daemon={"http": {"listen": "0.0.0.0:8080", "auth": "none"}},
        )
        result = cli("run", "-c", str(path), cwd=tmp_path)
        requests = fake.requests
    assert result.returncode == 78, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "daemon.http.auth" in lines[0] and "loopback" in lines[0], lines
    assert requests == []  # refused before anything connected
    assert not (tmp_path / "out").exists() and not (tmp_path / "state").exists()


@pytest.mark.parametrize(
    "listen", ["[::]:8080", "10.1.2.3:8080", "192.168.0.1:80", "head-node:8080", "[::ffff:1.2.3.4]:1"]
)
def test_auth_none_is_a_configuration_error_on_any_non_loopback_listener(
    config_file_factory: Callable[..., Path], listen: str
) -> None:
    with pytest.raises(ConfigError, match="only allowed on a loopback listener") as caught:
        load_config(config_file_factory(daemon={"http": {"listen": listen, "auth": "none"}}))
    assert caught.value.path == "daemon.http.auth"


def test_oversized_request_parameters_are_rejected(in_process: Callable[..., InProcess], tmp_path: Path) -> None:
    from cscs_storage_daemon.api.server import build_server
    from cscs_storage_daemon.health import HealthState

    tokens = tmp_path / "http-tokens"
    tokens.write_text("http-bearer-token-0123456789abcdef\n")
    h = in_process(daemon={"http": {"enabled": True, "auth": "token", "token_file": str(tokens)}})
    health = HealthState(offerings=["capstor"], broker_required=False)
    server = build_server(h.core, health, listen="127.0.0.1:0")
    server.start()
    good = {"Authorization": "Bearer http-bearer-token-0123456789abcdef"}
    try:
        with httpx.Client(base_url=server.url, timeout=10, headers=good) as client:
            base = "/api/storage-resources/?storage_system=capstor"
            assert client.get(base).status_code == 200
            assert client.get(base + "&x=" + "a" * 4100).status_code == 414
            assert client.get(base + "&" + "&".join(f"p{i}=1" for i in range(1000))).status_code == 414
            assert client.get(base + "&data_type=" + "a" * 300).status_code == 422
            assert client.get(base + "&" + "n" * 300 + "=1").status_code == 422
            assert client.get("/api/storage-resources/?storage_system=" + "c" * 300).status_code == 422
            far = client.get(base + "&page=" + "9" * 200)  # within the 256-character limit: a page past the end
            assert far.status_code == 200 and far.json()["result"]["storageResources"] == []
            assert client.get(base + "&page_size=501").status_code == 422
            bearer = {"Authorization": "Bearer " + "t" * 9000}
            assert client.get(base, headers=bearer).status_code == 401
            try:  # a megabyte of headers: h11 refuses it (400) or drops the connection, and carries on
                refused = client.get(base, headers={"X-Filler": "f" * 1_000_000}).status_code
            except httpx.TransportError:
                refused = 400
            assert refused in (400, 413, 431)
            assert client.get(base).status_code == 200  # still serving
    finally:
        server.stop(timeout=5)


# ------------------------------------------------------------------------------------------------ the session grep

SECRET_KEYS = {"waldur_api_token", "password", "passcode"}
CANARY = re.compile(
    rb"canaryTOKEN[0-9a-f]{32}"
)  # tests/fixtures/daemon_process.py's tokens (env only, never in a file)
KNOWN_TOKENS = {TOKEN, BROKER_PASSWORD, TEST_TOKEN}


def _is_secret(value: Any) -> bool:
    return isinstance(value, str) and len(value) >= 12 and "${" not in value and value.strip("*") != ""


def discover_secrets(root: Path) -> set[str]:
    """Every Waldur token and broker password the suite's configuration files under `root` name (literally, or
    through a token file), plus the constants and the fake Waldur's seeded tokens."""
    found = set(KNOWN_TOKENS)
    for seed in range(0, 16):
        fake = FakeWaldur(seed=seed)
        found.add(fake.token)
        fake.stop()

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                if key in SECRET_KEYS and _is_secret(item):
                    found.add(item)
                elif key == "waldur_api_token_file" and isinstance(item, str):
                    with contextlib.suppress(OSError, ValueError):
                        token = Path(item).read_text().strip()
                        if _is_secret(token):
                            found.add(token)
                else:
                    walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    for path in files_under(root):
        if path.suffix in (".yaml", ".yml"):
            with contextlib.suppress(Exception):
                walk(yaml.safe_load(path.read_text(errors="replace")))
        elif path.name == "waldur-token":
            with contextlib.suppress(OSError):
                token = path.read_text(errors="replace").strip()
                if _is_secret(token):
                    found.add(token)
    return found


def scan_for_leaks(root: Path) -> dict[str, list[str]]:
    """Files under `root` holding a Waldur token, by path (configuration files and token files are inputs the
    tests wrote, not output, and are skipped)."""
    secrets = discover_secrets(root)
    needles = [(s, s.encode()) for s in secrets] + [(s, json.dumps(s)[1:-1].encode()) for s in secrets]
    leaks: dict[str, list[str]] = {}
    for path in files_under(root):
        if path.suffix in (".yaml", ".yml", ".tmp") or not path.is_file() or path.is_symlink():
            continue
        try:
            data = path.read_bytes()
        except OSError:
            continue
        if data.strip().decode("utf-8", "replace") in secrets:
            continue  # a token file
        hits = sorted({s[:10] + "…" for s, needle in needles if needle in data})
        hits += [m.decode()[:16] + "…" for m in set(CANARY.findall(data))]
        if hits:
            leaks[str(path.relative_to(root))] = hits
    return leaks


@pytest.fixture(scope="session")
def session_leak_scan(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[], dict[str, list[str]]]]:
    """Scans the session's base temporary directory now (for the test) and again when the session ends (after
    every other test wrote what it writes); a leak found then fails the session at this fixture's teardown."""
    root = tmp_path_factory.getbasetemp()

    def scan() -> dict[str, list[str]]:
        return scan_for_leaks(root)

    yield scan
    leaks = scan()
    assert not leaks, f"Waldur tokens found in files the test session wrote under {root}: {leaks}"


def test_nothing_the_session_wrote_holds_a_waldur_token(
    session_leak_scan: Callable[[], dict[str, list[str]]], tmp_path: Path
) -> None:
    # The scanner finds what it must find (a leak planted here) ...
    planted = tmp_path / "planted.log"
    planted.write_text(f'{{"event": "oops", "token": "{TOKEN}"}}\n')
    canary = tmp_path / "planted.jsonl"
    canary.write_text('{"passcode": "canaryTOKEN' + "0f" * 16 + '"}\n')
    leaks = session_leak_scan()
    assert any(key.endswith("planted.log") for key in leaks), leaks
    assert any(key.endswith("planted.jsonl") for key in leaks), leaks
    planted.unlink()
    canary.unlink()
    # ... and nothing else.
    assert session_leak_scan() == {}
