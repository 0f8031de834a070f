"""`demo`: runs with nothing installed — no broker, no Waldur.

It starts the project's fake Waldur in-process with sample data for the three storage systems (capstor, vast,
iopsstor; one invalid resource among them), runs a full `sync` into `./demo-output/<system>/`, prints what it
wrote, and with `--serve` serves the HTTP API over the result until Ctrl-C.
"""

from __future__ import annotations

import sys
import tempfile
import threading
from pathlib import Path

from cscs_storage_daemon.config import config_from_data
from cscs_storage_daemon.sync import run_sync
from cscs_storage_daemon.testing.fake_waldur import FakeWaldur
from cscs_storage_daemon.testing.sample_data import populate

SYSTEMS = ("capstor", "vast", "iopsstor")


def demo_config_data(fake: FakeWaldur, offerings: list[object], output_dir: Path, state_dir: Path) -> dict[str, object]:
    return {
        "offerings": [
            {
                "name": f"CSCS {o.slug}",  # type: ignore[attr-defined]
                "waldur_api_url": fake.url,
                "waldur_api_token": fake.token,
                "waldur_offering_uuid": o.uuid,  # type: ignore[attr-defined]
                "backend_type": "cscs-hpc-storage",
                "backend_settings": {"output_directory": str(output_dir / o.slug)},  # type: ignore[attr-defined]
                "backend_components": {
                    "storage": {"measured_unit": "TB", "accounting_type": "limit", "label": "Storage", "unit_factor": 1}
                },
            }
            for o in offerings
        ],
        "daemon": {"state_directory": str(state_dir), "http": {"listen": "127.0.0.1:8080"}},
    }


def run_demo(*, output_dir: str = "demo-output", serve: bool = False, listen: str = "127.0.0.1:8080") -> int:
    out = Path(output_dir).resolve()
    with FakeWaldur() as fake, tempfile.TemporaryDirectory(prefix="cscs-demo-state-") as state:
        population = populate(fake, list(SYSTEMS), n=40, seed=2026)
        broken = dict(population.resources[0])
        broken["attributes"] = dict(broken.get("attributes") or {}, permissions="0999")
        fake.put_resource(broken)
        data = demo_config_data(fake, list(population.offerings), out, Path(state))
        data["daemon"]["http"]["listen"] = listen  # type: ignore[index]
        config = config_from_data(data, source="<demo>")
        code, reports = run_sync(config)
        print(f"\nDemo: the fake Waldur served {len(population.resources)} resources over real HTTP.")
        for report in reports:
            print(f"  {report.offering}: {report.written} resources in {report.file}")
            for problem in report.invalid:
                print(f"    reported invalid (left out, order would be erred): {problem}")
        if serve:
            from cscs_storage_daemon.daemon import serve_once

            stop = threading.Event()
            print(f"\nServing http://{listen}/api/storage-resources/?storage_system=capstor  (Ctrl-C to stop)")
            try:
                serve_once(config, stop=stop)
            except KeyboardInterrupt:
                stop.set()
        return 0 if code in (0, 3) else code


if __name__ == "__main__":
    sys.exit(run_demo())
