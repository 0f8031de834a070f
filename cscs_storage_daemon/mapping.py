"""Waldur marketplace resource (raw API JSON) → CSCS storage resource object (spec storage-json §1–§3).

Pure and I/O-free: the caller passes warnings on to the log through the ``warn`` callback and writes the result.
Resources are read as plain JSON (never through a client model), so an unexpected value makes one resource
invalid (:class:`InvalidResource`, naming the resource and the field) instead of failing a whole batch.

The hot path (:func:`map_resource`) is kept lean for 100 000-resource feeds: what depends only on the settings, the
offering, the data type, the permission or the quota values (the storageSystem / storageFileSystem /
storageDataType / permission objects, the quota list, a user's primaryProject, data-type checks) is built once
and *shared* by every result with that value; per resource there are dictionary look-ups, cheap string checks,
the two hashes of a generated target item and four new dicts (the result, its mountPoint, target and target
item). A caller may keep a result, but changes a copy, never the result or its nested objects in place: a result
whose floats orjson writes as `json.dumps` does (nearly all) is a read-only `StorageObject`, which the renderer
trusts without a look.
"""

from __future__ import annotations

import gc
import itertools
import math
import reprlib
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache, lru_cache
from typing import Any, Final, NoReturn

from cscs_storage_daemon.numbers import (
    HEX_DIGITS,
    deterministic_uuid,
    float_writes_alike,
    parse_number,
    unix_gid,
    unix_uid,
    uuid5_oid,
    uuid_hex,
)

__all__ = [
    "MAPPED_FIELDS",
    "InvalidResource",
    "MappingSettings",
    "StorageObject",
    "WarnCallback",
    "apply_order_changes",
    "deterministic_uuid",
    "effective_data_type",
    "gc_paused",
    "map_resource",
    "status_of",
    "target_type_of",
    "uuid_hex",
]

WarnCallback = Callable[[str, dict[str, Any]], None]
"""``warn(event_name, fields)``: how the mapping reports a WARNING without doing any I/O itself."""

DEFAULT_DATA_TYPE: Final = "store"
DEFAULT_PERMISSION: Final = "775"

_STATUS: Final[dict[str, str]] = {
    "Creating": "pending",
    "OK": "active",
    "Erred": "error",
    "Terminating": "removing",
    "Terminated": "removed",
}
_TARGET_TYPE: Final[dict[str, str]] = {
    "store": "project",
    "archive": "project",
    "users": "user",
    "scratch": "user",
}
_REQUIRED_STRINGS: Final = ("uuid", "slug", "offering_slug", "customer_slug", "project_slug")
#: Every top-level field of a Waldur resource that `map_resource` reads: its result (storage object or error, and
#: its warnings) depends on these alone, so a resource cut down to them maps the same (the mirror keeps no more).
MAPPED_FIELDS: Final = (*_REQUIRED_STRINGS, "state", "attributes", "options", "limits", "backend_metadata")
_SEGMENT_FIELDS: Final = ("slug", "offering_slug", "customer_slug", "project_slug")
_EMPTY: Final[Mapping[str, Any]] = {}
_LOWER_HEX_DIGITS: Final = "0123456789abcdef"
#: every valid permission: exactly 3-4 characters 0-7 (4 608 strings; a set look-up beats any string check)
_OCTAL_PERMISSIONS: Final = frozenset(
    "".join(digits) for width in (3, 4) for digits in itertools.product("01234567", repeat=width)
)
_MAX_ITEM_DEPTH: Final = 32
_MAX_ITEM_INT: Final = 10**1000  # far below the int→str digit limit json.dumps would trip over

# (correct spelling, legacy misspelling) of the inode overrides
_SOFT_INODE_KEYS: Final = ("soft_quota_inodes", "soft_quota_indoes")
_HARD_INODE_KEYS: Final = ("hard_quota_inodes", "hard_quota_indoes")

_repr = reprlib.Repr()
_repr.maxstring = 60
_repr.maxother = 60
_repr.maxlevel = 3


def _show(value: Any) -> str:
    """A short, single-line, log-safe rendering of an offending value."""
    try:
        return _repr.repr(value)
    except Exception:  # a pathological value (e.g. an int beyond the str conversion limit)
        return f"<{type(value).__name__}>"


def _display(text: str) -> str:
    """Text for a message: as is when printable, else with escapes (a slug may hold a newline or a NUL)."""
    return text if text.isprintable() else repr(text)[1:-1]


class InvalidResource(ValueError):
    """A resource the daemon cannot turn into a storage object (storage-json §2).

    ``resource_id`` is the uuid as Waldur sent it (the slug when the uuid is unusable), ``field`` the dotted path of
    the offending field (``attributes.permissions``, ``limits.storage``), ``message`` the reason.
    """

    def __init__(self, resource_id: str, field: str, message: str) -> None:
        super().__init__(resource_id, field, message)
        self.resource_id = resource_id
        self.field = field
        self.message = message

    def __str__(self) -> str:
        where = f"field {self.field}" if self.field else "resource body"
        return f"invalid resource {_display(self.resource_id)}: {where}: {self.message}"


@dataclass(frozen=True, slots=True)
class MappingSettings:
    """The per-offering inputs of the mapping (spec §7 ``backend_settings`` plus the storage component)."""

    storage_file_system: str = "lustre"
    inode_soft_coefficient: float = 1.33
    inode_hard_coefficient: float = 2.0
    inode_base_multiplier: float = 1_000_000.0
    use_mock_target_items: bool = False
    storage_component: str = "storage"
    unit_factor: float = 1.0

    @classmethod
    def from_backend(
        cls, backend_settings: Mapping[str, Any], backend_components: Mapping[str, Any]
    ) -> MappingSettings:
        """Build from an offering's (already validated) ``backend_settings`` and ``backend_components``.

        The storage component is the entry named ``storage``, or the only entry; its ``unit_factor`` defaults to 1.
        Keys the mapping does not use (``output_directory``, ``timezone``, …) are ignored. Raises ``ValueError``
        when no storage component can be chosen (config validation rules that out).
        """
        if "storage" in backend_components:
            component_name = "storage"
        elif len(backend_components) == 1:
            component_name = next(iter(backend_components))
        else:
            raise ValueError(
                "backend_components: expected an entry named 'storage' or exactly one entry, "
                f"got {sorted(map(str, backend_components))}"
            )
        component = backend_components[component_name]
        if isinstance(component, Mapping):
            unit_factor = component.get("unit_factor")
        else:
            unit_factor = getattr(component, "unit_factor", None)
        defaults = cls()

        def setting(key: str, default: Any) -> Any:
            value = backend_settings.get(key)
            return default if value is None else value

        return cls(
            storage_file_system=str(setting("storage_file_system", defaults.storage_file_system)),
            inode_soft_coefficient=float(setting("inode_soft_coefficient", defaults.inode_soft_coefficient)),
            inode_hard_coefficient=float(setting("inode_hard_coefficient", defaults.inode_hard_coefficient)),
            inode_base_multiplier=float(setting("inode_base_multiplier", defaults.inode_base_multiplier)),
            use_mock_target_items=bool(setting("use_mock_target_items", defaults.use_mock_target_items)),
            storage_component=str(component_name),
            unit_factor=1.0 if unit_factor is None else float(unit_factor),
        )


class StorageObject(dict[str, Any]):
    """A storage object from `map_resource` whose every float orjson writes as `json.dumps` does
    (`float_writes_alike`): what lets the renderer hand a list of them to orjson without looking inside.

    Read-only, so that it stays true: a changed copy is a plain dict (``{**storage, "status": "removing"}``),
    checked when rendered. A storage object holding a float written otherwise is a plain dict from the start.
    """

    __slots__ = ()

    def _read_only(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise TypeError("a mapped storage object is read-only: change a copy (dict(storage))")

    __setitem__ = __delitem__ = __ior__ = _read_only
    update = setdefault = pop = popitem = clear = _read_only

    def __reduce__(self) -> tuple[type[StorageObject], tuple[dict[str, Any]]]:
        return StorageObject, (dict(self),)  # copied and pickled whole: the items are not set one by one


# --------------------------------------------------------------------------------------------------- helpers


def status_of(resource: Mapping[str, Any]) -> str:
    """The storage ``status`` for a resource's Waldur ``state``; anything unknown, null or missing → ``pending``."""
    state = resource.get("state")
    return _STATUS.get(state, "pending") if type(state) is str else "pending"


def effective_data_type(resource: Mapping[str, Any]) -> str:
    """The lower-cased storage data type (``attributes.storage_data_type``, default ``store``).

    Tolerant by design (used to filter lists of raw resources): anything that is not a non-empty string gives
    ``store``; :func:`map_resource` is where invalid values are rejected.
    """
    attributes = resource.get("attributes")
    if isinstance(attributes, Mapping):
        value = attributes.get("storage_data_type")
        if isinstance(value, str) and value:
            return value.lower()
    return DEFAULT_DATA_TYPE


def target_type_of(data_type: str) -> str:
    """``project`` or ``user`` for a data type (case-insensitive); unknown types → ``project``."""
    return _TARGET_TYPE.get(data_type.lower(), "project")


def _resource_id(resource: Mapping[str, Any]) -> str:
    """How an error names a resource: its uuid as sent, else its slug, else whatever uuid text there is."""
    raw_uuid = resource.get("uuid")
    if isinstance(raw_uuid, str) and uuid_hex(raw_uuid) is not None:
        return raw_uuid
    slug = resource.get("slug")
    if isinstance(slug, str) and slug:
        return slug
    if isinstance(raw_uuid, str) and raw_uuid:
        return raw_uuid
    return "<unknown>"


def _path_segment_problem(text: str) -> str | None:
    """Why a non-empty string may not be a mount-path segment, or ``None`` (storage-json §2 slug rule)."""
    if text.isprintable():  # fast path: a printable string holds no Cc character and no surrogate
        if "/" in text:
            return "contains '/'"
        if text == "." or text == "..":
            return "must not be '.' or '..'"
        return None
    for char in text:
        code = ord(char)
        if code == 0:
            return "contains a NUL byte"
        if code < 0x20 or 0x7F <= code <= 0x9F:
            return f"contains a control character (U+{code:04X})"
    if "/" in text:
        return "contains '/'"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid Unicode text (lone surrogate)"
    return None


# Sub-objects that depend only on a value (an offering slug, a file system, a data type, a permission, the four
# quota values) are built once and shared by every result that has that value: most of a storage object, and
# what keeps 100 000 of them small and quick to build. Nothing may modify a result's nested objects in place.


def _named_object(scope: str, value: str) -> dict[str, Any]:
    return {"itemId": deterministic_uuid(scope, value), "key": value.lower(), "name": value.upper(), "active": True}


@lru_cache(maxsize=4096)  # one argument: the cache's fast path
def _system_object(offering_slug: str) -> dict[str, Any]:
    """The shared storageSystem object of an offering."""
    return _named_object("storage_system", offering_slug)


@lru_cache(maxsize=256)
def _file_system_object(storage_file_system: str) -> dict[str, Any]:
    """The shared storageFileSystem object of a file system."""
    return _named_object("storage_file_system", storage_file_system)


@lru_cache(maxsize=1024)
def _data_type_info(data_type: str) -> tuple[str | None, str, str | None, dict[str, Any]]:
    """``(problem, lower, target type or None when unknown, shared storageDataType object)`` of a raw data type."""
    problem = _path_segment_problem(data_type)
    if problem is not None:
        return problem, "", None, {}
    lower = data_type.lower()
    item = {
        "itemId": deterministic_uuid("storage_data_type", data_type),
        "key": lower,
        "name": data_type.upper(),
        "path": lower,
        "active": True,
    }
    return problem, lower, _TARGET_TYPE.get(lower), item


@cache  # bounded: called with valid permissions only (4 608 of them)
def _permission_object(permission: str) -> dict[str, Any]:
    return {"permissionType": "octal", "value": permission}


def _quotas(soft_space: float, hard_space: float, soft_inodes: float, hard_inodes: float) -> list[dict[str, Any]]:
    return [
        {"type": "space", "quota": soft_space, "unit": "tera", "enforcementType": "soft"},
        {"type": "space", "quota": hard_space, "unit": "tera", "enforcementType": "hard"},
        {"type": "inodes", "quota": soft_inodes, "unit": "none", "enforcementType": "soft"},
        {"type": "inodes", "quota": hard_inodes, "unit": "none", "enforcementType": "hard"},
    ]


@lru_cache(maxsize=4096)
def _shared_quotas(
    soft_space: float, hard_space: float, soft_inodes: float, hard_inodes: float
) -> tuple[list[dict[str, Any]], bool]:
    """The shared quota list of positive space values (a float key cannot tell -0.0 from 0.0; inodes are never
    -0.0), and whether its values write alike (`float_writes_alike`)."""
    quotas = _quotas(soft_space, hard_space, soft_inodes, hard_inodes)
    return quotas, _write_alike(soft_space, hard_space, soft_inodes, hard_inodes)


def _write_alike(*values: float) -> bool:
    return all(map(float_writes_alike, values))


@lru_cache(maxsize=65536)
def _primary_project(project_slug: str) -> dict[str, Any]:
    """The shared ``primaryProject`` of a generated user item."""
    return {"name": project_slug, "unixGid": unix_gid(project_slug), "active": True}


class _NotJson(Exception):
    pass


def _json_copy(value: Any, floats: list[float], depth: int = 0) -> Any:
    """A deep copy of a strict-JSON value; ``_NotJson`` for NaN/infinity, non-string keys, odd types, deep nests.
    Each float copied is appended to ``floats``."""
    kind = type(value)
    if kind is str:
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise _NotJson("a string that is not valid Unicode text") from None
        return value
    if value is None or kind is bool:
        return value
    if kind is int:
        if -_MAX_ITEM_INT <= value <= _MAX_ITEM_INT:
            return value
        raise _NotJson("an integer too large to serialise")
    if kind is float:
        if math.isfinite(value):
            floats.append(value)
            return value
        raise _NotJson("a non-finite number")
    if depth >= _MAX_ITEM_DEPTH:
        raise _NotJson("nesting too deep")
    if isinstance(value, Mapping):
        copied: dict[str, Any] = {}
        for key, item in value.items():
            if type(key) is not str:
                raise _NotJson("a non-string key")
            copied[_json_copy(key, floats, depth)] = _json_copy(item, floats, depth + 1)
        return copied
    if isinstance(value, list | tuple):
        return [_json_copy(item, floats, depth + 1) for item in value]
    raise _NotJson(f"a value of type {kind.__name__}")


def _raise_required_strings(resource: Mapping[str, Any]) -> NoReturn:
    """Raise for the first of uuid, slug, offering_slug, customer_slug, project_slug that is not a non-empty str."""
    for key in _REQUIRED_STRINGS:
        value = resource.get(key)
        if type(value) is str and value:
            continue
        if value is None:
            problem = "is missing" if key not in resource else "is null"
        elif isinstance(value, str):
            problem = "is empty" if not value else "must be a plain string"
        else:
            problem = f"must be a string, got {type(value).__name__} {_show(value)}"
        raise InvalidResource(_resource_id(resource), key, f"{key} {problem}")
    raise AssertionError("unreachable: called only when a required string is invalid")


def _check_segments(resource_id: str, segments: tuple[str, str, str, str]) -> None:
    """Raise for the first slug that may not be a mount-path segment (order: slug, offering, customer, project)."""
    for key, value in zip(_SEGMENT_FIELDS, segments, strict=True):
        problem = _path_segment_problem(value)
        if problem is not None:
            raise InvalidResource(resource_id, key, f"{key} {_show(value)} {problem}")


def _object_field(resource_id: str, key: str, value: Any) -> Mapping[str, Any]:
    """A nested object of the resource: null → ``{}``; a non-object is invalid."""
    if value is None:
        return _EMPTY
    if isinstance(value, Mapping):
        return value
    raise InvalidResource(
        resource_id, key, f"{key} must be a JSON object or null, got {type(value).__name__} {_show(value)}"
    )


# ------------------------------------------------------------------------------------------------ the mapping


def map_resource(
    resource: Mapping[str, Any],
    settings: MappingSettings,
    *,
    warn: WarnCallback | None = None,
) -> dict[str, Any]:
    """The storage resource object for one Waldur resource (key order as storage-json §1).

    Raises :class:`InvalidResource` for a resource that breaks a rule of storage-json §2; never anything else for
    JSON input. Warnings (unknown data type, ignored overrides, unusable metadata items) go to
    ``warn(event, fields)``; ``fields`` always carries ``resource`` (the uuid as sent).
    """
    if type(resource) is not dict and not isinstance(resource, Mapping):
        raise InvalidResource("<unknown>", "", f"expected a JSON object, got {type(resource).__name__}")

    # ---- identity and path segments (one combined check on the fast path; _check_* find the precise error)
    raw_uuid = resource.get("uuid")
    slug = resource.get("slug")
    offering_slug = resource.get("offering_slug")
    customer_slug = resource.get("customer_slug")
    project_slug = resource.get("project_slug")
    if not (
        type(raw_uuid) is str
        and type(slug) is str
        and type(offering_slug) is str
        and type(customer_slug) is str
        and type(project_slug) is str
        and raw_uuid
        and slug
        and offering_slug
        and customer_slug
        and project_slug
    ):
        _raise_required_strings(resource)
    if len(raw_uuid) == 32 and not raw_uuid.strip(_LOWER_HEX_DIGITS):
        item_id = raw_uuid  # already normal: no copy
    elif len(raw_uuid) == 32 and not raw_uuid.strip(HEX_DIGITS):
        item_id = raw_uuid.lower()
    else:
        checked = uuid_hex(raw_uuid)
        if checked is None:
            raise InvalidResource(
                _resource_id(resource), "uuid", f"uuid {_show(raw_uuid)} is not 32 hex digits (dashes aside)"
            )
        item_id = checked
    joined = f"{slug}{offering_slug}{customer_slug}{project_slug}"
    if "/" in joined or "." in joined or not joined.isprintable():
        _check_segments(raw_uuid, (slug, offering_slug, customer_slug, project_slug))

    # ---- nested objects: null means {}, anything else must be an object
    attributes = resource.get("attributes")
    if type(attributes) is not dict:
        attributes = _object_field(raw_uuid, "attributes", attributes)
    options = resource.get("options")
    if type(options) is not dict:
        options = _object_field(raw_uuid, "options", options)
    limits = resource.get("limits")
    if type(limits) is not dict:
        limits = _object_field(raw_uuid, "limits", limits)
    backend_metadata = resource.get("backend_metadata")
    if type(backend_metadata) is not dict:
        backend_metadata = _object_field(raw_uuid, "backend_metadata", backend_metadata)

    # ---- attributes
    data_type = attributes.get("storage_data_type")
    if data_type is None or data_type == "":
        data_type = DEFAULT_DATA_TYPE
    elif type(data_type) is not str:
        raise InvalidResource(
            raw_uuid,
            "attributes.storage_data_type",
            f"storage_data_type must be a string or null, got {type(data_type).__name__} {_show(data_type)}",
        )
    problem, data_type_lower, target_type, data_type_object = _data_type_info(data_type)
    if problem is not None:
        raise InvalidResource(
            raw_uuid, "attributes.storage_data_type", f"storage_data_type {_show(data_type)} {problem}"
        )

    permission = attributes.get("permissions")
    permission_field = "attributes.permissions"
    if permission is not None and type(permission) is not str:
        raise InvalidResource(
            raw_uuid,
            permission_field,
            f"permissions must be a string or null, got {type(permission).__name__} {_show(permission)}",
        )
    if options:
        option_permission = options.get("permissions")
        if type(option_permission) is str:
            if option_permission:
                permission = option_permission
                permission_field = "options.permissions"
        elif option_permission is not None:
            _ignored(warn, raw_uuid, "options.permissions", option_permission, "not a string")
    if not permission:
        permission = DEFAULT_PERMISSION
    elif permission not in _OCTAL_PERMISSIONS:
        raise InvalidResource(
            raw_uuid,
            permission_field,
            f"permissions {_show(permission)} must be exactly 3-4 octal digits (0-7)",
        )

    # ---- space and inodes
    limit = limits.get(settings.storage_component)
    if limit is None:
        space = 0.0
    else:
        number = parse_number(limit)
        if number is None:
            kind = "a boolean" if type(limit) is bool else f"{type(limit).__name__} {_show(limit)}"
            raise InvalidResource(
                raw_uuid,
                f"limits.{settings.storage_component}",
                f"storage limit must be a number or numeric string, got {kind}",
            )
        space = number * settings.unit_factor
        if not math.isfinite(space):
            reason = "is not a finite number" if not math.isfinite(number) else "is too large"
            raise InvalidResource(
                raw_uuid, f"limits.{settings.storage_component}", f"storage limit {_show(limit)} {reason}"
            )
    base = space * settings.inode_base_multiplier
    soft_inodes = base * settings.inode_soft_coefficient
    hard_inodes = base * settings.inode_hard_coefficient
    if not (math.isfinite(soft_inodes) and math.isfinite(hard_inodes)):
        raise InvalidResource(
            raw_uuid,
            f"limits.{settings.storage_component}",
            f"storage limit {_show(limit)} is too large: the inode quotas are not finite",
        )
    soft_inodes = float(int(soft_inodes))  # truncation toward zero, emitted as a float
    hard_inodes = float(int(hard_inodes))
    soft_space = hard_space = space
    if options:
        override = _space_override(options, "soft_quota_space", raw_uuid, warn)
        if override is not None:
            soft_space = override
        override = _space_override(options, "hard_quota_space", raw_uuid, warn)
        if override is not None:
            hard_space = override
        override = _inode_override(options, _SOFT_INODE_KEYS, raw_uuid, warn)
        if override is not None:
            soft_inodes = override
        override = _inode_override(options, _HARD_INODE_KEYS, raw_uuid, warn)
        if override is not None:
            hard_inodes = override

    quotas: list[dict[str, Any]] | None
    if soft_space > 0 and hard_space > 0:
        quotas, exact = _shared_quotas(soft_space, hard_space, soft_inodes, hard_inodes)
    elif soft_space > 0 or hard_space > 0:
        quotas = _quotas(soft_space, hard_space, soft_inodes, hard_inodes)
        exact = _write_alike(soft_space, hard_space, soft_inodes, hard_inodes)
    else:
        quotas, exact = None, True

    # ---- target (§3)
    if target_type is None:
        target_type = "project"
        if warn is not None:
            warn(
                "storage_data_type_unknown",
                {"resource": raw_uuid, "value": _show(data_type), "target_type": target_type},
            )
    target_item: dict[str, Any] | None = None
    if backend_metadata and not settings.use_mock_target_items:
        target_item, floats = _metadata_item(backend_metadata, target_type, raw_uuid, warn)
        exact = exact and _write_alike(*floats)
    if target_item is None:
        if target_type == "project":
            target_item = {
                "itemId": uuid5_oid(f"project:{slug}"),
                "status": "open",
                "name": slug,
                "unixGid": unix_gid(slug),
                "active": True,
            }
        else:
            target_item = {
                "itemId": uuid5_oid(f"user:{slug}"),
                "status": "active",
                "email": f"user-{slug}@example.com",
                "unixUid": unix_uid(slug),
                "primaryProject": _primary_project(project_slug),
                "active": True,
            }

    state = resource.get("state")
    storage = {
        "itemId": item_id,
        "status": _STATUS.get(state, "pending") if type(state) is str else "pending",
        "mountPoint": {"default": f"/{offering_slug}/{data_type_lower}/{customer_slug}/{project_slug}/{slug}"},
        "permission": _permission_object(permission),
        "quotas": quotas,
        "target": {"targetType": target_type, "targetItem": target_item},
        "storageSystem": _system_object(offering_slug),
        "storageFileSystem": _file_system_object(settings.storage_file_system),
        "storageDataType": data_type_object,
        "parentItemId": None,
    }
    return StorageObject(storage) if exact else storage


def _ignored(report: WarnCallback | None, resource_id: str, field: str, value: Any, reason: str) -> None:
    if report is not None:
        report(
            "storage_option_ignored",
            {"resource": resource_id, "field": field, "value": _show(value), "reason": reason},
        )


def _space_override(
    options: Mapping[str, Any], key: str, resource_id: str, report: WarnCallback | None
) -> float | None:
    """``options[key]`` in TB when it is a finite number or numeric string; else ``None`` (warned if set)."""
    value = options.get(key)
    if value is None:
        return None
    number = parse_number(value)
    if number is None:
        reason = "a boolean is not a number" if type(value) is bool else "not a number or numeric string"
        _ignored(report, resource_id, f"options.{key}", value, reason)
        return None
    if not math.isfinite(number):
        _ignored(report, resource_id, f"options.{key}", value, "not a finite number")
        return None
    return number


def _inode_override(
    options: Mapping[str, Any], keys: tuple[str, str], resource_id: str, report: WarnCallback | None
) -> float | None:
    """The first of ``keys`` (correct spelling, then legacy) holding a valid inode count, truncated; else None."""
    for key in keys:
        value = options.get(key)
        if value is None:
            continue
        number = parse_number(value)
        if number is None:
            reason = "a boolean is not a number" if type(value) is bool else "not a number or numeric string"
        elif not math.isfinite(number):
            reason = "not a finite number"
        elif number < 0:
            reason = "negative"
        else:
            return float(int(number))
        _ignored(report, resource_id, f"options.{key}", value, reason)
    return None


def _metadata_item(
    backend_metadata: Mapping[str, Any], target_type: str, resource_id: str, report: WarnCallback | None
) -> tuple[dict[str, Any] | None, list[float]]:
    """``backend_metadata["{target_type}_item"]`` as a fresh copy when it is a non-empty strict-JSON object, and
    the floats it holds."""
    floats: list[float] = []
    key = f"{target_type}_item"
    item = backend_metadata.get(key)
    if item is None:
        return None, floats
    if not isinstance(item, Mapping):
        if report is not None:
            report(
                "storage_target_item_ignored",
                {
                    "resource": resource_id,
                    "field": f"backend_metadata.{key}",
                    "value": _show(item),
                    "reason": "not a JSON object; using a generated item",
                },
            )
        return None, floats
    if not item:
        return None, floats
    try:
        copied: dict[str, Any] = _json_copy(item, floats)
    except _NotJson as error:
        if report is not None:
            report(
                "storage_target_item_ignored",
                {
                    "resource": resource_id,
                    "field": f"backend_metadata.{key}",
                    "value": _show(item),
                    "reason": f"holds {error}; using a generated item",
                },
            )
        return None, []
    return copied, floats


# ------------------------------------------------------------------------------------------------ batches


@contextmanager
def gc_paused() -> Iterator[None]:
    """Around mapping a whole listing (100 000 resources): the cyclic GC paused meanwhile.

    The storage objects and mirror entries of a batch all survive it, and contain no reference cycles: collecting
    while they are built walks them again and again for nothing, and a full collection over everything the process
    holds falls in the middle of the batch. When the outermost pause ends, what was made meanwhile goes straight to
    the oldest generation, unexamined (`promote_to_oldest`): the young collection the pause deferred would walk it
    all (~0.1 s for 100 000 storage objects) only to find it alive. A garbage cycle made meanwhile (a caught
    exception's traceback, say) is freed by the next full collection.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            promote_to_oldest()
            gc.enable()


def promote_to_oldest() -> None:
    """Move every object the cyclic collector tracks to its oldest generation, without examining one.

    `gc.freeze` moves them all to the permanent generation and `gc.unfreeze` moves that whole list back to the oldest
    generation: two list splices, whatever their length. Where something already holds objects frozen (the replay
    freezes the capture it runs), they are frozen with them instead, and go back when it unfreezes: unfreezing here
    would hand the capture back to the collector.
    """
    already_frozen = gc.get_freeze_count()
    gc.freeze()
    if not already_frozen:
        gc.unfreeze()


# ------------------------------------------------------------------------------------------------ order files


def apply_order_changes(resource: Mapping[str, Any], order: Mapping[str, Any]) -> dict[str, Any]:
    """The resource as an Update order will leave it (storage-json §6), for that order's file.

    A shallow copy of ``resource`` with ``limits`` replaced by the order's ``limits`` (when the order carries
    new limits: not null, not ``{}``) and ``options`` merged with the order's new options, if any:
    ``order["new_options"]`` or ``order["attributes"]["new_options"]`` (where Waldur puts an options change),
    when that is an object. The inputs are not modified. A resource ``options`` that is neither null nor an object
    is left as it is, so the mapping still reports it.
    """
    updated = dict(resource)
    new_limits = order.get("limits")
    if new_limits is not None and new_limits != {}:
        updated["limits"] = new_limits
    new_options = order.get("new_options")
    if new_options is None:
        attributes = order.get("attributes")
        if isinstance(attributes, Mapping):
            new_options = attributes.get("new_options")
    if isinstance(new_options, Mapping) and new_options:
        current = resource.get("options")
        if current is None:
            updated["options"] = dict(new_options)
        elif isinstance(current, Mapping):
            updated["options"] = {**current, **new_options}
    return updated
