"""WaldurGateway through real HTTP against the fake Waldur (and httpx.MockTransport for odd servers)."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from typing import Any
from uuid import UUID

import httpx
import pytest
from structlog.testing import capture_logs
from waldur_api_client.models import Resource

from cscs_storage_daemon.gateway import (
    WaldurError,
    WaldurGateway,
    WaldurPaginationError,
    WaldurRejected,
    WaldurUnavailable,
    api_root,
    next_link,
    uuid_hex,
)
from cscs_storage_daemon.retry import RetryInfo, RetryPolicy, build_retrying
from cscs_storage_daemon.testing.fake_waldur import FakeWaldur
from cscs_storage_daemon.testing.sample_data import populate
from tests.fixtures.waldur import FAST_RETRY

GatewayFactory = Callable[..., WaldurGateway]


def offering_with(fake: FakeWaldur, n: int) -> str:
    return populate(fake, ["capstor"], n=n).offerings[0].uuid


# -- URL handling ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "root"),
    [
        ("https://waldur.example.com/api/", "https://waldur.example.com"),
        ("https://waldur.example.com/api", "https://waldur.example.com"),
        ("https://waldur.example.com/", "https://waldur.example.com"),
        ("https://waldur.example.com", "https://waldur.example.com"),
        ("http://wapi/api", "http://wapi"),  # rstrip("/api") would give "http://w"
        ("http://pia.example.org/api/", "http://pia.example.org"),
        ("https://h.example.com/prefix/api/", "https://h.example.com/prefix"),
    ],
)
def test_api_root(given: str, root: str) -> None:
    assert api_root(given) == root


@pytest.mark.parametrize("bad", ["waldur.example.com/api/", "ftp://h/api/", "https://h/api/?x=1"])
def test_api_root_rejects_non_http_urls(bad: str) -> None:
    with pytest.raises(ValueError):
        api_root(bad)


@pytest.mark.parametrize("suffix", ["/api/", "/api", "/", ""])
def test_url_with_or_without_api_suffix(
    fake_waldur: FakeWaldur, waldur_gateway_factory: GatewayFactory, suffix: str
) -> None:
    offering = fake_waldur.add_offering(slug="capstor")
    gateway = waldur_gateway_factory(api_url=fake_waldur.root + suffix)
    assert gateway.get_offering(offering.uuid)["slug"] == "capstor"
    assert fake_waldur.requests[-1].path == f"/api/marketplace-provider-offerings/{offering.uuid}/"


def test_uuid_hex() -> None:
    value = "4eab2f7d-5a6c-4b8d-9e0f-1a2b3c4d5e6f"
    assert uuid_hex(value) == "4eab2f7d5a6c4b8d9e0f1a2b3c4d5e6f"
    assert uuid_hex(UUID(value)) == "4eab2f7d5a6c4b8d9e0f1a2b3c4d5e6f"
    assert uuid_hex(value.upper().replace("-", "")) == "4eab2f7d5a6c4b8d9e0f1a2b3c4d5e6f"
    with pytest.raises(ValueError):
        uuid_hex("../etc/passwd")


def test_paths_use_hex_uuids(fake_waldur: FakeWaldur, waldur_gateway: WaldurGateway) -> None:
    offering = fake_waldur.add_offering()
    resource = fake_waldur.add_resource(offering.uuid, slug="one")
    got = waldur_gateway.get_resource(str(UUID(resource["uuid"])))
    assert got["uuid"] == resource["uuid"]
    assert fake_waldur.requests[-1].path == f"/api/marketplace-provider-resources/{resource['uuid']}/"


# -- listing ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("page_size", "pages"), [(100, 3), (10, 25), (300, 1), (250, 1), (1000, 1)])
def test_list_resources_every_page(
    fake_waldur: FakeWaldur, waldur_gateway_factory: GatewayFactory, page_size: int, pages: int
) -> None:
    offering_uuid = offering_with(fake_waldur, 250)
    fake_waldur.add_offering(slug="other")
    gateway = waldur_gateway_factory(page_size=page_size)
    resources = gateway.list_resources(offering_uuid)
    assert len(resources) == 250
    assert [r["uuid"] for r in resources] == fake_waldur.resource_uuids(offering_uuid)
    assert all(isinstance(r, dict) for r in resources)
    listing = [r for r in fake_waldur.requests if r.path == "/api/marketplace-provider-resources/"]
    assert len(listing) == pages
    assert all(r.query["offering_uuid"] == [offering_uuid] for r in listing)
    assert [r.query.get("page") for r in listing] == [None] + [[str(p)] for p in range(2, pages + 1)]


class RecordingSink:
    """A listing sink that notes what it is told, and how many requests Waldur had seen by then."""

    def __init__(self, fake: FakeWaldur) -> None:
        self.fake = fake
        self.calls: list[tuple[str, int, int]] = []  # (call, items, requests so far)
        self.items: list[dict[str, Any]] = []

    def take(self, items: list[dict[str, Any]]) -> None:
        self.calls.append(("take", len(items), len(self.fake.requests)))
        self.items.extend(items)

    def restart(self) -> None:
        self.calls.append(("restart", 0, len(self.fake.requests)))
        self.items = []


def test_read_resources_hands_over_each_page_as_it_arrives(
    fake_waldur: FakeWaldur, waldur_gateway_factory: GatewayFactory
) -> None:
    offering_uuid = offering_with(fake_waldur, 250)
    sink = RecordingSink(fake_waldur)
    assert waldur_gateway_factory(page_size=100).read_resources(offering_uuid, sink) == 250
    # Page n is handed over before page n+1 is asked for: the gateway holds one page at a time.
    assert sink.calls == [("take", 100, 1), ("take", 100, 2), ("take", 50, 3)]
    assert [r["uuid"] for r in sink.items] == fake_waldur.resource_uuids(offering_uuid)


def test_a_listing_that_starts_over_tells_the_sink(fake_waldur: FakeWaldur) -> None:
    offering_uuid = offering_with(fake_waldur, 150)
    transport = _AfterFirstPage(lambda: fake_waldur.add_resource(offering_uuid, slug="late"))
    sink = RecordingSink(fake_waldur)
    with WaldurGateway(fake_waldur.url, fake_waldur.token, retry=FAST_RETRY, transport=transport) as gateway:
        assert gateway.read_resources(offering_uuid, sink) == 151
    # Page 2 answers with the new count: nothing of it is handed over, the listing starts again.
    assert [call for call, _, _ in sink.calls] == ["take", "restart", "take", "take"]
    assert len({r["uuid"] for r in sink.items}) == 151


def test_a_listing_that_does_not_add_up_fails_after_handing_over_its_pages(
    fake_waldur: FakeWaldur, waldur_gateway: WaldurGateway
) -> None:
    # The count is checked once every page is in: the caller must not use what the sink took (the mirror's
    # listing is only applied once the gateway returns).
    offering_uuid = offering_with(fake_waldur, 120)
    fake_waldur.result_count_delta = 1
    sink = RecordingSink(fake_waldur)
    with pytest.raises(WaldurPaginationError, match="120 items"):
        waldur_gateway.read_resources(offering_uuid, sink)
    assert [n for _, n, _ in sink.calls] == [100, 20]


def test_list_resources_with_the_servers_default_page_size(fake_waldur: FakeWaldur) -> None:
    # The fake caps page_size at 300, so a gateway asking for more still pages correctly through Link.
    offering_uuid = offering_with(fake_waldur, 650)
    with WaldurGateway(fake_waldur.url, fake_waldur.token, retry=FAST_RETRY, page_size=5000) as gateway:
        assert len(gateway.list_resources(offering_uuid)) == 650
    assert fake_waldur.count_requests("GET", "/api/marketplace-provider-resources/") == 3


def test_list_resources_empty_offering(fake_waldur: FakeWaldur, waldur_gateway: WaldurGateway) -> None:
    offering = fake_waldur.add_offering()
    assert waldur_gateway.list_resources(offering.uuid) == []


def test_list_resources_keeps_values_the_client_model_rejects(
    fake_waldur: FakeWaldur, waldur_gateway: WaldurGateway
) -> None:
    offering = fake_waldur.add_offering()
    weird = fake_waldur.add_resource(offering.uuid, slug="weird")
    weird["state"] = "Frobnicating"
    weird["created"] = None
    fake_waldur.put_resource(weird)
    with pytest.raises((ValueError, TypeError)):
        Resource.from_dict(weird)
    listed = waldur_gateway.list_resources(offering.uuid)
    assert listed[0]["state"] == "Frobnicating"
    assert waldur_gateway.get_resource(weird["uuid"])["created"] is None


def test_missing_link_is_detected(fake_waldur: FakeWaldur, waldur_gateway: WaldurGateway) -> None:
    offering_uuid = offering_with(fake_waldur, 120)
    fake_waldur.omit_link = True
    with pytest.raises(WaldurPaginationError) as info:
        waldur_gateway.list_resources(offering_uuid)
    assert "100" in str(info.value) and "120" in str(info.value)
    assert isinstance(info.value, WaldurError)


@pytest.mark.parametrize("delta", [1, -1, 50])
def test_lying_result_count_is_detected(fake_waldur: FakeWaldur, waldur_gateway: WaldurGateway, delta: int) -> None:
    offering_uuid = offering_with(fake_waldur, 120)
    fake_waldur.result_count_delta = delta
    with pytest.raises(WaldurPaginationError):
        waldur_gateway.list_resources(offering_uuid)


def test_missing_result_count_is_detected(fake_waldur: FakeWaldur, waldur_gateway: WaldurGateway) -> None:
    offering_uuid = offering_with(fake_waldur, 5)
    fake_waldur.omit_result_count = True
    with pytest.raises(WaldurPaginationError, match="X-Result-Count"):
        waldur_gateway.list_resources(offering_uuid)


class _AfterFirstPage(httpx.HTTPTransport):
    """Runs ``action`` once, right after the first listing page was answered (a change between two pages)."""

    def __init__(self, action: Callable[[], object]) -> None:
        super().__init__()
        self.action: Callable[[], object] | None = action

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        if self.action is not None and "marketplace-provider-resources" in request.url.path:
            action, self.action = self.action, None
            action()
        return response


def test_listing_restarts_when_a_page_vanishes(fake_waldur: FakeWaldur) -> None:
    offering_uuid = offering_with(fake_waldur, 150)

    def shrink() -> None:
        for uuid in fake_waldur.resource_uuids(offering_uuid)[:60]:
            fake_waldur.remove_resource(uuid)

    transport = _AfterFirstPage(shrink)
    with WaldurGateway(fake_waldur.url, fake_waldur.token, retry=FAST_RETRY, transport=transport) as gateway:
        resources = gateway.list_resources(offering_uuid)
    assert len(resources) == 90
    statuses = [r.status for r in fake_waldur.requests]
    assert statuses == [200, 404, 200]  # page 2 became "Invalid page.", then a fresh listing


def test_listing_restarts_when_the_collection_grows(fake_waldur: FakeWaldur) -> None:
    offering_uuid = offering_with(fake_waldur, 150)
    transport = _AfterFirstPage(lambda: fake_waldur.add_resource(offering_uuid, slug="late"))
    with WaldurGateway(fake_waldur.url, fake_waldur.token, retry=FAST_RETRY, transport=transport) as gateway:
        resources = gateway.list_resources(offering_uuid)
    assert len(resources) == 151
    assert len({r["uuid"] for r in resources}) == 151


def test_list_orders(fake_waldur: FakeWaldur, waldur_gateway_factory: GatewayFactory) -> None:
    offering_uuid = offering_with(fake_waldur, 30)
    resources = fake_waldur.resource_uuids(offering_uuid)
    wanted = [fake_waldur.create_order(uuid, "Update", limits={"storage": 7})["uuid"] for uuid in resources[:25]]
    fake_waldur.create_order(resources[25], "Update", state="done")
    gateway = waldur_gateway_factory(page_size=10)
    orders = gateway.list_orders(offering_uuid, ["pending-provider", "executing"])
    assert [o["uuid"] for o in orders] == wanted
    first = next(r for r in fake_waldur.requests if r.path == "/api/marketplace-orders/")
    assert first.query["state"] == ["pending-provider", "executing"]
    assert first.query["offering_uuid"] == [offering_uuid]
    with pytest.raises(TypeError):
        gateway.list_orders(offering_uuid, "executing")


# -- orders and resources ---------------------------------------------------------------------------------------


def test_order_flow(fake_waldur: FakeWaldur, waldur_gateway: WaldurGateway) -> None:
    offering = fake_waldur.add_offering(slug="capstor")
    resource, order = fake_waldur.order_new_resource(offering.uuid, slug="new-store")
    assert waldur_gateway.get_order(order["uuid"])["state"] == "pending-provider"
    waldur_gateway.approve_order(order["uuid"])
    assert waldur_gateway.get_order(order["uuid"])["state"] == "executing"
    waldur_gateway.set_backend_id(resource["uuid"], "new-store")
    assert waldur_gateway.get_resource(resource["uuid"])["backend_id"] == "new-store"
    waldur_gateway.set_order_done(order["uuid"])
    assert fake_waldur.order_state(order["uuid"]) == "done"
    assert fake_waldur.resource(resource["uuid"])["state"] == "OK"


def test_set_order_erred_records_the_message(fake_waldur: FakeWaldur, waldur_gateway: WaldurGateway) -> None:
    offering = fake_waldur.add_offering()
    _, order = fake_waldur.order_new_resource(offering.uuid, slug="x", state="executing")
    waldur_gateway.set_order_erred(order["uuid"], "slug: contains '/'", traceback="Traceback ...")
    stored = fake_waldur.order(order["uuid"])
    assert (stored["state"], stored["error_message"], stored["error_traceback"]) == (
        "erred",
        "slug: contains '/'",
        "Traceback ...",
    )
    assert fake_waldur.requests[-1].body == {"error_message": "slug: contains '/'", "error_traceback": "Traceback ..."}


def test_wrong_order_transitions_are_409(fake_waldur: FakeWaldur, waldur_gateway: WaldurGateway) -> None:
    offering = fake_waldur.add_offering()
    _, order = fake_waldur.order_new_resource(offering.uuid, slug="x")
    with pytest.raises(WaldurRejected) as info:
        waldur_gateway.set_order_done(order["uuid"])
    assert info.value.status == 409
    assert "Valid states for operation: executing." in str(info.value)
    waldur_gateway.approve_order(order["uuid"])
    with pytest.raises(WaldurRejected) as info:
        waldur_gateway.approve_order(order["uuid"])
    assert info.value.status == 409
    assert info.value.method == "POST"
    assert info.value.path == f"/api/marketplace-orders/{order['uuid']}/approve_by_provider/"
    assert "pending-provider" in info.value.detail


def test_get_offering(fake_waldur: FakeWaldur, waldur_gateway: WaldurGateway) -> None:
    offering = fake_waldur.add_offering(slug="capstor", name="Capstor storage")
    got = waldur_gateway.get_offering(offering.uuid)
    assert (got["uuid"], got["slug"], got["name"]) == (offering.uuid, "capstor", "Capstor storage")


# -- errors and retries ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [400, 403, 404, 409, 401])
def test_client_errors_fail_at_once(fake_waldur: FakeWaldur, waldur_gateway: WaldurGateway, status: int) -> None:
    offering = fake_waldur.add_offering()
    fake_waldur.fail_next(status)
    with pytest.raises(WaldurRejected) as info:
        waldur_gateway.get_offering(offering.uuid)
    assert info.value.status == status
    assert f"HTTP {status}" in str(info.value)
    assert fake_waldur.count_requests() == 1


def test_unknown_object_is_rejected_with_the_detail(fake_waldur: FakeWaldur, waldur_gateway: WaldurGateway) -> None:
    with pytest.raises(WaldurRejected) as info:
        waldur_gateway.get_resource("0" * 32)
    assert str(info.value) == (
        f"Waldur rejected GET /api/marketplace-provider-resources/{'0' * 32}/: HTTP 404: Not found."
    )
    assert len(fake_waldur.requests) == 1


def test_wrong_token_is_rejected(fake_waldur: FakeWaldur, waldur_gateway_factory: GatewayFactory) -> None:
    gateway = waldur_gateway_factory(token="wrong-token-value")
    with pytest.raises(WaldurRejected) as info:
        gateway.get_offering("0" * 32)
    assert info.value.status == 401
    assert "wrong-token-value" not in str(info.value)


@pytest.mark.parametrize(
    "faults",
    [[500], [502], [503], [429], ["drop"], [500, 502, 503, 429, "drop"]],
    ids=["500", "502", "503", "429", "drop", "all"],
)
def test_transient_failures_are_retried(
    fake_waldur: FakeWaldur, waldur_gateway_factory: GatewayFactory, faults: list[Any]
) -> None:
    offering = fake_waldur.add_offering(slug="capstor")
    seen: list[RetryInfo] = []
    gateway = waldur_gateway_factory(on_retry=seen.append)
    fake_waldur.fail_next(*faults)
    with capture_logs() as logs:
        assert gateway.get_offering(offering.uuid)["slug"] == "capstor"
    assert fake_waldur.count_requests() == len(faults) + 1
    assert [r.status for r in fake_waldur.requests][-1] == 200
    retries = [entry for entry in logs if entry["event"] == "waldur.retry"]
    assert [entry["attempt"] for entry in retries] == list(range(1, len(faults) + 1))
    for entry in retries:
        assert entry["method"] == "GET"
        assert entry["path"] == f"/api/marketplace-provider-offerings/{offering.uuid}/"
    expected = [f"HTTP {f}" if isinstance(f, int) else "RemoteProtocolError" for f in faults]
    assert [entry["reason"] for entry in retries] == expected
    assert [info.reason for info in seen] == expected
    assert {info.operation for info in seen} == {"get_offering"}


def test_a_failing_retry_hook_does_not_break_the_call(
    fake_waldur: FakeWaldur, waldur_gateway_factory: GatewayFactory
) -> None:
    offering = fake_waldur.add_offering(slug="capstor")

    def broken(info: RetryInfo) -> None:
        raise RuntimeError("metrics down")

    gateway = waldur_gateway_factory(on_retry=broken)
    fake_waldur.fail_next(503)
    assert gateway.get_offering(offering.uuid)["slug"] == "capstor"


def test_retries_on_a_post(fake_waldur: FakeWaldur, waldur_gateway: WaldurGateway) -> None:
    offering = fake_waldur.add_offering()
    _, order = fake_waldur.order_new_resource(offering.uuid, slug="x")
    fake_waldur.fail_next(503)
    waldur_gateway.approve_order(order["uuid"])
    assert fake_waldur.order_state(order["uuid"]) == "executing"


def test_retries_during_pagination(fake_waldur: FakeWaldur, waldur_gateway: WaldurGateway) -> None:
    offering_uuid = offering_with(fake_waldur, 250)
    fake_waldur.set_faults(error_rate=0.3, throttle_rate=0.1)
    fake_waldur.reseed(11)
    policy = RetryPolicy(attempts=20, max_wait=0.005, total=30.0, initial=0.001)
    with WaldurGateway(fake_waldur.url, fake_waldur.token, retry=policy) as gateway:
        assert len(gateway.list_resources(offering_uuid)) == 250


def test_attempts_are_bounded(fake_waldur: FakeWaldur, waldur_gateway_factory: GatewayFactory) -> None:
    offering = fake_waldur.add_offering()
    gateway = waldur_gateway_factory(retry=RetryPolicy(attempts=3, max_wait=0.01, total=10.0, initial=0.001))
    fake_waldur.fail_next(*([503] * 10))
    with pytest.raises(WaldurUnavailable) as info:
        gateway.get_offering(offering.uuid)
    assert info.value.status == 503
    assert "3 attempts" in str(info.value)
    assert fake_waldur.count_requests() == 3


def test_dropped_connections_exhaust_to_unavailable(
    fake_waldur: FakeWaldur, waldur_gateway_factory: GatewayFactory
) -> None:
    gateway = waldur_gateway_factory(retry=RetryPolicy(attempts=2, max_wait=0.01, total=10.0, initial=0.001))
    fake_waldur.fail_next("drop", "drop")
    with pytest.raises(WaldurUnavailable) as info:
        gateway.get_order("1" * 32)
    assert info.value.status is None
    assert "RemoteProtocolError" in str(info.value)


def test_timeout_with_a_hanging_server(fake_waldur: FakeWaldur, waldur_gateway_factory: GatewayFactory) -> None:
    offering = fake_waldur.add_offering(slug="capstor")
    fake_waldur.set_faults(hang_seconds=10.0)
    gateway = waldur_gateway_factory(
        timeout=0.2, retry=RetryPolicy(attempts=2, max_wait=0.01, total=10.0, initial=0.001)
    )
    fake_waldur.fail_next("hang", "hang")
    with pytest.raises(WaldurUnavailable) as info:
        gateway.get_offering(offering.uuid)
    assert "ReadTimeout" in str(info.value)
    assert [r.fault for r in fake_waldur.requests] == ["hang", "hang"]
    # One hang, then the answer.
    fake_waldur.fail_next("hang")
    assert gateway.get_offering(offering.uuid)["slug"] == "capstor"


def test_the_first_attempt_counts_against_the_total_time(
    fake_waldur: FakeWaldur, waldur_gateway_factory: GatewayFactory
) -> None:
    # The first try runs before the retry machinery exists: its 0.3 s still count, so with `total` 0.25 s no
    # second try may start, although attempts would allow five.
    offering = fake_waldur.add_offering(slug="capstor")
    fake_waldur.set_faults(hang_seconds=10.0)
    gateway = waldur_gateway_factory(timeout=0.3, retry=RetryPolicy(attempts=5, max_wait=0.01, total=0.25))
    fake_waldur.fail_next("hang", "hang")
    with pytest.raises(WaldurUnavailable, match=r"gave up after 1 attempt\)"):
        gateway.get_offering(offering.uuid)
    assert [r.fault for r in fake_waldur.requests] == ["hang"]


def test_the_request_is_sent_as_the_client_builds_it(fake_waldur: FakeWaldur, waldur_gateway: WaldurGateway) -> None:
    # Straight to the transport, no httpx.Client: the token, the agent, the query and the JSON body still arrive.
    offering_uuid = offering_with(fake_waldur, 3)
    order = fake_waldur.create_order(waldur_gateway.list_resources(offering_uuid)[0]["uuid"], "Update")
    waldur_gateway.list_orders(offering_uuid, ["pending-provider", "executing"])
    waldur_gateway.set_order_erred(order["uuid"], "quota ünavailable")
    # The fake answers 401 without `Authorization: Token …` and 415 for a body that is not declared JSON.
    listing, erred = fake_waldur.requests[-2], fake_waldur.requests[-1]
    assert listing.status == 200 and erred.status == 200
    assert listing.query["state"] == ["pending-provider", "executing"]
    assert listing.query["offering_uuid"] == [offering_uuid.replace("-", "")]
    assert erred.body == {"error_message": "quota ünavailable"}
    assert fake_waldur.order_state(order["uuid"]) == "erred"


def test_unreachable_server(waldur_gateway_factory: GatewayFactory) -> None:
    with FakeWaldur() as fake:  # bound and stopped: its port is now closed
        url = fake.url
    gateway = waldur_gateway_factory(api_url=url, retry=RetryPolicy(attempts=2, max_wait=0.01, initial=0.001))
    with pytest.raises(WaldurUnavailable, match="ConnectError"):
        gateway.get_offering("0" * 32)


def test_retry_after_is_respected_but_capped() -> None:
    slept: list[float] = []
    policy = RetryPolicy(attempts=3, max_wait=2.0, total=100.0, initial=0.001)
    from cscs_storage_daemon.retry import TransientHTTPStatus

    calls = iter([TransientHTTPStatus(429, retry_after=1.5), TransientHTTPStatus(429, retry_after=60), None])

    def attempt() -> str:
        exc = next(calls)
        if exc is not None:
            raise exc
        return "ok"

    retrying = build_retrying(policy, method="GET", path="/api/x/", sleep=slept.append, rng=random.Random(1))
    assert retrying(attempt) == "ok"
    assert slept[0] >= 1.5
    assert slept[1] == 2.0


def test_total_time_bound_stops_before_a_wait_that_would_exceed_it() -> None:
    slept: list[float] = []
    policy = RetryPolicy(attempts=50, max_wait=30.0, total=0.5, initial=10.0)
    from cscs_storage_daemon.retry import TransientHTTPStatus

    def attempt() -> None:
        raise TransientHTTPStatus(503, retry_after=5)

    retrying = build_retrying(policy, method="GET", path="/api/x/", sleep=slept.append)
    with pytest.raises(TransientHTTPStatus):
        retrying(attempt)
    assert slept == []


def test_full_jitter_stays_under_the_exponential_ceiling() -> None:
    policy = RetryPolicy(attempts=8, max_wait=1.0, total=1000.0, initial=0.1)
    slept: list[float] = []

    def attempt() -> None:
        raise httpx.ConnectError("refused")

    retrying = build_retrying(policy, method="GET", path="/api/x/", sleep=slept.append, rng=random.Random(3))
    with pytest.raises(httpx.ConnectError):
        retrying(attempt)
    assert len(slept) == 7
    for n, wait in enumerate(slept):
        assert 0.0 <= wait <= min(0.1 * 2**n, 1.0)


def test_non_transient_exceptions_are_not_retried() -> None:
    calls = []

    def attempt() -> None:
        calls.append(1)
        raise KeyError("x")

    with pytest.raises(KeyError):
        build_retrying(RetryPolicy(), method="GET", path="/api/x/", sleep=lambda s: None)(attempt)
    assert len(calls) == 1


def test_retry_policy_validation() -> None:
    with pytest.raises(ValueError):
        RetryPolicy(attempts=0)
    assert RetryPolicy() == RetryPolicy(attempts=6, max_wait=30.0, total=120.0, initial=0.5)


# -- odd servers (MockTransport) -------------------------------------------------------------------------------

TOKEN = "s3cr3t-t0ken-0123456789abcdef"


def mock_gateway(handler: Callable[[httpx.Request], httpx.Response], **kwargs: Any) -> WaldurGateway:
    kwargs.setdefault("retry", RetryPolicy(attempts=2, max_wait=0.001, initial=0.0001))
    return WaldurGateway("https://waldur.example.com/api/", TOKEN, transport=httpx.MockTransport(handler), **kwargs)


def test_the_client_sends_the_token_header() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"uuid": "0" * 32, "slug": "capstor"})

    with mock_gateway(handler) as gateway:
        gateway.get_offering("0" * 32)
    assert seen[0].headers["Authorization"] == f"Token {TOKEN}"
    assert str(seen[0].url) == f"https://waldur.example.com/api/marketplace-provider-offerings/{'0' * 32}/"


def test_long_details_are_truncated_and_the_token_is_masked() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(400, json={"detail": f"token {TOKEN} is bad " + "x" * 5000})

    with mock_gateway(handler) as gateway, pytest.raises(WaldurRejected) as info:
        gateway.get_offering("0" * 32)
    message = str(info.value)
    assert TOKEN not in message
    assert "***" in message
    assert len(message) < 500


def test_non_json_success_body_is_an_error() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b"<html>proxy login</html>")

    with mock_gateway(handler) as gateway, pytest.raises(WaldurError, match="not JSON"):
        gateway.get_order("0" * 32)


def test_json_that_is_not_an_object_is_an_error() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=[1, 2])

    with mock_gateway(handler) as gateway, pytest.raises(WaldurError, match="expected a JSON object"):
        gateway.get_resource("0" * 32)


def test_a_redirect_is_not_followed() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(301, headers={"Location": "https://elsewhere.example.com/"})

    with mock_gateway(handler) as gateway, pytest.raises(WaldurError) as info:
        gateway.get_resource("0" * 32)
    assert info.value.status == 301
    assert not isinstance(info.value, (WaldurRejected, WaldurUnavailable))


def test_link_next_that_does_not_advance_is_an_error() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200,
            json=[{"uuid": f"{random.getrandbits(128):032x}"}],
            headers={"X-Result-Count": "5", "Link": f'<{request.url.copy_set_param("page", "1")}>; rel="next"'},
        )

    with mock_gateway(handler) as gateway, pytest.raises(WaldurPaginationError, match="points back"):
        gateway.list_resources("0" * 32)


# -- secrets ---------------------------------------------------------------------------------------------------


def test_the_token_never_appears_in_logs_or_exceptions(fake_waldur: FakeWaldur) -> None:
    offering = fake_waldur.add_offering()
    texts: list[str] = []
    policy = RetryPolicy(attempts=2, max_wait=0.001, initial=0.0001)
    with capture_logs() as logs:
        gateway = WaldurGateway(fake_waldur.url, fake_waldur.token, retry=policy, timeout=0.2)
        texts.append(repr(gateway))
        fake_waldur.set_faults(hang_seconds=5.0)
        for faults in ([500, 503], [429, "drop"], ["hang", "hang"], [403], [400], [409]):
            fake_waldur.fail_next(*faults)
            try:
                gateway.get_offering(offering.uuid)
            except WaldurError as exc:
                texts.extend([str(exc), repr(exc), repr(exc.__dict__)])
                if exc.__cause__ is not None:
                    texts.append(repr(exc.__cause__))
        wrong = WaldurGateway(fake_waldur.url, "another-secret-token", retry=policy)
        try:
            wrong.get_offering(offering.uuid)
        except WaldurError as exc:
            texts.extend([str(exc), repr(exc)])
        gateway.close()
        wrong.close()
    assert any(entry["event"] == "waldur.retry" for entry in logs)
    everything = json.dumps(logs, default=repr) + "\n".join(texts)
    assert fake_waldur.token not in everything
    assert "another-secret-token" not in everything
    assert "Authorization" not in everything


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ('<https://w/api/x/?page=2>; rel="next"', "https://w/api/x/?page=2"),
        ('<https://w/api/x/?page=1>; rel="prev", <https://w/api/x/?page=3>; rel="next"', "https://w/api/x/?page=3"),
        ("<https://w/api/x/?page=3>; rel=next", "https://w/api/x/?page=3"),
        ('<https://w/api/x/?page=4>; rel="last next"', "https://w/api/x/?page=4"),
        ('<https://w/api/x/?page=1>; rel="first", <https://w/api/x/?page=9>; REL="Next"', "https://w/api/x/?page=9"),
        ('<https://w/api/x/?page=1>; rel="prev"', None),
        ('<https://w/api/x/?a=1,2&page=5>; title="a; b, c"; rel="next"', "https://w/api/x/?a=1,2&page=5"),
        ("", None),
        ("garbage", None),
    ],
)
def test_next_link_reads_the_link_header(header: str, expected: str | None) -> None:
    assert next_link(header) == expected
