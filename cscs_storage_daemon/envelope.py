"""Envelopes and file names of the storage JSON (storage-json spec §4–5). Pure functions, no I/O."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from datetime import datetime
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

    orjson gives the same bytes as `json.dumps(indent=2, ensure_ascii=False)` about 20 times faster (the standard
    library falls back to its pure-Python encoder whenever `indent` is set: 6-8 s for 100 000 resources). Values
    orjson refuses (integers past 64 bits, say) take the standard path; NaN is refused by both.
    """
    _refuse_nan(document)
    try:
        return orjson.dumps(document, option=orjson.OPT_INDENT_2 | orjson.OPT_APPEND_NEWLINE)
    except TypeError:
        return (json.dumps(document, ensure_ascii=False, indent=2, allow_nan=False) + "\n").encode("utf-8")


def _refuse_nan(document: dict[str, Any]) -> None:
    """orjson writes NaN and infinities as null; a quota must never silently become null."""
    for resource in document.get("result", {}).get("storageResources", ()):
        for quota in resource.get("quotas") or ():
            value = quota.get("quota") if isinstance(quota, dict) else None
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"refusing to write a non-finite quota {value!r}")


def content_key(document: dict[str, Any]) -> bytes:
    """What decides whether a snapshot changed: everything but `meta.date`."""
    return json.dumps(
        {"result": document["result"], "status": document["status"], "code": document["code"]},
        ensure_ascii=False,
        sort_keys=False,
        allow_nan=False,
    ).encode("utf-8")
