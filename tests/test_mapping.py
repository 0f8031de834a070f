"""Storage mapping (spec storage-json §1-§3, §6): every golden case, plus the rules the golden file cannot show."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import pickle
import subprocess
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from cscs_storage_daemon.envelope import render, snapshot_envelope
from cscs_storage_daemon.mapping import (
    InvalidResource,
    MappingSettings,
    StorageObject,
    apply_order_changes,
    deterministic_uuid,
    effective_data_type,
    map_resource,
    status_of,
    target_type_of,
    uuid_hex,
)
from cscs_storage_daemon.numbers import is_numeric_string, parse_number, unix_gid, unix_uid, uuid5_oid

GOLDEN = Path(os.environ.get("CSCS_GOLDEN_DIR", "/work/shared/golden")) / "storage_cases.jsonl"
if not GOLDEN.is_file():  # a checkout without the shared golden files
    pytest.skip(f"golden file {GOLDEN} not available", allow_module_level=True)

CASES: list[dict[str, Any]] = [json.loads(line) for line in GOLDEN.read_text("utf-8").splitlines() if line.strip()]

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


def settings_of(case: dict[str, Any]) -> MappingSettings:
    return MappingSettings.from_backend(case["settings"]["backend_settings"], case["settings"]["backend_components"])


def as_written(obj: Any) -> Any:
    """Serialise the way the daemon writes files and parse back."""
    return json.loads(json.dumps(obj, ensure_ascii=False, indent=2))


def assert_same_key_order(actual: Any, expected: Any, path: str = "$") -> None:
    if isinstance(expected, dict):
        assert isinstance(actual, dict), path
        assert list(actual) == list(expected), f"key order at {path}"
        for key in expected:
            assert_same_key_order(actual[key], expected[key], f"{path}.{key}")
    elif isinstance(expected, list):
        assert isinstance(actual, list), path
        assert len(actual) == len(expected), path
        for index, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_same_key_order(a, e, f"{path}[{index}]")


def test_golden_file_is_complete() -> None:
    names = [case["name"] for case in CASES]
    assert len(names) == len(set(names)) == 59
    assert sum("expected" in case for case in CASES) == 42
    assert sum("expected_error" in case for case in CASES) == 17


@pytest.mark.parametrize("case", [c for c in CASES if "expected" in c], ids=lambda c: c["name"])
def test_golden_expected(case: dict[str, Any]) -> None:
    result = as_written(map_resource(case["waldur_resource"], settings_of(case)))
    expected = case["expected"]
    assert result == expected
    assert_same_key_order(result, expected)
    assert list(result) == TOP_KEYS
    if expected["quotas"] is None:
        assert result["quotas"] is None
    else:
        assert len(result["quotas"]) == 4
        for quota in result["quotas"]:
            assert type(quota["quota"]) is float, quota


@pytest.mark.parametrize("case", [c for c in CASES if "expected_error" in c], ids=lambda c: c["name"])
def test_golden_expected_error(case: dict[str, Any]) -> None:
    resource = case["waldur_resource"]
    with pytest.raises(InvalidResource) as caught:
        map_resource(resource, settings_of(case))
    error = caught.value
    message = str(error)
    assert case["expected_error"]["contains"].lower() in message.lower()
    assert error.field == case["expected_error"]["field"]
    raw_uuid = resource.get("uuid")
    name = raw_uuid if isinstance(raw_uuid, str) and raw_uuid else resource["slug"]
    assert name in message
    assert error.resource_id == name


# ------------------------------------------------------------------------------------------------ unit tests


def base_resource(**changes: Any) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "uuid": "85d387f283c957a4a86671549302c442",
        "slug": "climate-sim",
        "state": "OK",
        "offering_slug": "capstor",
        "customer_slug": "university",
        "project_slug": "physics-dept",
        "limits": {"storage": 100},
        "attributes": {"permissions": "2770", "storage_data_type": "store"},
        "options": {},
        "backend_metadata": {},
    }
    resource.update(changes)
    return resource


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, event: str, fields: dict[str, Any]) -> None:
        self.events.append((event, fields))

    def fields(self, event: str) -> list[dict[str, Any]]:
        return [fields for name, fields in self.events if name == event]


def quotas_of(result: dict[str, Any]) -> list[float] | None:
    return None if result["quotas"] is None else [q["quota"] for q in result["quotas"]]


def invalid(resource: Any, settings: MappingSettings | None = None) -> InvalidResource:
    with pytest.raises(InvalidResource) as caught:
        map_resource(resource, settings or MappingSettings())
    return caught.value


def test_unknown_data_type_warns_naming_resource_and_value() -> None:
    warn = Recorder()
    result = map_resource(base_resource(attributes={"storage_data_type": "Scratchpad"}), MappingSettings(), warn=warn)
    assert result["target"]["targetType"] == "project"
    [fields] = warn.fields("storage_data_type_unknown")
    assert "Scratchpad" in fields["value"]
    assert fields["resource"] == "85d387f283c957a4a86671549302c442"


@pytest.mark.parametrize("data_type", ["store", "ARCHIVE", "users", "Scratch"])
def test_known_data_types_do_not_warn(data_type: str) -> None:
    warn = Recorder()
    map_resource(base_resource(attributes={"storage_data_type": data_type}), MappingSettings(), warn=warn)
    assert warn.events == []


def test_non_numeric_override_is_ignored_with_a_warning() -> None:
    warn = Recorder()
    options = {"soft_quota_space": "lots", "hard_quota_space": True, "hard_quota_inodes": "1e3"}
    result = map_resource(base_resource(options=options), MappingSettings(), warn=warn)
    assert quotas_of(result) == [100.0, 100.0, 133000000.0, 200000000.0]
    ignored = {f["field"]: f for f in warn.fields("storage_option_ignored")}
    assert set(ignored) == {"options.soft_quota_space", "options.hard_quota_space", "options.hard_quota_inodes"}
    assert "lots" in ignored["options.soft_quota_space"]["value"]
    assert "boolean" in ignored["options.hard_quota_space"]["reason"]
    assert all(f["resource"] == "85d387f283c957a4a86671549302c442" for f in ignored.values())


def test_non_string_option_permission_is_ignored_with_a_warning() -> None:
    warn = Recorder()
    result = map_resource(base_resource(options={"permissions": 700}), MappingSettings(), warn=warn)
    assert result["permission"]["value"] == "2770"
    [fields] = warn.fields("storage_option_ignored")
    assert fields["field"] == "options.permissions"


def test_empty_option_permission_falls_back_to_attributes() -> None:
    warn = Recorder()
    result = map_resource(base_resource(options={"permissions": "", "soft_quota_space": None}), MappingSettings())
    assert result["permission"]["value"] == "2770"
    assert warn.events == []


def test_invalid_attribute_permission_type_is_invalid_even_with_an_option_override() -> None:
    resource = base_resource(attributes={"permissions": 775}, options={"permissions": "0700"})
    assert invalid(resource).field == "attributes.permissions"


@pytest.mark.parametrize("value", ["775\n", "77", "07777", "0x77", "٧٧٥", " 775", "7a5", "rwx"])
def test_permission_must_be_exactly_3_to_4_octal_digits(value: str) -> None:
    error = invalid(base_resource(attributes={"permissions": value}))
    assert error.field == "attributes.permissions"
    assert "permissions" in str(error)


@pytest.mark.parametrize("value", ["000", "777", "0700", "1777", "7777"])
def test_valid_permissions(value: str) -> None:
    assert map_resource(base_resource(options={"permissions": value}), MappingSettings())["permission"] == {
        "permissionType": "octal",
        "value": value,
    }


def test_inode_overrides_correct_spelling_wins_when_valid_else_legacy() -> None:
    warn = Recorder()
    options = {
        "soft_quota_inodes": "-5",  # negative: ignored with a warning -> legacy spelling used
        "soft_quota_indoes": "123.9",  # numeric string, truncated
        "hard_quota_inodes": 2000.7,  # valid -> wins over the legacy spelling
        "hard_quota_indoes": 1,
    }
    result = map_resource(base_resource(options=options), MappingSettings(), warn=warn)
    assert quotas_of(result) == [100.0, 100.0, 123.0, 2000.0]
    [fields] = warn.fields("storage_option_ignored")
    assert fields["field"] == "options.soft_quota_inodes"
    assert fields["reason"] == "negative"


def test_negative_inode_overrides_are_ignored() -> None:
    warn = Recorder()
    options = {"soft_quota_indoes": -1, "hard_quota_inodes": -0.5}
    result = map_resource(base_resource(options=options), MappingSettings(), warn=warn)
    assert quotas_of(result) == [100.0, 100.0, 133000000.0, 200000000.0]
    assert len(warn.fields("storage_option_ignored")) == 2


def test_null_overrides_mean_not_set_without_warning() -> None:
    warn = Recorder()
    options = {key: None for key in ("soft_quota_space", "hard_quota_space", "soft_quota_inodes", "permissions")}
    result = map_resource(base_resource(options=options), MappingSettings(), warn=warn)
    assert quotas_of(result) == [100.0, 100.0, 133000000.0, 200000000.0]
    assert warn.events == []


def test_space_override_must_be_finite() -> None:
    warn = Recorder()
    result = map_resource(base_resource(options={"hard_quota_space": float("inf")}), MappingSettings(), warn=warn)
    assert quotas_of(result) == [100.0, 100.0, 133000000.0, 200000000.0]
    assert warn.fields("storage_option_ignored")[0]["reason"] == "not a finite number"


def test_positive_space_override_with_zero_limit_gives_four_quotas() -> None:
    result = map_resource(base_resource(limits={"storage": 0}, options={"soft_quota_space": "1"}), MappingSettings())
    assert quotas_of(result) == [1.0, 0.0, 0.0, 0.0]
    assert all(type(q) is float for q in quotas_of(result) or [])


@pytest.mark.parametrize("limits", [None, {}, {"storage": None}, {"storage": 0}, {"storage": "-3"}, {"cpu": 5}])
def test_quotas_null_when_space_not_positive(limits: Any) -> None:
    result = map_resource(base_resource(limits=limits), MappingSettings())
    assert result["quotas"] is None
    assert '"quotas": null' in json.dumps(result)


def test_inode_truncation_uses_double_arithmetic() -> None:
    result = map_resource(base_resource(limits={"storage": 4.1}), MappingSettings())
    assert quotas_of(result) == [4.1, 4.1, 5453000.0, 8199999.0]


def test_unit_factor_applied_unrounded() -> None:
    settings = MappingSettings(unit_factor=0.1)
    result = map_resource(base_resource(limits={"storage": 3}), settings)
    assert result["quotas"][0]["quota"] == 3 * 0.1 == 0.30000000000000004


@pytest.mark.parametrize(
    "limit", [True, False, "nan", "inf", "1e3", "1_000", " 12 ", "12\n", "١٢", "", [1], {"v": 1}, float("nan")]
)
def test_limit_not_a_finite_number_is_invalid(limit: Any) -> None:
    error = invalid(base_resource(limits={"storage": limit}))
    assert error.field == "limits.storage"
    assert "limit" in str(error)


@pytest.mark.parametrize("limit", [10**400, "9" * 400, 1e303, float("inf")])
def test_limit_too_large_is_invalid(limit: Any) -> None:
    assert invalid(base_resource(limits={"storage": limit})).field == "limits.storage"


def test_limit_field_names_the_configured_component() -> None:
    settings = MappingSettings.from_backend({}, {"disk": {"unit_factor": 2}})
    assert invalid(base_resource(limits={"disk": "x"}), settings).field == "limits.disk"


@pytest.mark.parametrize(("limit", "space"), [("12.5", 12.5), (".5", 0.5), ("-0.5", -0.5), ("007", 7.0), (3, 3.0)])
def test_numeric_limits(limit: Any, space: float) -> None:
    result = map_resource(base_resource(limits={"storage": limit}, options={"hard_quota_space": 1}), MappingSettings())
    assert result["quotas"][0]["quota"] == space
    assert type(result["quotas"][0]["quota"]) is float


@pytest.mark.parametrize("key", ["attributes", "options", "limits", "backend_metadata"])
@pytest.mark.parametrize("value", [[], "x", 3, True])
def test_nested_objects_must_be_objects(key: str, value: Any) -> None:
    error = invalid(base_resource(**{key: value}))
    assert error.field == key
    assert key in str(error)


@pytest.mark.parametrize("key", ["attributes", "options", "limits", "backend_metadata"])
def test_nested_objects_null_means_empty(key: str) -> None:
    resource = base_resource(**{key: None})
    assert as_written(map_resource(resource, MappingSettings()))["itemId"] == "85d387f283c957a4a86671549302c442"


@pytest.mark.parametrize("key", ["uuid", "slug", "offering_slug", "customer_slug", "project_slug"])
@pytest.mark.parametrize("value", [None, "", 1, ["a"], {"a": 1}, True])
def test_required_strings(key: str, value: Any) -> None:
    error = invalid(base_resource(**{key: value}))
    assert error.field == key
    assert key in str(error)


@pytest.mark.parametrize("key", ["slug", "offering_slug", "customer_slug", "project_slug"])
@pytest.mark.parametrize("value", [".", "..", "a/b", "/", "a\x00b", "tab\there", "del\x7f", "nel\x85", "\x9f"])
def test_slug_rule(key: str, value: str) -> None:
    error = invalid(base_resource(**{key: value}))
    assert error.field == key
    assert "\x00" not in str(error) and "\n" not in str(error)


@pytest.mark.parametrize("value", [".", "..", "a/b", "x\ny", "\x00"])
def test_data_type_follows_the_slug_rule(value: str) -> None:
    assert invalid(base_resource(attributes={"storage_data_type": value})).field == "attributes.storage_data_type"


@pytest.mark.parametrize("value", ["a\u00a0b", "zero\u200bwidth", "...", ".x", "x.", "a..b", "ünï"])
def test_non_control_characters_and_dots_are_fine(value: str) -> None:
    result = map_resource(base_resource(slug=value, attributes={"storage_data_type": value}), MappingSettings())
    assert result["mountPoint"]["default"] == f"/capstor/{value.lower()}/university/physics-dept/{value}"


def test_lone_surrogate_slug_is_invalid_not_a_crash() -> None:
    assert invalid(base_resource(slug="a\ud800b")).field == "slug"


@pytest.mark.parametrize(
    ("raw", "item_id"),
    [
        ("85D387F2-83C9-57A4-A866-71549302C442", "85d387f283c957a4a86671549302c442"),
        ("85d387f283c957a4a86671549302c442", "85d387f283c957a4a86671549302c442"),
        ("85d387f2-83c957a4a86671549302c442", "85d387f283c957a4a86671549302c442"),
    ],
)
def test_uuid_normalised(raw: str, item_id: str) -> None:
    assert map_resource(base_resource(uuid=raw), MappingSettings())["itemId"] == item_id


@pytest.mark.parametrize("raw", ["85d387f283c957a4a86671549302c44", "85d387f283c957a4a86671549302c44g", "{85d3}"])
def test_invalid_uuid_names_the_slug(raw: str) -> None:
    error = invalid(base_resource(uuid=raw))
    assert error.field == "uuid"
    assert error.resource_id == "climate-sim"
    assert "climate-sim" in str(error)


def test_error_without_uuid_or_slug_still_has_a_name() -> None:
    error = invalid({"slug": None})
    assert error.field == "uuid"
    assert error.resource_id == "<unknown>"


def test_not_an_object() -> None:
    error = invalid(["not", "a", "resource"])
    assert "expected a JSON object" in str(error)


def test_invalid_resource_attributes_and_pickle() -> None:
    error = InvalidResource("abc", "attributes.permissions", "permissions must be a string")
    assert isinstance(error, ValueError)
    assert str(error) == "invalid resource abc: field attributes.permissions: permissions must be a string"
    clone = pickle.loads(pickle.dumps(error))
    assert (clone.resource_id, clone.field, clone.message) == (error.resource_id, error.field, error.message)


def test_error_message_escapes_control_characters_in_names() -> None:
    error = invalid({"slug": "evil\nlog line"})
    assert "\n" not in str(error)
    assert error.resource_id == "evil\nlog line"


# ---------------------------------------------------------------------------------------------- target items


def n_by_hand(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") % 10000


def test_generated_ids_are_the_sha256_formula() -> None:
    assert unix_gid("climate-sim") == 30000 + n_by_hand("climate-sim") == 33708
    assert unix_uid("home-alice") == 20000 + n_by_hand("home-alice") == 28616
    assert unix_gid("") == 30000 + n_by_hand("")
    user = map_resource(
        base_resource(slug="scratch-bob", attributes={"storage_data_type": "scratch"}), MappingSettings()
    )
    item = user["target"]["targetItem"]
    assert item["unixUid"] == 20000 + n_by_hand("scratch-bob")
    assert item["primaryProject"]["unixGid"] == 30000 + n_by_hand("physics-dept")


def test_generated_ids_do_not_depend_on_the_process() -> None:
    code = (
        "import json;from cscs_storage_daemon.mapping import map_resource, MappingSettings;"
        f"print(json.dumps(map_resource({base_resource(attributes={'storage_data_type': 'users'})!r}, "
        "MappingSettings())))"
    )
    outputs = set()
    for seed in ("0", "1", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        run = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, cwd=Path.cwd()
        )
        outputs.add(run.stdout)
    assert len(outputs) == 1
    here = map_resource(base_resource(attributes={"storage_data_type": "users"}), MappingSettings())
    assert json.loads(outputs.pop()) == here


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("storage_system:capstor", "4b4a996a-8d6b-556d-ad60-202cefa6ecc3"),
        ("storage_system:vast", "d37943e8-04d0-572c-ae9b-859249b00cb4"),
        ("storage_file_system:lustre", "a04204cf-e3bf-5eb6-8323-0f3121afdd3b"),
        ("storage_data_type:scratch", "0368ba53-7bcd-5800-8a9f-e7867c0a4d53"),
        ("project:climate-sim", "7741a894-5020-532e-bcb2-f7bf347ac8bd"),
    ],
)
def test_deterministic_uuid_reference_values(name: str, expected: str) -> None:
    scope, _, value = name.partition(":")
    assert deterministic_uuid(scope, value) == expected == str(uuid.uuid5(uuid.NAMESPACE_OID, name))
    assert uuid5_oid(name) == expected


def test_metadata_item_used_as_a_copy() -> None:
    item: dict[str, Any] = {"itemId": "x", "unixGid": 31337, "nested": {"list": [1, 2.5, None, True, "ü"]}}
    resource = base_resource(backend_metadata={"project_item": item})
    result = map_resource(resource, MappingSettings())
    assert result["target"]["targetItem"] == item
    result["target"]["targetItem"]["nested"]["list"].append(3)
    assert item["nested"]["list"] == [1, 2.5, None, True, "ü"]


@pytest.mark.parametrize(
    "item", [{"unixGid": float("nan")}, {"deep": [float("inf")]}, {1: "int key"}, {"s": "\ud800"}, {"set": {1}}]
)
def test_metadata_item_that_is_not_strict_json_gives_generated_item(item: dict[Any, Any]) -> None:
    warn = Recorder()
    result = map_resource(base_resource(backend_metadata={"project_item": item}), MappingSettings(), warn=warn)
    assert result["target"]["targetItem"]["unixGid"] == 33708
    assert warn.fields("storage_target_item_ignored")
    json.dumps(result, allow_nan=False, ensure_ascii=False).encode("utf-8")


def test_metadata_item_too_deep_gives_generated_item() -> None:
    deep: Any = 1
    for _ in range(100):
        deep = {"d": deep}
    result = map_resource(base_resource(backend_metadata={"project_item": deep}), MappingSettings())
    assert result["target"]["targetItem"]["name"] == "climate-sim"


def test_empty_metadata_item_and_mock_flag() -> None:
    item = {"itemId": "from-metadata"}
    warn = Recorder()
    empty = map_resource(base_resource(backend_metadata={"project_item": {}}), MappingSettings(), warn=warn)
    assert empty["target"]["targetItem"]["unixGid"] == 33708
    assert warn.events == []
    mocked = map_resource(
        base_resource(backend_metadata={"project_item": item}), MappingSettings(use_mock_target_items=True)
    )
    assert mocked["target"]["targetItem"]["itemId"] == "7741a894-5020-532e-bcb2-f7bf347ac8bd"


def test_results_share_only_the_objects_of_a_value() -> None:
    """Each result is a fresh dict with its own mount point and target; the objects that follow from one value
    (offering, file system, data type, permission, quotas) are shared between results, which is what keeps 100 000
    of them small: nothing may change those in place."""
    first = map_resource(base_resource(), MappingSettings())
    second = map_resource(base_resource(), MappingSettings())
    assert first == second and first is not second
    for key in ("mountPoint", "target"):
        assert first[key] is not second[key]
    assert first["target"]["targetItem"] is not second["target"]["targetItem"]
    for key in ("permission", "quotas", "storageSystem", "storageFileSystem", "storageDataType"):
        assert first[key] is second[key]
    changed = {**first, "status": "removing"}  # how the processor marks a terminate order's object
    assert changed["status"] == "removing" and first["status"] == "active"
    assert map_resource(base_resource(), MappingSettings()) == second


def test_a_mapped_object_is_read_only() -> None:
    """The renderer trusts a `StorageObject` without looking inside: nothing may change it after the mapping."""
    result = map_resource(base_resource(), MappingSettings())
    assert type(result) is StorageObject
    for change in (
        lambda: result.__setitem__("status", "removing"),
        lambda: result.__delitem__("status"),
        lambda: result.update(status="removing"),
        lambda: result.setdefault("extra", 1.0),
        lambda: result.pop("status"),
        lambda: result.popitem(),
        lambda: result.clear(),
    ):
        with pytest.raises(TypeError, match="read-only"):
            change()
    with pytest.raises(TypeError, match="read-only"):
        result |= {"status": "removing"}
    assert result["status"] == "active" and len(result) == 10
    copy_ = dict(result)
    copy_["status"] = "removing"
    assert type(copy_) is dict and result["status"] == "active"
    for clone in (copy.copy(result), copy.deepcopy(result), pickle.loads(pickle.dumps(result))):
        assert type(clone) is StorageObject and clone == result


@pytest.mark.parametrize(
    ("changes", "trusted"),
    [
        ({"limits": {"storage": 50}}, True),
        ({"limits": {"storage": 0.00001}}, False),  # 1e-05 TB: orjson writes 0.00001 where json.dumps writes 1e-05
        ({"limits": {"storage": 0}}, True),  # quotas null
        ({"options": {"soft_quota_space": 2e-6}}, False),
        ({"backend_metadata": {"project_item": {"itemId": "x", "weight": 2.5}}}, True),
        ({"backend_metadata": {"project_item": {"itemId": "x", "nested": [{"weight": 3e-7}]}}}, False),
    ],
)
def test_only_objects_whose_floats_write_alike_are_trusted(changes: dict[str, Any], trusted: bool) -> None:
    result = map_resource(base_resource(**changes), MappingSettings())
    assert (type(result) is StorageObject) is trusted
    assert type(result) in (StorageObject, dict)
    expected = json.dumps(result, ensure_ascii=False, indent=2).encode()
    assert (orjson.dumps(result, option=orjson.OPT_INDENT_2) == expected) is trusted
    date = datetime(2025, 1, 1, tzinfo=UTC)
    assert (
        render(snapshot_envelope([result], date=date))
        == (json.dumps(snapshot_envelope([result], date=date), ensure_ascii=False, indent=2) + "\n").encode()
    )


def test_mapping_does_not_modify_its_input() -> None:
    resource = base_resource(options={"permissions": "0700", "soft_quota_indoes": "5"})
    snapshot = copy.deepcopy(resource)
    map_resource(resource, MappingSettings())
    assert resource == snapshot


# -------------------------------------------------------------------------------------------------- helpers


def test_status_of() -> None:
    table = {"Creating": "pending", "OK": "active", "Erred": "error", "Terminating": "removing"}
    table |= {"Terminated": "removed", "Updating": "pending", "ok": "pending", "Paused": "pending"}
    for state, status in table.items():
        assert status_of({"state": state}) == status
    for odd in (None, 3, ["OK"], {"OK": 1}):
        assert status_of({"state": odd}) == "pending"
    assert status_of({}) == "pending"


def test_effective_data_type() -> None:
    assert effective_data_type({"attributes": {"storage_data_type": "Users"}}) == "users"
    assert effective_data_type({"attributes": {"storage_data_type": ""}}) == "store"
    assert effective_data_type({"attributes": {"storage_data_type": ["x"]}}) == "store"
    assert effective_data_type({"attributes": None}) == "store"
    assert effective_data_type({"attributes": "junk"}) == "store"
    assert effective_data_type({}) == "store"
    assert [target_type_of(t) for t in ("STORE", "archive", "Users", "scratch", "x")] == [
        "project",
        "project",
        "user",
        "user",
        "project",
    ]


def test_uuid_hex() -> None:
    value = uuid.UUID("85d387f2-83c9-57a4-a866-71549302c442")
    assert uuid_hex(str(value)) == value.hex
    assert uuid_hex(str(value).upper()) == value.hex
    assert uuid_hex(value.hex.upper()) == value.hex
    assert uuid_hex(value) == value.hex
    assert uuid_hex("-" + value.hex + "--") == value.hex
    for bad in (None, 3, "", value.hex[:-1], value.hex + "0", value.hex[:-1] + "g", " " + value.hex[1:], "٣" * 32):
        assert uuid_hex(bad) is None


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ("12", True),
        ("-12", True),
        ("12.5", True),
        (".5", True),
        ("-.5", True),
        ("0", True),
        ("12.", False),
        ("+1", False),
        ("1e3", False),
        ("nan", False),
        ("inf", False),
        ("1_000", False),
        (" 12 ", False),
        ("12\n", False),
        ("١٢", False),
        ("", False),
        ("-", False),
        (".", False),
    ],
)
def test_numeric_strings(text: str, ok: bool) -> None:
    assert is_numeric_string(text) is ok
    assert (parse_number(text) is not None) is ok


def test_parse_number_types() -> None:
    assert parse_number(True) is None
    assert parse_number(False) is None
    assert parse_number(None) is None
    assert parse_number(3) == 3.0 and type(parse_number(3)) is float
    assert parse_number(10**400) == float("inf")
    assert parse_number(-(10**400)) == float("-inf")


# ------------------------------------------------------------------------------------------------- settings


def test_settings_defaults() -> None:
    settings = MappingSettings.from_backend({"output_directory": "/x"}, {"storage": {"measured_unit": "TB"}})
    assert settings == MappingSettings()
    assert settings.unit_factor == 1.0


def test_settings_from_backend() -> None:
    settings = MappingSettings.from_backend(
        {
            "output_directory": "/x",
            "storage_file_system": "gpfs",
            "inode_soft_coefficient": 1,
            "inode_hard_coefficient": 3,
            "inode_base_multiplier": 500000,
            "use_mock_target_items": True,
            "timezone": "Europe/Zurich",
        },
        {"disk": {"unit_factor": 0.001}},
    )
    assert settings == MappingSettings("gpfs", 1.0, 3.0, 500000.0, True, "disk", 0.001)
    assert type(settings.inode_base_multiplier) is float


def test_settings_storage_component_choice() -> None:
    both = {"archive": {"unit_factor": 5}, "storage": {"unit_factor": 2}}
    assert MappingSettings.from_backend({}, both).storage_component == "storage"
    assert MappingSettings.from_backend({}, both).unit_factor == 2.0
    with pytest.raises(ValueError, match="storage"):
        MappingSettings.from_backend({}, {"a": {}, "b": {}})
    with pytest.raises(ValueError):
        MappingSettings.from_backend({}, {})


# ------------------------------------------------------------------------------------------- update orders


def test_apply_order_changes_replaces_limits_and_merges_options() -> None:
    resource = base_resource(options={"permissions": "0700", "hard_quota_space": 50})
    snapshot = copy.deepcopy(resource)
    order = {
        "type": "Update",
        "limits": {"storage": 200},
        "attributes": {"new_options": {"hard_quota_space": 300, "soft_quota_inodes": 9}},
    }
    updated = apply_order_changes(resource, order)
    assert resource == snapshot  # pure
    assert updated["limits"] == {"storage": 200}
    assert updated["options"] == {"permissions": "0700", "hard_quota_space": 300, "soft_quota_inodes": 9}
    assert {k: v for k, v in updated.items() if k not in ("limits", "options")} == {
        k: v for k, v in resource.items() if k not in ("limits", "options")
    }
    assert quotas_of(map_resource(updated, MappingSettings())) == [200.0, 300.0, 9.0, 400000000.0]


def test_apply_order_changes_top_level_new_options_and_null_resource_options() -> None:
    updated = apply_order_changes(base_resource(options=None), {"new_options": {"permissions": "0750"}})
    assert updated["options"] == {"permissions": "0750"}
    assert updated["limits"] == {"storage": 100}


def test_apply_order_changes_without_changes() -> None:
    resource = base_resource()
    orders: list[dict[str, Any]] = [{}, {"limits": None}, {"limits": {}}, {"attributes": {"name": "x"}}]
    for order in [*orders, {"attributes": None}]:
        updated = apply_order_changes(resource, order)
        assert updated == resource
        assert updated is not resource


def test_apply_order_changes_on_the_golden_order_shape() -> None:
    order = json.loads((GOLDEN.parent / "api" / "order.json").read_text("utf-8"))
    updated = apply_order_changes(base_resource(limits={"storage": 1}), {**order, "type": "Update"})
    assert updated["limits"] == order["limits"]
    assert updated["options"] == {}
    assert map_resource(updated, MappingSettings())["quotas"][0]["quota"] == 50.0


def test_apply_order_changes_keeps_invalid_options_for_the_mapping_to_report() -> None:
    updated = apply_order_changes(base_resource(options=["bad"]), {"new_options": {"permissions": "0750"}})
    assert invalid(updated).field == "options"
