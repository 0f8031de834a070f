"""What the daemon holds for one offering while it runs: its slug, settings, gateway, mirror and writer."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

import httpx

from cscs_storage_daemon.gateway import WaldurGateway
from cscs_storage_daemon.mapping import MappingSettings
from cscs_storage_daemon.mirror import Change, OfferingMirror
from cscs_storage_daemon.retry import RetryInfo, RetryPolicy
from cscs_storage_daemon.waldur_transport import WaldurTransport
from cscs_storage_daemon.writer import OutputWriter

if TYPE_CHECKING:
    from cscs_storage_daemon.config import OfferingConfig


@dataclass(slots=True)
class OfferingRuntime:
    uuid: str  # 32 lower-case hex
    slug: str  # the storage_system key, read from Waldur's provider offering
    name: str
    settings: MappingSettings
    zone: ZoneInfo
    snapshot_retention: int
    gateway: WaldurGateway
    mirror: OfferingMirror
    writer: OutputWriter

    def read_all(self) -> list[Change]:
        """Every resource page from Waldur into the mirror (one step, once the listing is complete: a listing that
        fails changes nothing). Each page is mapped as it arrives, so the listing's raw JSON is never all held."""
        with self.mirror.listing() as listing:
            self.gateway.read_resources(self.uuid, listing)
            return self.mirror.replace_all(listing)


def open_offering(
    config: OfferingConfig,
    *,
    retry: RetryPolicy,
    timeout: float,
    removed_retention: float = 7 * 86400,
    transport: httpx.BaseTransport | WaldurTransport | None = None,
    on_retry: Callable[[RetryInfo], None] | None = None,
    warn: Callable[[str, dict[str, Any]], None] | None = None,
    output_directory: str | None = None,
) -> OfferingRuntime:
    """Connect one configured offering: its gateway, and its slug read from Waldur's provider offering."""
    settings = config.backend_settings
    gateway = WaldurGateway(
        config.waldur_api_url,
        config.waldur_api_token.get_secret_value(),
        verify_ssl=config.verify_ssl,
        timeout=timeout,
        retry=retry,
        transport=transport,
        on_retry=on_retry,
    )
    try:
        details = gateway.get_offering(config.offering_uuid_hex)
    except BaseException:
        gateway.close()
        raise
    slug = details.get("slug")
    if not isinstance(slug, str) or not slug:
        gateway.close()
        raise ValueError(f"offering {config.offering_uuid_hex} has no slug in Waldur")
    mapping = config.mapping_settings()
    return OfferingRuntime(
        uuid=config.offering_uuid_hex,
        slug=slug,
        name=config.name,
        settings=mapping,
        zone=ZoneInfo(settings.timezone),
        snapshot_retention=settings.snapshot_retention,
        gateway=gateway,
        mirror=OfferingMirror(slug, mapping, removed_retention=removed_retention, warn=warn),
        writer=OutputWriter(output_directory or settings.output_directory, file_mode=int(settings.file_mode, 8)),
    )
