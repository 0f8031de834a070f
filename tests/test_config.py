"""Configuration loading and validation (spec operations.md "Configuration", storage-json.md §5 and §7)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import SecretStr

from cscs_storage_daemon.config import (
    BackendSettings,
    Config,
    ConfigError,
    DaemonSettings,
    config_from_rendered,
    effective_broker,
    load_config,
    render_effective_config,
    validate_offering_settings,
    validate_offerings_settings,
)
from tests.fixtures.config_files import TEST_TOKEN, ConfigFileFactory, sample_offering, sample_offering_uuid

REPO = Path(__file__).resolve().parent.parent
GOLDEN = Path("/work/shared/golden/settings_cases.jsonl")
if not GOLDEN.exists():
    GOLDEN = REPO.parent / "shared" / "golden" / "settings_cases.jsonl"
EXAMPLE = REPO / "config" / "example.yaml"
SECTION7_KEYS = [
    "output_directory",
    "storage_file_system",
    "inode_soft_coefficient",
    "inode_hard_coefficient",
    "inode_base_multiplier",
    "use_mock_target_items",
    "timezone",
    "snapshot_retention",
    "file_mode",
]


@pytest.fixture(autouse=True)
def _no_systemd_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)


def _golden_cases() -> list[dict[str, Any]]:
    if not GOLDEN.exists():
        return []
    return [json.loads(line) for line in GOLDEN.read_text(encoding="utf-8").splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------------------------
# Golden settings cases


@pytest.mark.parametrize("case", _golden_cases(), ids=lambda case: case["name"])
def test_golden_settings_case(case: dict[str, Any]) -> None:
    def validate() -> Any:
        if "offerings" in case:
            return [settings.as_dict() for settings in validate_offerings_settings(case["offerings"])]
        return validate_offering_settings(**case["settings"]).as_dict()

    if "expected" in case:
        effective = validate()
        assert effective == case["expected"]
        for settings in effective if isinstance(effective, list) else [effective]:
            assert list(settings) == SECTION7_KEYS
    else:
        with pytest.raises(ConfigError) as caught:
            validate()
        message = str(caught.value)
        assert case["expected_error"]["contains"].lower() in message.lower()
        assert case["expected_error"]["field"] in caught.value.path


def test_golden_file_has_every_case() -> None:
    cases = _golden_cases()
    assert len(cases) == 38
    assert len({case["name"] for case in cases}) == len(cases)


# ------------------------------------------------------------------------------------------------------------
# Loading a file


def test_minimal_file_gets_every_default(config_file_factory: ConfigFileFactory, tmp_path: Path) -> None:
    config = load_config(config_file_factory())
    assert isinstance(config, Config)
    assert config.source == (tmp_path / "config.yaml").resolve()
    assert config.warnings == []
    assert config.ignored_keys == []
    [offering] = config.offerings
    assert offering.waldur_api_token.get_secret_value() == TEST_TOKEN
    assert isinstance(offering.waldur_api_token, SecretStr)
    assert offering.offering_uuid_hex == sample_offering_uuid("capstor").replace("-", "")
    assert offering.verify_ssl is True
    assert offering.backend_settings.as_dict() == {
        "output_directory": str(tmp_path / "out" / "capstor"),
        "storage_file_system": "lustre",
        "inode_soft_coefficient": 1.33,
        "inode_hard_coefficient": 2.0,
        "inode_base_multiplier": 1000000,
        "use_mock_target_items": False,
        "timezone": "UTC",
        "snapshot_retention": 1000,
        "file_mode": "0640",
    }
    assert offering.backend_settings.file_mode_int == 0o640
    assert offering.backend_settings.zoneinfo.key == "UTC"
    assert config.daemon == DaemonSettings()
    daemon = config.daemon
    assert (daemon.event_mode, daemon.auto_approve, daemon.complete_orders, daemon.workers) == (
        "unified",
        True,
        True,
        4,
    )
    assert (daemon.reconcile_interval, daemon.removed_retention) == (600, 7 * 24 * 3600)
    assert (daemon.shutdown_timeout, daemon.healthz_broker_grace) == (30, 60)
    assert daemon.state_directory == Path("/var/lib/cscs-storage-daemon")
    assert (daemon.snapshot.quiet, daemon.snapshot.max_wait, daemon.snapshot.heartbeat) == (2, 30, 3600)
    assert (daemon.retry.attempts, daemon.retry.max_wait, daemon.retry.total, daemon.retry.timeout) == (6, 30, 120, 10)
    assert (daemon.http.enabled, daemon.http.listen, daemon.http.auth) == (True, "127.0.0.1:8080", "none")
    assert (daemon.http.listen_host, daemon.http.listen_port) == ("127.0.0.1", 8080)
    assert (daemon.log.format, daemon.log.level) == ("auto", "info")
    assert (daemon.broker.prefetch, daemon.broker.heartbeat_ms) == (10, 10000)


@pytest.mark.parametrize(
    ("url", "root"),
    [
        ("https://waldur.example.org/api/", "https://waldur.example.org"),
        ("https://waldur.example.org/api", "https://waldur.example.org"),
        ("https://waldur.example.org/", "https://waldur.example.org"),
        ("https://waldur.example.org", "https://waldur.example.org"),
        ("https://example.org/waldur/api/", "https://example.org/waldur"),
        ("http://localhost:8000/api/", "http://localhost:8000"),
    ],
)
def test_api_url_with_or_without_api_suffix(
    config_file_factory: ConfigFileFactory, tmp_path: Path, url: str, root: str
) -> None:
    path = config_file_factory([sample_offering(output_directory=tmp_path / "o", waldur_api_url=url)])
    [offering] = load_config(path).offerings
    assert offering.api_root == root
    assert offering.api_url == root + "/api/"


def test_error_message_names_file_and_key_path(
    config_file_factory: ConfigFileFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config_file_factory(
        [
            sample_offering("capstor", output_directory=tmp_path / "a"),
            sample_offering(
                "vast",
                output_directory=tmp_path / "b",
                backend_settings={"inode_hard_coefficient": 1.2},
            ),
        ]
    )
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as caught:
        load_config("config.yaml")
    assert str(caught.value) == (
        "config.yaml: offerings[1].backend_settings.inode_hard_coefficient: "
        "must be greater than inode_soft_coefficient (1.33)"
    )
    assert (caught.value.file, caught.value.path) == (
        "config.yaml",
        "offerings[1].backend_settings.inode_hard_coefficient",
    )


def test_every_problem_is_reported(config_file_factory: ConfigFileFactory, tmp_path: Path) -> None:
    path = config_file_factory(
        [sample_offering(output_directory=tmp_path / "a", backend_settings={"timezone": "Nowhere/Else"})],
        daemon={"workers": 0, "snapshot": {"quiet": 5, "max_wait": 1}},
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    paths = [problem.path for problem in caught.value.problems]
    assert paths == ["offerings[0].backend_settings.timezone", "daemon.workers", "daemon.snapshot.max_wait"]
    assert len(str(caught.value).splitlines()) == 3
    assert all(line.startswith(f"{path}: ") for line in caught.value.messages)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the configuration file"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    ("text", "path", "detail"),
    [
        ("", "offerings", "required key is missing"),
        ("- a\n- b\n", "", "must be a mapping"),
        ("daemon: {}\n", "offerings", "required key is missing"),
        ("offerings: []\n", "offerings", "no offering with backend_type 'cscs-hpc-storage'"),
        ("offerings:\n", "offerings", "must not be null"),
        ("offerings: [3]\n", "offerings[0]", "must be a mapping"),
    ],
)
def test_document_shape_errors(config_file_factory: ConfigFileFactory, text: str, path: str, detail: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(config_file_factory(text=text))
    assert caught.value.path == path
    assert detail in caught.value.detail


# ------------------------------------------------------------------------------------------------------------
# YAML


def test_yaml_syntax_error_names_file_and_line(config_file_factory: ConfigFileFactory) -> None:
    path = config_file_factory(text="offerings:\n  - name: x\n    backend_settings: {output_directory: /x\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: line ")
    assert "YAML syntax error" in message


def test_yaml_syntax_error_line_number(config_file_factory: ConfigFileFactory) -> None:
    path = config_file_factory(text="offerings: []\ndaemon:\n  workers: 4\n   bad: indent\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.path.startswith("line 4,")


def test_duplicate_key_is_an_error(config_file_factory: ConfigFileFactory) -> None:
    path = config_file_factory(text="daemon:\n  workers: 4\n  workers: 8\nofferings: []\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.path.startswith("line 3,")
    assert "duplicate key 'workers' (first written on line 2)" in str(caught.value)


def test_unquoted_file_mode_says_to_quote_it(config_file_factory: ConfigFileFactory, tmp_path: Path) -> None:
    document = yaml.safe_dump({"offerings": [sample_offering(output_directory=tmp_path / "o")]}, sort_keys=False)
    document = document.replace(
        f"output_directory: {tmp_path / 'o'}", f"output_directory: {tmp_path / 'o'}\n    file_mode: 0640"
    )
    path = config_file_factory(text=document)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.path == "offerings[0].backend_settings.file_mode"
    assert "quote" in caught.value.detail
    assert "416" in caught.value.detail


# ------------------------------------------------------------------------------------------------------------
# ${ENV}


def test_env_references_are_expanded(
    config_file_factory: ConfigFileFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CSD_TEST_TOKEN", "token-from-env-0001")
    monkeypatch.setenv("CSD_TEST_OUT", str(tmp_path / "env-out"))
    monkeypatch.setenv("CSD_TEST_PORT", "15674")
    monkeypatch.setenv("CSD_TEST_TLS", "false")
    offering = sample_offering(
        output_directory="${CSD_TEST_OUT}/capstor",
        waldur_api_token="${CSD_TEST_TOKEN}",
        name="literal $${NOT_EXPANDED}",
    )
    path = config_file_factory([offering], daemon={"broker": {"port": "${CSD_TEST_PORT}", "tls": "${CSD_TEST_TLS}"}})
    config = load_config(path)
    [loaded] = config.offerings
    assert loaded.waldur_api_token.get_secret_value() == "token-from-env-0001"
    assert loaded.backend_settings.output_directory == f"{tmp_path / 'env-out'}/capstor"
    assert loaded.name == "literal ${NOT_EXPANDED}"
    assert config.daemon.broker.port == 15674
    assert config.daemon.broker.tls is False


def test_unset_env_reference_is_an_error_naming_the_key(
    config_file_factory: ConfigFileFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CSD_TEST_UNSET", raising=False)
    path = config_file_factory([sample_offering(output_directory=tmp_path / "o", waldur_api_token="${CSD_TEST_UNSET}")])
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.path == "offerings[0].waldur_api_token"
    assert caught.value.detail == "environment variable CSD_TEST_UNSET is not set"


def test_unset_env_reference_in_daemon_section(
    config_file_factory: ConfigFileFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CSD_TEST_UNSET", raising=False)
    path = config_file_factory(daemon={"http": {"listen": "127.0.0.1:${CSD_TEST_UNSET}"}})
    with pytest.raises(ConfigError, match=r"daemon\.http\.listen: environment variable CSD_TEST_UNSET is not set"):
        load_config(path)


def test_malformed_env_reference_is_an_error(config_file_factory: ConfigFileFactory, tmp_path: Path) -> None:
    path = config_file_factory([sample_offering(output_directory=tmp_path / "o", name="${NAME:-default}")])
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.path == "offerings[0].name"
    assert "invalid environment reference" in caught.value.detail


# ------------------------------------------------------------------------------------------------------------
# Token


def _without_token(tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    offering = sample_offering(output_directory=tmp_path / "o", **overrides)
    if "waldur_api_token" not in overrides:
        del offering["waldur_api_token"]
    return offering


def test_token_from_file(config_file_factory: ConfigFileFactory, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("  file-token-123456\n\n", encoding="utf-8")
    path = config_file_factory([_without_token(tmp_path, waldur_api_token_file=str(token_file))])
    [offering] = load_config(path).offerings
    assert offering.waldur_api_token.get_secret_value() == "file-token-123456"
    assert offering.waldur_api_token_file == token_file


def test_token_from_systemd_credentials(
    config_file_factory: ConfigFileFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "waldur-token").write_text("credential-token-42\n", encoding="utf-8")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    path = config_file_factory([_without_token(tmp_path)])
    [offering] = load_config(path).offerings
    assert offering.waldur_api_token.get_secret_value() == "credential-token-42"


def test_explicit_token_wins_over_systemd_credentials(
    config_file_factory: ConfigFileFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "waldur-token").write_text("credential-token-42\n", encoding="utf-8")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    [offering] = load_config(config_file_factory()).offerings
    assert offering.waldur_api_token.get_secret_value() == TEST_TOKEN


@pytest.mark.parametrize("token", [None, "", "   "])
def test_missing_token_is_an_error(config_file_factory: ConfigFileFactory, tmp_path: Path, token: str | None) -> None:
    offering = (
        _without_token(tmp_path)
        if token is None
        else sample_offering(output_directory=tmp_path / "o", waldur_api_token=token)
    )
    with pytest.raises(ConfigError) as caught:
        load_config(config_file_factory([offering]))
    assert caught.value.path == "offerings[0].waldur_api_token"
    assert "no Waldur API token" in caught.value.detail
    assert "waldur-token" in caught.value.detail


def test_token_file_problems(config_file_factory: ConfigFileFactory, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n", encoding="utf-8")
    for token_file, detail in ((tmp_path / "missing", "cannot read"), (empty, "is empty")):
        path = config_file_factory([_without_token(tmp_path, waldur_api_token_file=str(token_file))])
        with pytest.raises(ConfigError) as caught:
            load_config(path)
        assert caught.value.path == "offerings[0].waldur_api_token_file"
        assert detail in caught.value.detail
        assert len(caught.value.problems) == 1


def test_token_and_token_file_together_is_an_error(config_file_factory: ConfigFileFactory, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("file-token-123456", encoding="utf-8")
    path = config_file_factory(
        [sample_offering(output_directory=tmp_path / "o", waldur_api_token_file=str(token_file))]
    )
    with pytest.raises(ConfigError, match="either waldur_api_token or waldur_api_token_file"):
        load_config(path)


def test_numeric_token_must_be_quoted_and_is_not_echoed(config_file_factory: ConfigFileFactory, tmp_path: Path) -> None:
    path = config_file_factory([sample_offering(output_directory=tmp_path / "o", waldur_api_token=987654321)])
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.path == "offerings[0].waldur_api_token"
    assert "987654321" not in str(caught.value)


# ------------------------------------------------------------------------------------------------------------
# Unknown keys, site agent keys, skipped offerings


@pytest.mark.parametrize(
    ("where", "path", "hint"),
    [
        ("top", "offering", "did you mean offerings?"),
        ("offering", "offerings[0].stomp_enabeld", "did you mean stomp_enabled?"),
        ("backend", "offerings[0].backend_settings.outptu_directory", "did you mean output_directory?"),
        ("component", "offerings[0].backend_components.storage.unit_facter", "did you mean unit_factor?"),
        ("daemon", "daemon.snapshot.quiett", "did you mean quiet?"),
    ],
)
def test_unknown_key_error_names_the_path(
    config_file_factory: ConfigFileFactory, tmp_path: Path, where: str, path: str, hint: str
) -> None:
    offering = sample_offering(output_directory=tmp_path / "o")
    extra: dict[str, Any] = {}
    daemon: dict[str, Any] | None = None
    if where == "top":
        extra["offering"] = []
    elif where == "offering":
        offering["stomp_enabeld"] = True
    elif where == "backend":
        offering["backend_settings"]["outptu_directory"] = "/x"
    elif where == "component":
        offering["backend_components"]["storage"]["unit_facter"] = 2
    else:
        daemon = {"snapshot": {"quiett": 1}}
    with pytest.raises(ConfigError) as caught:
        load_config(config_file_factory([offering], daemon=daemon, extra=extra))
    assert caught.value.path == path
    assert caught.value.detail == f"unknown key ({hint})"


def test_site_agent_keys_are_accepted_and_listed_as_ignored(
    config_file_factory: ConfigFileFactory, tmp_path: Path
) -> None:
    agent_keys: dict[str, Any] = {
        "order_processing_backend": "cscs-hpc-storage",
        "reporting_backend": "cscs-hpc-storage",
        "membership_sync_backend": "",
        "username_management_backend": "base",
        "resource_import_enabled": False,
        "oidc_client_secret": "agent-oidc-secret-value",
    }
    offerings = [
        sample_offering("capstor", output_directory=tmp_path / "a", mqtt_enabled=False, **agent_keys),
        sample_offering("vast", output_directory=tmp_path / "b", reporting_backend="cscs-hpc-storage"),
    ]
    path = config_file_factory(offerings, extra={"sentry_dsn": "", "timezone": "UTC", "log_level": "INFO"})
    config = load_config(path)
    assert len(config.offerings) == 2
    assert config.ignored_keys == sorted(
        ["log_level", "sentry_dsn", "timezone", *(f"offerings[*].{key}" for key in agent_keys)]
    )
    assert "agent-oidc-secret-value" not in json.dumps(render_effective_config(config))


def test_site_agent_component_keys_are_accepted(config_file_factory: ConfigFileFactory, tmp_path: Path) -> None:
    offering = sample_offering(output_directory=tmp_path / "o")
    offering["backend_components"]["storage"].update(
        {
            "min_value": 0,
            "max_value": 1000,
            "max_available_limit": 5000,
            "default_limit": 10,
            "limit_period": "total",
            "description": "Storage space",
            "unit_factor_reporting": 1,
        }
    )
    [loaded] = load_config(config_file_factory([offering])).offerings
    assert loaded.backend_components["storage"].max_value == 1000
    assert loaded.components_dict()["storage"]["limit_period"] == "total"


def test_other_backend_types_are_skipped_with_a_warning(
    config_file_factory: ConfigFileFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CSD_TEST_UNSET", raising=False)
    slurm = {
        "name": "Cluster",
        "waldur_api_url": "https://waldur.example.org/api/",
        "waldur_api_token": "${CSD_TEST_UNSET}",  # a skipped offering is not expanded
        "waldur_offering_uuid": "x",
        "backend_type": "SLURM",
        "backend_settings": {"default_account": "root"},
        "backend_components": {"cpu": {"measured_unit": "k-Hours", "limit": 10}},
    }
    path = config_file_factory(
        [slurm, sample_offering(output_directory=tmp_path / "o", backend_type="CSCS-HPC-Storage")]
    )
    config = load_config(path)
    [offering] = config.offerings
    assert offering.backend_type == "cscs-hpc-storage"
    assert config.warnings == [
        f"{path}: offerings[0] ('Cluster'): backend_type 'SLURM' is not 'cscs-hpc-storage': offering skipped"
    ]


def test_log_notes(config_file_factory: ConfigFileFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    other = sample_offering("x", output_directory=tmp_path / "x", backend_type="slurm")
    path = config_file_factory([other, sample_offering(output_directory=tmp_path / "o")], extra={"sentry_dsn": ""})
    config = load_config(path)
    logger = logging.getLogger("test_config")
    with caplog.at_level(logging.INFO, logger="test_config"):
        config.log_notes(logger)
    levels = [(record.levelname, record.getMessage()) for record in caplog.records]
    assert levels[0][0] == "INFO" and "sentry_dsn" in levels[0][1]
    assert levels[1][0] == "WARNING" and "offering skipped" in levels[1][1]


# ------------------------------------------------------------------------------------------------------------
# Offerings: cross-checks


def test_same_output_directory_after_normalisation(config_file_factory: ConfigFileFactory, tmp_path: Path) -> None:
    path = config_file_factory(
        [
            sample_offering("capstor", output_directory=tmp_path / "shared"),
            sample_offering("vast", output_directory=f"{tmp_path}/x/../shared/"),
        ]
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.path == "offerings[1].backend_settings.output_directory"
    assert "offerings[0]" in caught.value.detail


def test_same_offering_twice_is_an_error(config_file_factory: ConfigFileFactory, tmp_path: Path) -> None:
    first = sample_offering("capstor", output_directory=tmp_path / "a")
    second = sample_offering("vast", output_directory=tmp_path / "b")
    second["waldur_offering_uuid"] = first["waldur_offering_uuid"].replace("-", "").upper()
    with pytest.raises(ConfigError) as caught:
        load_config(config_file_factory([first, second]))
    assert caught.value.path == "offerings[1].waldur_offering_uuid"


@pytest.mark.parametrize(
    ("key", "value", "detail"),
    [
        ("waldur_offering_uuid", "not-a-uuid", "must be a UUID"),
        ("waldur_api_url", "waldur.example.org/api/", "must be an absolute http:// or https:// URL"),
        ("name", "", "must not be empty"),
        ("verify_ssl", 1, "must be true or false"),
        ("backend_settings", None, "must not be null"),
    ],
)
def test_offering_value_errors(
    config_file_factory: ConfigFileFactory, tmp_path: Path, key: str, value: Any, detail: str
) -> None:
    offering = sample_offering(output_directory=tmp_path / "o")
    offering[key] = value
    with pytest.raises(ConfigError) as caught:
        load_config(config_file_factory([offering]))
    assert caught.value.path == f"offerings[0].{key}"
    assert detail in caught.value.detail


def test_null_backend_setting_is_an_error() -> None:
    with pytest.raises(ConfigError) as caught:
        validate_offering_settings(
            {"output_directory": "/x", "timezone": None},
            {"storage": dict(measured_unit="TB", accounting_type="limit", label="S")},
        )
    assert (caught.value.path, caught.value.detail) == ("backend_settings.timezone", "must not be null")


def test_several_components_need_one_named_storage() -> None:
    component = {"measured_unit": "TB", "accounting_type": "limit", "label": "S"}
    with pytest.raises(ConfigError) as caught:
        validate_offering_settings({"output_directory": "/x"}, {"a": component, "b": component})
    assert caught.value.path == "backend_components"
    assert "storage" in caught.value.detail


@pytest.mark.parametrize("unit_factor", [0, -1, True, "1", None])
def test_unit_factor_must_be_a_positive_number(unit_factor: Any) -> None:
    component = {"measured_unit": "TB", "accounting_type": "limit", "label": "S", "unit_factor": unit_factor}
    with pytest.raises(ConfigError) as caught:
        validate_offering_settings({"output_directory": "/x"}, {"storage": component})
    assert caught.value.path == "backend_components.storage.unit_factor"


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("snapshot_retention", 10.0),
        ("snapshot_retention", True),
        ("inode_base_multiplier", float("inf")),
        ("inode_soft_coefficient", float("nan")),
        ("storage_file_system", "   "),
        ("file_mode", "06400"),
    ],
)
def test_more_section7_rules(key: str, value: Any) -> None:
    component = {"measured_unit": "TB", "accounting_type": "limit", "label": "S"}
    with pytest.raises(ConfigError) as caught:
        validate_offering_settings({"output_directory": "/x", key: value}, {"storage": component})
    assert caught.value.path == f"backend_settings.{key}"


def test_offering_helpers(config_file_factory: ConfigFileFactory, tmp_path: Path) -> None:
    offering = sample_offering(output_directory=tmp_path / "o")
    offering["backend_components"] = {
        "disk": {"measured_unit": "GB", "accounting_type": "limit", "label": "Disk", "unit_factor": 0.001}
    }
    config = load_config(config_file_factory([offering]))
    [loaded] = config.offerings
    assert (loaded.storage_component, loaded.unit_factor) == ("disk", 0.001)
    assert config.offering(loaded.offering_uuid_hex.upper()) is loaded
    assert config.offering(str(loaded.offering_uuid)) is loaded
    assert config.offering("0" * 32) is None


def test_mapping_settings(config_file_factory: ConfigFileFactory, tmp_path: Path) -> None:
    mapping = pytest.importorskip("cscs_storage_daemon.mapping")
    offering = sample_offering(
        output_directory=tmp_path / "o",
        backend_settings={"inode_soft_coefficient": 1.5, "inode_hard_coefficient": 2.5, "storage_file_system": "gpfs"},
    )
    offering["backend_components"]["storage"]["unit_factor"] = 2
    [loaded] = load_config(config_file_factory([offering])).offerings
    settings = loaded.mapping_settings()
    assert isinstance(settings, mapping.MappingSettings)
    assert (settings.inode_soft_coefficient, settings.inode_hard_coefficient) == (1.5, 2.5)
    assert (settings.storage_file_system, settings.storage_component, settings.unit_factor) == ("gpfs", "storage", 2)


# ------------------------------------------------------------------------------------------------------------
# daemon:


@pytest.mark.parametrize(
    ("daemon", "path", "detail"),
    [
        ({"workers": 0}, "daemon.workers", "must be at least 1"),
        ({"workers": True}, "daemon.workers", "not a boolean"),
        ({"workers": 2.5}, "daemon.workers", "must be an integer"),
        ({"reconcile_interval": -1}, "daemon.reconcile_interval", "must be greater than 0"),
        ({"event_mode": "both"}, "daemon.event_mode", "must be 'unified' or 'legacy'"),
        ({"snapshot": {"quiet": 40}}, "daemon.snapshot.max_wait", "must be at least quiet (40)"),
        ({"snapshot": {"max_wait": 7200}}, "daemon.snapshot.heartbeat", "must be at least max_wait (7200)"),
        ({"retry": {"attempts": 0}}, "daemon.retry.attempts", "must be at least 1"),
        ({"retry": {"timeout": 0}}, "daemon.retry.timeout", "must be greater than 0"),
        ({"broker": {"protocol": "amqp"}}, "daemon.broker.protocol", "must be 'stomp' or 'mqtt'"),
        ({"broker": {"port": 70000}}, "daemon.broker.port", "must be at most 65535"),
        ({"broker": {"websocket_path": "ws"}}, "daemon.broker.websocket_path", "must start with '/'"),
        ({"broker": {"prefetch": 0}}, "daemon.broker.prefetch", "must be at least 1"),
        ({"http": {"listen": "8080"}}, "daemon.http.listen", 'must be "host:port"'),
        ({"http": {"listen": "0.0.0.0:8080"}}, "daemon.http.auth", "only allowed on a loopback listener"),
        ({"http": {"auth": "token"}}, "daemon.http.token_file", "required when auth is token"),
        ({"http": {"auth": "oidc"}}, "daemon.http.oidc", "required when auth is oidc"),
        ({"http": {"auth": "oidc", "oidc": {"issuer": "https://id"}}}, "daemon.http.oidc.audience", "required key"),
        ({"log": {"level": "verbose"}}, "daemon.log.level", "must be one of debug, info"),
        ({"log": {"format": "text"}}, "daemon.log.format", "must be 'auto', 'json' or 'console'"),
        ({"state_directory": ""}, "daemon.state_directory", "must not be empty"),
    ],
)
def test_daemon_value_errors(
    config_file_factory: ConfigFileFactory, daemon: dict[str, Any], path: str, detail: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(config_file_factory(daemon=daemon))
    assert caught.value.path == path
    assert detail in caught.value.detail


def test_daemon_values(config_file_factory: ConfigFileFactory, tmp_path: Path) -> None:
    tokens = tmp_path / "http-tokens"
    tokens.write_text("a\n", encoding="utf-8")
    daemon = {
        "http": {"listen": "[::]:9000", "auth": "token", "token_file": str(tokens)},
        "log": {"level": "DEBUG", "format": "json"},
        "snapshot": {"quiet": 0.1, "max_wait": 0.5, "heartbeat": 5},
        "state_directory": str(tmp_path / "state"),
        "broker": None,  # a section with every key commented out
    }
    config = load_config(config_file_factory(daemon=daemon))
    assert (config.daemon.http.listen_host, config.daemon.http.listen_port) == ("::", 9000)
    assert config.daemon.http.token_file == tokens
    assert config.daemon.log.level == "debug"
    assert config.daemon.snapshot.quiet == 0.1
    assert config.daemon.state_directory == tmp_path / "state"
    policy = pytest.importorskip("cscs_storage_daemon.retry")
    assert config.daemon.retry.policy() == policy.RetryPolicy(attempts=6, max_wait=30.0, total=120.0)


def test_http_token_file_from_systemd_credentials(
    config_file_factory: ConfigFileFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "http-token").write_text("t\n", encoding="utf-8")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    config = load_config(config_file_factory(daemon={"http": {"listen": "0.0.0.0:8080", "auth": "token"}}))
    assert config.daemon.http.token_file == credentials / "http-token"


def test_http_disabled_skips_listener_checks(config_file_factory: ConfigFileFactory) -> None:
    config = load_config(
        config_file_factory(daemon={"http": {"enabled": False, "listen": "0.0.0.0:1", "auth": "token"}})
    )
    assert config.daemon.http.enabled is False


# ------------------------------------------------------------------------------------------------------------
# Broker defaults


def _broker(
    config_file_factory: ConfigFileFactory, tmp_path: Path, broker: dict[str, Any] | None = None, **offering: Any
) -> Any:
    config = load_config(
        config_file_factory(
            [sample_offering(output_directory=tmp_path / "o", **offering)],
            daemon={"broker": broker} if broker is not None else None,
        )
    )
    return effective_broker(config, config.offerings[0])


def test_broker_default_is_stomp_over_tcp_to_the_api_host(
    config_file_factory: ConfigFileFactory, tmp_path: Path
) -> None:
    broker = _broker(config_file_factory, tmp_path, waldur_api_url="https://waldur.example.org:8443/api/")
    assert (broker.protocol, broker.host, broker.port, broker.websocket_path) == (
        "stomp",
        "waldur.example.org",
        61613,
        None,
    )
    assert (broker.tls, broker.verify_ssl, broker.prefetch, broker.heartbeat_ms) == (True, True, 10, 10000)
    assert broker.url == "stomp+ssl://waldur.example.org:61613"


def test_broker_websocket_defaults_to_443(config_file_factory: ConfigFileFactory, tmp_path: Path) -> None:
    broker = _broker(config_file_factory, tmp_path, {"websocket_path": "/rmqws-stomp"})
    assert (broker.protocol, broker.port, broker.websocket_path, broker.tls) == ("stomp", 443, "/rmqws-stomp", True)
    assert broker.url == "wss://waldur.example.org:443/rmqws-stomp"


def test_broker_mqtt_from_the_offering(config_file_factory: ConfigFileFactory, tmp_path: Path) -> None:
    broker = _broker(config_file_factory, tmp_path, stomp_enabled=False, mqtt_enabled=True, websocket_use_tls=False)
    assert (broker.protocol, broker.port, broker.tls, broker.websocket_path) == ("mqtt", 1883, False, None)
    broker = _broker(
        config_file_factory, tmp_path, {"websocket_path": "/rmqws"}, stomp_enabled=False, mqtt_enabled=True
    )
    assert (broker.protocol, broker.port) == ("mqtt", 443)


def test_broker_explicit_values_win(config_file_factory: ConfigFileFactory, tmp_path: Path) -> None:
    settings = {
        "protocol": "mqtt",
        "host": "localhost",
        "port": 11883,
        "tls": False,
        "prefetch": 3,
        "heartbeat_ms": 0,
        "username": "guest",
        "password": "broker-password-xyz",
        "vhost": "/",
    }
    broker = _broker(config_file_factory, tmp_path, settings, verify_ssl=False)
    assert (broker.protocol, broker.host, broker.port, broker.tls) == ("mqtt", "localhost", 11883, False)
    assert (broker.prefetch, broker.heartbeat_ms, broker.username, broker.vhost) == (3, 0, "guest", "/")
    assert broker.password.get_secret_value() == "broker-password-xyz"
    assert broker.verify_ssl is False


def test_broker_uses_the_site_agent_stomp_ws_keys(config_file_factory: ConfigFileFactory, tmp_path: Path) -> None:
    broker = _broker(config_file_factory, tmp_path, stomp_ws_host="localhost", stomp_ws_port=15674, stomp_ws_path="/ws")
    assert (broker.host, broker.port, broker.websocket_path) == ("localhost", 15674, "/ws")
    broker = _broker(config_file_factory, tmp_path, stomp_ws_host="rmq.example.org")
    assert (broker.host, broker.port, broker.websocket_path) == ("rmq.example.org", 443, "/rmqws-stomp")
    broker = _broker(config_file_factory, tmp_path, {"websocket_path": ""}, stomp_ws_path="/ws")
    assert (broker.port, broker.websocket_path) == (61613, None)


# ------------------------------------------------------------------------------------------------------------
# render_effective_config


def test_render_masks_every_secret(config_file_factory: ConfigFileFactory, tmp_path: Path) -> None:
    token = "zz-distinctive-token-7f3a9c"
    password = "zz-broker-password-41b2"
    path = config_file_factory(
        [sample_offering(output_directory=tmp_path / "o", waldur_api_token=token, name=f"named {token}")],
        daemon={"broker": {"password": password, "username": "guest"}},
    )
    config = load_config(path)
    rendered = render_effective_config(config)
    text = json.dumps(rendered)  # JSON-safe
    assert token not in text
    assert password not in text
    [offering] = rendered["offerings"]
    assert offering["waldur_api_token"] == "***"
    assert offering["name"] == "named ***"
    assert offering["broker"]["password"] == "***"
    assert offering["broker"]["username"] == "guest"
    assert rendered["daemon"]["broker"]["password"] == "***"
    assert offering["backend_settings"] == config.offerings[0].backend_settings.as_dict()
    assert offering["broker"]["port"] == 61613
    assert rendered["daemon"]["snapshot"] == {"quiet": 2.0, "max_wait": 30.0, "heartbeat": 3600.0}
    assert rendered["source"] == str(path.resolve())


def test_render_never_holds_the_token_file_contents(config_file_factory: ConfigFileFactory, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("zz-token-in-a-file-5521\n", encoding="utf-8")
    path = config_file_factory([_without_token(tmp_path, waldur_api_token_file=str(token_file))])
    text = json.dumps(render_effective_config(load_config(path)))
    assert "zz-token-in-a-file-5521" not in text


def test_rendered_config_loads_back(config_file_factory: ConfigFileFactory, tmp_path: Path) -> None:
    offerings = [
        sample_offering("capstor", output_directory=tmp_path / "a", backend_settings={"timezone": "Europe/Zurich"}),
        sample_offering("vast", output_directory=tmp_path / "b"),
    ]
    config = load_config(config_file_factory(offerings, daemon={"broker": {"password": "pw-123456789"}, "workers": 2}))
    rendered = json.loads(json.dumps(render_effective_config(config)))
    again = config_from_rendered(rendered)
    assert [o.backend_settings for o in again.offerings] == [o.backend_settings for o in config.offerings]
    assert again.offerings[0].waldur_api_token.get_secret_value() == "***"
    assert again.daemon.workers == 2
    assert again.daemon.broker.password is None


# ------------------------------------------------------------------------------------------------------------
# config/example.yaml


def test_example_config_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WALDUR_API_TOKEN", "example-token-0000")
    config = load_config(EXAMPLE)
    assert [Path(o.backend_settings.output_directory).name for o in config.offerings] == ["capstor", "vast", "iopsstor"]
    assert all(o.backend_settings.output_directory.startswith("/var/lib/cscs-storage/") for o in config.offerings)
    assert len({o.offering_uuid_hex for o in config.offerings}) == 3
    assert all(o.waldur_api_token.get_secret_value() == "example-token-0000" for o in config.offerings)
    assert config.warnings == [] and config.ignored_keys == []
    # the daemon section shows the defaults, apart from the Web-STOMP path of Waldur's ingress
    assert config.daemon.model_copy(update={"broker": DaemonSettings().broker}) == DaemonSettings()
    assert config.daemon.broker.websocket_path == "/rmqws-stomp"
    broker = effective_broker(config, config.offerings[2])
    assert (broker.host, broker.port, broker.tls) == ("waldur.example.org", 443, True)


def test_example_config_needs_the_token_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WALDUR_API_TOKEN", raising=False)
    with pytest.raises(ConfigError) as caught:
        load_config(EXAMPLE)
    assert [p.path for p in caught.value.problems] == [f"offerings[{i}].waldur_api_token" for i in range(3)]
    assert "WALDUR_API_TOKEN" in caught.value.detail


def test_example_backend_settings_comments_match_the_defaults() -> None:
    defaults = BackendSettings(output_directory="/x").as_dict()
    data = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    explicit = data["offerings"][0]["backend_settings"]
    assert set(explicit) == set(SECTION7_KEYS)
    for key in SECTION7_KEYS[1:]:
        if key != "timezone":
            assert explicit[key] == defaults[key], key
