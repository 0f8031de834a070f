"""Envelopes and file names of the storage JSON (storage-json spec §4–5). Pure functions, no I/O."""

from __future__ import annotations

import hashlib
import json
import math
import operator
from collections.abc import Sequence
from datetime import datetime
from itertools import chain
from typing import Any, Literal

import orjson

from cscs_storage_daemon import APP_VERSION

OrderType = Literal["create", "update", "terminate"]
ORDER_TYPES: dict[str, OrderType] = {"create": "create", "update": "update", "terminate": "terminate"}


def paginate(*, total: int, page: int, page_size: int) -> dict[str, int]:
    """The `paginate` object over a filtered set of `total` items."""
    pages = max(1, math.ceil(total / page_size)) if total else 1
    return {
        "current": page,
        "limit": page_size,
        "offset": (page - 1) * page_size,
        "pages": pages,
        "total": total,
    }


def envelope(
    resources: Sequence[dict[str, Any]], *, date: datetime, pagination: dict[str, int] | None
) -> dict[str, Any]:
    """The one envelope every file and HTTP response uses; `pagination` None leaves `paginate` out."""
    result: dict[str, Any] = {"storageResources": list(resources)}
    if pagination is not None:
        result["paginate"] = pagination
    return {
        "status": "success",
        "code": 200,
        "meta": {"date": date.isoformat(), "appVersion": APP_VERSION},
        "result": result,
    }


def snapshot_envelope(resources: Sequence[dict[str, Any]], *, date: datetime) -> dict[str, Any]:
    """all.json: every valid resource, one page holding all of them (`limit` 1 when there are none)."""
    n = len(resources)
    return envelope(
        resources,
        date=date,
        pagination={"current": 1, "limit": n or 1, "offset": 0, "pages": 1, "total": n},
    )


def order_envelope(resource: dict[str, Any], *, date: datetime) -> dict[str, Any]:
    """An order file: the envelope with one storage resource and no `paginate`."""
    return envelope([resource], date=date, pagination=None)


def _stamp(date: datetime) -> str:
    return date.strftime("%Y-%m-%d-%H-%M")


def snapshot_file_name(date: datetime) -> str:
    """`{YYYY-MM-DD-HH-MM}-all.json`, `date` already in the offering's time zone."""
    return f"{_stamp(date)}-all.json"


def order_file_name(date: datetime, order_type: str, order_uuid_hex: str) -> str:
    """`{YYYY-MM-DD-HH-MM}-{order_type}_{order_uuid_hex}.json` (the seed promises the order uuid)."""
    kind = ORDER_TYPES.get(order_type.lower())
    if kind is None:
        raise ValueError(f"unknown order type {order_type!r}")
    if len(order_uuid_hex) != 32 or any(c not in "0123456789abcdef" for c in order_uuid_hex):
        raise ValueError(f"order uuid must be 32 lower-case hex digits, got {order_uuid_hex!r}")
    return f"{_stamp(date)}-{kind}_{order_uuid_hex}.json"


def is_snapshot_file_name(name: str) -> bool:
    return name.endswith("-all.json") and len(name) == len("YYYY-MM-DD-HH-MM-all.json")


def render(document: dict[str, Any]) -> bytes:
    """UTF-8, 2-space indent, non-ASCII kept literally, newline at the end.

    The bytes are those of `json.dumps(indent=2, ensure_ascii=False, allow_nan=False)` plus a newline. orjson
    writes them about 20 times faster (the standard library falls back to its pure-Python encoder whenever `indent`
    is set: 6-8 s for 100 000 resources) for envelopes of storage objects as `map_resource` makes them (see
    `_orjson_writes_the_same`); anything else, and values orjson refuses (integers past 64 bits, say), take the
    standard path, which also refuses NaN.
    """
    if _orjson_writes_the_same(document):
        try:
            return orjson.dumps(document, option=orjson.OPT_INDENT_2 | orjson.OPT_APPEND_NEWLINE)
        except TypeError:
            pass
    return (json.dumps(document, ensure_ascii=False, indent=2, allow_nan=False) + "\n").encode("utf-8")


_PLAIN_TYPES = frozenset({str, int, bool, type(None)})
_GET_QUOTAS = operator.itemgetter("quotas")
_GET_QUOTA = operator.itemgetter("quota")
_GET_TARGET = operator.itemgetter("target")
_GET_TARGET_ITEM = operator.itemgetter("targetItem")


def _orjson_writes_the_same(document: dict[str, Any]) -> bool:
    """Whether orjson's bytes for this envelope are exactly `json.dumps`'s.

    Strings, integers and floats come out the same except floats that are non-finite (orjson writes `null` where
    `json.dumps` refuses) or of magnitude in [1e-9, 1e-4) (orjson: `0.00001`, `1e-6`; `json.dumps`: `1e-05`,
    `1e-06`). A storage object from `map_resource` holds floats only in `quotas` and possibly in a target item
    copied from `backend_metadata`: both are checked, in C-level passes (~0.2 s for 100 000 resources). Other
    fields of a storage object are trusted to hold no float (the mapping's contract); an envelope whose resources
    lack `quotas` or `target` is not vouched for.
    """
    try:
        result = document["result"]
        resources = result["storageResources"]
        if not _PLAIN_TYPES.issuperset(map(type, document["meta"].values())):
            return False
        if not _PLAIN_TYPES.issuperset(map(type, (result.get("paginate") or {}).values())):
            return False
        quotas = list(map(_GET_QUOTA, chain.from_iterable(filter(None, map(_GET_QUOTAS, resources)))))
        items = filter(None, map(_GET_TARGET_ITEM, filter(None, map(_GET_TARGET, resources))))
        values = list(chain.from_iterable(map(dict.values, items)))
        total = sum(quotas)
    except (KeyError, TypeError, AttributeError):
        return False
    if not math.isfinite(total):
        return False  # NaN / infinity (or an overflowing sum: the standard path sorts it out)
    if [v for v in quotas if -1e-4 < v < 1e-4 and v]:
        return False
    if _PLAIN_TYPES.issuperset(map(type, values)):
        return True
    # a user's `primaryProject`, or whatever a target item from backend_metadata holds
    return all(_same_in_orjson(v) for v in values if type(v) not in _PLAIN_TYPES)


def _same_in_orjson(value: Any, depth: int = 0) -> bool:
    kind = type(value)
    if kind in _PLAIN_TYPES:
        return True
    if kind is float:
        return math.isfinite(value) and not (-1e-4 < value < 1e-4 and value)
    if depth > 32:
        return False
    if kind is dict:
        return all(type(k) is str for k in value) and all(_same_in_orjson(v, depth + 1) for v in value.values())
    if kind is list:
        return all(_same_in_orjson(v, depth + 1) for v in value)
    return False


def content_key(document: dict[str, Any]) -> bytes:
    """What decides whether a snapshot changed: a digest of everything but `meta.date`.

    A digest, not the serialised content: a 100 000-resource feed would otherwise keep ~170 MB per offering alive
    between regenerations. Only compared with itself, so orjson's compact form serves (the standard library's is
    about 7 times slower); values orjson refuses take the standard path.
    """
    content = {"result": document["result"], "status": document["status"], "code": document["code"]}
    try:
        data = orjson.dumps(content)
    except TypeError:
        data = json.dumps(content, ensure_ascii=False, allow_nan=False).encode("utf-8")
    return hashlib.sha256(data).digest()
