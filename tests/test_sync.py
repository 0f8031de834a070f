"""`sync` / `waldur_cscs_storage_sync` end to end: real HTTP to the fake Waldur, files on disk."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from cscs_storage_daemon.cli import main, seed_sync_main
from cscs_storage_daemon.testing.fake_waldur import FakeWaldur
from cscs_storage_daemon.testing.sample_data import populate

TOKEN = "sync-test-token-7f3a9c"


def write_config(tmp_path: Path, fake: FakeWaldur, offerings: list[Any], **daemon: Any) -> Path:
    data = {
        "offerings": [
            {
                "name": f"CSCS {o.slug}",
                "waldur_api_url": fake.url,
                "waldur_api_token": fake.token,
                "waldur_offering_uuid": o.uuid,
                "backend_type": "cscs-hpc-storage",
                "backend_settings": {"output_directory": str(tmp_path / "out" / o.slug)},
                "backend_components": {
                    "storage": {"measured_unit": "TB", "accounting_type": "limit", "label": "Storage", "unit_factor": 1}
                },
            }
            for o in offerings
        ],
        "daemon": {"state_directory": str(tmp_path / "state"), "retry": {"attempts": 3, "max_wait": 0.05, "total": 5}}
        | daemon,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def all_json(directory: Path) -> dict[str, Any]:
    files = sorted(directory.glob("*-all.json"))
    assert len(files) == 1, files
    return json.loads(files[0].read_text())


@pytest.fixture
def fake() -> Any:
    with FakeWaldur(token=TOKEN) as f:
        yield f


def test_sync_writes_every_page_per_offering(tmp_path: Path, fake: FakeWaldur) -> None:
    population = populate(fake, ["capstor", "vast"], n=250, seed=3)
    config = write_config(tmp_path, fake, population.offerings)
    assert main(["sync", "-c", str(config)]) == 0
    for offering in population.offerings:
        document = all_json(tmp_path / "out" / offering.slug)
        resources = document["result"]["storageResources"]
        assert len(resources) == 250
        assert document["result"]["paginate"] == {"current": 1, "limit": 250, "offset": 0, "pages": 1, "total": 250}
        assert {r["storageSystem"]["key"] for r in resources} == {offering.slug}
        assert document["meta"]["appVersion"] == "1.4.0"


def test_invalid_resource_is_reported_and_the_rest_written(
    tmp_path: Path, fake: FakeWaldur, capsys: pytest.CaptureFixture[str]
) -> None:
    population = populate(fake, ["capstor"], n=5, seed=1)
    bad = dict(population.resources[0])
    bad["attributes"] = {"permissions": "999"}
    fake.put_resource(bad)
    config = write_config(tmp_path, fake, population.offerings)
    assert main(["sync", "-c", str(config)]) == 3
    err = capsys.readouterr().err
    assert bad["uuid"] in err and "attributes.permissions" in err
    document = all_json(tmp_path / "out" / "capstor")
    assert len(document["result"]["storageResources"]) == 4


def test_dry_run_creates_nothing_and_prints_the_true_count(
    tmp_path: Path, fake: FakeWaldur, capsys: pytest.CaptureFixture[str]
) -> None:
    population = populate(fake, ["capstor"], n=150, seed=2)
    config = write_config(tmp_path, fake, population.offerings)
    assert seed_sync_main(["-c", str(config), "--dry-run"]) == 0
    assert "150 resources" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "state").exists()


def test_offering_uuid_dashed_or_hex_selects_one(tmp_path: Path, fake: FakeWaldur) -> None:
    population = populate(fake, ["capstor", "vast"], n=3)
    config = write_config(tmp_path, fake, population.offerings)
    vast = population.offerings[1]
    dashed = f"{vast.uuid[:8]}-{vast.uuid[8:12]}-{vast.uuid[12:16]}-{vast.uuid[16:20]}-{vast.uuid[20:]}"
    assert main(["sync", "-c", str(config), "--offering-uuid", dashed.upper()]) == 0
    assert (tmp_path / "out" / "vast").is_dir()
    assert not (tmp_path / "out" / "capstor").exists()
    assert main(["sync", "-c", str(config), "--offering-uuid", "0" * 32]) == 1


def test_waldur_down_exits_1(tmp_path: Path, fake: FakeWaldur) -> None:
    population = populate(fake, ["capstor"], n=3)
    config = write_config(tmp_path, fake, population.offerings)
    fake.set_faults(error_rate=1.0)
    assert main(["sync", "-c", str(config)]) == 1
    assert not list((tmp_path / "out").glob("**/*-all.json"))


def test_config_error_exits_78_naming_the_key(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("offerings: []\ndaemon:\n  workerz: 4\n")
    result = subprocess.run(
        [sys.executable, "-m", "cscs_storage_daemon.cli", "sync", "-c", str(path)], capture_output=True, text=True
    )
    assert result.returncode == 78
    assert "daemon.workerz" in result.stderr


@pytest.mark.parametrize("command", ["run", "serve", "sync"])
def test_a_config_error_is_reported_before_the_waldur_client_loads(tmp_path: Path, command: str) -> None:
    # The Waldur client's models take seconds to import: a bad config (systemd restarting a broken unit, an
    # operator's typo) must be told at once, not after them.
    path = tmp_path / "bad.yaml"
    path.write_text("offerings: []\ndaemon:\n  workerz: 4\n")
    probe = (
        "import sys\n"
        "from cscs_storage_daemon.cli import main\n"
        "try:\n"
        "    main(sys.argv[1:])\n"
        "except SystemExit as exc:\n"
        "    print(exc.code, sorted(m for m in sys.modules if m.startswith('waldur_api_client')))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe, command, "-c", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.stdout.split() == ["78", "[]"], result.stdout + result.stderr
    assert "daemon.workerz" in result.stderr


def test_token_never_in_output(tmp_path: Path, fake: FakeWaldur, capfd: pytest.CaptureFixture[str]) -> None:
    population = populate(fake, ["capstor"], n=3)
    config = write_config(tmp_path, fake, population.offerings)
    assert main(["sync", "-c", str(config), "-v"]) == 0
    assert main(["check-config", "-c", str(config)]) == 0
    out = capfd.readouterr()
    assert TOKEN not in out.out + out.err
    for path in tmp_path.rglob("*"):
        if path.is_file() and path.name != "config.yaml":
            assert TOKEN not in path.read_text(errors="replace")
