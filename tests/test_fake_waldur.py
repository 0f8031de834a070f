"""The fake Waldur: real HTTP, Waldur's status codes and list headers, bodies the real client parses."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
import pytest
from waldur_api_client.api.marketplace_orders import (
    marketplace_orders_approve_by_provider,
    marketplace_orders_list,
    marketplace_orders_retrieve,
    marketplace_orders_set_state_done,
    marketplace_orders_set_state_erred,
)
from waldur_api_client.api.marketplace_provider_offerings import marketplace_provider_offerings_retrieve
from waldur_api_client.api.marketplace_provider_resources import (
    marketplace_provider_resources_list,
    marketplace_provider_resources_retrieve,
    marketplace_provider_resources_set_backend_id,
)
from waldur_api_client.api.users import users_me_retrieve
from waldur_api_client.client import AuthenticatedClient
from waldur_api_client.errors import UnexpectedStatus
from waldur_api_client.models import (
    AgentIdentity,
    AgentProcessor,
    AgentQueueRegistrationResponse,
    AgentService,
    EventSubscription,
    EventSubscriptionQueue,
    OrderDetails,
    OrderInfoResponse,
    ProviderOfferingDetails,
    Resource,
    ServiceProvider,
    Status,
    UserMe,
)
from waldur_api_client.models.order_approve_by_provider_request import OrderApproveByProviderRequest
from waldur_api_client.models.order_error_details_request import OrderErrorDetailsRequest
from waldur_api_client.models.order_state import OrderState
from waldur_api_client.models.resource_backend_id_request import ResourceBackendIDRequest

from cscs_storage_daemon.testing.fake_waldur import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, FakeWaldur, Faults
from cscs_storage_daemon.testing.sample_data import (
    SampleData,
    generate_resources,
    offering_for,
    populate,
)

GOLDEN_API = Path(os.environ.get("GOLDEN_DIR", "/work/shared/golden")) / "api"

GOLDEN_MODELS: dict[str, Any] = {
    "resource.json": Resource,
    "resources_list_page1.json": [Resource],
    "order.json": OrderDetails,
    "orders_list_page.json": [OrderDetails],
    "offering.json": ProviderOfferingDetails,
    "event_subscription.json": EventSubscription,
    "event_subscription_queue.json": EventSubscriptionQueue,
    "agent_identity.json": AgentIdentity,
    "agent_service.json": AgentService,
    "agent_processor.json": AgentProcessor,
    "agent_queue_registration.json": AgentQueueRegistrationResponse,
    "order_approve_by_provider.json": OrderInfoResponse,
    "resource_set_backend_id.json": Status,
    "user_me.json": UserMe,
    "service_providers_list.json": [ServiceProvider],
}


def parse(model: Any, body: Any) -> Any:
    if isinstance(model, list):
        assert isinstance(body, list)
        return [model[0].from_dict(item) for item in body]
    return model.from_dict(body)


def client_for(fake: FakeWaldur, token: str | None = None) -> AuthenticatedClient:
    return AuthenticatedClient(base_url=fake.root, token=token or fake.token, timeout=httpx.Timeout(5.0))


# One shared client: building an httpx.Client (its SSL context) costs tens of milliseconds.
_HTTP = httpx.Client(timeout=5.0)


def raw(fake: FakeWaldur, method: str, path: str, *, token: str | None = "", **kwargs: Any) -> httpx.Response:
    headers = dict(kwargs.pop("headers", {}))
    if token is not None:
        headers["Authorization"] = f"Token {token or fake.token}"
    return _HTTP.request(method, fake.root + path, headers=headers, **kwargs)


# -- golden bodies ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(not GOLDEN_API.is_dir(), reason="golden API files not available")
@pytest.mark.parametrize("name", sorted(GOLDEN_MODELS))
def test_golden_body_parses_with_client_model(name: str) -> None:
    body = json.loads((GOLDEN_API / name).read_text())
    parse(GOLDEN_MODELS[name], body)


@pytest.mark.skipif(not GOLDEN_API.is_dir(), reason="golden API files not available")
def test_every_golden_body_is_covered() -> None:
    bodies = {p.name for p in GOLDEN_API.glob("*.json") if not p.name.endswith(".headers.json")}
    assert bodies == set(GOLDEN_MODELS)


@pytest.mark.skipif(not GOLDEN_API.is_dir(), reason="golden API files not available")
def test_fake_resource_has_the_golden_keys_in_order(fake_waldur: FakeWaldur) -> None:
    golden_resource = json.loads((GOLDEN_API / "resource.json").read_text())
    golden_order = json.loads((GOLDEN_API / "order.json").read_text())
    offering = fake_waldur.add_offering(slug="capstor")
    resource = fake_waldur.add_resource(offering.uuid, slug="msclimate-store")
    order = fake_waldur.create_order(resource["uuid"], "Update", limits={"storage": 60})
    served = raw(fake_waldur, "GET", f"/api/marketplace-provider-resources/{resource['uuid']}/").json()
    assert list(served) == list(golden_resource)
    served_order = raw(fake_waldur, "GET", f"/api/marketplace-orders/{order['uuid']}/").json()
    assert list(served_order) == list(golden_order)
    golden_offering = json.loads((GOLDEN_API / "offering.json").read_text())
    assert list(fake_waldur.offering(offering.uuid)) == list(golden_offering)


# -- the real client against the fake --------------------------------------------------------------------------


def test_real_client_parses_every_endpoint(fake_waldur: FakeWaldur) -> None:
    population = populate(fake_waldur, ["capstor"], n=5)
    offering = population.offerings[0]
    resource, order = fake_waldur.order_new_resource(offering.uuid, slug="new-store")
    client = client_for(fake_waldur)

    parsed = marketplace_provider_resources_retrieve.sync(UUID(resource["uuid"]), client=client)
    assert isinstance(parsed, Resource)
    assert parsed.uuid.hex == resource["uuid"]
    listed = marketplace_provider_resources_list.sync_all(client=client, offering_uuid=[UUID(offering.uuid)])
    assert len(listed) == 6
    detailed = marketplace_provider_resources_list.sync_detailed(
        client=client, offering_uuid=[UUID(offering.uuid)], page_size=2
    )
    assert detailed.headers["X-Result-Count"] == "6"
    assert len(detailed.parsed) == 2

    assert isinstance(
        marketplace_provider_offerings_retrieve.sync(UUID(offering.uuid), client=client), ProviderOfferingDetails
    )
    assert isinstance(marketplace_orders_retrieve.sync(UUID(order["uuid"]), client=client), OrderDetails)
    orders = marketplace_orders_list.sync_all(
        client=client, offering_uuid=UUID(offering.uuid), state=[OrderState.PENDING_PROVIDER, OrderState.EXECUTING]
    )
    assert [o.uuid.hex for o in orders] == [order["uuid"]]

    approved = marketplace_orders_approve_by_provider.sync(
        UUID(order["uuid"]), client=client, body=OrderApproveByProviderRequest()
    )
    assert isinstance(approved, OrderInfoResponse)
    # A second approval is a 409, which this client function turns into None.
    assert (
        marketplace_orders_approve_by_provider.sync(
            UUID(order["uuid"]), client=client, body=OrderApproveByProviderRequest()
        )
        is None
    )
    status = marketplace_provider_resources_set_backend_id.sync(
        UUID(resource["uuid"]), client=client, body=ResourceBackendIDRequest(backend_id="new-store")
    )
    assert isinstance(status, Status)
    assert status.status == "Resource backend_id has been changed."
    marketplace_orders_set_state_done.sync_detailed(UUID(order["uuid"]), client=client)
    with pytest.raises(UnexpectedStatus) as info:
        marketplace_orders_set_state_done.sync_detailed(UUID(order["uuid"]), client=client)
    assert info.value.status_code == 409
    marketplace_orders_set_state_erred.sync_detailed(
        UUID(order["uuid"]), client=client, body=OrderErrorDetailsRequest(error_message="boom")
    )
    assert isinstance(users_me_retrieve.sync(client=client), UserMe)


def test_sync_all_gets_every_page_because_link_is_sent(fake_waldur: FakeWaldur) -> None:
    population = populate(fake_waldur, ["capstor"], n=250)
    client = client_for(fake_waldur)
    listed = marketplace_provider_resources_list.sync_all(
        client=client, offering_uuid=[UUID(population.offerings[0].uuid)]
    )
    assert len(listed) == 250
    assert len({r.uuid for r in listed}) == 250


def test_sync_all_truncates_without_link_which_is_why_the_gateway_checks(fake_waldur: FakeWaldur) -> None:
    population = populate(fake_waldur, ["capstor"], n=120)
    fake_waldur.omit_link = True
    listed = marketplace_provider_resources_list.sync_all(
        client=client_for(fake_waldur), offering_uuid=[UUID(population.offerings[0].uuid)]
    )
    assert len(listed) == 100


def test_sample_data_parses_with_the_client_model() -> None:
    for resource in generate_resources(300, seed=7):
        Resource.from_dict(resource)


# -- pagination ------------------------------------------------------------------------------------------------


def test_list_default_page_size_and_headers(fake_waldur: FakeWaldur) -> None:
    population = populate(fake_waldur, ["capstor"], n=25)
    offering_uuid = population.offerings[0].uuid
    response = raw(fake_waldur, "GET", "/api/marketplace-provider-resources/", params={"offering_uuid": offering_uuid})
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/json"
    assert response.headers["X-Result-Count"] == "25"
    body = response.json()
    assert isinstance(body, list)
    assert len(body) == DEFAULT_PAGE_SIZE
    base = f"{fake_waldur.root}/api/marketplace-provider-resources/?offering_uuid={offering_uuid}"
    assert response.headers["Link"] == (
        f'<{base}>; rel="first", <{base}&page=2>; rel="next", <{base}&page=3>; rel="last"'
    )


def test_link_header_middle_and_last_pages_keep_the_query_sorted_and_encoded(fake_waldur: FakeWaldur) -> None:
    population = populate(fake_waldur, ["capstor"], n=9)
    offering_uuid = population.offerings[0].uuid
    params = [("state", "OK"), ("state", "Erred"), ("offering_uuid", offering_uuid), ("page_size", "2"), ("page", "2")]
    # Only a subset matches the state filter; use page 2 of whatever there is.
    response = raw(fake_waldur, "GET", "/api/marketplace-provider-resources/", params=params)
    assert response.status_code == 200
    links = response.links
    assert set(links) == {"first", "prev", "next", "last"} or set(links) == {"first", "prev", "last"}
    assert links["first"]["url"] == (
        f"{fake_waldur.root}/api/marketplace-provider-resources/?offering_uuid={offering_uuid}"
        "&page_size=2&state=OK&state=Erred"
    )
    assert "page=" not in links["prev"]["url"]  # the page-1 link has no page parameter
    # A value with a comma is percent-encoded, so the client's split on "," still works.
    response = raw(fake_waldur, "GET", "/api/marketplace-provider-resources/", params={"backend_id": "a,b"})
    assert "backend_id=a%2Cb" in response.headers["Link"]


def test_page_size_is_capped_like_waldur(fake_waldur: FakeWaldur) -> None:
    populate(fake_waldur, ["capstor"], n=MAX_PAGE_SIZE + 5)
    response = raw(fake_waldur, "GET", "/api/marketplace-provider-resources/", params={"page_size": 1000})
    assert len(response.json()) == MAX_PAGE_SIZE
    response = raw(fake_waldur, "GET", "/api/marketplace-provider-resources/", params={"page_size": "abc"})
    assert len(response.json()) == DEFAULT_PAGE_SIZE


@pytest.mark.parametrize("page", ["4", "0", "-1", "abc", "99"])
def test_page_past_the_last_or_invalid_is_404(fake_waldur: FakeWaldur, page: str) -> None:
    populate(fake_waldur, ["capstor"], n=25)
    response = raw(fake_waldur, "GET", "/api/marketplace-provider-resources/", params={"page": page})
    assert response.status_code == 404
    assert response.json() == {"detail": "Invalid page."}


def test_last_page_and_page_last(fake_waldur: FakeWaldur) -> None:
    populate(fake_waldur, ["capstor"], n=25)
    response = raw(fake_waldur, "GET", "/api/marketplace-provider-resources/", params={"page": "3"})
    assert len(response.json()) == 5
    assert "next" not in response.links
    response = raw(fake_waldur, "GET", "/api/marketplace-provider-resources/", params={"page": "last"})
    assert len(response.json()) == 5


def test_empty_first_page_is_200(fake_waldur: FakeWaldur) -> None:
    response = raw(fake_waldur, "GET", "/api/marketplace-provider-resources/")
    assert response.status_code == 200
    assert response.json() == []
    assert response.headers["X-Result-Count"] == "0"
    assert set(response.links) == {"first", "last"}


def test_resource_filters(fake_waldur: FakeWaldur) -> None:
    a = fake_waldur.add_offering(slug="capstor")
    b = fake_waldur.add_offering(slug="vast")
    ok = fake_waldur.add_resource(a.uuid, slug="one", state="OK")
    fake_waldur.add_resource(a.uuid, slug="two", state="Creating")
    fake_waldur.add_resource(b.uuid, slug="three", state="OK")

    def uuids(params: Any) -> list[str]:
        response = raw(fake_waldur, "GET", "/api/marketplace-provider-resources/", params=params)
        assert response.status_code == 200
        return [r["slug"] for r in response.json()]

    assert uuids({"offering_uuid": a.uuid}) == ["one", "two"]
    assert uuids({"offering_uuid": str(UUID(a.uuid))}) == ["one", "two"]  # dashed works too
    assert uuids([("offering_uuid", a.uuid), ("offering_uuid", b.uuid)]) == ["one", "two", "three"]
    assert uuids([("state", "OK"), ("offering_uuid", a.uuid)]) == ["one"]
    assert uuids({"offering_slug": "vast"}) == ["three"]
    assert uuids({"backend_id": "one"}) == ["one"]
    assert uuids({"project_uuid": ok["project_uuid"]}) == ["one", "two", "three"]
    bad = raw(fake_waldur, "GET", "/api/marketplace-provider-resources/", params={"state": "ok"})
    assert bad.status_code == 400
    assert "state" in bad.json()
    bad = raw(fake_waldur, "GET", "/api/marketplace-provider-resources/", params={"offering_uuid": "nope"})
    assert bad.status_code == 400
    assert bad.json() == {"offering_uuid": ["Enter a valid UUID."]}


def test_field_selection(fake_waldur: FakeWaldur) -> None:
    offering = fake_waldur.add_offering()
    resource = fake_waldur.add_resource(offering.uuid, slug="one")
    response = raw(
        fake_waldur,
        "GET",
        f"/api/marketplace-provider-resources/{resource['uuid']}/",
        params=[("field", "uuid"), ("field", "state")],
    )
    assert response.json() == {"uuid": resource["uuid"], "state": "OK"}


# -- HTTP strictness -------------------------------------------------------------------------------------------


def test_authentication_is_required(fake_waldur: FakeWaldur) -> None:
    missing = raw(fake_waldur, "GET", "/api/users/me/", token=None)
    assert missing.status_code == 401
    assert missing.json() == {"detail": "Authentication credentials were not provided."}
    wrong = raw(fake_waldur, "GET", "/api/users/me/", token="not-the-token")
    assert wrong.status_code == 401
    assert wrong.json() == {"detail": "Invalid token."}
    bearer = raw(
        fake_waldur, "GET", "/api/users/me/", token=None, headers={"Authorization": f"Bearer {fake_waldur.token}"}
    )
    assert bearer.status_code == 401
    assert raw(fake_waldur, "GET", "/api/users/me/").status_code == 200


def test_missing_trailing_slash_redirects_and_is_not_followed(fake_waldur: FakeWaldur) -> None:
    response = raw(fake_waldur, "GET", "/api/marketplace-provider-resources")
    assert response.status_code == 301
    assert response.headers["Location"].endswith("/api/marketplace-provider-resources/")
    assert raw(fake_waldur, "GET", "/api/no-such-endpoint/").status_code == 404


def test_wrong_method_is_405(fake_waldur: FakeWaldur) -> None:
    offering = fake_waldur.add_offering()
    resource = fake_waldur.add_resource(offering.uuid, slug="one")
    order = fake_waldur.create_order(resource["uuid"], "Update")
    response = raw(fake_waldur, "GET", f"/api/marketplace-orders/{order['uuid']}/approve_by_provider/")
    assert response.status_code == 405
    assert response.json() == {"detail": 'Method "GET" not allowed.'}
    assert "POST" in response.headers["Allow"]
    assert raw(fake_waldur, "DELETE", f"/api/marketplace-provider-resources/{resource['uuid']}/").status_code == 405
    assert raw(fake_waldur, "HEAD", f"/api/marketplace-provider-resources/{resource['uuid']}/").status_code == 200


def test_unknown_uuid_is_404_and_dashed_uuids_work(fake_waldur: FakeWaldur) -> None:
    offering = fake_waldur.add_offering()
    resource = fake_waldur.add_resource(offering.uuid, slug="one")
    for path in (
        f"/api/marketplace-provider-resources/{'0' * 32}/",
        "/api/marketplace-provider-resources/not-a-uuid/",
        f"/api/marketplace-orders/{'1' * 32}/",
        f"/api/marketplace-provider-offerings/{'2' * 32}/",
    ):
        response = raw(fake_waldur, "GET", path)
        assert response.status_code == 404, path
        assert response.json() == {"detail": "Not found."}
    dashed = str(UUID(resource["uuid"]))
    response = raw(fake_waldur, "GET", f"/api/marketplace-provider-resources/{dashed}/")
    assert response.status_code == 200
    assert response.json()["uuid"] == resource["uuid"]  # hex in JSON, always


def test_bad_json_body_is_400_and_wrong_media_type_415(fake_waldur: FakeWaldur) -> None:
    offering = fake_waldur.add_offering()
    resource = fake_waldur.add_resource(offering.uuid, slug="one")
    path = f"/api/marketplace-provider-resources/{resource['uuid']}/set_backend_id/"
    bad = raw(fake_waldur, "POST", path, content=b"{not json", headers={"Content-Type": "application/json"})
    assert bad.status_code == 400
    assert bad.json()["detail"].startswith("JSON parse error")
    wrong = raw(fake_waldur, "POST", path, content=b"backend_id=x", headers={"Content-Type": "text/plain"})
    assert wrong.status_code == 415
    missing = raw(fake_waldur, "POST", path, json={})
    assert missing.status_code == 400
    assert missing.json() == {"backend_id": ["This field is required."]}


def test_set_backend_id(fake_waldur: FakeWaldur) -> None:
    offering = fake_waldur.add_offering()
    resource = fake_waldur.add_resource(offering.uuid, slug="one", backend_id="")
    path = f"/api/marketplace-provider-resources/{resource['uuid']}/set_backend_id/"
    assert raw(fake_waldur, "POST", path, json={"backend_id": "one"}).json() == {
        "status": "Resource backend_id has been changed."
    }
    assert raw(fake_waldur, "POST", path, json={"backend_id": "one"}).json() == {
        "status": "Resource backend_id is not changed."
    }
    assert fake_waldur.resource(resource["uuid"])["backend_id"] == "one"


def test_keep_alive_reuses_one_connection(fake_waldur: FakeWaldur) -> None:
    with httpx.Client(base_url=fake_waldur.root, headers={"Authorization": f"Token {fake_waldur.token}"}) as client:
        for _ in range(20):
            assert client.get("/api/users/me/").status_code == 200
    assert fake_waldur.accepted_connections == 1


def test_requests_are_recorded_without_headers(fake_waldur: FakeWaldur) -> None:
    raw(fake_waldur, "GET", "/api/marketplace-provider-resources/", params=[("state", "OK"), ("state", "Erred")])
    raw(fake_waldur, "GET", "/api/users/me/", token="wrong")
    first, second = fake_waldur.requests
    assert (first.method, first.path, first.query, first.status) == (
        "GET",
        "/api/marketplace-provider-resources/",
        {"state": ["OK", "Erred"]},
        200,
    )
    assert second.status == 401
    assert fake_waldur.token not in repr(fake_waldur.requests)


# -- order state machine ---------------------------------------------------------------------------------------


def post(fake: FakeWaldur, order_uuid: str, action: str, body: Any = None) -> httpx.Response:
    return raw(fake, "POST", f"/api/marketplace-orders/{order_uuid}/{action}/", json=body if body is not None else {})


def test_create_order_lifecycle(fake_waldur: FakeWaldur) -> None:
    offering = fake_waldur.add_offering()
    resource, order = fake_waldur.order_new_resource(offering.uuid, slug="new-store")
    assert resource["state"] == "Creating"
    assert resource["order_in_progress"]["uuid"] == order["uuid"]
    assert post(fake_waldur, order["uuid"], "set_state_done").status_code == 409
    approved = post(fake_waldur, order["uuid"], "approve_by_provider")
    assert approved.status_code == 200
    assert "detail" in approved.json()
    assert fake_waldur.order_state(order["uuid"]) == "executing"
    again = post(fake_waldur, order["uuid"], "approve_by_provider")
    assert again.status_code == 409
    assert again.json() == {"detail": "Valid states for operation: pending-provider."}
    done = post(fake_waldur, order["uuid"], "set_state_done")
    assert done.status_code == 200
    assert done.content == b""
    assert fake_waldur.order_state(order["uuid"]) == "done"
    assert fake_waldur.resource(resource["uuid"])["state"] == "OK"
    assert fake_waldur.resource(resource["uuid"])["order_in_progress"] is None
    twice = post(fake_waldur, order["uuid"], "set_state_done")
    assert twice.status_code == 409
    assert twice.json() == {"detail": "Valid states for operation: executing."}


def test_update_order_applies_limits_only_when_done(fake_waldur: FakeWaldur) -> None:
    offering = fake_waldur.add_offering()
    resource = fake_waldur.add_resource(offering.uuid, slug="one", storage=10)
    order = fake_waldur.create_order(resource["uuid"], "Update", limits={"storage": 60})
    assert order["limits"] == {"storage": 60}
    post(fake_waldur, order["uuid"], "approve_by_provider")
    current = fake_waldur.resource(resource["uuid"])
    assert (current["state"], current["limits"]) == ("Updating", {"storage": 10})
    post(fake_waldur, order["uuid"], "set_state_done")
    current = fake_waldur.resource(resource["uuid"])
    assert (current["state"], current["limits"]) == ("OK", {"storage": 60})


def test_terminate_order(fake_waldur: FakeWaldur) -> None:
    offering = fake_waldur.add_offering()
    resource = fake_waldur.add_resource(offering.uuid, slug="one")
    order = fake_waldur.create_order(resource["uuid"], "Terminate", state="executing")
    assert fake_waldur.resource(resource["uuid"])["state"] == "Terminating"
    post(fake_waldur, order["uuid"], "set_state_done")
    assert fake_waldur.resource(resource["uuid"])["state"] == "Terminated"


def test_erred_and_rejected_orders(fake_waldur: FakeWaldur) -> None:
    offering = fake_waldur.add_offering()
    resource, order = fake_waldur.order_new_resource(offering.uuid, slug="new-store")
    erred = post(fake_waldur, order["uuid"], "set_state_erred", {"error_message": "bad slug", "error_traceback": "tb"})
    assert erred.status_code == 200
    stored = fake_waldur.order(order["uuid"])
    assert (stored["state"], stored["error_message"], stored["error_traceback"]) == ("erred", "bad slug", "tb")
    assert fake_waldur.resource(resource["uuid"])["state"] == "Erred"
    assert post(fake_waldur, order["uuid"], "set_state_executing").status_code == 200
    assert fake_waldur.order_state(order["uuid"]) == "executing"

    other = fake_waldur.add_resource(offering.uuid, slug="two")
    terminate = fake_waldur.create_order(other["uuid"], "Terminate")
    assert post(fake_waldur, terminate["uuid"], "reject_by_provider").status_code == 200
    assert fake_waldur.order_state(terminate["uuid"]) == "rejected"
    assert post(fake_waldur, terminate["uuid"], "reject_by_provider").status_code == 409


def test_order_list_filters(fake_waldur: FakeWaldur) -> None:
    a = fake_waldur.add_offering(slug="capstor")
    b = fake_waldur.add_offering(slug="vast")
    ra = fake_waldur.add_resource(a.uuid, slug="one")
    rb = fake_waldur.add_resource(b.uuid, slug="two")
    pending = fake_waldur.create_order(ra["uuid"], "Update")
    executing = fake_waldur.create_order(ra["uuid"], "Terminate", state="executing")
    fake_waldur.create_order(ra["uuid"], "Update", state="done")
    fake_waldur.create_order(rb["uuid"], "Update")
    response = raw(
        fake_waldur,
        "GET",
        "/api/marketplace-orders/",
        params=[("offering_uuid", a.uuid), ("state", "pending-provider"), ("state", "executing")],
    )
    assert [o["uuid"] for o in response.json()] == [pending["uuid"], executing["uuid"]]
    assert response.headers["X-Result-Count"] == "2"
    response = raw(fake_waldur, "GET", "/api/marketplace-orders/", params={"type": "Terminate"})
    assert [o["uuid"] for o in response.json()] == [executing["uuid"]]
    assert raw(fake_waldur, "GET", "/api/marketplace-orders/", params={"state": "Executing"}).status_code == 400


# -- faults ----------------------------------------------------------------------------------------------------


def test_scripted_faults(fake_waldur: FakeWaldur) -> None:
    fake_waldur.fail_next(503, 429, 403)
    assert raw(fake_waldur, "GET", "/api/users/me/").status_code == 503
    throttled = raw(fake_waldur, "GET", "/api/users/me/")
    assert throttled.status_code == 429
    assert throttled.headers["Retry-After"] == "1"
    assert raw(fake_waldur, "GET", "/api/users/me/").status_code == 403
    assert raw(fake_waldur, "GET", "/api/users/me/").status_code == 200
    assert [r.fault for r in fake_waldur.requests] == ["error", "throttle", "error", None]


def test_dropped_connection(fake_waldur: FakeWaldur) -> None:
    fake_waldur.fail_next("drop")
    with pytest.raises(httpx.RemoteProtocolError):
        raw(fake_waldur, "GET", "/api/users/me/")
    assert fake_waldur.requests[-1].status is None
    assert raw(fake_waldur, "GET", "/api/users/me/").status_code == 200


def test_hang_past_the_client_timeout(fake_waldur: FakeWaldur) -> None:
    fake_waldur.set_faults(hang_seconds=5.0)
    fake_waldur.fail_next("hang")
    with httpx.Client(base_url=fake_waldur.root, timeout=0.2) as client, pytest.raises(httpx.ReadTimeout):
        client.get("/api/users/me/", headers={"Authorization": f"Token {fake_waldur.token}"})


def test_slow_answer_still_answers(fake_waldur: FakeWaldur) -> None:
    fake_waldur.set_faults(delay=0.05)
    fake_waldur.fail_next("slow")
    assert raw(fake_waldur, "GET", "/api/users/me/").status_code == 200
    assert fake_waldur.requests[-1].fault == "slow"


def test_random_faults_are_reproducible_with_a_seed(fake_waldur_factory: Any) -> None:
    outcomes = []
    for _ in range(2):
        fake = fake_waldur_factory(seed=42, faults=Faults(error_rate=0.3, throttle_rate=0.2))
        statuses = [raw(fake, "GET", "/api/users/me/").status_code for _ in range(40)]
        outcomes.append(statuses)
    assert outcomes[0] == outcomes[1]
    assert {200, 429} <= set(outcomes[0])
    assert set(outcomes[0]) & {500, 502, 503}


def test_exempt_and_only_paths(fake_waldur: FakeWaldur) -> None:
    fake_waldur.faults = Faults(error_rate=1.0, exempt_paths=("/api/users/",))
    assert raw(fake_waldur, "GET", "/api/users/me/").status_code == 200
    assert raw(fake_waldur, "GET", "/api/marketplace-orders/").status_code >= 500
    fake_waldur.faults = Faults(error_rate=1.0, only_paths=("/api/marketplace-orders/",))
    assert raw(fake_waldur, "GET", "/api/users/me/").status_code == 200
    assert raw(fake_waldur, "GET", "/api/marketplace-orders/").status_code >= 500
    fake_waldur.clear_faults()
    assert raw(fake_waldur, "GET", "/api/marketplace-orders/").status_code == 200


def test_concurrent_requests(fake_waldur: FakeWaldur) -> None:
    populate(fake_waldur, ["capstor"], n=50)
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            for _ in range(10):
                assert raw(fake_waldur, "GET", "/api/marketplace-provider-resources/").status_code == 200
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert fake_waldur.server_errors == []


# -- sample data -----------------------------------------------------------------------------------------------


def test_sample_data_is_deterministic_and_realistic() -> None:
    first = generate_resources(500, seed=3)
    assert first == generate_resources(500, seed=3)
    assert first != generate_resources(500, seed=4)
    uuids = {r["uuid"] for r in first}
    assert len(uuids) == 500
    assert all(len(u) == 32 and int(u, 16) >= 0 for u in uuids)
    assert {r["state"] for r in first} <= {"Creating", "OK", "Erred", "Updating", "Terminating", "Terminated"}
    assert {r["attributes"]["storage_data_type"] for r in first} == {"store", "scratch", "users", "archive"}
    sample = first[0]
    assert sample["offering_slug"] == "capstor"
    assert set(sample["limits"]) == {"storage"}
    for key in ("customer_slug", "project_slug", "slug", "created", "modified", "backend_metadata", "options"):
        assert key in sample


def test_sample_data_builds_100k() -> None:
    resources = generate_resources(100_000, seed=1)
    assert len({r["uuid"] for r in resources}) == 100_000


def test_populate_several_offerings(fake_waldur: FakeWaldur) -> None:
    population = populate(fake_waldur, ["capstor", offering_for("vast", seed=2)], n=30, seed=5)
    assert [o.slug for o in population.offerings] == ["capstor", "vast"]
    assert len(population.resources) == 60
    assert len(population.of("vast")) == 30
    for offering in population.offerings:
        assert len(fake_waldur.resource_uuids(offering.uuid)) == 30
        assert fake_waldur.offering(offering.uuid)["slug"] == offering.slug
    slugs = [r["slug"] for r in population.resources]
    assert len(set(slugs)) == len(slugs)


def test_sample_projects_have_unique_slugs() -> None:
    projects = SampleData(seed=0).projects(100)
    assert len({(p.customer_slug, p.slug) for p in projects}) == len(projects)
