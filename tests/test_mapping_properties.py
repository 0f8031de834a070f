"""Property tests: whatever JSON Waldur sends, the mapping returns a writable object or raises InvalidResource."""

from __future__ import annotations

import json
import math
import uuid
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cscs_storage_daemon.mapping import InvalidResource, MappingSettings, StorageObject, map_resource, uuid_hex
from cscs_storage_daemon.mirror import kept_fields
from cscs_storage_daemon.numbers import is_numeric_string, parse_number, uuid5_oid

BOUNDED = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])

TOP_KEYS = [
    "itemId",
    "status",
    "mountPoint",
    "permission",
    "quotas",
    "target",
    "storageSystem",
    "storageFileSystem",
    "storageDataType",
    "parentItemId",
]
RESOURCE_KEYS = [
    "uuid",
    "slug",
    "state",
    "offering_slug",
    "customer_slug",
    "project_slug",
    "limits",
    "attributes",
    "options",
    "backend_metadata",
]
NESTED_KEYS = {
    "attributes": ["permissions", "storage_data_type", "name"],
    "options": [
        "permissions",
        "soft_quota_space",
        "hard_quota_space",
        "soft_quota_inodes",
        "hard_quota_inodes",
        "soft_quota_indoes",
        "hard_quota_indoes",
    ],
    "limits": ["storage", "disk", "cpu"],
    "backend_metadata": ["project_item", "user_item"],
}
SETTINGS = [
    MappingSettings(),
    MappingSettings(use_mock_target_items=True, storage_file_system="gpfs"),
    MappingSettings(storage_component="disk", unit_factor=0.001),
    MappingSettings(inode_soft_coefficient=1.1, inode_hard_coefficient=1.2, inode_base_multiplier=5e5),
]

# what json.loads can produce (it accepts NaN / Infinity, and lone surrogates through \ud800 escapes)
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(10**400), max_value=10**400)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.text(alphabet=st.characters(codec=None), max_size=6)
    | st.sampled_from(
        ["", ".", "..", "/", "100", "-1", "1e3", "nan", "0700", "775", "store", "users", "\x00", "\ud800"]
    )
)
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=12,
)
numbers_or_json = (
    st.integers(-5, 10**7)
    | st.floats(-1e3, 1e18)
    | st.from_regex(r"-?([0-9]{1,4}(\.[0-9]{1,3})?|\.[0-9]{1,3})", fullmatch=True)
    | st.sampled_from(["0700", "2770", "775", "store", "archive", "scratch", "Users", ""])
    | json_values
)


def valid_resource() -> dict[str, Any]:
    return {
        "uuid": "85d387f283c957a4a86671549302c442",
        "slug": "climate-sim",
        "state": "OK",
        "offering_slug": "capstor",
        "customer_slug": "university",
        "project_slug": "physics-dept",
        "limits": {"storage": 100, "disk": 3},
        "attributes": {"permissions": "2770", "storage_data_type": "users"},
        "options": {"soft_quota_space": 80, "hard_quota_indoes": 5},
        "backend_metadata": {"user_item": {"itemId": "x", "unixUid": 1}},
    }


@st.composite
def nearly_valid_resources(draw: st.DrawFn) -> dict[str, Any]:
    resource = valid_resource()
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        choice = draw(st.integers(0, 9))
        if choice < 7:  # mostly the nested values, where most rules live
            top = draw(st.sampled_from(sorted(NESTED_KEYS)))
            nested = dict(resource[top]) if isinstance(resource.get(top), dict) else {}
            nested[draw(st.sampled_from(NESTED_KEYS[top]))] = draw(numbers_or_json)
            resource[top] = nested
        elif choice < 9:
            resource[draw(st.sampled_from(RESOURCE_KEYS))] = draw(json_values)
        else:
            resource.pop(draw(st.sampled_from(RESOURCE_KEYS)), None)
    return resource


arbitrary_resources = st.dictionaries(st.sampled_from(RESOURCE_KEYS) | st.text(max_size=5), json_values, max_size=10)
resources = arbitrary_resources | nearly_valid_resources()


def check_output(result: dict[str, Any]) -> None:
    text = json.dumps(result, allow_nan=False, ensure_ascii=False, indent=2)
    text.encode("utf-8")  # the file is written as UTF-8
    # A StorageObject is handed to orjson unchecked: orjson must write it as json.dumps does (or refuse it, and the
    # renderer falls back). A plain dict is checked: the mapping makes one only when orjson would write otherwise.
    try:
        by_orjson: bytes | None = orjson.dumps(result, option=orjson.OPT_INDENT_2)
    except TypeError:
        by_orjson = None
    if type(result) is StorageObject:
        assert by_orjson is None or by_orjson == text.encode("utf-8")
    else:
        assert type(result) is dict and by_orjson != text.encode("utf-8")
    assert list(result) == TOP_KEYS
    quotas = result["quotas"]
    assert quotas is None or (isinstance(quotas, list) and len(quotas) == 4)
    if quotas is not None:
        assert [(q["type"], q["enforcementType"]) for q in quotas] == [
            ("space", "soft"),
            ("space", "hard"),
            ("inodes", "soft"),
            ("inodes", "hard"),
        ]
        for quota in quotas:
            assert type(quota["quota"]) is float
            assert math.isfinite(quota["quota"])
        assert quotas[0]["quota"] > 0 or quotas[1]["quota"] > 0
    for segment in result["mountPoint"]["default"].split("/")[1:]:
        assert segment not in ("", ".", "..")
    assert uuid_hex(result["itemId"]) == result["itemId"]


@BOUNDED
@given(resource=resources, mapping_settings=st.sampled_from(SETTINGS))
def test_mapping_returns_writable_object_or_invalid_resource(
    resource: dict[str, Any], mapping_settings: MappingSettings
) -> None:
    warnings: list[tuple[str, dict[str, Any]]] = []
    try:
        result = map_resource(resource, mapping_settings, warn=lambda e, f: warnings.append((e, f)))
    except InvalidResource as error:
        assert error.field
        assert str(error)
        assert error.message
        return
    check_output(result)
    for event, fields in warnings:
        assert isinstance(event, str) and "resource" in fields
        json.dumps(fields)
    # deterministic: the same input maps to the same output
    assert map_resource(resource, mapping_settings) == result


def outcome(resource: dict[str, Any], mapping_settings: MappingSettings) -> tuple[Any, list[Any]]:
    """What mapping `resource` gives: the storage object or the error's (uuid, field, message), and the warnings."""
    warnings: list[Any] = []
    try:
        result: Any = map_resource(resource, mapping_settings, warn=lambda e, f: warnings.append((e, f)))
    except InvalidResource as error:
        result = (error.resource_id, error.field, error.message)
    return result, warnings


@BOUNDED
@given(
    resource=resources,
    extra=st.dictionaries(st.sampled_from(["name", "created", "report", "current_usages", "url"]), json_values),
    mapping_settings=st.sampled_from(SETTINGS),
)
def test_a_resource_cut_down_to_the_fields_the_mirror_keeps_maps_the_same(
    resource: dict[str, Any], extra: dict[str, Any], mapping_settings: MappingSettings
) -> None:
    # The mirror keeps `KEPT_FIELDS` of a resource and maps that: the same object, error and warnings must come out.
    full = {**extra, **resource}
    kept = kept_fields(full)
    assert set(kept) <= set(full)
    assert outcome(kept, mapping_settings) == outcome(full, mapping_settings)


@BOUNDED
@given(resource=nearly_valid_resources(), mapping_settings=st.sampled_from(SETTINGS))
def test_valid_outputs_have_four_float_quotas_or_null(
    resource: dict[str, Any], mapping_settings: MappingSettings
) -> None:
    try:
        result = map_resource(resource, mapping_settings)
    except InvalidResource:
        return
    check_output(result)
    reparsed = json.loads(json.dumps(result, ensure_ascii=False, indent=2))
    assert reparsed == result
    if reparsed["quotas"] is not None:
        assert all(type(q["quota"]) is float for q in reparsed["quotas"])


@BOUNDED
@given(limit=st.one_of(st.integers(min_value=-(10**6), max_value=10**9), st.floats(-1e12, 1e12)))
def test_numeric_limits_follow_the_formula(limit: float) -> None:
    resource = valid_resource() | {"limits": {"storage": limit}, "options": {}}
    result = map_resource(resource, MappingSettings())
    space = float(limit)
    if space <= 0:
        assert result["quotas"] is None
        return
    base = space * 1_000_000.0
    assert [q["quota"] for q in result["quotas"]] == [space, space, float(int(base * 1.33)), float(int(base * 2.0))]


@BOUNDED
@given(text=st.text(max_size=12) | st.from_regex(r"-?([0-9]+(\.[0-9]+)?|\.[0-9]+)", fullmatch=True))
def test_numeric_string_rule(text: str) -> None:
    body = text[1:] if text.startswith("-") else text
    whole, dot, fraction = body.partition(".")
    strict = text.isascii() and (whole.isdigit() or (whole == "" and bool(dot)))
    strict = strict and (fraction.isdigit() if dot else whole.isdigit())
    assert is_numeric_string(text) is strict
    number = parse_number(text)
    assert (number is not None) is strict
    if number is not None:
        assert number == float(text)


@BOUNDED
@given(name=st.text(max_size=40))
def test_uuid5_matches_the_standard_library(name: str) -> None:
    assert uuid5_oid(name) == str(uuid.uuid5(uuid.NAMESPACE_OID, name))


@BOUNDED
@given(value=st.uuids(), upper=st.booleans(), dashed=st.booleans())
def test_uuid_hex_normalises(value: uuid.UUID, upper: bool, dashed: bool) -> None:
    text = str(value) if dashed else value.hex
    assert uuid_hex(text.upper() if upper else text) == value.hex
