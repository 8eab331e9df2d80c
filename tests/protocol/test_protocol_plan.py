"""The migration plan: strict round trips of any valid plan, refusal of anything else."""
from __future__ import annotations

import copy
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from migsec.errors import MalformedMessageError
from migsec.protocol.codec import canonical_json, parse_json_object
from migsec.protocol.messages import MigrationRequest
from migsec.protocol.plan import MAX_BYTES, DiskPlan, MigrationPlan

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# paths may hold anything but NUL: "|" and "," (the separators of the old string options) included
path_char = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")
paths = st.builds(lambda parts: "/" + "/".join(parts),
                  st.lists(st.text(path_char, min_size=1, max_size=12), min_size=1, max_size=4))
awkward_paths = st.sampled_from(["/img/a|b.qcow2", "/img/x,y.raw", "/img/with space/ü.qcow2", "/|", "/,,"])
any_path = st.one_of(paths, awkward_paths)
targets = st.from_regex(r"[sv]d[a-z]{1,2}", fullmatch=True)
formats = st.sampled_from(["raw", "qcow2", "vmdk", None])
sizes = st.integers(0, 2**40)


@st.composite
def disks(draw: st.DrawFn, target: str) -> DiskPlan:
    kind = draw(st.sampled_from(["file", "file", "block", "network", "volume"]))
    if kind == "file":
        source = draw(st.one_of(st.none(), any_path))
        backing = tuple(draw(st.lists(any_path, max_size=3))) if source is not None else ()
    elif kind == "block":
        source, backing = draw(st.one_of(st.none(), any_path)), ()
    else:
        source, backing = draw(st.one_of(st.none(), st.text(path_char, min_size=1, max_size=20))), ()
    return DiskPlan(target=target, type=kind, source=source, format=draw(formats), virtual_size=draw(sizes),
                    backing=backing, readonly=draw(st.booleans()), shareable=draw(st.booleans()))


@st.composite
def plans(draw: st.DrawFn) -> MigrationPlan:
    names = draw(st.lists(targets, unique=True, max_size=5))
    text = st.text(path_char, min_size=1, max_size=16)
    return MigrationPlan(
        vm_name=draw(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,20}", fullmatch=True)),
        vm_uuid=str(draw(st.uuids())), mode=draw(st.sampled_from(["cold", "live"])),
        vcpus=draw(st.integers(1, 4096)), memory_bytes=draw(st.integers(1, 2**40)),
        disks=tuple(draw(disks(t)) for t in names), tags=tuple(draw(st.lists(text, max_size=4))),
        paused=draw(st.booleans()),
        storage_map=draw(st.dictionaries(any_path, any_path, max_size=3)),
        network_map=draw(st.dictionaries(text, text, max_size=3)))


@SETTINGS
@given(plans())
def test_any_plan_round_trips_through_canonical_json(plan: MigrationPlan) -> None:
    wire = canonical_json(plan.to_dict())
    back = MigrationPlan.from_dict(parse_json_object(wire, "plan"))
    assert back == plan
    assert canonical_json(back.to_dict()) == wire
    # the facts the consumers read survive as they were, whatever the paths hold
    assert back.files == plan.files
    assert back.top_files == plan.top_files
    assert back.tags == plan.tags


@SETTINGS
@given(plans())
def test_files_are_every_top_image_then_its_backing_files_once(plan: MigrationPlan) -> None:
    expected: list[str] = []
    for d in plan.disks:
        if d.type == "file" and d.source is not None:
            for f in (d.source, *d.backing):
                if f not in expected:
                    expected.append(f)
    assert list(plan.files) == expected
    assert set(plan.top_files) <= set(plan.files)
    assert plan.disk_bytes == sum(d.virtual_size for d in plan.disks)
    assert all(d.type == "file" and not d.readonly and not d.shareable for d in plan.mirrored_disks)


def _plan(**changes: object) -> dict:
    base = MigrationPlan(vm_name="vm1", vm_uuid="0b1c6e4a-6f8e-4b59-9d43-5b3e2d0b7a11", mode="cold", vcpus=2,
                         memory_bytes=1 << 30,
                         disks=(DiskPlan("vda", "file", "/img/a|b.qcow2", "qcow2", 1 << 30, ("/img/base,1.qcow2",)),),
                         tags=("gold,eu", "a|b")).to_dict()
    base.update(changes)
    return base


def test_a_pipe_or_comma_in_a_path_or_tag_is_kept() -> None:
    plan = MigrationPlan.from_dict(json.loads(json.dumps(_plan())))
    assert plan.files == ("/img/a|b.qcow2", "/img/base,1.qcow2")
    assert plan.top_files == ("/img/a|b.qcow2",)
    assert plan.tags == ("gold,eu", "a|b")


@pytest.mark.parametrize("changes, problem", [
    ({"v": 2}, "unsupported version"),
    ({"mode": "warm"}, "mode"),
    ({"vcpus": 0}, "vcpus"),
    ({"vcpus": True}, "vcpus"),
    ({"memory_bytes": -1}, "memory_bytes"),
    ({"memory_bytes": 1.5}, "memory_bytes"),
    ({"vm_uuid": "0b1c6e4a6f8e4b599d435b3e2d0b7a11"}, "vm_uuid"),
    ({"vm_name": "a b"}, "vm_name"),
    ({"tags": "gold"}, "tags"),
    ({"tags": [""]}, "tag"),
    ({"tags": [1]}, "tag"),
    ({"paused": "no"}, "paused"),
    ({"storage_map": {"/a": ""}}, "storage_map"),
    ({"network_map": []}, "network_map"),
    ({"disks": {}}, "disks"),
    ({"extra": 1}, "unknown field"),
])
def test_a_malformed_plan_is_refused_naming_the_field(changes: dict, problem: str) -> None:
    with pytest.raises(MalformedMessageError, match=problem):
        MigrationPlan.from_dict(_plan(**changes))


@pytest.mark.parametrize("disk_changes, problem", [
    ({"target": "v d a"}, "target"),
    ({"type": "File!"}, "type"),
    ({"source": ""}, "path of 1-"),
    ({"source": "/a\x00b"}, "without NUL"),
    ({"source": 7}, "source"),
    ({"format": "qcow 2"}, "format"),
    ({"virtual_size": MAX_BYTES + 1}, "virtual_size"),
    ({"backing": "/img/base"}, "backing"),
    ({"backing": [""]}, "path of 1-"),
    ({"readonly": 1}, "readonly"),
    ({"bus": "virtio"}, "unknown field"),
])
def test_a_malformed_disk_is_refused_naming_the_field(disk_changes: dict, problem: str) -> None:
    obj = _plan()
    obj["disks"][0].update(disk_changes)
    with pytest.raises(MalformedMessageError, match=problem):
        MigrationPlan.from_dict(obj)


def test_missing_fields_and_duplicate_targets_are_refused() -> None:
    for key in _plan():
        obj = _plan()
        del obj[key]
        with pytest.raises(MalformedMessageError, match=key if key != "v" else "'v'"):
            MigrationPlan.from_dict(obj)
    obj = _plan()
    obj["disks"].append(copy.deepcopy(obj["disks"][0]))
    with pytest.raises(MalformedMessageError, match="share a target"):
        MigrationPlan.from_dict(obj)
    with pytest.raises(MalformedMessageError, match="backing"):
        DiskPlan("vdb", "block", "/dev/sdb", "raw", backing=("/img/x",))


def test_a_plan_is_immutable() -> None:
    plan = MigrationPlan.from_dict(_plan())
    with pytest.raises(AttributeError):
        plan.mode = "live"  # type: ignore[misc]
    with pytest.raises(TypeError):
        plan.storage_map["/x"] = "/y"  # type: ignore[index]


# ---- carried and signed inside Mig_Rqst ------------------------------------------------------------
def _request(plan: MigrationPlan | None, **changes: object) -> MigrationRequest:
    fields: dict = {"vm": "vm1", "mode": "cold", "dest_did": "cloud-b.example", "options": {"persistent": True}}
    fields.update(changes)
    return MigrationRequest(plan=plan, **fields)


def test_the_request_carries_its_plan_and_its_digest_covers_it() -> None:
    plan = MigrationPlan.from_dict(_plan())
    req = _request(plan)
    wire = parse_json_object(canonical_json(req.claims()), "Mig_Rqst")
    back = MigrationRequest.from_claims(wire)
    assert back == req and back.plan == plan
    assert back.plan is not None and back.plan.files == ("/img/a|b.qcow2", "/img/base,1.qcow2")
    other = MigrationPlan.from_dict(_plan(vcpus=3))
    assert _request(other).digest() != req.digest()
    # a request without a plan (the user's, recovery's) has no "plan" claim: its digest is as before
    bare = _request(None)
    assert "plan" not in bare.claims()
    assert MigrationRequest.from_claims(bare.claims()) == bare


@pytest.mark.parametrize("changes", [{"vm": "vm2"}, {"mode": "live"}, {"storage_map": {"/a": "/b"}},
                                     {"network_map": {"default": "br0"}}])
def test_a_plan_for_another_vm_mode_or_mapping_is_refused(changes: dict) -> None:
    with pytest.raises(MalformedMessageError, match="plan names another"):
        _request(MigrationPlan.from_dict(_plan()), **changes)


def test_a_malformed_plan_claim_is_refused() -> None:
    claims = _request(MigrationPlan.from_dict(_plan())).claims()
    claims["plan"]["disks"][0]["virtual_size"] = -1
    with pytest.raises(MalformedMessageError, match="virtual_size"):
        MigrationRequest.from_claims(claims)
    claims["plan"] = "vda=/img/x"
    with pytest.raises(MalformedMessageError, match="expected an object"):
        MigrationRequest.from_claims(claims)
