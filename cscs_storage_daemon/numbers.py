"""Pure value helpers shared by the storage mapping and its callers.

Everything here is deterministic and free of I/O: numbers as the storage spec reads them (JSON numbers or ASCII
numeric strings, never booleans), UUID normalisation, RFC 4122 version-5 ids and the stable ``G``/``U`` numbers of
storage-json §3.
"""

from __future__ import annotations

import math
import re
import sys
import uuid
from functools import lru_cache
from hashlib import sha1, sha256
from typing import Any, Final

__all__ = [
    "HEX_DIGITS",
    "deterministic_uuid",
    "float_writes_alike",
    "is_numeric_string",
    "parse_number",
    "stable_bucket",
    "unix_gid",
    "unix_uid",
    "uuid5_oid",
    "uuid_hex",
]

#: ``^-?(\d+(\.\d+)?|\.\d+)$`` restricted to ASCII digits (storage-json §2); used with ``fullmatch`` so a
#: trailing newline never slips through the way ``$`` would let it.
_NUMERIC_STRING: Final = re.compile(r"-?(?:[0-9]+(?:\.[0-9]+)?|\.[0-9]+)")

HEX_DIGITS: Final = "0123456789abcdefABCDEF"
_OID_BYTES: Final = uuid.NAMESPACE_OID.bytes
_OID_SHA1: Final = sha1(_OID_BYTES, usedforsecurity=False)
_FROM_BYTES: Final = int.from_bytes
_MAX_FLOAT: Final = sys.float_info.max
_VARIANT_NIBBLE: Final = {digit: "89ab"[int(digit, 16) & 3] for digit in "0123456789abcdef"}


def float_writes_alike(value: float) -> bool:
    """Whether orjson writes this float as `json.dumps` does: finite, and 0 or of magnitude at least 1e-4.

    orjson writes NaN and infinities as ``null`` (``json.dumps`` refuses them, as the storage format must), and
    writes a magnitude in (0, 1e-4) its own way (``0.00001``, ``1e-6`` where ``json.dumps`` writes ``1e-05``,
    ``1e-06``).
    """
    return value == 0.0 or 1e-4 <= abs(value) <= _MAX_FLOAT


def is_numeric_string(value: str) -> bool:
    """True for an ASCII decimal like ``"12"``, ``"-0.5"``, ``".5"``; false for ``"1e3"``, ``"nan"``, ``" 1"``."""
    return _NUMERIC_STRING.fullmatch(value) is not None


def parse_number(value: Any) -> float | None:
    """A JSON number or numeric string as a double, or ``None`` when it is neither.

    Booleans are never numbers. The result may be infinite or NaN (a float that arrived as such, an integer or a
    digit string too large for a double): callers decide what a non-finite value means.
    """
    kind = type(value)
    if kind is float:
        return value  # type: ignore[no-any-return]
    if kind is int:
        try:
            return float(value)
        except OverflowError:
            return math.inf if value > 0 else -math.inf
    if kind is str:
        return float(value) if _NUMERIC_STRING.fullmatch(value) is not None else None
    if kind is bool or not isinstance(value, int | float):
        return None
    # int / float subclasses other than bool (not produced by a JSON parser, but harmless)
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def uuid_hex(value: Any) -> str | None:
    """A UUID with or without dashes, any case, as 32 lower-case hex digits; ``None`` when it is not one.

    Every dash is removed first (storage-json §2: "32 hex digits once dashes are removed"). ``uuid.UUID`` objects
    are accepted too.
    """
    if isinstance(value, uuid.UUID):
        return value.hex
    if type(value) is not str and not isinstance(value, str):
        return None
    text: str = value
    if len(text) != 32:
        text = text.replace("-", "")
        if len(text) != 32:
            return None
    # strip() with the digit set leaves "" exactly when every character is an (ASCII) hex digit
    if text.strip(HEX_DIGITS):
        return None
    return text.lower()


def uuid5_oid(name: str) -> str:
    """``str(uuid.uuid5(uuid.NAMESPACE_OID, name))`` without building a ``uuid.UUID`` (about twice as fast)."""
    digest = _OID_SHA1.copy()  # the namespace already hashed
    digest.update(name.encode())
    h = digest.hexdigest()
    # version nibble := 5; the two top bits of the variant nibble := 10 (RFC 4122)
    return f"{h[:8]}-{h[8:12]}-5{h[13:16]}-{_VARIANT_NIBBLE[h[16]]}{h[17:20]}-{h[20:32]}"


@lru_cache(maxsize=65536)
def deterministic_uuid(scope: str, value: str) -> str:
    """RFC 4122 version-5 UUID, namespace ``NAMESPACE_OID``, over the UTF-8 of ``"scope:value"``, dashed.

    Same result as ``str(uuid.uuid5(uuid.NAMESPACE_OID, f"{scope}:{value}"))``, computed without building a
    ``uuid.UUID``. Raises ``UnicodeEncodeError`` for a string that is not valid Unicode text (a lone surrogate).
    """
    return uuid5_oid(f"{scope}:{value}")


def stable_bucket(text: str) -> int:
    """``n(s)`` of storage-json §3: the first 8 bytes of SHA-256(UTF-8) big-endian, modulo 10 000."""
    return _FROM_BYTES(sha256(text.encode()).digest()[:8]) % 10000  # big-endian: from_bytes' default


def unix_gid(text: str) -> int:
    """``G(s) = 30000 + n(s)``: the generated group id of a project target item."""
    return 30000 + stable_bucket(text)


def unix_uid(text: str) -> int:
    """``U(s) = 20000 + n(s)``: the generated user id of a user target item."""
    return 20000 + stable_bucket(text)
