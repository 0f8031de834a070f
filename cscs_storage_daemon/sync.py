"""`sync`: one full pass — fetch every resource page, write one all.json per offering, exit (operations spec).

Exit codes: 0 success; 1 an offering could not be synced (Waldur unreachable after retries, write failure);
3 every all.json was written but some resources were invalid (each reported on stderr).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import TextIO

import structlog

from cscs_storage_daemon.clock import Clock, SystemClock
from cscs_storage_daemon.config import Config
from cscs_storage_daemon.envelope import render_pieces, snapshot_envelope, snapshot_file_name
from cscs_storage_daemon.events import normalise_uuid
from cscs_storage_daemon.gateway import WaldurError
from cscs_storage_daemon.runtime import open_offering

log = structlog.get_logger("cscs_storage_daemon.sync")

EXIT_OK, EXIT_FAILED, EXIT_INVALID = 0, 1, 3


@dataclass
class SyncReport:
    offering: str
    resources: int = 0
    written: int = 0
    invalid: list[str] = field(default_factory=list)
    file: str | None = None
    error: str | None = None


def _warn(event: str, fields: dict[str, object]) -> None:
    log.warning(event, **fields)


def run_sync(
    config: Config,
    *,
    offering_uuid: str | None = None,
    dry_run: bool = False,
    clock: Clock | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> tuple[int, list[SyncReport]]:
    clock = clock or SystemClock()
    out = out or sys.stdout
    err = err or sys.stderr
    wanted = normalise_uuid(offering_uuid) if offering_uuid else None
    if offering_uuid and wanted is None:
        raise ValueError(f"--offering-uuid {offering_uuid!r} is not a UUID")
    offerings = [o for o in config.offerings if wanted is None or o.offering_uuid_hex == wanted]
    if wanted is not None and not offerings:
        raise ValueError(f"no configured cscs-hpc-storage offering has uuid {offering_uuid}")
    reports: list[SyncReport] = []
    for offering_config in offerings:
        report = SyncReport(offering=offering_config.name)
        reports.append(report)
        try:
            runtime = open_offering(
                offering_config, retry=config.daemon.retry.policy(), timeout=config.daemon.retry.timeout, warn=_warn
            )
        except (WaldurError, ValueError) as exc:
            report.error = str(exc)
            log.error("sync.failed", offering=offering_config.name, error=report.error)
            continue
        report.offering = runtime.slug
        with runtime.mirror.listing() as listing:  # each page mapped as it arrives: never the whole raw listing
            try:
                count = runtime.gateway.read_resources(runtime.uuid, listing)
            except WaldurError as exc:
                report.error = str(exc)
                log.error("sync.failed", offering=runtime.slug, error=report.error)
                continue
            finally:
                runtime.gateway.close()
            changes = runtime.mirror.replace_all(listing)
        report.resources = count
        for change in changes:
            if change.error is not None:
                report.invalid.append(str(change.error))
                print(f"{runtime.slug}: invalid resource: {change.error}", file=err)
                log.error(
                    "resource.invalid",
                    offering=runtime.slug,
                    resource_uuid=change.uuid,
                    field=change.error.field,
                    error=change.error.message,
                )
        objects = runtime.mirror.storage_objects()
        report.written = len(objects)
        local = clock.now().astimezone(runtime.zone)
        name = snapshot_file_name(local)
        if dry_run:
            print(
                f"{runtime.slug}: {report.resources} resources, {report.written} valid, "
                f"{len(report.invalid)} invalid; would write {runtime.writer.directory / name} (dry run)",
                file=out,
            )
            continue
        try:
            path = runtime.writer.write_pieces(name, render_pieces(snapshot_envelope(objects, date=local)))
            runtime.writer.prune_snapshots(runtime.snapshot_retention)
        except OSError as exc:
            report.error = f"cannot write {runtime.writer.directory / name}: {exc}"
            log.error("sync.write_failed", offering=runtime.slug, error=report.error)
            continue
        report.file = str(path)
        log.info("snapshot.written", offering=runtime.slug, file=str(path), resources=report.written)
        print(f"{runtime.slug}: wrote {path} ({report.written} resources, {len(report.invalid)} invalid)", file=out)
    if any(r.error for r in reports):
        return EXIT_FAILED, reports
    if any(r.invalid for r in reports):
        return EXIT_INVALID, reports
    return EXIT_OK, reports
