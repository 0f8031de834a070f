"""Configuration: one YAML file, validated into pydantic v2 models.

The ``offerings:`` list keeps the Waldur Site Agent's keys, so an existing ``cscs-hpc-storage`` agent configuration
loads unchanged; the daemon's own settings live in a top-level ``daemon:`` section where every key has a default.

Rules (spec ``operations.md`` "Configuration", ``storage-json.md`` §5 and §7):

* Unknown keys are errors. Keys the site agent accepts but the daemon does not use are accepted and listed in
  ``Config.ignored_keys`` (the caller logs them once at INFO, see `Config.log_notes`).
* Offerings whose ``backend_type`` is not ``cscs-hpc-storage`` are skipped; each skip is a line in
  ``Config.warnings`` (the caller logs them at WARNING). Their other values are neither validated nor expanded.
* ``${NAME}`` in a string value is replaced by the environment variable ``NAME``; an unset variable is an error
  naming the key. ``$${`` stands for a literal ``${``. Keys are never expanded.
* Every problem is a `ConfigError` whose message reads ``"<file>: <key.path>: <what>"``; several problems give one
  such line each. The CLI maps it to exit status 78 (`EX_CONFIG`).

`load_config` does not log: logging is configured from the configuration it returns.
"""

from __future__ import annotations

import difflib
import functools
import ipaddress
import math
import os
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, NoReturn
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from annotated_types import Ge, Gt, Le
from pydantic import (
    AfterValidator,
    AllowInfNan,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    SecretStr,
    Strict,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails, PydanticCustomError

if TYPE_CHECKING:
    from cscs_storage_daemon.mapping import MappingSettings
    from cscs_storage_daemon.retry import RetryPolicy

__all__ = [
    "BACKEND_TYPE",
    "EX_CONFIG",
    "BackendComponent",
    "BackendSettings",
    "BrokerEndpoint",
    "BrokerSettings",
    "Config",
    "ConfigError",
    "ConfigProblem",
    "DaemonSettings",
    "HttpSettings",
    "LogSettings",
    "OfferingConfig",
    "OidcSettings",
    "RetrySettings",
    "SnapshotSettings",
    "config_from_data",
    "config_from_rendered",
    "effective_broker",
    "load_config",
    "render_effective_config",
    "validate_offering_settings",
    "validate_offerings_settings",
]

BACKEND_TYPE = "cscs-hpc-storage"
EX_CONFIG = 78  # sysexits.h EX_CONFIG: the exit status for any ConfigError
MASK = "***"
TOKEN_CREDENTIAL = "waldur-token"  # noqa: S105 - a file name: $CREDENTIALS_DIRECTORY/waldur-token (systemd LoadCredential=)
HTTP_TOKEN_CREDENTIAL = "http-token"  # noqa: S105 - a file name: $CREDENTIALS_DIRECTORY/http-token for http.auth: token
DEFAULT_WEBSOCKET_PATH = "/rmqws-stomp"  # the site agent's Web-STOMP path behind Waldur's ingress

# Keys the Waldur Site Agent accepts that the daemon does not use (reference storage-format.md §3.2 and the
# agent's configuration model). They are accepted so an agent configuration loads unchanged.
AGENT_TOP_LEVEL_KEYS = frozenset(
    {
        "sentry_dsn",
        "elastic_apm_server_url",
        "timezone",
        "global_proxy",
        "log_level",
        "reporting_periods",
        "expose_backend_error_details",
        "log_shipping",
    }
)
AGENT_OFFERING_KEYS = frozenset(
    {
        "oidc_token_url",
        "oidc_client_id",
        "oidc_client_secret",
        "stomp_membership_sync_enabled",
        "order_processing_backend",
        "membership_sync_backend",
        "reporting_backend",
        "username_management_backend",
        "resource_import_enabled",
        "username_reconciliation_enabled",
        "preserve_unmanaged_backend_users",
        "omit_anomalous_usage_components",
    }
)

# A value under a key matching this is a secret; `_file`, `_url` and `_path` keys hold locations, not secrets.
_SECRET_KEY = re.compile(r"token|secret|password|passwd|passcode|credential|dsn|(^|_)(api_?)?key($|_)", re.I)
_LOCATION_KEY = re.compile(r"_(file|url|path)$", re.I)
_ENV_REFERENCE = re.compile(r"\$(\$?)\{([^}]*)\}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_INT_TEXT = re.compile(r"[+-]?[0-9]+")
_NUMBER_TEXT = re.compile(r"[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)")
_OCTAL_MODE = re.compile(r"[0-7]{3,4}")
_HEX_UUID = re.compile(r"[0-9a-fA-F]{32}")
_LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


# --------------------------------------------------------------------------------------------------------------
# Errors


@dataclass(frozen=True)
class ConfigProblem:
    """One configuration problem: the dotted key path (``offerings[1].backend_settings.x``) and what is wrong."""

    path: str
    detail: str

    def format(self, file: str | None) -> str:
        parts = [part for part in (file, self.path) if part]
        return ": ".join([*parts, self.detail])


class ConfigError(Exception):
    """The configuration is unusable. ``str()`` is ``"<file>: <key.path>: <what>"``, one line per problem.

    ``file``, ``path`` and ``detail`` describe the first problem; ``problems`` holds all of them.
    """

    def __init__(self, file: str | None, path: str, detail: str, *, more: Sequence[ConfigProblem] = ()) -> None:
        self.file = file
        self.problems: list[ConfigProblem] = [ConfigProblem(path, detail), *more]
        self.path = path
        self.detail = detail
        super().__init__("\n".join(self.messages))

    @property
    def messages(self) -> list[str]:
        """Every problem as one ``"<file>: <key.path>: <what>"`` line."""
        return [problem.format(self.file) for problem in self.problems]

    @classmethod
    def from_problems(cls, file: str | None, problems: Sequence[ConfigProblem]) -> ConfigError:
        first, *rest = problems
        return cls(file, first.path, first.detail, more=rest)


def _fail(detail: str) -> NoReturn:
    """Raise a validation error whose message is exactly `detail` (no pydantic prefix)."""
    raise PydanticCustomError("config_value", "{detail}", {"detail": detail})


def _join_path(prefix: str, loc: Iterable[int | str]) -> str:
    path = prefix
    for item in loc:
        if isinstance(item, int):
            path += f"[{item}]"
        elif item == "[key]":
            path += " (key)"
        else:
            path = f"{path}.{item}" if path else str(item)
    return path


def _type_name(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    return type(value).__name__


def _shown(value: object, key: object) -> str:
    """`` (got X)`` for a short, non-secret value, else nothing."""
    if isinstance(key, str) and _SECRET_KEY.search(key) and not _LOCATION_KEY.search(key):
        return ""
    if isinstance(value, Mapping | list | tuple):
        return f" (got {_type_name(value)})"
    text = repr(value)
    return f" (got {text})" if len(text) <= 60 else ""


def _suggest(key: object) -> str:
    if not isinstance(key, str):
        return ""
    close = difflib.get_close_matches(key, sorted(_known_keys()), n=1, cutoff=0.75)
    return f" (did you mean {close[0]}?)" if close else ""


def _describe(error: ErrorDetails) -> str:
    """A short, human message for one pydantic error."""
    kind = error["type"]
    value = error.get("input")
    ctx = error.get("ctx") or {}
    key = error["loc"][-1] if error["loc"] else None
    got = _shown(value, key)
    if kind == "config_value":
        return error["msg"]
    if kind == "missing":
        return "required key is missing"
    if kind == "extra_forbidden":
        return "unknown key" + _suggest(key)
    if value is None and (kind.endswith("_type") or kind in ("model_attributes_type", "literal_error")):
        return "must not be null"
    if kind in ("value_error", "assertion_error"):
        return str(ctx.get("error", error["msg"]))
    if kind == "string_type":
        return f"must be a string{got}"
    if kind == "bool_type":
        return f"must be true or false{got}"
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return f"must be an integer{got}"
    if kind in ("float_type", "float_parsing"):
        return f"must be a number{got}"
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return f"must be a mapping{got}"
    if kind == "list_type":
        return f"must be a list{got}"
    if kind == "literal_error":
        return f"must be {ctx.get('expected')}{got}"
    if kind == "greater_than":
        return f"must be greater than {ctx.get('gt')}{got}"
    if kind == "greater_than_equal":
        return f"must be at least {ctx.get('ge')}{got}"
    if kind == "less_than_equal":
        return f"must be at most {ctx.get('le')}{got}"
    if kind == "finite_number":
        return "must be a finite number"
    message = error["msg"]
    return message[:1].lower() + message[1:]


def _problems_from(exc: ValidationError, prefix: str) -> list[ConfigProblem]:
    return [ConfigProblem(_join_path(prefix, err["loc"]), _describe(err)) for err in exc.errors()]


# --------------------------------------------------------------------------------------------------------------
# Value types


def _type_error(value: object, what: str) -> NoReturn:
    if value is None:
        _fail("must not be null")
    shown = f" ({str(value).lower()})" if isinstance(value, bool) else ""
    _fail(f"must be {what}, not {_type_name(value)}{shown}")


def _number(value: object) -> float:
    """A finite JSON/YAML number. Booleans and strings (even numeric ones) are errors (§7)."""
    if value is None or isinstance(value, bool) or not isinstance(value, int | float):
        if isinstance(value, str):
            _fail(f"must be a number, not a string ({value!r}): remove the quotes")
        _type_error(value, "a number")
    try:
        finite = math.isfinite(value)
    except OverflowError:
        finite = False
    if not finite:
        _fail(f"must be a finite number (got {value!r})")
    return value


def _positive_number(value: object) -> float:
    number = _number(value)
    if number <= 0:
        _fail(f"must be greater than 0 (got {number!r})")
    return number


def _text(value: object) -> str:
    """A string that is not empty after stripping white space; kept as written."""
    if not isinstance(value, str):
        _type_error(value, "a string")
    if not value.strip():
        _fail("must not be empty")
    return value


def _strict_bool(value: object) -> bool:
    if not isinstance(value, bool):
        _type_error(value, "true or false")
    return value


def _retention(value: object) -> int:
    if isinstance(value, float) and not isinstance(value, bool):
        _fail(f"must be a whole number such as 1000, not {value!r}")
    if value is None or isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, str):
            _fail(f"must be an integer, not a string ({value!r}): remove the quotes")
        _type_error(value, "an integer")
    if value < 1:
        _fail(f"must be at least 1 (got {value})")
    return value


def _file_mode(value: object) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        as_octal = f"0{value:o}" if 0 <= value <= 0o7777 else None
        hint = (
            f"; YAML reads an unquoted {as_octal} as the number {value}" if as_octal else f" (got the number {value})"
        )
        _fail(f'must be a quoted string of 3-4 octal digits, e.g. file_mode: "{as_octal or "0640"}"{hint}')
    if not isinstance(value, str):
        _type_error(value, 'a quoted string of 3-4 octal digits such as "0640"')
    if not _OCTAL_MODE.fullmatch(value):
        _fail(f'must be 3-4 octal digits (0-7) such as "0640" (got {value!r})')
    return value


def _timezone(value: object) -> str:
    if not isinstance(value, str):
        _type_error(value, "an IANA time zone name such as Europe/Zurich")
    problem = "must be an IANA time zone name such as UTC or Europe/Zurich"
    if not value.strip():
        _fail(f"{problem} (got an empty string)")
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        _fail(f"{problem}; {value!r} is not one")
    return value


def _env_int(value: object) -> object:
    """Daemon integers: no booleans; a decimal string (typically from ``${VAR}``) is converted."""
    if isinstance(value, bool):
        _fail(f"must be an integer, not a boolean ({str(value).lower()})")
    if isinstance(value, str) and _INT_TEXT.fullmatch(value.strip()):
        return int(value)
    return value


def _env_number(value: object) -> object:
    """Daemon durations: no booleans; a decimal string (typically from ``${VAR}``) is converted."""
    if isinstance(value, bool):
        _fail(f"must be a number, not a boolean ({str(value).lower()})")
    if isinstance(value, str) and _NUMBER_TEXT.fullmatch(value.strip()):
        text = value.strip()
        return int(text) if _INT_TEXT.fullmatch(text) else float(text)
    return value


def _env_bool(value: object) -> object:
    """Daemon and offering booleans: true/false, or the strings true/false/yes/no/on/off (from ``${VAR}``)."""
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in ("true", "yes", "on"):
            return True
        if lowered in ("false", "no", "off"):
            return False
    return value


def _none_to_empty(value: object) -> object:
    """A section whose keys are all commented out parses as null: treat it as empty (all defaults)."""
    return {} if value is None else value


def _path_value(value: object) -> object:
    if isinstance(value, str):
        if not value.strip():
            _fail("must not be empty")
        return Path(value).expanduser()
    if not isinstance(value, Path):
        _type_error(value, "a path")
    return value


Number = Annotated[float, PlainValidator(_number)]
PositiveNumber = Annotated[float, PlainValidator(_positive_number)]
Text = Annotated[str, PlainValidator(_text)]
StrictFlag = Annotated[bool, PlainValidator(_strict_bool)]
Flag = Annotated[bool, BeforeValidator(_env_bool), Strict()]
Str = Annotated[str, Strict()]
NonEmptyStr = Annotated[str, Strict(), AfterValidator(lambda v: v if v.strip() else _fail("must not be empty"))]
Int = Annotated[int, BeforeValidator(_env_int), Strict()]
Seconds = Annotated[float, BeforeValidator(_env_number), Strict(), AllowInfNan(False)]
Port = Annotated[int, BeforeValidator(_env_int), Strict(), Ge(1), Le(65535)]
PathValue = Annotated[Path, BeforeValidator(_path_value)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------------------------------------------
# backend_settings / backend_components (storage-json §7)


class BackendSettings(_Model):
    """An offering's ``backend_settings``, exactly the keys of storage-json §7, with their defaults."""

    output_directory: Text
    storage_file_system: Text = "lustre"
    inode_soft_coefficient: PositiveNumber = 1.33
    inode_hard_coefficient: Number = Field(default=2.0, validate_default=True)
    inode_base_multiplier: PositiveNumber = 1_000_000
    use_mock_target_items: StrictFlag = False
    timezone: Annotated[str, PlainValidator(_timezone)] = "UTC"
    snapshot_retention: Annotated[int, PlainValidator(_retention)] = 1000
    file_mode: Annotated[str, PlainValidator(_file_mode)] = "0640"

    @field_validator("inode_hard_coefficient", mode="after")
    @classmethod
    def _hard_above_soft(cls, value: float, info: ValidationInfo) -> float:
        soft = info.data.get("inode_soft_coefficient")
        if soft is not None and not value > soft:
            _fail(f"must be greater than inode_soft_coefficient ({soft!r})")
        return value

    @property
    def file_mode_int(self) -> int:
        """``file_mode`` as a number (``"0640"`` → ``0o640``)."""
        return int(self.file_mode, 8)

    @property
    def zoneinfo(self) -> ZoneInfo:
        """The configured time zone (file names and ``meta.date``)."""
        return ZoneInfo(self.timezone)

    @property
    def output_path(self) -> Path:
        """``output_directory`` as a path (relative paths resolve against the working directory)."""
        return Path(self.output_directory)

    def as_dict(self) -> dict[str, Any]:
        """The effective settings, every §7 key, in §7 order."""
        return self.model_dump()


class BackendComponent(_Model):
    """One ``backend_components`` entry: the site agent's component keys. Only ``unit_factor`` matters here."""

    measured_unit: Str
    accounting_type: Literal["usage", "limit", "one"]
    label: Str
    unit_factor: PositiveNumber = 1
    # Accepted for the site agent (it registers components in Waldur); the daemon does not use them.
    unit_factor_reporting: Any = None
    limit: Any = None
    description: Any = None
    min_value: Any = None
    max_value: Any = None
    max_available_limit: Any = None
    default_limit: Any = None
    limit_period: Any = None
    article_code: Any = None
    is_boolean: Any = None
    is_prepaid: Any = None
    min_prepaid_duration: Any = None
    max_prepaid_duration: Any = None
    prepaid_duration_step: Any = None
    min_renewal_duration: Any = None
    max_renewal_duration: Any = None
    renewal_duration_step: Any = None


def _check_components(components: dict[str, BackendComponent]) -> dict[str, BackendComponent]:
    if not components:
        _fail("at least one component is required (e.g. storage: {measured_unit: TB, accounting_type: limit, ...})")
    if len(components) > 1 and "storage" not in components:
        names = ", ".join(sorted(components))
        _fail(f"with several components one must be named 'storage' (got {names})")
    return components


Components = Annotated[dict[str, BackendComponent], AfterValidator(_check_components)]


def _storage_component(components: Mapping[str, BackendComponent]) -> tuple[str, BackendComponent]:
    name = "storage" if "storage" in components else next(iter(components))
    return name, components[name]


class _OfferingSettings(_Model):
    backend_settings: BackendSettings
    backend_components: Components


def _normalised_directory(directory: str) -> str:
    return os.path.normpath(os.path.abspath(directory))


def _duplicate_directories(entries: Sequence[tuple[str, BackendSettings]]) -> list[ConfigProblem]:
    """Two offerings writing into one directory (compared as normalised absolute paths), storage-json §5."""
    seen: dict[str, str] = {}
    problems = []
    for prefix, settings in entries:
        key = _normalised_directory(settings.output_directory)
        if key in seen:
            problems.append(
                ConfigProblem(
                    f"{prefix}.backend_settings.output_directory",
                    f"{settings.output_directory!r} is also the output_directory of {seen[key]}: "
                    "each offering needs its own directory",
                )
            )
        else:
            seen[key] = prefix
    return problems


def validate_offering_settings(
    backend_settings: Mapping[str, Any], backend_components: Mapping[str, Any]
) -> BackendSettings:
    """Validate one offering's ``backend_settings`` and ``backend_components`` (§7); raise `ConfigError`.

    Error paths start at ``backend_settings`` / ``backend_components``; the message has no file part.
    """
    try:
        validated = _OfferingSettings.model_validate(
            {"backend_settings": backend_settings, "backend_components": backend_components}
        )
    except ValidationError as exc:
        raise ConfigError.from_problems(None, _problems_from(exc, "")) from None
    return validated.backend_settings


def validate_offerings_settings(offerings: Sequence[Mapping[str, Any]]) -> list[BackendSettings]:
    """Validate several offerings' ``{"backend_settings", "backend_components"}`` together (§5, §7).

    Adds the cross-offering rule: no two offerings may share an ``output_directory``. Paths read
    ``offerings[i].backend_settings...``.
    """
    problems: list[ConfigProblem] = []
    validated: list[tuple[str, BackendSettings]] = []
    for index, offering in enumerate(offerings):
        prefix = f"offerings[{index}]"
        try:
            entry = _OfferingSettings.model_validate(
                {
                    "backend_settings": offering.get("backend_settings"),
                    "backend_components": offering.get("backend_components"),
                }
            )
        except ValidationError as exc:
            problems.extend(_problems_from(exc, prefix))
        else:
            validated.append((prefix, entry.backend_settings))
    problems.extend(_duplicate_directories(validated))
    if problems:
        raise ConfigError.from_problems(None, problems)
    return [settings for _, settings in validated]


# --------------------------------------------------------------------------------------------------------------
# Offerings


def _read_secret_file(path: Path) -> str:
    """The stripped contents of a token file; ValueError (with a message) when unreadable or empty."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"cannot read {str(path)!r}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{str(path)!r} is not UTF-8 text") from None
    token = text.strip()
    if not token:
        raise ValueError(f"{str(path)!r} is empty")
    return token


def _credential_path(name: str) -> Path | None:
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    return Path(directory) / name if directory else None


def _check_api_url(value: str) -> str:
    parts = urlsplit(value.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        _fail(f"must be an absolute http:// or https:// URL (got {value!r})")
    if parts.query or parts.fragment:
        _fail("must not carry a query or a fragment")
    return value.strip()


def _check_uuid(value: str) -> str:
    if not _HEX_UUID.fullmatch(value.strip().replace("-", "")):
        _fail(f"must be a UUID (32 hex digits, dashes allowed) (got {value!r})")
    return value.strip()


def _check_websocket_path(value: str | None) -> str | None:
    if value is not None and value != "" and not value.startswith("/"):
        _fail(f"must start with '/' (got {value!r})")
    return value


class OfferingConfig(_Model):
    """One ``offerings:`` entry with ``backend_type: cscs-hpc-storage``.

    The token comes from ``waldur_api_token``, else ``waldur_api_token_file`` (read, stripped), else
    ``$CREDENTIALS_DIRECTORY/waldur-token``. ``stomp_ws_host`` / ``stomp_ws_port`` / ``stomp_ws_path`` (the site
    agent's Web-STOMP settings) are broker defaults for this offering (see `effective_broker`).
    """

    name: NonEmptyStr
    waldur_api_url: Annotated[str, Strict(), AfterValidator(_check_api_url)]
    waldur_api_token_file: PathValue | None = None
    waldur_api_token: SecretStr = Field(default_factory=lambda: SecretStr(""), validate_default=True)
    waldur_offering_uuid: Annotated[str, Strict(), AfterValidator(_check_uuid)]
    backend_type: Annotated[str, Strict(), AfterValidator(str.lower)]
    backend_settings: BackendSettings
    backend_components: Components
    stomp_enabled: Flag = False
    mqtt_enabled: Flag = False
    websocket_use_tls: Flag = True
    verify_ssl: Flag = True
    stomp_ws_host: NonEmptyStr | None = None
    stomp_ws_port: Port | None = None
    stomp_ws_path: Annotated[str | None, AfterValidator(_check_websocket_path)] = None

    @model_validator(mode="before")
    @classmethod
    def _drop_agent_keys(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            return {key: value for key, value in data.items() if key not in AGENT_OFFERING_KEYS}
        return data

    @field_validator("waldur_api_token_file", mode="after")
    @classmethod
    def _token_file_readable(cls, value: Path | None) -> Path | None:
        if value is not None:
            try:
                _read_secret_file(value)
            except ValueError as exc:
                _fail(str(exc))
        return value

    @field_validator("waldur_api_token", mode="before")
    @classmethod
    def _resolve_token(cls, value: Any, info: ValidationInfo) -> Any:
        if "waldur_api_token_file" not in info.data:
            return value  # the token file is invalid; that error is reported on its own key
        token_file: Path | None = info.data["waldur_api_token_file"]
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        if value is not None and not isinstance(value, str):
            _fail(f"must be a string, not {_type_name(value)}: quote the token")
        explicit = (value or "").strip()
        if explicit and token_file is not None:
            _fail("set either waldur_api_token or waldur_api_token_file, not both")
        if explicit:
            return explicit
        if token_file is not None:
            try:
                return _read_secret_file(token_file)
            except ValueError as exc:
                _fail(f"waldur_api_token_file: {exc}")
        credential = _credential_path(TOKEN_CREDENTIAL)
        if credential is not None and credential.exists():
            try:
                return _read_secret_file(credential)
            except ValueError as exc:
                _fail(f"systemd credential {TOKEN_CREDENTIAL}: {exc}")
        _fail(
            "no Waldur API token: set waldur_api_token or waldur_api_token_file, "
            f"or provide the systemd credential {TOKEN_CREDENTIAL} ($CREDENTIALS_DIRECTORY/{TOKEN_CREDENTIAL})"
        )

    @field_validator("backend_type", mode="after")
    @classmethod
    def _cscs_only(cls, value: str) -> str:
        if value != BACKEND_TYPE:
            _fail(f"must be {BACKEND_TYPE!r} (got {value!r})")
        return value

    @property
    def offering_uuid(self) -> uuid.UUID:
        return uuid.UUID(self.offering_uuid_hex)

    @property
    def offering_uuid_hex(self) -> str:
        """``waldur_offering_uuid`` as 32 lower-case hex digits."""
        return self.waldur_offering_uuid.replace("-", "").lower()

    @property
    def api_root(self) -> str:
        """The Waldur server root, without the ``/api`` suffix and trailing slash (``https://h``)."""
        return self.waldur_api_url.rstrip("/").removesuffix("/api")

    @property
    def api_url(self) -> str:
        """The Waldur REST API base, always ending in ``/api/`` (``https://h/api/``)."""
        return f"{self.api_root}/api/"

    @property
    def api_host(self) -> str:
        """The host name of ``waldur_api_url`` (the broker host by default)."""
        return urlsplit(self.waldur_api_url).hostname or ""

    @property
    def storage_component(self) -> str:
        """The name of the storage component: ``storage``, or the only component."""
        return _storage_component(self.backend_components)[0]

    @property
    def unit_factor(self) -> float:
        """The storage component's ``unit_factor``."""
        return float(_storage_component(self.backend_components)[1].unit_factor)

    def components_dict(self) -> dict[str, dict[str, Any]]:
        """``backend_components`` as plain dicts (keys not set are left out)."""
        return {name: c.model_dump(exclude_none=True) for name, c in self.backend_components.items()}

    def mapping_settings(self) -> MappingSettings:
        """The mapping's view of this offering (`cscs_storage_daemon.mapping.MappingSettings`)."""
        from cscs_storage_daemon.mapping import MappingSettings

        return MappingSettings.from_backend(self.backend_settings.as_dict(), self.components_dict())


# --------------------------------------------------------------------------------------------------------------
# daemon:


class BrokerSettings(_Model):
    """``daemon.broker``. Unset values are derived per offering by `effective_broker`."""

    protocol: Literal["stomp", "mqtt"] | None = None
    host: NonEmptyStr | None = None
    port: Port | None = None
    websocket_path: Annotated[str | None, AfterValidator(_check_websocket_path)] = None
    tls: Flag | None = None
    prefetch: Annotated[Int, Ge(1), Le(65535)] = 10
    heartbeat_ms: Annotated[Int, Ge(0)] = 10000
    username: Str | None = None
    password: SecretStr | None = None
    vhost: Str | None = None


class SnapshotSettings(_Model):
    """``daemon.snapshot``: all.json debounce (seconds)."""

    quiet: Annotated[Seconds, Ge(0)] = 2.0
    max_wait: Annotated[Seconds, Gt(0)] = Field(default=30.0, validate_default=True)
    heartbeat: Annotated[Seconds, Gt(0)] = Field(default=3600.0, validate_default=True)

    @field_validator("max_wait", mode="after")
    @classmethod
    def _max_wait_after_quiet(cls, value: float, info: ValidationInfo) -> float:
        quiet = info.data.get("quiet")
        if quiet is not None and value < quiet:
            _fail(f"must be at least quiet ({quiet:g}) (got {value:g})")
        return value

    @field_validator("heartbeat", mode="after")
    @classmethod
    def _heartbeat_after_max_wait(cls, value: float, info: ValidationInfo) -> float:
        max_wait = info.data.get("max_wait")
        if max_wait is not None and value < max_wait:
            _fail(f"must be at least max_wait ({max_wait:g}) (got {value:g})")
        return value


class RetrySettings(_Model):
    """``daemon.retry``: Waldur REST retries (attempts; waits and total in seconds) and the HTTP timeout."""

    attempts: Annotated[Int, Ge(1), Le(100)] = 6
    max_wait: Annotated[Seconds, Gt(0)] = 30.0
    total: Annotated[Seconds, Gt(0)] = 120.0
    timeout: Annotated[Seconds, Gt(0)] = 10.0

    def policy(self) -> RetryPolicy:
        """The gateway's `cscs_storage_daemon.retry.RetryPolicy` for these settings."""
        from cscs_storage_daemon.retry import RetryPolicy

        return RetryPolicy(attempts=self.attempts, max_wait=self.max_wait, total=self.total)


class OidcSettings(_Model):
    """``daemon.http.oidc``: JWTs from ``issuer`` for ``audience``; ``jwks_url`` unset = from discovery."""

    issuer: Annotated[str, Strict(), AfterValidator(_check_api_url)]
    audience: NonEmptyStr
    jwks_url: Annotated[str, Strict(), AfterValidator(_check_api_url)] | None = None
    required_role: NonEmptyStr | None = None
    role_claim: NonEmptyStr = "roles"


def _split_listen(value: str) -> tuple[str, int]:
    match = re.fullmatch(r"\[([^\]]+)\]:([0-9]+)|([^:\[\]]+):([0-9]+)", value.strip())
    if not match:
        raise ValueError(f'must be "host:port" (IPv6 as "[::1]:8080") (got {value!r})')
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4))
    if not 1 <= port <= 65535:
        raise ValueError(f"port must be 1-65535 (got {port})")
    return host, port


def _check_listen(value: str) -> str:
    try:
        _split_listen(value)
    except ValueError as exc:
        _fail(str(exc))
    return value.strip()


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class HttpSettings(_Model):
    """``daemon.http``: the read-only HTTP API (spec http-api.md "Access control")."""

    enabled: Flag = True
    listen: Annotated[str, Strict(), AfterValidator(_check_listen)] = "127.0.0.1:8080"
    auth: Literal["none", "token", "oidc"] = Field(default="none", validate_default=True)
    token_file: PathValue | None = Field(default=None, validate_default=True)
    oidc: OidcSettings | None = Field(default=None, validate_default=True)

    @field_validator("auth", mode="after")
    @classmethod
    def _none_only_on_loopback(cls, value: str, info: ValidationInfo) -> str:
        listen = info.data.get("listen")
        if value == "none" and info.data.get("enabled") and listen and not _is_loopback(_split_listen(listen)[0]):
            _fail(f"none is only allowed on a loopback listener (listen is {listen}): use token or oidc")
        return value

    @field_validator("token_file", mode="after")
    @classmethod
    def _token_file_for_token_auth(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if info.data.get("auth") != "token" or not info.data.get("enabled"):
            return value
        if value is None:
            value = _credential_path(HTTP_TOKEN_CREDENTIAL)
            if value is None:
                _fail(f"required when auth is token (or provide the systemd credential {HTTP_TOKEN_CREDENTIAL})")
        if not value.is_file():
            _fail(f"{str(value)!r} does not exist or is not a file")
        return value

    @field_validator("oidc", mode="after")
    @classmethod
    def _oidc_for_oidc_auth(cls, value: OidcSettings | None, info: ValidationInfo) -> OidcSettings | None:
        if info.data.get("auth") == "oidc" and info.data.get("enabled") and value is None:
            _fail("required when auth is oidc (issuer and audience at least)")
        return value

    @property
    def listen_host(self) -> str:
        return _split_listen(self.listen)[0]

    @property
    def listen_port(self) -> int:
        return _split_listen(self.listen)[1]


def _log_level(value: object) -> object:
    if isinstance(value, str) and value.strip().lower() in _LOG_LEVELS:
        return value.strip().lower()
    if isinstance(value, str):
        _fail(f"must be one of {', '.join(_LOG_LEVELS)} (got {value!r})")
    return value


class LogSettings(_Model):
    """``daemon.log``: ``format`` auto (console on a terminal, else JSON) | json | console; ``level`` lower-case."""

    format: Literal["auto", "json", "console"] = "auto"
    level: Annotated[str, Strict(), BeforeValidator(_log_level)] = "info"


class DaemonSettings(_Model):
    """The ``daemon:`` section; every key has a default. Durations are in seconds."""

    broker: Annotated[BrokerSettings, BeforeValidator(_none_to_empty)] = Field(default_factory=BrokerSettings)
    event_mode: Literal["unified", "legacy"] = "unified"
    state_directory: PathValue = Path("/var/lib/cscs-storage-daemon")
    auto_approve: Flag = True
    complete_orders: Flag = True
    workers: Annotated[Int, Ge(1), Le(256)] = 4
    reconcile_interval: Annotated[Seconds, Gt(0)] = 600.0
    removed_retention: Annotated[Seconds, Ge(0)] = 7 * 24 * 3600.0
    shutdown_timeout: Annotated[Seconds, Gt(0)] = 30.0
    healthz_broker_grace: Annotated[Seconds, Ge(0)] = 60.0
    snapshot: Annotated[SnapshotSettings, BeforeValidator(_none_to_empty)] = Field(default_factory=SnapshotSettings)
    retry: Annotated[RetrySettings, BeforeValidator(_none_to_empty)] = Field(default_factory=RetrySettings)
    http: Annotated[HttpSettings, BeforeValidator(_none_to_empty)] = Field(
        default_factory=lambda: HttpSettings.model_validate({})
    )
    log: Annotated[LogSettings, BeforeValidator(_none_to_empty)] = Field(default_factory=LogSettings)


# --------------------------------------------------------------------------------------------------------------
# The whole file


class Config(_Model):
    """The validated configuration.

    ``offerings`` holds only the ``cscs-hpc-storage`` offerings, in file order. ``ignored_keys`` lists the site
    agent keys present but unused (``sentry_dsn``, ``offerings[*].reporting_backend``); ``warnings`` the skipped
    offerings. Neither is logged here: call `log_notes` once logging is configured.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    offerings: list[OfferingConfig]
    daemon: DaemonSettings = Field(default_factory=DaemonSettings)
    source: Path = Path("<config>")
    ignored_keys: list[str] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)

    def offering(self, offering_uuid: str | uuid.UUID) -> OfferingConfig | None:
        """The offering with this uuid (dashed or hex, any case), or None."""
        wanted = offering_uuid.hex if isinstance(offering_uuid, uuid.UUID) else str(offering_uuid)
        wanted = wanted.strip().replace("-", "").lower()
        return next((o for o in self.offerings if o.offering_uuid_hex == wanted), None)

    def broker_for(self, offering: OfferingConfig) -> BrokerEndpoint:
        """Same as `effective_broker(self, offering)`."""
        return effective_broker(self, offering)

    def log_notes(self, logger: Any) -> None:
        """Log the ignored keys once at INFO and each warning at WARNING (stdlib or structlog logger)."""
        if self.ignored_keys:
            logger.info("config.ignored_keys: site agent keys not used by the daemon: " + ", ".join(self.ignored_keys))
        for warning in self.warnings:
            logger.warning("config.warning: " + warning)


# --------------------------------------------------------------------------------------------------------------
# Broker resolution


class BrokerEndpoint(_Model):
    """Where and how one offering connects to the broker, every default resolved."""

    protocol: Literal["stomp", "mqtt"]
    host: str
    port: int
    websocket_path: str | None
    tls: bool
    verify_ssl: bool
    prefetch: int
    heartbeat_ms: int
    username: str | None = None
    password: SecretStr | None = None
    vhost: str | None = None

    @property
    def websocket(self) -> bool:
        return self.websocket_path is not None

    @property
    def url(self) -> str:
        """For logs: ``wss://host:443/rmqws-stomp``, ``stomp+ssl://host:61613``, ``mqtt://host:1883``."""
        if self.websocket_path is not None:
            return f"{'wss' if self.tls else 'ws'}://{self.host}:{self.port}{self.websocket_path}"
        return f"{self.protocol}{'+ssl' if self.tls else ''}://{self.host}:{self.port}"


def effective_broker(config: Config, offering: OfferingConfig) -> BrokerEndpoint:
    """Resolve ``daemon.broker`` for one offering.

    * protocol: ``daemon.broker.protocol``, else ``mqtt`` when the offering has ``mqtt_enabled`` and not
      ``stomp_enabled``, else ``stomp``;
    * host: ``daemon.broker.host``, else the offering's ``stomp_ws_host`` (STOMP), else the host of
      ``waldur_api_url``;
    * websocket_path: ``daemon.broker.websocket_path`` (``""`` forces plain TCP), else (STOMP) the offering's
      ``stomp_ws_path``, or ``/rmqws-stomp`` when only ``stomp_ws_host`` / ``stomp_ws_port`` are set, as the site
      agent does; else none (plain TCP);
    * port: ``daemon.broker.port``, else the offering's ``stomp_ws_port`` (STOMP over WebSocket), else 443 with a
      WebSocket path, 61613 for STOMP, 1883 for MQTT;
    * tls: ``daemon.broker.tls``, else the offering's ``websocket_use_tls``; ``verify_ssl`` is the offering's.
    """
    broker = config.daemon.broker
    if broker.protocol is not None:
        protocol = broker.protocol
    else:
        protocol = "mqtt" if offering.mqtt_enabled and not offering.stomp_enabled else "stomp"
    agent_ws = protocol == "stomp" and any(
        v is not None for v in (offering.stomp_ws_host, offering.stomp_ws_port, offering.stomp_ws_path)
    )
    if broker.websocket_path is not None:
        websocket_path = broker.websocket_path or None
    elif agent_ws:
        websocket_path = offering.stomp_ws_path or DEFAULT_WEBSOCKET_PATH
    else:
        websocket_path = None
    host = broker.host or (offering.stomp_ws_host if protocol == "stomp" else None) or offering.api_host
    if broker.port is not None:
        port = broker.port
    elif websocket_path is not None and protocol == "stomp" and offering.stomp_ws_port is not None:
        port = offering.stomp_ws_port
    elif websocket_path is not None:
        port = 443
    else:
        port = 61613 if protocol == "stomp" else 1883
    return BrokerEndpoint(
        protocol=protocol,
        host=host,
        port=port,
        websocket_path=websocket_path,
        tls=offering.websocket_use_tls if broker.tls is None else broker.tls,
        verify_ssl=offering.verify_ssl,
        prefetch=broker.prefetch,
        heartbeat_ms=broker.heartbeat_ms,
        username=broker.username,
        password=broker.password,
        vhost=broker.vhost,
    )


# --------------------------------------------------------------------------------------------------------------
# YAML and ${ENV}


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key written twice in one mapping (PyYAML silently keeps the last one)."""


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: dict[Any, int] = {}
    for key_node, _value in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            first = seen.get(key)
        except TypeError:
            continue  # unhashable: construct_mapping reports it
        if first is not None:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first written on line {first})", key_node.start_mark
            )
        seen[key] = key_node.start_mark.line + 1
    loader.flatten_mapping(node)
    return loader.construct_mapping(node, deep=True)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def _parse_yaml(text: str, file: str) -> Any:
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = " ".join(part for part in (exc.context, exc.problem) if part) or "invalid YAML"
        raise ConfigError(file, where, f"YAML syntax error: {what}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(file, "", f"YAML syntax error: {exc}") from None


def _expand_text(text: str, path: str, problems: list[ConfigProblem]) -> str:
    def replace(match: re.Match[str]) -> str:
        escaped, name = match.group(1), match.group(2)
        if escaped:
            return "${" + name + "}"
        if not _ENV_NAME.fullmatch(name):
            problems.append(
                ConfigProblem(path, f"invalid environment reference ${{{name}}} (write $${{ for a literal ${{)")
            )
            return match.group(0)
        value = os.environ.get(name)
        if value is None:
            problems.append(ConfigProblem(path, f"environment variable {name} is not set"))
            return match.group(0)
        return value

    return _ENV_REFERENCE.sub(replace, text)


def _expand_env(value: Any, path: str, problems: list[ConfigProblem]) -> Any:
    """``${NAME}`` in every string value below `value`; problems (unset variables) are collected."""
    if isinstance(value, str):
        return _expand_text(value, path, problems) if "${" in value else value
    if isinstance(value, Mapping):
        return {k: _expand_env(v, _join_path(path, [str(k)]), problems) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v, f"{path}[{i}]", problems) for i, v in enumerate(value)]
    return value


# --------------------------------------------------------------------------------------------------------------
# Loading


def _secrets_as_written(data: Mapping[str, Any], expand_env: bool) -> list[str]:
    """The tokens and the broker password of a document (``${...}`` expanded): a value echoed by an error (a token
    pasted into the wrong key, say) is masked with them, so a configuration error never shows a secret."""
    candidates: list[Any] = []
    offerings = data.get("offerings")
    if isinstance(offerings, list):
        candidates += [entry.get("waldur_api_token") for entry in offerings if isinstance(entry, Mapping)]
    daemon = data.get("daemon")
    if isinstance(daemon, Mapping) and isinstance(daemon.get("broker"), Mapping):
        candidates.append(daemon["broker"].get("password"))
    found = []
    for value in candidates:
        if isinstance(value, str):
            if expand_env and "${" in value:
                value = _expand_text(value, "", [])
            if len(value) >= 8:  # the floor render_effective_config masks at
                found.append(value)
    return sorted(found, key=len, reverse=True)


def _mask_secrets(text: str, secrets: Sequence[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, MASK)
    return text


def load_config(path: str | Path) -> Config:
    """Read, expand and validate the YAML configuration file; raise `ConfigError` on any problem."""
    file = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(file, "", f"cannot read the configuration file: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(file, "", "the configuration file is not UTF-8 text") from None
    data = _parse_yaml(text, file)
    return config_from_data(data, source=Path(path).resolve(), file=file)


def config_from_data(
    data: Any, *, source: str | Path = "<config>", file: str | None = None, expand_env: bool = True
) -> Config:
    """Validate an already parsed configuration (the YAML document as Python data).

    `file` labels error messages (default: `source`). With `expand_env` false ``${...}`` is left as written.
    """
    label = file if file is not None else str(source)
    problems: list[ConfigProblem] = []
    if data is None:
        raise ConfigError(label, "offerings", "required key is missing (the file is empty)")
    if not isinstance(data, Mapping):
        raise ConfigError(
            label, "", f"the document must be a mapping with offerings: and daemon:, not {_type_name(data)}"
        )

    ignored: set[str] = set()
    for key in data:
        if key in AGENT_TOP_LEVEL_KEYS:
            ignored.add(str(key))
        elif key not in ("offerings", "daemon"):
            problems.append(ConfigProblem(str(key), "unknown key" + _suggest(key)))

    warnings: list[str] = []
    offerings = _load_offerings(data.get("offerings"), "offerings" in data, expand_env, problems, ignored, warnings)

    daemon_raw = _none_to_empty(data.get("daemon"))
    if expand_env:
        daemon_raw = _expand_env(daemon_raw, "daemon", problems)
    daemon: DaemonSettings | None = None
    try:
        daemon = DaemonSettings.model_validate(daemon_raw)
    except ValidationError as exc:
        problems.extend(_problems_from(exc, "daemon"))

    if problems or daemon is None:
        secrets = _secrets_as_written(data, expand_env)
        raise ConfigError.from_problems(
            label, [ConfigProblem(p.path, _mask_secrets(p.detail, secrets)) for p in problems]
        )
    return Config(
        offerings=[offering for _, offering in offerings],
        daemon=daemon,
        source=Path(source),
        ignored_keys=sorted(ignored),
        warnings=[f"{label}: {warning}" for warning in warnings],
    )


def _load_offerings(
    raw: Any,
    present: bool,
    expand_env: bool,
    problems: list[ConfigProblem],
    ignored: set[str],
    warnings: list[str],
) -> list[tuple[str, OfferingConfig]]:
    if not present:
        problems.append(ConfigProblem("offerings", "required key is missing"))
        return []
    if not isinstance(raw, list):
        detail = "must not be null" if raw is None else f"must be a list, not {_type_name(raw)}"
        problems.append(ConfigProblem("offerings", detail))
        return []
    loaded: list[tuple[str, OfferingConfig]] = []
    for index, entry in enumerate(raw):
        prefix = f"offerings[{index}]"
        if not isinstance(entry, Mapping):
            problems.append(ConfigProblem(prefix, f"must be a mapping, not {_type_name(entry)}"))
            continue
        backend_type = entry.get("backend_type")
        if isinstance(backend_type, str) and expand_env:
            backend_type = _expand_env(backend_type, f"{prefix}.backend_type", problems)
        if isinstance(backend_type, str) and backend_type.strip().lower() != BACKEND_TYPE:
            name = entry.get("name")
            named = f" ({name!r})" if isinstance(name, str) else ""
            warnings.append(f"{prefix}{named}: backend_type {backend_type!r} is not {BACKEND_TYPE!r}: offering skipped")
            continue
        ignored.update(f"offerings[*].{key}" for key in entry if key in AGENT_OFFERING_KEYS)
        expanded = _expand_env(entry, prefix, problems) if expand_env else entry
        try:
            loaded.append((prefix, OfferingConfig.model_validate(expanded)))
        except ValidationError as exc:
            problems.extend(_problems_from(exc, prefix))

    seen_uuids: dict[str, str] = {}
    for prefix, offering in loaded:
        other = seen_uuids.setdefault(offering.offering_uuid_hex, prefix)
        if other != prefix:
            problems.append(
                ConfigProblem(f"{prefix}.waldur_offering_uuid", f"the same offering is already configured in {other}")
            )
    problems.extend(_duplicate_directories([(prefix, o.backend_settings) for prefix, o in loaded]))
    if not loaded and not problems:
        problems.append(ConfigProblem("offerings", f"no offering with backend_type {BACKEND_TYPE!r}"))
    return loaded


# --------------------------------------------------------------------------------------------------------------
# Rendering (check-config, the debug endpoint, the capture header)


def _plain(value: Any) -> Any:
    """JSON-safe copy: SecretStr → "***", paths → str, tuples → lists."""
    if isinstance(value, SecretStr):
        return MASK if value.get_secret_value() else ""
    if isinstance(value, BaseModel):
        return _plain(value.model_dump())
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def _mask(value: Any, secrets: Sequence[str], key: str | None = None) -> Any:
    """Mask scalar values of secret-looking keys, and any occurrence of a known secret in any string."""
    if isinstance(value, dict):
        return {k: _mask(v, secrets, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_mask(v, secrets) for v in value]
    if isinstance(value, str):
        if value and key is not None and _SECRET_KEY.search(key) and not _LOCATION_KEY.search(key):
            return MASK
        for secret in secrets:
            value = value.replace(secret, MASK)
        return value
    if value is not None and key is not None and _SECRET_KEY.search(key) and not _LOCATION_KEY.search(key):
        return MASK
    return value


def render_effective_config(config: Config) -> dict[str, Any]:
    """The effective configuration, JSON-safe, every secret masked as ``"***"``.

    Shape: ``{"offerings": [...], "daemon": {...}, "source", "ignored_keys", "warnings"}``. Each offering has every
    effective value (``backend_settings`` with all §7 defaults), its token as ``"***"`` (the token file is
    resolved and not shown) and a ``broker`` entry with `effective_broker` resolved. `config_from_rendered` turns
    the result back into a `Config` (replay).
    """
    secrets: list[str] = []
    offerings = []
    for offering in config.offerings:
        secrets.append(offering.waldur_api_token.get_secret_value())
        entry = offering.model_dump(exclude={"waldur_api_token_file"}, exclude_none=True)
        entry["backend_components"] = offering.components_dict()
        entry["broker"] = effective_broker(config, offering).model_dump()
        offerings.append(entry)
    if config.daemon.broker.password is not None:
        secrets.append(config.daemon.broker.password.get_secret_value())
    rendered = {
        "offerings": offerings,
        "daemon": config.daemon.model_dump(),
        "source": config.source,
        "ignored_keys": list(config.ignored_keys),
        "warnings": list(config.warnings),
    }
    # Belt and braces: a token that turns up anywhere else (say, expanded into a name) is masked too.
    return dict(_mask(_plain(rendered), [s for s in secrets if len(s) >= 8]))


def config_from_rendered(data: Mapping[str, Any], *, source: str | Path = "<capture>") -> Config:
    """Rebuild a `Config` from `render_effective_config` output (tokens stay ``"***"``; nothing is expanded)."""
    offerings = [
        {k: v for k, v in entry.items() if k != "broker"} if isinstance(entry, Mapping) else entry
        for entry in data.get("offerings") or []
    ]
    daemon = data.get("daemon")
    if isinstance(daemon, Mapping) and isinstance(daemon.get("broker"), Mapping):
        broker = {k: v for k, v in daemon["broker"].items() if not (k == "password" and v == MASK)}
        daemon = {**daemon, "broker": broker}
    return config_from_data({"offerings": offerings, "daemon": daemon}, source=source, expand_env=False)


# --------------------------------------------------------------------------------------------------------------


@functools.cache
def _known_keys() -> frozenset[str]:
    """Every key any configuration section accepts (for "did you mean" hints)."""
    models: list[type[BaseModel]] = [
        BackendSettings,
        BackendComponent,
        OfferingConfig,
        BrokerSettings,
        SnapshotSettings,
        RetrySettings,
        OidcSettings,
        HttpSettings,
        LogSettings,
        DaemonSettings,
    ]
    keys = {key for model in models for key in model.model_fields}
    return frozenset(keys | AGENT_TOP_LEVEL_KEYS | AGENT_OFFERING_KEYS | {"offerings", "daemon"})
