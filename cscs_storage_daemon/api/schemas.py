"""Pydantic models of the HTTP API's responses: the OpenAPI document only.

Responses are rendered straight to bytes (see `app.py`); these models describe them so that the schema published at
``/openapi.json`` is accurate (schemathesis checks every response against it). They follow storage-json.md §1 and
§4 and http-api.md.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, Field


class ResourceState(StrEnum):
    """A Waldur marketplace resource state."""

    Creating = "Creating"
    OK = "OK"
    Erred = "Erred"
    Updating = "Updating"
    Terminating = "Terminating"
    Terminated = "Terminated"


class Paginate(BaseModel):
    current: int
    limit: int
    offset: int
    pages: int
    total: int


class Meta(BaseModel):
    date: str = Field(description="Time of the response, ISO 8601 with offset")
    appVersion: str


class Permission(BaseModel):
    permissionType: str
    value: str


class Quota(BaseModel):
    type: str
    quota: float
    unit: str
    enforcementType: str


class Target(BaseModel):
    targetType: Literal["project", "user"]
    targetItem: dict[str, Any]


class StorageItem(BaseModel):
    itemId: str
    key: str
    name: str
    path: str | None = None
    active: bool


class StorageResource(BaseModel):
    """One storage resource object (storage-json.md §1)."""

    itemId: str
    status: str
    mountPoint: dict[str, str]
    permission: Permission
    quotas: list[Quota] | None
    target: Target
    storageSystem: StorageItem
    storageFileSystem: StorageItem
    storageDataType: StorageItem
    parentItemId: str | None


class StorageResult(BaseModel):
    storageResources: list[StorageResource]
    paginate: Paginate


class StorageResourcesResponse(BaseModel):
    """The envelope of storage-json.md §4."""

    status: Literal["success"]
    code: int
    meta: Meta
    result: StorageResult


class RawResource(BaseModel):
    uuid: str
    name: Any
    slug: Any
    state: Any
    customer_slug: Any
    customer_name: Any
    project_slug: Any
    project_name: Any
    offering_slug: Any
    offering_type: Any
    limits: Any
    attributes: Any
    backend_metadata: Any
    created: Any
    modified: Any


class FiltersApplied(BaseModel):
    storage_system: str
    data_type: str | None
    status: str | None
    state: str | None


class RawResources(BaseModel):
    resources: list[RawResource]
    pagination: Paginate
    filters_applied: FiltersApplied


class AgentOfferingConfig(BaseModel):
    uuid: str
    api_url: str
    backend_type: str
    backend_settings: dict[str, Any]
    backend_components: dict[str, Any]


class DebugResponse(BaseModel):
    """``debug=true``: raw Waldur data instead of the storage format."""

    status: Literal["success"]
    debug_mode: Literal[True]
    agent_offering_config: AgentOfferingConfig
    waldur_offering_details: dict[str, Any] = Field(
        description='The live provider offering (cached 60 s) without secret_options, or {"error": "..."}'
    )
    raw_resources: RawResources


class StorageSystemErrorContext(BaseModel):
    allowed_values: list[str]
    help: str


class StorageSystemErrorItem(BaseModel):
    type: Literal["missing", "enum_validation"]
    loc: list[str]
    msg: str
    ctx: StorageSystemErrorContext


class ValidationErrorItem(BaseModel):
    """FastAPI's standard validation error item (and the storage_system ones, which fit it too)."""

    type: str
    loc: list[str | int]
    msg: str
    input: Any = None
    ctx: dict[str, Any] | None = None


class ValidationErrorResponse(BaseModel):
    detail: list[ValidationErrorItem]


class ErrorResponse(BaseModel):
    detail: str


class HealthOffering(BaseModel):
    resources: int
    last_snapshot: str | None


class HealthResponse(BaseModel):
    status: Literal["ok", "unavailable"]
    version: str
    broker: Literal["connected", "disconnected", "not used"]
    broker_disconnected_since: str | None = None
    offerings: dict[str, HealthOffering]
    failing: list[str] | None = None
