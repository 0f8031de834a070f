"""The HTTP API over real HTTP (spec http-api.md): parameters, errors, filters, pagination, debug mode, health,
metrics. Plus unit tests of the pure parts (`api.query`, `health.healthz`)."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from cscs_storage_daemon.api.app import (
    MAX_QUERY_BYTES,
    OfferingDetailsCache,
    OfferingInfo,
    mask_secrets,
    render_envelope,
)
from cscs_storage_daemon.api.query import FilterIndex, Filters, MirrorView, MirrorViews, compact_json, page_bounds
from cscs_storage_daemon.api.server import ApiServer, parse_listen
from cscs_storage_daemon.clock import FixedClock
from cscs_storage_daemon.config import config_from_data, render_effective_config
from cscs_storage_daemon.envelope import envelope, paginate
from cscs_storage_daemon.health import HealthState, HealthView, healthz
from cscs_storage_daemon.testing.sample_data import Project, make_resource, offering_for
from tests.fixtures.api import API_NOW, SLUGS, ApiServerFactory, api_offering_info, fill_mirror
from tests.fixtures.config_files import sample_offering

# The three bodies of the spec, as written there (allowed values: the configured slugs, in config order).
MISSING_BODY = {
    "detail": [
        {
            "type": "missing",
            "loc": ["query", "storage_system"],
            "msg": "storage_system is mandatory.",
            "ctx": {
                "allowed_values": ["capstor", "vast", "iopsstor"],
                "help": "Add ?storage_system=<system_name> to your request",
            },
        }
    ]
}
INVALID_BODY = {
    "detail": [
        {
            "type": "enum_validation",
            "loc": ["query", "storage_system"],
            "msg": "Invalid storage_system value.",
            "ctx": {
                "allowed_values": ["capstor", "vast", "iopsstor"],
                "help": "Use: ?storage_system=capstor or ?storage_system=vast or ?storage_system=iopsstor",
            },
        }
    ]
}
EMPTY_BODY = {
    "detail": [
        {
            "type": "enum_validation",
            "loc": ["query", "storage_system"],
            "msg": "storage_system cannot be empty.",
            "ctx": {
                "allowed_values": ["capstor", "vast", "iopsstor"],
                "help": "Use ?storage_system=capstor (not just ?storage_system=)",
            },
        }
    ]
}


def _keys_in_order(value: Any) -> Any:
    """The nested key order of a JSON value (lists of (key, child) pairs), to compare orders too."""
    if isinstance(value, dict):
        return [(key, _keys_in_order(child)) for key, child in value.items()]
    if isinstance(value, list):
        return [_keys_in_order(child) for child in value]
    return value


def _bytes(body: Any) -> bytes:
    # What FastAPI's JSONResponse sends (compact separators, UTF-8).
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


@pytest.fixture
def three(api_server: ApiServerFactory) -> Any:
    """The spec's three storage systems: capstor with 250 sample resources, vast with 3, iopsstor empty."""
    return api_server(
        {"capstor": fill_mirror("capstor", 250), "vast": fill_mirror("vast", 3), "iopsstor": fill_mirror("iopsstor", 0)}
    )


# ------------------------------------------------------------------------------------------ storage_system


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("", MISSING_BODY),
        ("?page=1", MISSING_BODY),
        ("?storage_system=", EMPTY_BODY),
        ("?storage_system=foo", INVALID_BODY),
        ("?storage_system=CAPSTOR", INVALID_BODY),
        ("?storage_system=capstor%20", INVALID_BODY),
    ],
)
def test_storage_system_errors_are_the_spec_bodies_byte_for_byte(three: Any, query: str, expected: Any) -> None:
    response = three.get("/api/storage-resources/" + query)
    assert response.status_code == 422
    assert response.headers["content-type"] == "application/json"
    assert response.json() == expected
    assert _keys_in_order(response.json()) == _keys_in_order(expected)
    assert response.content == _bytes(expected)


def test_allowed_values_follow_the_configured_slugs_in_order(api_server: ApiServerFactory) -> None:
    harness = api_server({"vast": fill_mirror("vast", 0), "capstor": fill_mirror("capstor", 0)})
    body = harness.resources(storage_system="nope").json()
    assert body["detail"][0]["ctx"] == {
        "allowed_values": ["vast", "capstor"],
        "help": "Use: ?storage_system=vast or ?storage_system=capstor",
    }
    assert harness.resources(storage_system="").json()["detail"][0]["ctx"]["help"] == (
        "Use ?storage_system=vast (not just ?storage_system=)"
    )


@pytest.mark.parametrize(
    ("params", "loc", "kind"),
    [
        ({"page": "0"}, "page", "greater_than_equal"),
        ({"page": "-3"}, "page", "greater_than_equal"),
        ({"page": "abc"}, "page", "int_parsing"),
        ({"page": "1.5"}, "page", "int_parsing"),
        ({"page_size": "0"}, "page_size", "greater_than_equal"),
        ({"page_size": "501"}, "page_size", "less_than_equal"),
        ({"page_size": "ten"}, "page_size", "int_parsing"),
        ({"state": "Bogus"}, "state", "enum"),
        ({"state": "ok"}, "state", "enum"),
        ({"state": ""}, "state", "enum"),
        ({"debug": "maybe"}, "debug", "bool_parsing"),
    ],
)
def test_other_bad_parameters_get_fastapis_standard_422(
    three: Any, params: dict[str, str], loc: str, kind: str
) -> None:
    response = three.resources(storage_system="capstor", **params)
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert [item["loc"] for item in detail] == [["query", loc]]
    assert detail[0]["type"] == kind
    assert "msg" in detail[0] and "input" in detail[0]


def test_state_enum_lists_waldur_states(three: Any) -> None:
    response = three.resources(storage_system="capstor", state="Bogus")
    expected = response.json()["detail"][0]["ctx"]["expected"]
    for state in ("Creating", "OK", "Erred", "Updating", "Terminating", "Terminated"):
        assert f"'{state}'" in expected


def test_page_past_the_end_and_maximum_page_size_are_accepted(three: Any) -> None:
    assert three.resources(storage_system="capstor", page_size=500).status_code == 200
    assert three.resources(storage_system="capstor", page=10**9).status_code == 200


def test_missing_trailing_slash_redirects(three: Any) -> None:
    response = three.get("/api/storage-resources", params={"storage_system": "capstor"})
    assert response.status_code == 307
    assert response.headers["location"].endswith("/api/storage-resources/?storage_system=capstor")


# ------------------------------------------------------------------------------------------------ listing


def _served(mirror: Any) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(storage object, raw) of every served entry, in feed order."""
    return [(entry.storage, entry.raw) for entry in mirror.entries() if entry.storage is not None]


def _expected(
    mirror: Any, data_type: str | None = None, status: str | None = None, state: str | None = None
) -> list[str]:
    out = []
    for storage, raw in _served(mirror):
        if data_type is not None and storage["storageDataType"]["key"] != data_type:
            continue
        if status is not None and storage["status"] != status:
            continue
        if state is not None and raw.get("state") != state:
            continue
        out.append(storage["itemId"])
    return out


def test_unfiltered_listing_is_the_whole_feed_in_order(three: Any) -> None:
    mirror = three.mirrors["capstor"]
    response = three.resources(storage_system="capstor", page_size=500)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert list(body) == ["status", "code", "meta", "result"]
    assert body["status"] == "success" and body["code"] == 200
    assert body["meta"] == {"date": API_NOW.isoformat(), "appVersion": "1.4.0"}
    assert body["result"]["storageResources"] == mirror.storage_objects()
    assert body["result"]["paginate"] == {"current": 1, "limit": 500, "offset": 0, "pages": 1, "total": 250}


def test_body_is_the_envelope_rendered_compactly(three: Any) -> None:
    response = three.resources(storage_system="vast")
    document = envelope(
        three.mirrors["vast"].storage_objects(), date=API_NOW, pagination=paginate(total=3, page=1, page_size=100)
    )
    assert response.content == _bytes(document)


def test_storage_systems_are_separate(three: Any) -> None:
    vast = three.resources(storage_system="vast").json()["result"]
    assert [r["storageSystem"]["key"] for r in vast["storageResources"]] == ["vast"] * 3
    empty = three.resources(storage_system="iopsstor").json()["result"]
    assert empty == {
        "storageResources": [],
        "paginate": {"current": 1, "limit": 100, "offset": 0, "pages": 1, "total": 0},
    }


@pytest.mark.parametrize(
    "filters",
    [
        {"data_type": "store"},
        {"data_type": "scratch"},
        {"data_type": "users"},
        {"data_type": "archive"},
        {"status": "active"},
        {"status": "pending"},
        {"status": "removed"},
        {"status": "removing"},
        {"status": "error"},
        {"state": "OK"},
        {"state": "Creating"},
        {"state": "Terminated"},
        {"state": "Updating"},
        {"data_type": "store", "status": "active"},
        {"data_type": "users", "state": "OK"},
        {"status": "pending", "state": "Creating"},
        {"status": "pending", "state": "Updating"},
        {"data_type": "scratch", "status": "active", "state": "OK"},
        {"data_type": "store", "status": "active", "state": "Erred"},  # contradictory: nothing
    ],
)
def test_filters_are_exact_and_combined_with_and(three: Any, filters: dict[str, str]) -> None:
    expected = _expected(three.mirrors["capstor"], **filters)
    body = three.resources(storage_system="capstor", page_size=500, **filters).json()
    assert [r["itemId"] for r in body["result"]["storageResources"]] == expected
    assert body["result"]["paginate"]["total"] == len(expected)


def test_sample_data_covers_several_values_of_every_filter(three: Any) -> None:
    # Guards the parametrised test above against a sample that would make it vacuous.
    served = _served(three.mirrors["capstor"])
    assert len({s["storageDataType"]["key"] for s, _ in served}) == 4
    assert len({s["status"] for s, _ in served}) >= 4
    assert len({r["state"] for _, r in served}) >= 5


@pytest.mark.parametrize(
    "filters",
    [{"data_type": "STORE"}, {"data_type": "Store"}, {"status": "Active"}, {"status": "nonsense"}, {"data_type": "x"}],
)
def test_filters_are_case_sensitive_and_no_match_is_an_empty_200(three: Any, filters: dict[str, str]) -> None:
    response = three.resources(storage_system="capstor", **filters)
    assert response.status_code == 200
    assert response.json()["result"] == {
        "storageResources": [],
        "paginate": {"current": 1, "limit": 100, "offset": 0, "pages": 1, "total": 0},
    }


def test_empty_data_type_or_status_is_no_filter(three: Any) -> None:
    body = three.resources(storage_system="capstor", data_type="", status="").json()
    assert body["result"]["paginate"]["total"] == 250


@pytest.mark.parametrize(
    ("page", "page_size"),
    [(1, 100), (2, 100), (3, 100), (4, 100), (1, 1), (250, 1), (251, 1), (7, 37), (1, 500), (2, 249), (99, 10)],
)
def test_pagination_over_the_whole_filtered_set(three: Any, page: int, page_size: int) -> None:
    everything = _expected(three.mirrors["capstor"])
    body = three.resources(storage_system="capstor", page=page, page_size=page_size).json()
    start = (page - 1) * page_size
    assert [r["itemId"] for r in body["result"]["storageResources"]] == everything[start : start + page_size]
    assert body["result"]["paginate"] == {
        "current": page,
        "limit": page_size,
        "offset": start,
        "pages": math.ceil(250 / page_size),
        "total": 250,
    }


def test_pagination_of_a_filtered_set(three: Any) -> None:
    matching = _expected(three.mirrors["capstor"], data_type="store", state="OK")
    assert len(matching) > 25
    pages = math.ceil(len(matching) / 10)
    seen: list[str] = []
    for page in range(1, pages + 2):
        body = three.resources(storage_system="capstor", data_type="store", state="OK", page=page, page_size=10).json()
        assert body["result"]["paginate"] == {
            "current": page,
            "limit": 10,
            "offset": (page - 1) * 10,
            "pages": pages,
            "total": len(matching),
        }
        seen += [r["itemId"] for r in body["result"]["storageResources"]]
    assert seen == matching  # the last request was past the end: empty


def test_total_zero_gives_one_page(three: Any) -> None:
    body = three.resources(storage_system="capstor", status="nothing", page=3, page_size=7).json()
    assert body["result"]["paginate"] == {"current": 3, "limit": 7, "offset": 14, "pages": 1, "total": 0}


def test_meta_date_has_the_offering_time_zone_offset(api_server: ApiServerFactory) -> None:
    harness = api_server(
        {"capstor": fill_mirror("capstor", 1)},
        infos={"capstor": api_offering_info("capstor", zone=ZoneInfo("Europe/Zurich"))},
    )
    date = harness.resources(storage_system="capstor").json()["meta"]["date"]
    assert date == "2025-08-26T15:32:34.123456+02:00"
    assert datetime.fromisoformat(date) == API_NOW


def test_mirror_changes_show_up_on_the_next_request(three: Any) -> None:
    mirror = three.mirrors["vast"]
    assert three.resources(storage_system="vast").json()["result"]["paginate"]["total"] == 3
    # warm the caches of one filter combination, then change the mirror
    assert three.resources(storage_system="vast", state="OK").status_code == 200
    offering = offering_for("vast")
    project = Project("a" * 32, "proj", "Project", "b" * 32, "cust", "Customer")
    new = make_resource(offering, project, uuid="c" * 32, slug="fresh", state="OK", created="2099-01-01T00:00:00Z")
    mirror.apply(new)
    body = three.resources(storage_system="vast", page_size=500).json()
    assert body["result"]["paginate"]["total"] == 4
    assert body["result"]["storageResources"][-1]["itemId"] == "c" * 32
    assert "c" * 32 in [
        r["itemId"] for r in three.resources(storage_system="vast", state="OK").json()["result"]["storageResources"]
    ]
    mirror.remove("c" * 32)
    assert three.resources(storage_system="vast").json()["result"]["paginate"]["total"] == 3


def test_invalid_resources_are_not_served_but_stale_ones_are(api_server: ApiServerFactory) -> None:
    offering = offering_for("capstor")
    project = Project("a" * 32, "proj", "Project", "b" * 32, "cust", "Customer")
    good = make_resource(offering, project, uuid="1" * 32, slug="good", state="OK")
    never_valid = make_resource(offering, project, uuid="2" * 32, slug="../escape", state="OK")
    turned_bad = make_resource(offering, project, uuid="3" * 32, slug="stale", state="OK")
    mirror = fill_mirror("capstor", 0, extra=[good, never_valid, turned_bad])
    mirror.apply({**turned_bad, "attributes": {"permissions": "99999"}, "state": "Erred"})
    harness = api_server({"capstor": mirror})
    body = harness.resources(storage_system="capstor").json()
    assert sorted(r["itemId"] for r in body["result"]["storageResources"]) == ["1" * 32, "3" * 32]
    stale = next(r for r in body["result"]["storageResources"] if r["itemId"] == "3" * 32)
    assert stale["status"] == "active"  # the last valid object
    # the state filter uses the resource's current Waldur state
    erred = harness.resources(storage_system="capstor", state="Erred").json()["result"]["storageResources"]
    assert [r["itemId"] for r in erred] == ["3" * 32]
    # debug mode shows every resource, also the one never valid
    raw = harness.resources(storage_system="capstor", debug="true").json()["raw_resources"]
    assert sorted(r["uuid"] for r in raw["resources"]) == ["1" * 32, "2" * 32, "3" * 32]


def test_no_waldur_call_for_normal_requests(three: Any) -> None:
    for _ in range(3):
        three.resources(storage_system="capstor", state="OK")
    three.get("/healthz")
    three.get("/metrics")
    assert three.details_calls == []


# ---------------------------------------------------------------------------------------------- size limits


def test_query_string_over_4_kib_is_414(three: Any) -> None:
    query = "storage_system=capstor&" + "&".join(f"x{i}=" + "a" * 200 for i in range(25))
    assert len(query) > MAX_QUERY_BYTES
    response = three.get("/api/storage-resources/?" + query)
    assert response.status_code == 414
    assert response.json() == {"detail": "Request-URI Too Long"}


def test_parameter_value_over_256_characters_is_422(three: Any) -> None:
    response = three.resources(storage_system="capstor", data_type="a" * 257)
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["query", "data_type"]
    assert response.json()["detail"][0]["type"] == "string_too_long"
    ok = three.resources(storage_system="capstor", data_type="a" * 256)
    assert ok.status_code == 200


def test_long_storage_system_value_is_refused_before_processing(three: Any) -> None:
    response = three.resources(storage_system="c" * 300)
    assert response.status_code == 422
    assert response.json()["detail"][0]["type"] == "string_too_long"


# ---------------------------------------------------------------------------------------------- debug mode


SECRET_TOKEN = "waldur-token-SECRET-0123456789abcdef"
SECRET_MARKERS = ("SECRET", "hunter2", "s3cr3t")


def _config_with_secrets(tmp_path: Any) -> Any:
    offering = sample_offering(
        "capstor",
        output_directory=tmp_path / "out",
        waldur_api_token=SECRET_TOKEN,
        waldur_api_url="https://robot:hunter2@waldur.example.org/api/",
        waldur_offering_uuid=offering_for("capstor").uuid,
    )
    offering["backend_components"] = {
        "storage": {
            "measured_unit": "TB",
            "accounting_type": "limit",
            "label": "Storage",
            "description": f"token {SECRET_TOKEN}",
            "article_code": {"api_key": "s3cr3t-key", "password": "s3cr3t-pw"},
            "limit": {"client_secret": "s3cr3t-client"},
        }
    }
    offering["backend_settings"]["storage_file_system"] = "lustre"
    return config_from_data(
        {
            "offerings": [offering],
            "daemon": {"broker": {"username": "u", "password": "hunter2-broker"}},
        }
    )


@pytest.mark.parametrize("use_render_config", [True, False])
def test_debug_mode_body_never_holds_a_secret(
    api_server: ApiServerFactory, tmp_path: Any, use_render_config: bool
) -> None:
    config = _config_with_secrets(tmp_path)
    details = offering_for("capstor").to_json()
    details["secret_options"] = {"api_token": SECRET_TOKEN, "password": "hunter2"}
    details["plugin_options"] = {"note": f"uses {SECRET_TOKEN}"}
    harness = api_server(
        {"capstor": fill_mirror("capstor", 5)},
        infos={"capstor": config.offerings[0]},
        offering_details=lambda slug: details,
        render_config=(lambda: render_effective_config(config)) if use_render_config else None,
    )
    response = harness.resources(storage_system="capstor", debug="true", page_size=2)
    assert response.status_code == 200
    text = response.text
    for marker in SECRET_MARKERS:
        assert marker not in text
    body = response.json()
    assert list(body) == ["status", "debug_mode", "agent_offering_config", "waldur_offering_details", "raw_resources"]
    assert body["status"] == "success" and body["debug_mode"] is True
    agent = body["agent_offering_config"]
    assert list(agent) == ["uuid", "api_url", "backend_type", "backend_settings", "backend_components"]
    assert agent["uuid"] == offering_for("capstor").uuid
    assert agent["api_url"] == "https://robot:***@waldur.example.org/api/"
    assert agent["backend_type"] == "cscs-hpc-storage"
    assert agent["backend_settings"]["storage_file_system"] == "lustre"
    assert agent["backend_settings"]["inode_base_multiplier"] == 1_000_000
    component = agent["backend_components"]["storage"]
    assert component["article_code"] == {"api_key": "***", "password": "***"}
    assert component["limit"] == {"client_secret": "***"}
    assert "secret_options" not in body["waldur_offering_details"]
    assert body["waldur_offering_details"]["slug"] == "capstor"


def test_mask_secrets_rules() -> None:
    masked = mask_secrets(
        {
            "API_KEY": "x",
            "token_file": "/etc/t",
            "Password": 42,
            "nested": {"client_secret": {"deep": 1}, "ok": "value with TOPSECRET inside"},
            "secret_options": {"a": 1},
            "list": [{"access_token": "t"}, "plain"],
            "url": "https://u:pw@h:8443/p?q=1",
            "unset_key": None,
        },
        ["TOPSECRET"],
    )
    assert masked == {
        "API_KEY": "***",
        "token_file": "***",
        "Password": "***",
        "nested": {"client_secret": "***", "ok": "value with *** inside"},
        "list": [{"access_token": "***"}, "plain"],
        "url": "https://u:***@h:8443/p?q=1",
        "unset_key": None,
    }


def test_debug_mode_raw_resources_fields_filters_and_pagination(three: Any) -> None:
    mirror = three.mirrors["capstor"]
    response = three.resources(
        storage_system="capstor", debug="true", data_type="users", state="OK", page=2, page_size=5
    )
    body = response.json()
    raw = body["raw_resources"]
    assert list(raw) == ["resources", "pagination", "filters_applied"]
    assert raw["filters_applied"] == {"storage_system": "capstor", "data_type": "users", "status": None, "state": "OK"}
    matching = [
        e
        for e in mirror.entries()
        if (e.raw["attributes"] or {}).get("storage_data_type") == "users" and e.raw["state"] == "OK"
    ]
    assert raw["pagination"] == {
        "current": 2,
        "limit": 5,
        "offset": 5,
        "pages": math.ceil(len(matching) / 5),
        "total": len(matching),
    }
    assert [r["uuid"] for r in raw["resources"]] == [e.uuid for e in matching[5:10]]
    first, entry = raw["resources"][0], matching[5]
    assert list(first) == [
        "uuid",
        "name",
        "slug",
        "state",
        "customer_slug",
        "customer_name",
        "project_slug",
        "project_name",
        "offering_slug",
        "offering_type",
        "limits",
        "attributes",
        "backend_metadata",
        "created",
        "modified",
    ]
    for key in first:
        assert first[key] == entry.raw[key]


def test_debug_data_type_filter_uses_the_effective_data_type(api_server: ApiServerFactory) -> None:
    offering = offering_for("capstor")
    project = Project("a" * 32, "proj", "Project", "b" * 32, "cust", "Customer")
    no_type = make_resource(offering, project, uuid="1" * 32, slug="untyped", data_type=None)
    no_attributes = {**make_resource(offering, project, uuid="2" * 32, slug="bare"), "attributes": None}
    upper = make_resource(offering, project, uuid="3" * 32, slug="upper", data_type="SCRATCH")
    harness = api_server({"capstor": fill_mirror("capstor", 0, extra=[no_type, no_attributes, upper])})
    store = harness.resources(storage_system="capstor", debug="true", data_type="store").json()["raw_resources"]
    assert sorted(r["uuid"] for r in store["resources"]) == ["1" * 32, "2" * 32]
    assert store["resources"][1]["attributes"] == {} or store["resources"][0]["attributes"] == {}
    scratch = harness.resources(storage_system="capstor", debug="true", data_type="scratch").json()["raw_resources"]
    assert [r["uuid"] for r in scratch["resources"]] == ["3" * 32]
    assert (
        harness.resources(storage_system="capstor", debug="true", data_type="SCRATCH").json()["raw_resources"][
            "pagination"
        ]["total"]
        == 0
    )
    # normal mode agrees
    normal = harness.resources(storage_system="capstor", data_type="store").json()["result"]["storageResources"]
    assert sorted(r["itemId"] for r in normal) == ["1" * 32, "2" * 32]


def test_debug_offering_details_are_cached_and_json_safe(api_server: ApiServerFactory) -> None:
    import uuid

    details = {
        "uuid": uuid.UUID(offering_for("capstor").uuid),
        "customer_uuid": "1b7e9c4a-2d3f-4e5a-8b6c-7d8e9f0a1b2c",
        "created": datetime(2024, 11, 5, 10, 0, tzinfo=UTC),
        "name": "Capstor",
        "secret_options": {"x": 1},
    }
    harness = api_server({"capstor": fill_mirror("capstor", 2)}, offering_details=lambda slug: details)
    first = harness.resources(storage_system="capstor", debug="true").json()["waldur_offering_details"]
    assert first == {
        "uuid": offering_for("capstor").uuid,
        "customer_uuid": "1b7e9c4a2d3f4e5a8b6c7d8e9f0a1b2c",
        "created": "2024-11-05T10:00:00+00:00",
        "name": "Capstor",
    }
    harness.resources(storage_system="capstor", debug="true")
    harness.resources(storage_system="capstor", debug="1", state="OK")
    assert harness.details_calls == ["capstor"]


def test_debug_offering_details_failure_still_serves_the_rest(api_server: ApiServerFactory) -> None:
    def failing(slug: str) -> dict[str, Any]:
        raise ConnectionError(f"Waldur down (token {SECRET_TOKEN})")

    harness = api_server(
        {"capstor": fill_mirror("capstor", 3)},
        infos={"capstor": api_offering_info("capstor", secrets=(SECRET_TOKEN,))},
        offering_details=failing,
    )
    response = harness.resources(storage_system="capstor", debug="true")
    assert response.status_code == 200
    body = response.json()
    assert list(body["waldur_offering_details"]) == ["error"]
    assert "Waldur down" in body["waldur_offering_details"]["error"]
    assert SECRET_TOKEN not in response.text
    assert body["raw_resources"]["pagination"]["total"] == 3
    assert body["agent_offering_config"]["uuid"] == offering_for("capstor").uuid


def test_offering_details_cache_expiry() -> None:
    now = [0.0]
    calls: list[str] = []

    def fetch(slug: str) -> dict[str, Any]:
        calls.append(slug)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return {"n": len(calls)}

    cache = OfferingDetailsCache(fetch, ttl=60, error_ttl=5, monotonic=lambda: now[0])
    assert cache.get("a") == {"n": 1}
    now[0] = 59.9
    assert cache.get("a") == {"n": 1}
    now[0] = 60.0
    assert cache.get("a")["error"].startswith("Failed to fetch offering details: RuntimeError: boom")
    now[0] = 64.0
    assert "error" in cache.get("a")
    now[0] = 65.0
    assert cache.get("a") == {"n": 3}
    assert OfferingDetailsCache(None).get("a") == {"error": "offering details are not available in this mode"}


# ------------------------------------------------------------------------------------------------ healthz


def test_healthz_ready_is_200(three: Any) -> None:
    response = three.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {
        "status": "ok",
        "version": three.health.version,
        "broker": "connected",
        "offerings": {
            "capstor": {"resources": 250, "last_snapshot": API_NOW.isoformat()},
            "vast": {"resources": 3, "last_snapshot": API_NOW.isoformat()},
            "iopsstor": {"resources": 0, "last_snapshot": API_NOW.isoformat()},
        },
    }


def test_healthz_not_ready_is_503_with_the_failing_parts(api_server: ApiServerFactory) -> None:
    harness = api_server({"capstor": fill_mirror("capstor", 2)}, ready=False)
    response = harness.get("/healthz")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "unavailable"
    assert body["failing"] == ["ready", "offerings.capstor.last_snapshot"]
    assert body["offerings"] == {"capstor": {"resources": 2, "last_snapshot": None}}


def test_healthz_broker_grace_over_http(api_server: ApiServerFactory) -> None:
    harness = api_server({"capstor": fill_mirror("capstor", 1)}, grace=60)
    harness.health.set_broker_connected(False)
    harness.clock.advance(59)
    body = harness.get("/healthz")
    assert body.status_code == 200
    assert body.json()["broker"] == "disconnected"
    assert body.json()["broker_disconnected_since"] == API_NOW.isoformat()
    harness.clock.advance(2)
    response = harness.get("/healthz")
    assert response.status_code == 503
    assert response.json()["failing"] == ["broker"]
    harness.health.set_broker_connected(True)
    assert harness.get("/healthz").status_code == 200


def _view(**overrides: Any) -> HealthView:
    values: dict[str, Any] = {
        "version": "9.9.9",
        "ready": True,
        "broker_required": True,
        "broker_connected": True,
        "broker_disconnected_since": None,
        "offerings": ("capstor",),
        "snapshots": {"capstor": API_NOW},
    }
    values.update(overrides)
    return HealthView(**values)


def test_healthz_function_cases() -> None:
    now = API_NOW + timedelta(seconds=100)
    code, body = healthz(_view(), now=now, grace=60, resources={"capstor": 7})
    assert code == 200 and body["offerings"] == {"capstor": {"resources": 7, "last_snapshot": API_NOW.isoformat()}}
    code, body = healthz(_view(ready=False), now=now, grace=60, resources={})
    assert (code, body["failing"]) == (503, ["ready"])
    down = _view(broker_connected=False, broker_disconnected_since=API_NOW)
    assert healthz(down, now=now, grace=100, resources={})[0] == 200
    code, body = healthz(down, now=now, grace=99.5, resources={})
    assert (code, body["failing"], body["broker"]) == (503, ["broker"], "disconnected")
    assert healthz(down, now=now, grace=0, resources={})[0] == 503
    no_snapshot = _view(snapshots={})
    assert healthz(no_snapshot, now=now, grace=60, resources={})[1]["failing"] == ["offerings.capstor.last_snapshot"]
    not_used = _view(broker_required=False, broker_connected=False, broker_disconnected_since=API_NOW)
    code, body = healthz(not_used, now=now, grace=0, resources={})
    assert (code, body["broker"]) == (200, "not used")


def test_health_state_tracks_transports_and_since() -> None:
    clock = FixedClock(API_NOW)
    state = HealthState(offerings=["a"], clock=clock)
    view = state.view()
    assert (view.broker_connected, view.broker_disconnected_since) == (False, API_NOW)
    clock.advance(10)
    state.broker_connected("stomp:a")
    state.broker_connected("stomp:b")
    assert state.view().broker_connected
    clock.advance(10)
    state.broker_disconnected("stomp:a")
    clock.advance(10)
    state.broker_disconnected("stomp:a")  # repeated: keeps the first moment
    state.broker_disconnected("stomp:b")
    view = state.view()
    assert (view.broker_connected, view.broker_disconnected_since) == (False, API_NOW + timedelta(seconds=20))
    state.broker_connected("stomp:a")
    assert state.view().broker_disconnected_since == API_NOW + timedelta(seconds=30)
    state.snapshot_written("b", API_NOW)
    assert state.view().offerings == ("a", "b")
    assert not state.ready
    state.set_ready(True)
    assert state.ready


# ------------------------------------------------------------------------------------------------ metrics


def test_metrics_endpoint(three: Any) -> None:
    three.metrics.mirror_size.labels("capstor").set(250)
    three.resources(storage_system="capstor")
    three.resources(storage_system="nope")
    response = three.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    text = response.text
    assert 'cscs_mirror_resources{offering="capstor"} 250.0' in text
    assert 'cscs_http_requests_total{code="200",handler="/api/storage-resources/"} 1.0' in text
    assert 'cscs_http_requests_total{code="422",handler="/api/storage-resources/"} 1.0' in text
    assert "cscs_http_request_duration_seconds_bucket" in text


def test_two_apps_on_one_metrics_registry(api_server: ApiServerFactory) -> None:
    from cscs_storage_daemon.api import create_app
    from cscs_storage_daemon.metrics import Metrics

    metrics = Metrics()
    for _ in range(2):
        create_app(offerings=[], health=HealthState(), metrics=metrics)


def test_openapi_document(three: Any) -> None:
    schema = three.get("/openapi.json").json()
    operation = schema["paths"]["/api/storage-resources/"]["get"]
    params = {p["name"]: p for p in operation["parameters"]}
    assert params["storage_system"]["required"] is True
    assert params["storage_system"]["schema"]["enum"] == list(SLUGS)
    assert set(params) == {"storage_system", "data_type", "status", "state", "page", "page_size", "debug"}
    assert {"200", "414", "422"} <= set(operation["responses"])
    assert "/healthz" in schema["paths"] and "/metrics" in schema["paths"]
    assert three.get("/docs").status_code == 200


# ------------------------------------------------------------------------------------------------ pure parts


def test_filter_index_matches_a_brute_force_filter() -> None:
    keys = [(dt, st, state) for dt in ("a", "b") for st in ("x", "y", "z") for state in ("OK", "Erred")] * 3
    index = FilterIndex(keys, lambda key: key)
    for data_type in (None, "a", "b", "c"):
        for status in (None, "x", "z"):
            for state in (None, "OK", "Erred"):
                expected = [
                    i
                    for i, (d, s, t) in enumerate(keys)
                    if data_type in (None, d) and status in (None, s) and state in (None, t)
                ]
                assert list(index.select(Filters(data_type, status, state))) == expected


def test_page_bounds() -> None:
    assert page_bounds(250, 1, 100) == (0, 100)
    assert page_bounds(250, 3, 100) == (200, 250)
    assert page_bounds(250, 4, 100) == (250, 250)
    assert page_bounds(0, 1, 100) == (0, 0)
    with pytest.raises(ValueError):
        page_bounds(1, 0, 1)


def test_mirror_views_rebuild_per_version_and_keep_rendered_json() -> None:
    mirror = fill_mirror("capstor", 20)
    views = MirrorViews(mirror)
    first = views.current()
    assert views.current() is first
    rendered = first.rendered(0)
    assert json.loads(rendered) == first.visible[0].storage
    offering = offering_for("capstor")
    project = Project("a" * 32, "proj", "Project", "b" * 32, "cust", "Customer")
    mirror.apply(make_resource(offering, project, uuid="f" * 32, slug="new", created="2099-01-01T00:00:00Z"))
    second = views.current()
    assert second is not first and second.total == first.total + 1
    assert second.rendered(0) is rendered  # the unchanged entry's JSON is reused


def test_mirror_view_chains_stay_short() -> None:
    mirror = fill_mirror("capstor", 3)
    views = MirrorViews(mirror)
    views.current().rendered(0)
    offering = offering_for("capstor")
    project = Project("a" * 32, "proj", "Project", "b" * 32, "cust", "Customer")
    for i in range(5):  # views created, never rendered
        mirror.apply(make_resource(offering, project, uuid=f"{i:032x}", slug=f"n{i}", created="2099-01-01T00:00:00Z"))
        view: MirrorView = views.current()
        depth, cursor = 0, view
        while cursor._previous is not None:
            cursor, depth = cursor._previous, depth + 1
        assert depth <= 2


def test_render_envelope_equals_the_envelope() -> None:
    objects: list[dict[str, Any]] = [{"a": 1, "ü": "é"}, {"b": [1.0, None]}]
    pagination = paginate(total=2, page=1, page_size=10)
    document = envelope(objects, date=API_NOW, pagination=pagination)
    assert render_envelope([compact_json(o) for o in objects], date=API_NOW, pagination=pagination) == compact_json(
        document
    )
    assert render_envelope([], date=API_NOW, pagination=pagination) == compact_json(
        envelope([], date=API_NOW, pagination=pagination)
    )


def test_offering_info_from_config(tmp_path: Any) -> None:
    config = _config_with_secrets(tmp_path)
    info = OfferingInfo.from_config(config.offerings[0])
    assert info.uuid == offering_for("capstor").uuid
    assert info.secrets == (SECRET_TOKEN,)
    assert info.backend_settings["timezone"] == "UTC"


def test_parse_listen() -> None:
    assert parse_listen("127.0.0.1:8080") == ("127.0.0.1", 8080)
    assert parse_listen("[::1]:0") == ("::1", 0)
    assert parse_listen("localhost:1") == ("localhost", 1)
    for bad in ("8080", "::1:80", "h:x", "h:70000"):
        with pytest.raises(ValueError):
            parse_listen(bad)


def test_api_server_port_zero_ipv6_and_clean_stop(three: Any) -> None:
    import httpx

    server = ApiServer(three.server.app, "[::1]:0")
    port = server.start()
    assert port > 0 and server.running
    assert httpx.get(f"http://[::1]:{port}/healthz").status_code == 200
    assert server.stop(timeout=5)
    assert not server.running
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://[::1]:{port}/healthz")


def test_api_server_port_in_use_raises_oserror(three: Any) -> None:
    with pytest.raises(OSError):
        ApiServer(three.server.app, f"127.0.0.1:{three.server.port}").start()


def test_api_server_installs_no_signal_handlers(three: Any) -> None:
    import signal

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    server = ApiServer(three.server.app, "127.0.0.1:0")
    server.start()
    during = {sig: signal.getsignal(sig) for sig in before}
    server.stop()
    assert during == before


def test_filter_keys_lent_by_the_previous_view_stay_correct() -> None:
    mirror = fill_mirror("capstor", 60)
    views = MirrorViews(mirror)
    first = views.current()
    assert list(first.index.select(Filters(state="OK")))  # keys computed: the next view borrows them
    changed = next(e for e in mirror.entries() if e.raw["state"] == "OK")
    mirror.apply({**changed.raw, "state": "Erred"})
    second = views.current()
    for filters in (Filters(state="OK"), Filters(state="Erred"), Filters(status="error"), Filters(data_type="store")):
        expected = [
            i
            for i, e in enumerate(second.visible)
            if filters.state in (None, e.raw["state"])
            and filters.status in (None, e.storage["status"])  # type: ignore[index]
            and filters.data_type in (None, e.storage["storageDataType"]["key"])  # type: ignore[index]
        ]
        assert list(second.index.select(filters)) == expected
    assert changed.uuid in [second.visible[i].uuid for i in second.index.select(Filters(state="Erred"))]
