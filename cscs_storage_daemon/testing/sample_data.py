"""Realistic Waldur JSON for tests and benchmarks, deterministic from a seed.

The shapes follow the golden API responses (``GET /api/marketplace-provider-resources/{uuid}/``,
``GET /api/marketplace-orders/{uuid}/``, ``GET /api/marketplace-provider-offerings/{uuid}/``): uuids as 32 hex
digits, datetimes in ISO 8601, typed keys without a value omitted rather than null. Everything here parses with the
models of waldur-api-client 8.1.3.

`generate_resources` builds 100 000 resources in well under a few seconds; `populate` loads a `FakeWaldur`.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from cscs_storage_daemon.mapping import gc_paused

if TYPE_CHECKING:
    from cscs_storage_daemon.testing.fake_waldur import FakeWaldur

BASE_URL = "https://waldur.example.com"
CATEGORY_UUID = "a0e18f2dbc3c4a4f9d5e6f7a8b9c0d1e"
PROVIDER_UUID = "1b7e9c4a2d3f4e5a8b6c7d8e9f0a1b2c"
PROVIDER_NAME = "CSCS"
PROVIDER_SLUG = "cscs"
EPOCH = datetime(2025, 1, 1, tzinfo=UTC)

RESOURCE_STATES = ("Creating", "OK", "Erred", "Updating", "Terminating", "Terminated")
ORDER_STATES = (
    "pending-consumer",
    "pending-provider",
    "pending-project",
    "pending-start-date",
    "executing",
    "done",
    "erred",
    "canceled",
    "rejected",
)
ORDER_TYPES = ("Create", "Update", "Terminate", "Restore")

# (value, weight) tables for generated resources.
_STATE_WEIGHTS = (("OK", 85), ("Creating", 4), ("Updating", 3), ("Terminating", 2), ("Terminated", 4), ("Erred", 2))
_DATA_TYPE_WEIGHTS = (("store", 50), ("scratch", 20), ("users", 15), ("archive", 15))
_PERMISSIONS = {"store": "2770", "archive": "2750", "users": "0755", "scratch": "0775"}
_STORAGE_SIZES = (1, 2, 5, 10, 20, 50, 100, 200, 500)
_WORDS = (
    "alpine", "aurora", "basalt", "boreal", "cirrus", "delta", "ember", "fjord", "glacier", "granite",
    "harbor", "helix", "ibex", "jura", "karst", "lagoon", "larch", "meteo", "moraine", "nebula",
    "orbit", "photon", "quartz", "rhone", "saturn", "sierra", "solar", "tundra", "vortex", "zephyr",
)  # fmt: skip


def uuid_from(rng: random.Random) -> str:
    """A random version-4 uuid as 32 hex digits (fast: no `uuid.UUID` object)."""
    value = rng.getrandbits(128)
    value = (value & ~(0xF << 76)) | (0x4 << 76)
    value = (value & ~(0x3 << 62)) | (0x2 << 62)
    return f"{value:032x}"


def isoformat(moment: datetime) -> str:
    """``2025-03-14T09:26:53.123456Z``, the DRF encoder's form."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def now_iso() -> str:
    return isoformat(datetime.now(UTC))


@dataclass(frozen=True)
class Offering:
    """What a resource needs to know about its offering."""

    uuid: str
    slug: str
    name: str
    description: str = ""
    type: str = "Marketplace.Slurm"
    provider_uuid: str = PROVIDER_UUID
    provider_name: str = PROVIDER_NAME
    provider_slug: str = PROVIDER_SLUG
    category_uuid: str = CATEGORY_UUID
    plan_uuid: str = "9d0f7e1cab2b4f3e8c4d5e6f7a8b9c0d"
    component_uuid: str = "17f8a69ecdad4b1a8e2f3a4b5c6d7e8f"
    created: str = "2024-11-05T10:00:00.000000Z"

    def to_json(self, base_url: str = BASE_URL) -> dict[str, Any]:
        """The `ProviderOfferingDetails` body of ``GET /api/marketplace-provider-offerings/{uuid}/``."""
        return {
            "url": f"{base_url}/api/marketplace-provider-offerings/{self.uuid}/",
            "uuid": self.uuid,
            "created": self.created,
            "name": self.name,
            "slug": self.slug,
            "description": self.description,
            "full_description": "",
            "privacy_policy_link": "",
            "helpdesk_url": "",
            "documentation_url": "",
            "access_url": "",
            "endpoints": [],
            "partitions": [],
            "customer": f"{base_url}/api/customers/{self.provider_uuid}/",
            "customer_uuid": self.provider_uuid,
            "customer_name": self.provider_name,
            "project": None,
            "project_uuid": None,
            "project_name": None,
            "category": f"{base_url}/api/marketplace-categories/{self.category_uuid}/",
            "category_uuid": self.category_uuid,
            "category_title": "Storage",
            "attributes": {},
            "options": {
                "order": ["storage_data_type", "permissions"],
                "options": {
                    "storage_data_type": {
                        "type": "select_string",
                        "label": "Storage data type",
                        "choices": ["store", "archive", "users", "scratch"],
                        "required": True,
                    },
                    "permissions": {
                        "type": "string",
                        "label": "Unix permissions",
                        "default": "2770",
                        "required": False,
                    },
                },
            },
            "resource_options": {"order": [], "options": {}},
            "components": [
                {
                    "uuid": self.component_uuid,
                    "billing_type": "limit",
                    "type": "storage",
                    "name": "Storage",
                    "description": "Storage quota",
                    "measured_unit": "TB",
                    "unit_factor": 1,
                    "limit_period": "total",
                    "limit_amount": None,
                    "article_code": "",
                    "max_value": 1000,
                    "min_value": 1,
                    "max_available_limit": None,
                    "is_boolean": False,
                    "default_limit": 1,
                    "factor": None,
                    "is_builtin": False,
                    "is_prepaid": False,
                    "overage_component": None,
                    "min_prepaid_duration": None,
                    "max_prepaid_duration": None,
                    "prepaid_duration_step": None,
                    "min_renewal_duration": None,
                    "max_renewal_duration": None,
                    "renewal_duration_step": None,
                }
            ],
            "plugin_options": {},
            "secret_options": {},
            "state": "Active",
            "vendor_details": "",
            "thumbnail": None,
            "plans": [
                {
                    "url": f"{base_url}/api/marketplace-provider-plans/{self.plan_uuid}/",
                    "uuid": self.plan_uuid,
                    "name": "Default",
                    "description": "",
                    "article_code": "",
                    "unit_price": "0.0000000",
                    "unit": "month",
                    "backend_id": "",
                    "organization_groups": [],
                    "components": [],
                    "prices": {"storage": 0.0},
                    "future_prices": {},
                    "quotas": {"storage": 0},
                    "plan_type": "limit-based",
                    "minimal_price": "0",
                }
            ],
            "screenshots": [],
            "type": self.type,
            "scope": "",
            "scope_uuid": None,
            "scope_name": None,
            "files": [],
            "quotas": [],
            "paused_reason": "",
            "country": "CH",
            "backend_id": "",
            "organization_groups": [],
            "tags": [],
            "image": None,
            "parent_uuid": None,
            "backend_metadata": {},
        }


def offering_for(slug: str, *, seed: int = 0, uuid: str | None = None, name: str | None = None) -> Offering:
    """An `Offering` whose uuid is derived from the slug and the seed unless given."""
    if uuid is None:
        uuid = uuid_from(random.Random(f"offering:{seed}:{slug}"))
    return Offering(uuid=uuid, slug=slug, name=name or f"{slug.capitalize()} storage")


def _offering_prefix(offering: Offering, base_url: str) -> dict[str, Any]:
    """The ``offering*`` / ``provider*`` / ``category*`` / ``plan*`` keys shared by resources and orders."""
    return {
        "offering": f"{base_url}/api/marketplace-public-offerings/{offering.uuid}/",
        "offering_name": offering.name,
        "offering_uuid": offering.uuid,
        "offering_description": offering.description,
        "offering_image": None,
        "offering_thumbnail": None,
        "offering_type": offering.type,
        "offering_shared": True,
        "offering_billable": True,
        "offering_plugin_options": {},
        "provider_name": offering.provider_name,
        "provider_uuid": offering.provider_uuid,
        "provider_slug": offering.provider_slug,
        "category_title": "Storage",
        "category_uuid": offering.category_uuid,
        "category_icon": None,
        "plan": f"{base_url}/api/marketplace-public-plans/{offering.plan_uuid}/",
        "plan_unit": "month",
        "plan_name": "Default",
        "plan_uuid": offering.plan_uuid,
        "plan_description": "",
    }


@dataclass(frozen=True)
class Project:
    uuid: str
    slug: str
    name: str
    customer_uuid: str
    customer_slug: str
    customer_name: str
    description: str = ""
    start_date: str | None = "2025-01-01"


def make_resource(
    offering: Offering,
    project: Project,
    *,
    uuid: str,
    slug: str,
    name: str | None = None,
    state: str = "OK",
    storage: float | int | None = 10,
    data_type: str | None = "store",
    permissions: str | None = "2770",
    options: Mapping[str, Any] | None = None,
    backend_id: str | None = None,
    backend_metadata: Mapping[str, Any] | None = None,
    end_date: str | None = None,
    created: str = "2025-03-14T09:26:53.123456Z",
    modified: str | None = None,
    base_url: str = BASE_URL,
) -> dict[str, Any]:
    """One `Resource` body, key for key like golden ``resource.json``.

    ``backend_id`` defaults to the slug, except for a resource still ``Creating`` (then ``""``).
    """
    attributes: dict[str, Any] = {"name": name or slug}
    if data_type is not None:
        attributes["storage_data_type"] = data_type
    if permissions is not None:
        attributes["permissions"] = permissions
    if backend_id is None:
        backend_id = "" if state == "Creating" else slug
    resource = _offering_prefix(offering, base_url)
    resource.update(
        {
            "attributes": attributes,
            "limits": {} if storage is None else {"storage": storage},
            "uuid": uuid,
            "created": created,
            "modified": modified or created,
            "url": f"{base_url}/api/marketplace-resources/{uuid}/",
            "scope": None,
            "description": "",
            "state": state,
            "resource_uuid": None,
            "backend_id": backend_id,
            "effective_id": "",
            "resource_type": None,
            "project": f"{base_url}/api/projects/{project.uuid}/",
            "project_uuid": project.uuid,
            "project_name": project.name,
            "project_slug": project.slug,
            "project_description": project.description,
            "project_start_date": project.start_date,
            "project_end_date": None,
            "project_end_date_requested_by": None,
            "customer_uuid": project.customer_uuid,
            "customer_name": project.customer_name,
            "customer_slug": project.customer_slug,
            "offering_slug": offering.slug,
            "offering_backend_id": "",
            "backend_metadata": dict(backend_metadata) if backend_metadata is not None else {},
            "is_usage_based": False,
            "is_limit_based": True,
            "name": name or slug,
            "slug": slug,
            "current_usages": {},
            "can_terminate": True,
            "report": None,
            "end_date": end_date,
            "end_date_requested_by": None,
            "end_date_updated_at": None,
            "username": None,
            "limit_usage": {},
            "downscaled": False,
            "restrict_member_access": False,
            "paused": False,
            "endpoints": [],
            "error_message": "",
            "error_traceback": "",
            "options": dict(options) if options is not None else None,
            "available_actions": [],
            "last_sync": modified or created,
            "order_in_progress": None,
            "creation_order": None,
            "renewal_date": None,
            "offering_state": "Active",
            "offering_components": [],
        }
    )
    return resource


def make_order(
    resource: Mapping[str, Any],
    *,
    uuid: str,
    type: str,
    state: str = "pending-provider",
    limits: Mapping[str, Any] | None = None,
    attributes: Mapping[str, Any] | None = None,
    created: str | None = None,
    base_url: str = BASE_URL,
) -> dict[str, Any]:
    """One `OrderDetails` body for ``resource``, key for key like golden ``order.json``.

    Limits default to the resource's limits for Create/Restore/Update and to ``{}`` for Terminate; attributes to
    the resource's attributes for Create and ``{}`` otherwise.
    """
    if type not in ORDER_TYPES:
        raise ValueError(f"unknown order type {type!r}")
    if state not in ORDER_STATES:
        raise ValueError(f"unknown order state {state!r}")
    if limits is None:
        limits = {} if type == "Terminate" else dict(resource.get("limits") or {})
    if attributes is None:
        attributes = dict(resource.get("attributes") or {}) if type == "Create" else {}
    created = created or now_iso()
    order: dict[str, Any] = {
        key: resource[key]
        for key in (
            "offering",
            "offering_name",
            "offering_uuid",
            "offering_description",
            "offering_image",
            "offering_thumbnail",
            "offering_type",
            "offering_shared",
            "offering_billable",
            "offering_plugin_options",
            "provider_name",
            "provider_uuid",
            "provider_slug",
            "category_title",
            "category_uuid",
            "category_icon",
            "plan",
            "plan_unit",
            "plan_name",
            "plan_uuid",
            "plan_description",
        )
        if key in resource
    }
    order.update(
        {
            "attributes": dict(attributes),
            "limits": dict(limits),
            "uuid": uuid,
            "created": created,
            "modified": created,
            "resource_uuid": None,
            "resource_type": None,
            "resource_name": resource.get("name", ""),
            "cost": "0.0000000000",
            "state": state,
            "output": "",
            "output_updated_at": None,
            "marketplace_resource_uuid": resource["uuid"],
            "error_message": "",
            "error_traceback": "",
            "error_updated_at": None,
            "callback_url": None,
            "completed_at": None,
            "request_comment": None,
            "attachment": None,
            "type": type,
            "start_date": None,
            "slug": resource.get("slug", ""),
            "url": f"{base_url}/api/marketplace-orders/{uuid}/",
            "consumer_reviewed_by": None,
            "consumer_reviewed_by_full_name": None,
            "consumer_reviewed_by_username": None,
            "consumer_reviewed_at": None,
            "provider_reviewed_by": None,
            "provider_reviewed_by_full_name": None,
            "provider_reviewed_by_username": None,
            "provider_reviewed_at": None,
            "created_by_username": "jdoe",
            "created_by_full_name": "Jane Doe",
            "created_by_civil_number": None,
            "created_by_email": "jane.doe@example.com",
            "customer_name": resource.get("customer_name", ""),
            "customer_uuid": resource["customer_uuid"],
            "customer_slug": resource.get("customer_slug", ""),
            "project_name": resource.get("project_name", ""),
            "project_uuid": resource["project_uuid"],
            "project_description": resource.get("project_description", ""),
            "project_slug": resource.get("project_slug", ""),
            "old_plan_name": None,
            "new_plan_name": None,
            "old_plan_uuid": None,
            "new_plan_uuid": None,
            "old_cost_estimate": 0.0,
            "new_cost_estimate": None,
            "can_terminate": False,
            "fixed_price": 0.0,
            "activation_price": 0.0,
            "termination_comment": None,
            "backend_id": "",
            "order_subtype": None,
            "provider_message": "",
            "provider_message_url": "",
            "provider_message_attachment": None,
            "provider_message_updated_at": None,
            "consumer_message": "",
            "consumer_message_attachment": None,
            "consumer_message_updated_at": None,
            "consumer_rejection_comment": "",
            "provider_rejection_comment": "",
            "auto_approved": False,
            "auto_approved_by_rule_uuid": None,
            "issue": None,
        }
    )
    return order


def _lookup_table(table: Sequence[tuple[str, int]]) -> list[str]:
    """Each value repeated by its weight: ``table[int(rng.random() * len(table))]`` draws by weight."""
    return [value for value, weight in table for _ in range(weight)]


@dataclass
class SampleData:
    """A deterministic generator of customers, projects and resources."""

    seed: int = 0
    base_url: str = BASE_URL
    customers: int | None = None  # default: about one per 40 resources, at least 3
    rng: random.Random = field(init=False)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def projects(self, count_customers: int) -> list[Project]:
        rng = self.rng
        projects: list[Project] = []
        for c in range(count_customers):
            word = _WORDS[c % len(_WORDS)]
            customer_slug = f"{word}{c // len(_WORDS) or ''}"
            customer_uuid = uuid_from(rng)
            customer_name = f"{word.capitalize()} Institute {c}"
            for p in range(1 + rng.randrange(4)):
                projects.append(
                    Project(
                        uuid=uuid_from(rng),
                        slug=f"{customer_slug}-p{p}",
                        name=f"{customer_name} project {p}",
                        customer_uuid=customer_uuid,
                        customer_slug=customer_slug,
                        customer_name=customer_name,
                        description=f"Research project {p} of {customer_name}",
                    )
                )
        return projects

    def resources(
        self,
        offering: Offering,
        n: int,
        *,
        states: Sequence[tuple[str, int]] = _STATE_WEIGHTS,
        start: int = 0,
    ) -> Iterator[dict[str, Any]]:
        """``n`` resources of ``offering``; resource ``i`` has slug ``<project>-<type>-<start + i>``."""
        rng = self.rng
        count_customers = self.customers or max(3, n // 40)
        projects = self.projects(count_customers)
        state_table = _lookup_table(states)
        type_table = _lookup_table(_DATA_TYPE_WEIGHTS)
        prefix = _offering_prefix(offering, self.base_url)
        base = self.base_url
        epoch = EPOCH.replace(tzinfo=None)
        random_ = rng.random
        for i in range(start, start + n):
            project = projects[int(random_() * len(projects))]
            state = state_table[int(random_() * len(state_table))]
            data_type = type_table[int(random_() * len(type_table))]
            storage = _STORAGE_SIZES[int(random_() * len(_STORAGE_SIZES))]
            uuid = uuid_from(rng)
            slug = f"{project.slug}-{data_type}-{i}"
            created = epoch + timedelta(seconds=i * 37 + int(random_() * 30), microseconds=i % 1000000)
            created_s = created.isoformat(timespec="microseconds") + "Z"
            modified = created + timedelta(seconds=int(random_() * 86400))
            modified_s = modified.isoformat(timespec="microseconds") + "Z"
            roll = random_()
            options: dict[str, Any] | None
            if roll < 0.6:
                options = {}
            elif roll < 0.9:
                options = {"soft_quota_space": storage, "hard_quota_space": round(storage * 1.1, 1)}
            else:
                options = None
            metadata: dict[str, Any] = {}
            if random_() < 0.05:
                metadata = {"project_item": {"itemId": project.uuid, "key": project.slug}}
            resource = dict(prefix)
            resource.update(
                {
                    "attributes": {
                        "name": slug,
                        "storage_data_type": data_type,
                        "permissions": _PERMISSIONS[data_type],
                    },
                    "limits": {"storage": storage},
                    "uuid": uuid,
                    "created": created_s,
                    "modified": modified_s,
                    "url": f"{base}/api/marketplace-resources/{uuid}/",
                    "scope": None,
                    "description": "",
                    "state": state,
                    "resource_uuid": None,
                    "backend_id": "" if state == "Creating" else slug,
                    "effective_id": "",
                    "resource_type": None,
                    "project": f"{base}/api/projects/{project.uuid}/",
                    "project_uuid": project.uuid,
                    "project_name": project.name,
                    "project_slug": project.slug,
                    "project_description": project.description,
                    "project_start_date": project.start_date,
                    "project_end_date": None,
                    "project_end_date_requested_by": None,
                    "customer_uuid": project.customer_uuid,
                    "customer_name": project.customer_name,
                    "customer_slug": project.customer_slug,
                    "offering_slug": offering.slug,
                    "offering_backend_id": "",
                    "backend_metadata": metadata,
                    "is_usage_based": False,
                    "is_limit_based": True,
                    "name": slug,
                    "slug": slug,
                    "current_usages": {},
                    "can_terminate": True,
                    "report": None,
                    "end_date": None,
                    "end_date_requested_by": None,
                    "end_date_updated_at": None,
                    "username": None,
                    "limit_usage": {},
                    "downscaled": False,
                    "restrict_member_access": False,
                    "paused": False,
                    "endpoints": [],
                    "error_message": "",
                    "error_traceback": "",
                    "options": options,
                    "available_actions": [],
                    "last_sync": modified_s,
                    "order_in_progress": None,
                    "creation_order": None,
                    "renewal_date": None,
                    "offering_state": "Active",
                    "offering_components": [],
                }
            )
            yield resource


def generate_resources(
    n: int,
    *,
    seed: int = 0,
    offering: Offering | None = None,
    base_url: str = BASE_URL,
) -> list[dict[str, Any]]:
    """``n`` realistic resources of one offering (``capstor`` unless given), the same for the same seed and n."""
    offering = offering or offering_for("capstor", seed=seed)
    with gc_paused():
        return list(SampleData(seed=seed, base_url=base_url).resources(offering, n))


@dataclass
class Population:
    offerings: list[Offering]
    resources: list[dict[str, Any]]

    def of(self, slug: str) -> list[dict[str, Any]]:
        return [r for r in self.resources if r["offering_slug"] == slug]


def populate(
    fake: FakeWaldur,
    offerings: Sequence[str | Offering] | int = ("capstor",),
    n: int = 100,
    *,
    seed: int = 0,
) -> Population:
    """Add the offerings (slugs, `Offering`s, or a count) and ``n`` resources per offering to ``fake``."""
    if isinstance(offerings, int):
        chosen = [offering_for(f"storage{i}", seed=seed) for i in range(offerings)]
    else:
        chosen = [item if isinstance(item, Offering) else offering_for(item, seed=seed) for item in offerings]
    data = SampleData(seed=seed, base_url=fake.root)
    resources: list[dict[str, Any]] = []
    for index, offering in enumerate(chosen):
        fake.add_offering(offering)
        with gc_paused():
            batch = list(data.resources(offering, n, start=index * n))
        fake.put_resources(batch)
        resources.extend(batch)
    return Population(offerings=chosen, resources=resources)
