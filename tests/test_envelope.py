"""Envelopes, file names and rendering of the storage JSON (spec storage-json §4–5). Pure: no I/O."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cscs_storage_daemon import envelope as envelope_module
from cscs_storage_daemon.envelope import (
    RenderedObjects,
    content_key,
    envelope,
    is_snapshot_file_name,
    order_envelope,
    order_file_name,
    paginate,
    render,
    render_pieces,
    snapshot_envelope,
    snapshot_file_name,
)
from cscs_storage_daemon.mapping import MappingSettings, map_resource
from cscs_storage_daemon.testing.sample_data import generate_resources

ZURICH = ZoneInfo("Europe/Zurich")
UUID_HEX = "0a1b2c3d4e5f40718293a4b5c6d7e8f9"


def resource(name: str = "msclimate-store") -> dict[str, object]:
    return {"itemId": "4eab2f7d-5a6c-4b8d-9e0f-1a2b3c4d5e6f", "status": "active", "name": name}


# ---------------------------------------------------------------------------------------------------- paginate


@pytest.mark.parametrize(
    ("total", "page", "size", "expected"),
    [
        (0, 1, 10, {"current": 1, "limit": 10, "offset": 0, "pages": 1, "total": 0}),
        (1, 1, 10, {"current": 1, "limit": 10, "offset": 0, "pages": 1, "total": 1}),
        (10, 1, 10, {"current": 1, "limit": 10, "offset": 0, "pages": 1, "total": 10}),
        (11, 2, 10, {"current": 2, "limit": 10, "offset": 10, "pages": 2, "total": 11}),
        (95, 3, 25, {"current": 3, "limit": 25, "offset": 50, "pages": 4, "total": 95}),
    ],
)
def test_paginate(total: int, page: int, size: int, expected: dict[str, int]) -> None:
    assert paginate(total=total, page=page, page_size=size) == expected


def test_paginate_key_order() -> None:
    assert list(paginate(total=5, page=1, page_size=2)) == ["current", "limit", "offset", "pages", "total"]


def test_empty_all_json_has_limit_one_and_one_page() -> None:
    document = snapshot_envelope([], date=datetime(2025, 3, 14, 9, 26, tzinfo=UTC))
    assert document["result"] == {
        "storageResources": [],
        "paginate": {"current": 1, "limit": 1, "offset": 0, "pages": 1, "total": 0},
    }


def test_all_json_is_one_page_holding_everything() -> None:
    resources = [resource(f"r{i}") for i in range(7)]
    document = snapshot_envelope(resources, date=datetime(2025, 3, 14, 9, 26, tzinfo=UTC))
    assert document["result"]["storageResources"] == resources
    assert document["result"]["paginate"] == {"current": 1, "limit": 7, "offset": 0, "pages": 1, "total": 7}


# ---------------------------------------------------------------------------------------------------- envelope


def test_envelope_key_order() -> None:
    document = snapshot_envelope([resource()], date=datetime(2025, 3, 14, 9, 26, tzinfo=UTC))
    assert list(document) == ["status", "code", "meta", "result"]
    assert list(document["meta"]) == ["date", "appVersion"]
    assert list(document["result"]) == ["storageResources", "paginate"]
    assert document["status"] == "success"
    assert document["code"] == 200
    assert document["meta"]["appVersion"] == "1.4.0"


def test_order_file_has_one_resource_and_no_paginate() -> None:
    document = order_envelope(resource(), date=datetime(2025, 3, 14, 9, 26, tzinfo=UTC))
    assert list(document["result"]) == ["storageResources"]
    assert document["result"]["storageResources"] == [resource()]
    assert list(document) == ["status", "code", "meta", "result"]


def test_envelope_does_not_share_the_callers_list() -> None:
    resources = [resource()]
    document = envelope(resources, date=datetime(2025, 1, 1, tzinfo=UTC), pagination=None)
    resources.append(resource("other"))
    assert len(document["result"]["storageResources"]) == 1


def test_meta_date_has_an_offset() -> None:
    document = snapshot_envelope([], date=datetime(2025, 3, 14, 9, 26, 53, tzinfo=UTC))
    assert document["meta"]["date"] == "2025-03-14T09:26:53+00:00"
    assert datetime.fromisoformat(document["meta"]["date"]).utcoffset() is not None


# ---------------------------------------------------------------------------------------------------- names


@pytest.mark.parametrize(
    ("utc", "local_stamp", "offset"),
    [
        (datetime(2025, 1, 15, 23, 30, 5, tzinfo=UTC), "2025-01-16-00-30", "+01:00"),  # winter: next day
        (datetime(2025, 7, 1, 22, 59, 59, tzinfo=UTC), "2025-07-02-00-59", "+02:00"),  # summer time
    ],
)
def test_names_use_the_zones_wall_time_and_match_meta_date(utc: datetime, local_stamp: str, offset: str) -> None:
    local = utc.astimezone(ZURICH)
    document = snapshot_envelope([], date=local)
    assert snapshot_file_name(local) == f"{local_stamp}-all.json"
    assert order_file_name(local, "create", UUID_HEX) == f"{local_stamp}-create_{UUID_HEX}.json"
    meta = datetime.fromisoformat(document["meta"]["date"])
    assert meta == utc  # the same instant …
    assert document["meta"]["date"].endswith(offset)  # … in the same zone
    assert meta.strftime("%Y-%m-%d-%H-%M") == local_stamp  # … and the same wall time as the name


@pytest.mark.parametrize("order_type", ["create", "update", "terminate", "Create", "UPDATE"])
def test_order_file_name_types(order_type: str) -> None:
    name = order_file_name(datetime(2025, 3, 14, 9, 26, tzinfo=UTC), order_type, UUID_HEX)
    assert name == f"2025-03-14-09-26-{order_type.lower()}_{UUID_HEX}.json"


@pytest.mark.parametrize("order_type", ["delete", "", "restore", "create ", "terminate\n"])
def test_order_file_name_rejects_bad_types(order_type: str) -> None:
    with pytest.raises(ValueError, match="order type"):
        order_file_name(datetime(2025, 3, 14, tzinfo=UTC), order_type, UUID_HEX)


@pytest.mark.parametrize(
    "uuid",
    [
        "",
        UUID_HEX[:-1],
        UUID_HEX + "0",
        UUID_HEX.upper(),
        "0a1b2c3d-4e5f-4071-8293-a4b5c6d7e8f9",
        "0a1b2c3d4e5f40718293a4b5c6d7e8fg",
        "../../../../etc/passwd0000000000",
        "0a1b2c3d4e5f40718293a4b5c6d7e8f\x00",
    ],
)
def test_order_file_name_rejects_non_hex_uuids(uuid: str) -> None:
    with pytest.raises(ValueError, match="uuid"):
        order_file_name(datetime(2025, 3, 14, tzinfo=UTC), "create", uuid)


def test_snapshot_file_names_are_recognised() -> None:
    assert is_snapshot_file_name(snapshot_file_name(datetime(2025, 3, 14, 9, 26, tzinfo=UTC)))
    assert not is_snapshot_file_name(order_file_name(datetime(2025, 3, 14, tzinfo=UTC), "create", UUID_HEX))
    assert not is_snapshot_file_name("all.json")
    assert not is_snapshot_file_name(".tmp-abc-all.json.part")


# ---------------------------------------------------------------------------------------------------- render


def test_render_format() -> None:
    document = order_envelope({"name": "Zürich-Ω-数据", "quota": 1.5}, date=datetime(2025, 3, 14, 9, 26, tzinfo=ZURICH))
    data = render(document)
    text = data.decode("utf-8")
    assert text.endswith("}\n") and not text.endswith("\n\n")
    assert '\n  "status": "success",\n' in text  # 2-space indent
    assert '\n    "date": "2025-03-14T09:26:00+01:00",\n' in text
    assert "Zürich-Ω-数据" in text and "\\u" not in text  # non-ASCII kept literally
    assert json.loads(data) == document


def test_render_exact_bytes() -> None:
    document = envelope([{"a": "é"}], date=datetime(2025, 1, 2, 3, 4, tzinfo=UTC), pagination=None)
    expected = (
        "{\n"
        '  "status": "success",\n'
        '  "code": 200,\n'
        '  "meta": {\n'
        '    "date": "2025-01-02T03:04:00+00:00",\n'
        '    "appVersion": "1.4.0"\n'
        "  },\n"
        '  "result": {\n'
        '    "storageResources": [\n'
        "      {\n"
        '        "a": "é"\n'
        "      }\n"
        "    ]\n"
        "  }\n"
        "}\n"
    ).encode()
    assert render(document) == expected


def test_render_empty_containers() -> None:
    data = render(snapshot_envelope([], date=datetime(2025, 1, 1, tzinfo=UTC)))
    assert b'"storageResources": [],' in data


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_render_refuses_nan_and_infinity(bad: float) -> None:
    # The mapping only ever emits finite numbers; the renderer still refuses to turn a bad quota into null.
    document = order_envelope({"quotas": [{"type": "space", "quota": bad}]}, date=datetime(2025, 1, 1, tzinfo=UTC))
    with pytest.raises(ValueError):
        render(document)


# ---------------------------------------------------------------------------------------------------- content key


def test_content_key_ignores_meta_date() -> None:
    a = snapshot_envelope([resource()], date=datetime(2025, 1, 1, tzinfo=UTC))
    b = snapshot_envelope([resource()], date=datetime(2025, 6, 1, 12, 0, tzinfo=ZURICH))
    assert render(a) != render(b)
    assert content_key(a) == content_key(b)


def test_content_key_sees_every_resource_change() -> None:
    date = datetime(2025, 1, 1, tzinfo=UTC)
    base = content_key(snapshot_envelope([resource("a"), resource("b")], date=date))
    assert content_key(snapshot_envelope([resource("a"), resource("c")], date=date)) != base
    assert content_key(snapshot_envelope([resource("b"), resource("a")], date=date)) != base  # order matters
    assert content_key(snapshot_envelope([resource("a")], date=date)) != base


def test_content_key_is_a_small_digest() -> None:
    """The key of a big feed is kept between regenerations: it must not be the whole content."""
    date = datetime(2025, 1, 1, tzinfo=UTC)
    key = content_key(snapshot_envelope([resource(f"r{i}") for i in range(1000)], date=date))
    assert isinstance(key, bytes) and len(key) <= 64


def test_content_key_of_values_orjson_refuses() -> None:
    date = datetime(2025, 1, 1, tzinfo=UTC)
    big = content_key(order_envelope({"n": 2**70}, date=date))
    assert big == content_key(order_envelope({"n": 2**70}, date=date))
    assert big != content_key(order_envelope({"n": 2**70 + 1}, date=date))


# ---------------------------------------------------------------------------------------------------- byte identity
# render() must give exactly the bytes of the standard library's json.dumps(indent=2, ensure_ascii=False) + "\n",
# whichever encoder it uses inside.


def stdlib_render(document: dict[str, Any]) -> bytes:
    return (json.dumps(document, ensure_ascii=False, indent=2, allow_nan=False) + "\n").encode("utf-8")


def assert_same_as_stdlib(document: dict[str, Any]) -> None:
    try:
        expected = stdlib_render(document)
    except (ValueError, UnicodeEncodeError) as exc:
        with pytest.raises(type(exc)):
            render(document)
        return
    assert render(document) == expected


def storage_object(**changes: Any) -> dict[str, Any]:
    golden = json.loads(Path("/work/shared/golden/api/resource.json").read_text())
    obj = dict(map_resource(golden, MappingSettings()))  # a changed copy: plain, checked when rendered
    obj.update(changes)
    return obj


def quotas(*values: Any) -> list[dict[str, Any]]:
    return [{"type": "space", "quota": v, "unit": "tera", "enforcementType": "soft"} for v in values]


def test_mapped_sample_feed_is_byte_identical() -> None:
    objects = [map_resource(raw, MappingSettings()) for raw in generate_resources(2000, seed=3)]
    assert_same_as_stdlib(snapshot_envelope(objects, date=datetime(2025, 3, 14, 9, 26, 53, 123456, tzinfo=ZURICH)))
    assert_same_as_stdlib(order_envelope(objects[0], date=datetime(2025, 3, 14, tzinfo=UTC)))


@pytest.mark.parametrize(
    "value",
    [1e-05, -6.5e-05, 1e-06, 1.5e-07, 1e-09, 9.99e-05, 1e-4, 1e-10, 5e-324, 0.0, -0.0, 1e16, 1.5e300, 0.1 + 0.2],
)
def test_floats_are_written_as_the_standard_library_does(value: float) -> None:
    """orjson writes 0.00001 and 1e-6 where json.dumps writes 1e-05 and 1e-06: those must not leak out."""
    date = datetime(2025, 1, 1, tzinfo=UTC)
    assert_same_as_stdlib(snapshot_envelope([storage_object(quotas=quotas(50.0, value))], date=date))
    item = {"itemId": "x", "weight": value, "nested": {"list": [value, {"deep": value}]}}
    assert_same_as_stdlib(
        snapshot_envelope([storage_object(target={"targetType": "project", "targetItem": item})], date=date)
    )
    assert_same_as_stdlib(order_envelope({"anywhere": [value]}, date=date))
    assert json.dumps(value).encode() in render(order_envelope({"anywhere": [value]}, date=date))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_floats_are_refused_anywhere(bad: float) -> None:
    date = datetime(2025, 1, 1, tzinfo=UTC)
    item = {"itemId": "x", "nested": {"w": bad}}
    for document in (
        snapshot_envelope([storage_object(quotas=quotas(bad))], date=date),
        snapshot_envelope([storage_object(target={"targetType": "project", "targetItem": item})], date=date),
        order_envelope({"anywhere": {"in": [bad]}}, date=date),
    ):
        with pytest.raises(ValueError):
            render(document)


def test_pieces_join_to_the_standard_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    """all.json is rendered a few resources at a time; pieces the standard path takes sit between orjson's."""
    monkeypatch.setattr(envelope_module, "PIECE_RESOURCES", 3)
    objects = [map_resource(raw, MappingSettings()) for raw in generate_resources(10, seed=5)]
    objects[4] = {**objects[4], "quotas": quotas(1e-05)}  # the second piece takes the standard path
    document = snapshot_envelope(objects, date=datetime(2025, 3, 14, 9, 26, tzinfo=ZURICH))
    pieces = list(render_pieces(document))
    assert len(pieces) == 1 + 4 + 3 + 1  # head, 4 pieces of resources, 3 commas between them, tail
    assert b"".join(pieces) == render(document) == stdlib_render(document)
    objects[7] = {**objects[7], "quotas": quotas(math.nan)}
    with pytest.raises(ValueError):
        render(snapshot_envelope(objects, date=datetime(2025, 3, 14, 9, 26, tzinfo=ZURICH)))


def test_rendered_objects_give_the_bytes_of_render_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    """The cache renders each storage object once; a regeneration joins what it holds with what changed."""
    monkeypatch.setattr(envelope_module, "PIECE_RESOURCES", 3)
    objects = [map_resource(raw, MappingSettings()) for raw in generate_resources(10, seed=5)]
    objects[4] = {**objects[4], "quotas": quotas(1e-05)}  # written by the standard library
    objects[6] = {**objects[6], "quotas": quotas(2**70)}  # refused by orjson
    cache = RenderedObjects()
    date = datetime(2025, 3, 14, 9, 26, tzinfo=ZURICH)
    first = cache.prepare(snapshot_envelope(objects, date=date))
    assert first is not None and len(cache) == 10
    assert b"".join(first.pieces()) == render(snapshot_envelope(objects, date=date))
    assert len(list(first.pieces())) == 1 + 4 + 3 + 1
    calls: list[int] = []
    render_each = envelope_module._render_each
    monkeypatch.setattr(envelope_module, "_render_each", lambda fresh: calls.append(len(fresh)) or render_each(fresh))
    later = datetime(2025, 3, 14, 9, 27, tzinfo=ZURICH)
    same = cache.prepare(snapshot_envelope(objects, date=later))
    assert same is not None and same.key == first.key and calls == [0]  # the date is not content
    changed = [*objects[:2], {**objects[2], "name": "renamed"}, *objects[3:9]]  # one changed, the last one gone
    prepared = cache.prepare(snapshot_envelope(changed, date=later))
    assert prepared is not None and calls == [0, 1] and len(cache) == 9
    assert prepared.key != first.key
    assert (
        b"".join(prepared.pieces())
        == render(snapshot_envelope(changed, date=later))
        == stdlib_render(snapshot_envelope(changed, date=later))
    )
    swapped = [changed[1], changed[0], *changed[2:]]
    again = cache.prepare(snapshot_envelope(swapped, date=later))
    assert again is not None and again.key != prepared.key  # order matters


def test_rendered_objects_leave_what_they_do_not_render_to_the_caller() -> None:
    date = datetime(2025, 1, 1, tzinfo=UTC)
    cache = RenderedObjects()
    assert cache.prepare(snapshot_envelope([], date=date)) is None
    assert cache.prepare(snapshot_envelope([storage_object(quotas=quotas(math.nan))], date=date)) is None
    document = snapshot_envelope([resource()], date=date)
    document["meta"]["appVersion"] = '\n    "storageResources": []'
    prepared = cache.prepare(document)  # the new line is escaped in the string: the layout is the envelope's
    assert prepared is not None and b"".join(prepared.pieces()) == stdlib_render(document)


def test_a_date_that_looks_like_the_resources_key_is_written_as_is() -> None:
    document = snapshot_envelope([resource()], date=datetime(2025, 1, 1, tzinfo=UTC))
    document["meta"]["date"] = '"storageResources": []'
    assert_same_as_stdlib(document)
    document["meta"]["appVersion"] = '\n    "storageResources": []'
    assert_same_as_stdlib(document)


def test_values_orjson_refuses_are_still_written() -> None:
    date = datetime(2025, 1, 1, tzinfo=UTC)
    assert_same_as_stdlib(order_envelope(storage_object(quotas=quotas(2**70)), date=date))
    assert_same_as_stdlib(order_envelope({"deep": [[[[[[[[[[]]]]]]]]]], "big": -(2**64)}, date=date))


def test_lone_surrogates_are_refused() -> None:
    with pytest.raises(UnicodeEncodeError):
        render(order_envelope({"name": "\ud800"}, date=datetime(2025, 1, 1, tzinfo=UTC)))


JSON_LEAVES = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.floats(min_value=-1e-3, max_value=1e-3)
    | st.text()
)
JSON_VALUES = st.recursive(
    JSON_LEAVES,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=10,
)


@settings(max_examples=300, deadline=None)
@given(
    quota_values=st.lists(st.floats() | st.floats(min_value=-1e-3, max_value=1e-3) | st.integers(), max_size=4),
    item=st.dictionaries(st.text(max_size=8), JSON_VALUES, max_size=4),
    name=st.text(),
)
def test_storage_shaped_documents_are_byte_identical(quota_values: list[Any], item: dict[str, Any], name: str) -> None:
    obj = storage_object(
        quotas=quotas(*quota_values) if quota_values else None,
        target={"targetType": "project", "targetItem": {"name": name, **item}},
    )
    obj["mountPoint"] = {"default": f"/capstor/store/{name}"}
    assert_same_as_stdlib(snapshot_envelope([obj, storage_object()], date=datetime(2025, 1, 1, tzinfo=ZURICH)))


@settings(max_examples=300, deadline=None)
@given(value=JSON_VALUES)
def test_any_other_document_is_byte_identical(value: Any) -> None:
    """Documents not shaped like the mapping's output (tests, ad-hoc tools) take the standard path."""
    assert_same_as_stdlib(order_envelope({"value": value}, date=datetime(2025, 1, 1, tzinfo=UTC)))
    assert_same_as_stdlib(snapshot_envelope([{"quotas": value}], date=datetime(2025, 1, 1, tzinfo=UTC)))
    assert_same_as_stdlib(snapshot_envelope([{"quotas": None, "target": value}], date=datetime(2025, 1, 1, tzinfo=UTC)))


@pytest.mark.parametrize(
    "value",
    [
        *(0.0, -0.0, 1e-4, -1e-4, 9.9e-5, 1e-5, -3e-7, math.nan, math.inf, -math.inf, 5.5, 1e300, 2**70),
        *("x", None, True, {"a": 1e-5}, {"a": 2.5}, {"a": {"b": 1}}, {1: "x"}, [1], [1e-5]),
    ],
)
def test_the_check_of_an_order_files_resource_agrees_with_the_full_one(value: Any) -> None:
    """An order file's resource is checked directly (`_few_written_the_same`); it never vouches for what the full
    check refuses, and the bytes are the standard library's either way."""
    date = datetime(2025, 1, 1, tzinfo=UTC)
    for obj in (
        storage_object(quotas=quotas(value)),
        storage_object(target={"targetType": "user", "targetItem": {"itemId": "x", "primaryProject": value}}),
        storage_object(target={"targetType": "project", "targetItem": {"itemId": "x", "unixGid": value}}),
    ):
        if envelope_module._few_written_the_same([obj]):
            assert envelope_module._orjson_writes_the_same([obj, obj, obj])  # the full check, on 3 resources
        document = order_envelope(obj, date=date)
        try:
            expected = stdlib_render(document)
        except ValueError:
            with pytest.raises(ValueError):
                render(document)
        else:
            assert render(document) == expected
