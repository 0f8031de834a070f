"""The systemd unit: the directives the operations spec requires, and an exposure score of 2.0 or better."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "cscs-storage-daemon.service"


def directives() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def test_unit_has_the_required_directives() -> None:
    d = directives()
    assert d["Type"] == ["notify"]
    assert d["WatchdogSec"] == ["30"]
    assert d["Restart"] == ["on-failure"]
    assert d["RestartPreventExitStatus"] == ["78"]
    assert d["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert d["User"] and d["User"] != ["root"]
    assert d["StateDirectory"] == ["cscs-storage-daemon"]
    assert d["LoadCredential"] == ["waldur-token:/etc/cscs-storage-daemon/waldur-token"]
    assert d["ReadWritePaths"]
    assert d["ProtectSystem"] == ["strict"]
    assert d["RestrictAddressFamilies"] == ["AF_UNIX AF_INET AF_INET6"]
    assert d["CapabilityBoundingSet"] == [""]
    assert "@system-service" in d["SystemCallFilter"]
    for flag in ("ProtectHome", "PrivateTmp", "NoNewPrivileges"):
        assert d[flag] == ["yes"], flag
    # Two malloc arenas: with one per thread, fragmentation alone grows the RSS (docs/reliability.md).
    assert "MALLOC_ARENA_MAX=2" in d["Environment"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed here")
def test_exposure_score_is_2_or_better() -> None:
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", str(UNIT)], capture_output=True, text=True, check=False
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout[-2000:] + result.stderr[-2000:]
    assert float(match.group(1)) <= 2.0
