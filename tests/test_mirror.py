"""The mirror of one offering (events spec §3–4, storage-json §2): what all.json serves, and what it keeps."""

from __future__ import annotations

import copy
import json
import threading
import weakref
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from cscs_storage_daemon.api.query import RAW_FIELDS
from cscs_storage_daemon.gateway import WaldurGateway, WaldurPaginationError
from cscs_storage_daemon.mapping import MappingSettings, map_resource
from cscs_storage_daemon.mirror import KEPT_FIELDS, OfferingMirror, kept_json, parse_kept_json
from cscs_storage_daemon.runtime import OfferingRuntime
from cscs_storage_daemon.testing.fake_waldur import FakeWaldur
from cscs_storage_daemon.testing.sample_data import populate
from cscs_storage_daemon.writer import OutputWriter
from tests.fixtures.waldur import FAST_RETRY

GOLDEN: dict[str, Any] = json.loads(Path("/work/shared/golden/api/resource.json").read_text())
DAY = 86400.0


class FakeClock:
    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


def raw(n: int = 1, *, created: str | None = None, **changes: Any) -> dict[str, Any]:
    """A Waldur resource shaped like golden resource.json; resource `n` has uuid `n` and slug `res-n`."""
    resource = copy.deepcopy(GOLDEN)
    resource.update(
        uuid=f"{n:032x}",
        slug=f"res-{n}",
        name=f"res-{n}",
        created=created or f"2025-03-{n % 28 + 1:02d}T09:26:53.123456Z",
        state="OK",
    )
    resource.update(changes)
    return resource


def invalid(n: int = 1, **changes: Any) -> dict[str, Any]:
    """The same resource with a slug that would escape the mount path."""
    return raw(n, **{"project_slug": "../etc", **changes})


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def mirror(clock: FakeClock) -> OfferingMirror:
    return OfferingMirror("capstor", MappingSettings(), removed_retention=7 * DAY, clock=clock)


def item_ids(mirror: OfferingMirror) -> list[str]:
    return [obj["itemId"] for obj in mirror.storage_objects()]


# ---------------------------------------------------------------------------------------------------- valid


def test_valid_resource_is_visible(mirror: OfferingMirror) -> None:
    change = mirror.apply(raw(1))
    assert change.changed and change.error is None and not change.new_error and not change.stale
    assert mirror.storage_objects() == [map_resource(raw(1), MappingSettings())]
    entry = mirror.get(f"{1:032x}")
    assert entry is not None and entry.visible
    assert len(mirror) == 1


def test_the_same_input_again_changes_nothing(mirror: OfferingMirror) -> None:
    mirror.apply(raw(1))
    version = mirror.version
    change = mirror.apply(raw(1))
    assert not change.changed
    assert mirror.version == version


def test_a_new_value_is_a_change(mirror: OfferingMirror) -> None:
    mirror.apply(raw(1))
    version = mirror.version
    change = mirror.apply(raw(1, limits={"storage": 80}, options={}))
    assert change.changed
    assert mirror.version > version
    assert mirror.storage_objects()[0]["quotas"][0]["quota"] == 80.0


def test_uuid_is_looked_up_in_any_spelling(mirror: OfferingMirror) -> None:
    mirror.apply(raw(0xABC))
    dashed = "00000000-0000-0000-0000-000000000ABC"
    assert mirror.get(dashed) is not None
    assert mirror.get("not a uuid") is None


# ---------------------------------------------------------------------------------------------------- invalid


def test_invalid_never_seen_valid_is_left_out_and_reported_once(mirror: OfferingMirror) -> None:
    mirror.apply(raw(2))
    first = mirror.apply(invalid(1))
    assert first.error is not None and first.error.field == "project_slug"
    assert first.new_error and not first.changed and not first.stale
    assert item_ids(mirror) == [raw(2)["uuid"]]
    again = mirror.apply(invalid(1))
    assert again.error is not None and not again.new_error  # the same input: not logged a second time
    other = mirror.apply(invalid(1, project_slug="a/b"))
    assert other.new_error  # a different invalid input is reported again
    assert [e.uuid for e in mirror.invalid()] == [f"{1:032x}"]


def test_valid_then_invalid_keeps_the_last_valid_object(mirror: OfferingMirror) -> None:
    mirror.apply(raw(1, limits={"storage": 50}))
    served = mirror.storage_objects()
    change = mirror.apply(invalid(1, limits={"storage": 99}))
    assert change.error is not None and change.new_error and change.stale and not change.changed
    assert mirror.storage_objects() == served  # stale, not vanished: consumers would read that as a deletion
    assert not mirror.apply(invalid(1, limits={"storage": 99})).new_error
    fixed = mirror.apply(raw(1, limits={"storage": 99}, options={}))
    assert fixed.changed and fixed.error is None
    assert mirror.storage_objects()[0]["quotas"][0]["quota"] == 99.0
    assert mirror.invalid() == []


def test_invalid_again_after_being_fixed_is_reported_again(mirror: OfferingMirror) -> None:
    mirror.apply(raw(1))
    assert mirror.apply(invalid(1)).new_error
    mirror.apply(raw(1))
    assert mirror.apply(invalid(1)).new_error


def test_unusable_uuid_is_reported_and_not_served(mirror: OfferingMirror) -> None:
    change = mirror.apply(raw(1, uuid="not-a-uuid"))
    assert change.error is not None and change.new_error
    assert mirror.storage_objects() == [] and len(mirror) == 0


# ---------------------------------------------------------------------------------------------------- full listings


def test_replace_all_drops_what_waldur_no_longer_lists(mirror: OfferingMirror) -> None:
    mirror.replace_all([raw(1), raw(2), raw(3), invalid(4)])
    assert len(mirror) == 4
    version = mirror.version
    changes = mirror.replace_all([raw(1), raw(3)])
    assert {c.uuid for c in changes if c.changed} == {f"{2:032x}", f"{4:032x}"}
    assert item_ids(mirror) == [raw(1)["uuid"], raw(3)["uuid"]]
    assert len(mirror) == 2
    assert mirror.version > version
    assert mirror.get(f"{2:032x}") is None


def test_replace_all_with_the_same_listing_changes_nothing(mirror: OfferingMirror) -> None:
    listing = [raw(1), raw(2)]
    mirror.replace_all(listing)
    version = mirror.version
    assert not any(c.changed for c in mirror.replace_all(copy.deepcopy(listing)))
    assert mirror.version == version


def test_replace_all_with_nothing_empties_the_mirror(mirror: OfferingMirror) -> None:
    mirror.replace_all([raw(1)])
    mirror.replace_all([])
    assert mirror.storage_objects() == [] and len(mirror) == 0


def test_remove(mirror: OfferingMirror) -> None:
    mirror.apply(raw(1))
    assert mirror.remove(f"{1:032x}")
    assert not mirror.remove(f"{1:032x}")
    assert not mirror.remove("garbage")
    assert mirror.storage_objects() == []


# ---------------------------------------------------------------------------------------------------- Terminated


def test_terminated_is_kept_until_retention_then_expired(mirror: OfferingMirror, clock: FakeClock) -> None:
    mirror.apply(raw(1))
    mirror.apply(raw(2))
    clock.now += 100
    mirror.apply(raw(1, state="Terminated"))
    assert mirror.storage_objects()[0]["status"] == "removed"
    clock.now += 3 * DAY
    mirror.apply(raw(1, state="Terminated"))  # seen again: the clock keeps counting from the first sighting
    clock.now += 4 * DAY - 1
    assert mirror.expire_removed() == []
    assert item_ids(mirror) == [raw(1)["uuid"], raw(2)["uuid"]]
    clock.now += 1
    assert mirror.expire_removed() == [f"{1:032x}"]
    assert item_ids(mirror) == [raw(2)["uuid"]]
    assert mirror.expire_removed() == []


def test_expired_terminated_resource_does_not_come_back_with_the_next_listing(
    mirror: OfferingMirror, clock: FakeClock
) -> None:
    """Waldur keeps listing Terminated resources: the reconciliation after expiry must not re-add them."""
    listing = [raw(1, state="Terminated"), raw(2)]
    mirror.replace_all(listing)
    clock.now += 7 * DAY
    mirror.replace_all(listing)
    assert mirror.expire_removed() == [f"{1:032x}"]
    for _ in range(3):
        clock.now += 600
        changes = mirror.replace_all(listing)
        assert not any(c.changed for c in changes)
        assert item_ids(mirror) == [raw(2)["uuid"]]
        assert mirror.expire_removed() == []
    # restored in Waldur: served again, and a later termination counts from scratch
    mirror.apply(raw(1, state="OK"))
    assert item_ids(mirror) == [raw(1)["uuid"], raw(2)["uuid"]]
    mirror.apply(raw(1, state="Terminated"))
    clock.now += 7 * DAY - 1
    assert mirror.expire_removed() == []
    clock.now += 1
    assert mirror.expire_removed() == [f"{1:032x}"]


def test_terminated_then_restored_resets_the_retention(mirror: OfferingMirror, clock: FakeClock) -> None:
    mirror.apply(raw(1, state="Terminated"))
    clock.now += 6 * DAY
    mirror.apply(raw(1, state="OK"))
    clock.now += 6 * DAY
    mirror.apply(raw(1, state="Terminated"))
    clock.now += 6 * DAY
    assert mirror.expire_removed() == []
    assert len(mirror.storage_objects()) == 1


def test_retention_counts_from_a_clock_reading_of_zero() -> None:
    """A replay clock may start at 0: the first sighting at t=0 still counts."""
    clock = FakeClock(0.0)
    mirror = OfferingMirror("capstor", MappingSettings(), removed_retention=10.0, clock=clock)
    mirror.apply(raw(1, state="Terminated"))
    clock.now = 5.0
    mirror.apply(raw(1, state="Terminated"))
    clock.now = 10.0
    assert mirror.expire_removed() == [f"{1:032x}"]


# ---------------------------------------------------------------------------------------------------- order, version


def test_feed_order_is_created_then_uuid(mirror: OfferingMirror) -> None:
    mirror.replace_all(
        [
            raw(5, created="2025-03-02T00:00:00.000001Z"),
            raw(4, created="2025-03-01T00:00:00.000001Z"),
            raw(3, created="2025-03-02T00:00:00.000001Z"),
            raw(9, created="2024-12-31T23:59:59.999999Z"),
            raw(1, created="2025-03-03T00:00:00.000001Z"),
        ]
    )
    assert item_ids(mirror) == [f"{n:032x}" for n in (9, 4, 3, 5, 1)]
    assert [e.uuid for e in mirror.entries()] == [f"{n:032x}" for n in (9, 4, 3, 5, 1)]


def test_order_does_not_depend_on_arrival(mirror: OfferingMirror) -> None:
    resources = [raw(n, created=f"2025-03-{n % 5 + 1:02d}T00:00:00.000001Z") for n in range(1, 20)]
    mirror.replace_all(resources)
    expected = item_ids(mirror)
    other = OfferingMirror("capstor", MappingSettings())
    for resource in reversed(resources):
        other.apply(resource)
    assert item_ids(other) == expected


def test_version_increases_on_every_change(mirror: OfferingMirror, clock: FakeClock) -> None:
    versions = [mirror.version]

    def step() -> None:
        assert mirror.version > versions[-1]
        versions.append(mirror.version)

    mirror.apply(raw(1))
    step()
    mirror.apply(raw(1, limits={"storage": 1}))
    step()
    mirror.apply(raw(2))
    step()
    mirror.remove(f"{2:032x}")
    step()
    mirror.apply(raw(1, state="Terminated"))
    step()
    clock.now += 8 * DAY
    mirror.expire_removed()
    step()
    mirror.replace_all([raw(3)])
    step()


def test_concurrent_applies(mirror: OfferingMirror) -> None:
    def work(w: int) -> None:
        for i in range(100):
            mirror.apply(raw(w * 1000 + i))
            mirror.storage_objects()

    threads = [threading.Thread(target=work, args=(w,)) for w in range(1, 5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(mirror) == 400
    assert len(mirror.storage_objects()) == 400


# ------------------------------------------------------------------------------------ what a resource costs


def test_only_the_kept_fields_of_a_resource_stay(mirror: OfferingMirror) -> None:
    resource = raw(1)
    assert len(resource) > 2 * len(KEPT_FIELDS)  # the golden resource has far more fields than are kept
    mirror.apply(resource)
    entry = mirror.get(resource["uuid"])
    assert entry is not None
    assert entry.raw == {name: resource[name] for name in KEPT_FIELDS if name in resource}
    # What the HTTP API's debug view shows is kept.
    assert set(RAW_FIELDS) <= set(KEPT_FIELDS)


@pytest.mark.parametrize(
    ("one", "other"),
    [
        ({"limits": {"storage": None}}, {"limits": {"storage": float("nan")}}),
        ({"limits": {"storage": None}}, {"limits": {"storage": float("inf")}}),
        ({"limits": {"storage": 2**64}}, {"limits": {"storage": 2**64 + 1}}),
        ({"name": "\ud800"}, {"name": "\ud801"}),
        ({"limits": {"storage": 1}}, {"limits": {"storage": 1.0}}),
        ({"state": "OK"}, {"state": "OK", "name": None}),
    ],
)
def test_the_kept_json_tells_apart_what_maps_differently(one: dict[str, Any], other: dict[str, Any]) -> None:
    # Equal bytes mean "not mapped again": two different inputs must never give the same bytes.
    assert kept_json(one) != kept_json(other)
    for value in (one, other):
        assert kept_json(value) == kept_json(copy.deepcopy(value))
        back = parse_kept_json(kept_json(value))
        assert json.dumps(back, allow_nan=True) == json.dumps(value, allow_nan=True)


def test_a_non_finite_limit_is_mapped_again_after_a_null_one(mirror: OfferingMirror) -> None:
    fine = raw(1, limits={"storage": None})
    mirror.replace_all([fine])
    assert mirror.invalid_count == 0
    changes = mirror.replace_all([raw(1, limits={"storage": float("nan")})])
    assert changes[0].error is not None and changes[0].error.field.startswith("limits")


class Bulky:
    """A value that can be watched (a weak reference) to see whether the mirror still holds it."""


def test_a_listing_does_not_hold_the_fields_it_does_not_keep(mirror: OfferingMirror) -> None:
    bulky = Bulky()
    watch = weakref.ref(bulky)
    listing = mirror.listing()
    listing.take([raw(1, report=bulky), raw(2)])
    del bulky
    mirror.replace_all(listing)
    del listing
    assert watch() is None
    assert len(mirror.storage_objects()) == 2


def test_an_unchanged_resource_is_not_mapped_again_by_a_listing(clock: FakeClock) -> None:
    warnings: list[tuple[str, dict[str, Any]]] = []
    mirror = OfferingMirror("capstor", MappingSettings(), clock=clock, warn=lambda e, f: warnings.append((e, f)))
    odd = raw(1, attributes={**GOLDEN["attributes"], "storage_data_type": "odd"})  # maps, with a warning
    mirror.replace_all([odd, raw(2)])
    assert len(warnings) == 1
    first = mirror.storage_objects()
    entries = mirror.entries()
    version = mirror.version
    # The same resources again, with fields the mirror does not keep changed: nothing is mapped or changed, and
    # the entries stay the same objects (what the API rendered for them still serves).
    changes = mirror.replace_all([{**odd, "modified": odd["modified"], "report": "new"}, {**raw(2), "url": "x"}])
    assert not any(change.changed for change in changes)
    assert len(warnings) == 1
    assert [a is b for a, b in zip(mirror.storage_objects(), first, strict=True)] == [True, True]
    assert [a is b for a, b in zip(mirror.entries(), entries, strict=True)] == [True, True]
    assert mirror.version == version
    # A resource event with the same input is not mapped again either.
    assert not mirror.apply({**odd, "report": "newer"}).changed
    assert len(warnings) == 1
    # A kept field that changes is mapped again.
    mirror.replace_all([{**odd, "name": "renamed"}, raw(2)])
    assert len(warnings) == 2
    assert mirror.version > version


def test_an_unchanged_invalid_resource_is_reported_once(mirror: OfferingMirror) -> None:
    first = mirror.replace_all([raw(1), invalid(2)])
    assert [c.new_error for c in first if c.error] == [True]
    again = mirror.replace_all([raw(1), invalid(2)])
    assert [(c.error is not None, c.new_error) for c in again] == [(False, False), (True, False)]


def test_a_listing_that_fails_half_way_changes_nothing(fake_waldur: FakeWaldur) -> None:
    offering = populate(fake_waldur, ["capstor"], n=150).offerings[0]
    with WaldurGateway(fake_waldur.url, fake_waldur.token, retry=FAST_RETRY) as gateway:
        runtime = OfferingRuntime(
            uuid=offering.uuid,
            slug="capstor",
            name="capstor",
            settings=MappingSettings(),
            zone=ZoneInfo("UTC"),
            snapshot_retention=10,
            gateway=gateway,
            mirror=OfferingMirror("capstor", MappingSettings()),
            writer=OutputWriter(Path("/nonexistent-never-written")),
        )
        runtime.read_all()
        before = runtime.mirror.storage_objects()
        version = runtime.mirror.version
        assert before
        # Waldur changes a resource, then the listing does not add up once page 2 is in.
        changed = fake_waldur.resource_uuids(offering.uuid)[0]
        fake_waldur.put_resource({**fake_waldur.resource(changed), "name": "changed"})
        fake_waldur.result_count_delta = 1
        with pytest.raises(WaldurPaginationError):
            runtime.read_all()
        assert runtime.mirror.version == version
        assert runtime.mirror.storage_objects() == before
        entry = runtime.mirror.get(changed)
        assert entry is not None and entry.raw.get("name") != "changed"
        # Once Waldur adds up again, the next listing takes the change.
        fake_waldur.result_count_delta = 0
        runtime.read_all()
        entry = runtime.mirror.get(changed)
        assert entry is not None and entry.raw["name"] == "changed"
