"""Pure pieces of the daemon: storage mapping, obligations, the plan's PDP attributes, peer lookup."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from migsec.auth.servers import apply_obligations, check_capacity, vm_attributes
from migsec.migration.dataplane import disk_map
from migsec.migration.peers import find_peer, split_address
from migsec.errors import AuthorizationDenied, ConfigError, MappingError
from migsec.policy import attributes as A
from migsec.policy.api import Decision, Obligation
from migsec.protocol.messages import MigrationRequest
from migsec.protocol.plan import DiskPlan, MigrationPlan

MIB = 1024 * 1024
UUID = "0b1c6e4a-6f8e-4b59-9d43-5b3e2d0b7a11"


def plan(*paths, vcpus=1, memory=MIB, tags=()):
    """A cold plan for vm1 with one qcow2 file disk per path."""
    disks = tuple(DiskPlan(f"vd{chr(ord('a') + i)}", "file", str(path), "qcow2", 1 << 20)
                  for i, path in enumerate(paths))
    return MigrationPlan(vm_name="vm1", vm_uuid=UUID, mode="cold", vcpus=vcpus, memory_bytes=memory, disks=disks,
                         tags=tuple(tags))


def services(**limits):
    cfg = SimpleNamespace(
        storage=SimpleNamespace(image_dir="/srv/images", map={"/a/images": "/b/images", "/a/images/gold": "/b/gold"}),
        limits=SimpleNamespace(max_vcpus=limits.get("max_vcpus", 0), max_memory_mib=limits.get("max_memory_mib", 0)),
        libvirt=SimpleNamespace(uri="test:///default"))
    return SimpleNamespace(config=cfg, did="cloud-b.example")


def test_disk_map_longest_prefix_then_image_dir():
    m = disk_map(services(), ["/a/images/vm.qcow2", "/a/images/gold/base.qcow2", "/elsewhere/x.raw"])
    assert m == {"/a/images/vm.qcow2": "/b/images/vm.qcow2", "/a/images/gold/base.qcow2": "/b/gold/base.qcow2",
                 "/elsewhere/x.raw": "/srv/images/x.raw"}


@pytest.mark.parametrize("bad", ["relative/x.qcow2", "/a/images/../../etc/passwd"])
def test_disk_map_refuses_unclean_paths_from_the_source(bad):
    with pytest.raises(MappingError):
        disk_map(services(), [bad])


def test_disk_map_refuses_two_disks_on_one_target():
    with pytest.raises(MappingError):
        disk_map(services(), ["/x/vm.qcow2", "/y/vm.qcow2"])


def _request(mode="cold"):
    return MigrationRequest(vm="vm1", mode=mode, dest_did="cloud-b.example")


def test_bandwidth_obligation_is_applied_and_the_lowest_wins():
    d = Decision("Permit", [Obligation(A.OBLIGATION_MAX_BANDWIDTH, {A.ASSIGN_BANDWIDTH_MIB_S: 50}),
                            Obligation(A.OBLIGATION_MAX_BANDWIDTH, {A.ASSIGN_BANDWIDTH_MIB_S: 20})])
    bandwidth, obligations = apply_obligations(d, _request(), where="source")
    assert bandwidth == 20 * MIB and len(obligations) == 2


def test_require_live_denies_a_cold_move_and_unknown_obligations_deny():
    with pytest.raises(AuthorizationDenied, match="live"):
        apply_obligations(Decision("Permit", [Obligation(A.OBLIGATION_REQUIRE_LIVE, {})]), _request(), where="source")
    assert apply_obligations(Decision("Permit", [Obligation(A.OBLIGATION_REQUIRE_LIVE, {})]),
                             _request("live"), where="source")[0] is None
    with pytest.raises(AuthorizationDenied, match="cannot fulfil"):
        apply_obligations(Decision("Permit", [Obligation("urn:x:encrypt-at-rest", {})]), _request(),
                          where="destination")


def test_capacity_limits_name_the_setting():
    with pytest.raises(AuthorizationDenied, match=r"\[limits\].max_vcpus"):
        check_capacity(services(max_vcpus=2), plan(vcpus=4))
    with pytest.raises(AuthorizationDenied, match=r"\[limits\].max_memory_mib"):
        check_capacity(services(max_memory_mib=64), plan(memory=128 * MIB))
    check_capacity(services(), plan())  # the test driver has room for 1 MiB


def test_the_pdp_attributes_of_a_plan():
    attributes = vm_attributes(plan("/a/x|y.qcow2", "/a/z,w.qcow2", vcpus=2, memory=5, tags=("x,y", "z")))
    assert attributes == {"vm-name": "vm1", "vm-uuid": UUID, "vcpus": 2, "memory-bytes": 5,
                          "disk-bytes": 2 << 20, "tags": ["x,y", "z"]}
    assert "tags" not in vm_attributes(plan())  # no tags: no attribute


def test_find_peer_by_did_or_address():
    peers = [SimpleNamespace(did="cloud-b.example", address="migsec://198.18.0.2:7443")]
    svc = SimpleNamespace(peers=SimpleNamespace(list=lambda: peers))
    assert find_peer(svc, "cloud-b.example", 1).did == "cloud-b.example"
    assert find_peer(svc, "198.18.0.2", 7443).did == "cloud-b.example"
    with pytest.raises(ConfigError, match="peer add"):
        find_peer(svc, "198.18.0.2", 7444)
    assert split_address("migsec://[::1]:9") == ("::1", 9)


def test_throttled_socket_passes_data_through_and_polls():
    import select
    import socket

    from migsec.migration.dataplane import _ThrottledSocket

    a, b = socket.socketpair()
    with a, b:
        wrapped = _ThrottledSocket(b, 64 * MIB)
        poll = select.poll()
        poll.register(wrapped, select.POLLIN)  # the plane polls the socket it is given
        a.sendall(b"x" * 5000 + b"y" * 5000)
        assert poll.poll(1000)
        buf = bytearray(10000)
        got = 0
        while got < len(buf):
            got += wrapped.recv_into(memoryview(buf)[got:], len(buf) - got)
        assert bytes(buf) == b"x" * 5000 + b"y" * 5000
        wrapped.settimeout(1)
        a.sendall(b"z")
        assert wrapped.recv(10) == b"z"


def test_memory_image_streams_during_the_save_within_the_bound_b_accepts(tmp_path):
    import threading

    from migsec.migration.dataplane import SAVE_MAGIC, SAVE_MAGIC_PARTIAL, memory_image_bound, source_streams
    from migsec.migration.source import _Background
    from migsec.transfer import file_digest

    image = tmp_path / "memory.save"
    release = threading.Event()

    def save() -> None:  # libvirt's order: partial magic, body, final magic; then it stops QEMU
        with open(image, "wb") as fh:
            fh.write(SAVE_MAGIC_PARTIAL + bytes(range(256)) * 4096)
            fh.flush()
            release.wait(30)
            fh.seek(0)
            fh.write(SAVE_MAGIC)

    saver = _Background(save)
    info = SimpleNamespace(xml="<domain/>", memory_bytes=64 << 20)
    streams = list(source_streams(info, [], saver, image))  # never waits for the save
    assert [s.name for s in streams] == ["domain.xml", "memory"]
    memory = streams[-1]
    assert memory.growing and memory.bound == memory_image_bound(64 << 20) and not saver.finished()
    release.set()
    assert memory.digest()[0] == file_digest(image)
    saver.join()


def test_moved_disks_that_cannot_be_removed_are_reported(tmp_path):
    from migsec.migration.release import remove_moved_disks

    gone, stuck, absent = tmp_path / "vm.qcow2", tmp_path / "stuck.qcow2", tmp_path / "absent.qcow2"
    gone.write_bytes(b"x")
    stuck.mkdir()  # unlink() of a directory fails, whoever runs the test
    failed = remove_moved_disks(plan(gone, stuck, absent))
    assert not gone.exists() and stuck.exists()
    assert [d["path"] for d in failed] == [str(stuck)] and failed[0]["error"]


def test_discard_with_an_unreadable_staging_state_still_finds_the_parts_beside_targets(tmp_path):
    from migsec.migration.dataplane import discard, staging_dir

    images, other = tmp_path / "images", tmp_path / "mapped"
    images.mkdir()
    other.mkdir()
    config = SimpleNamespace(paths=SimpleNamespace(staging_dir=tmp_path / "staging"),
                             storage=SimpleNamespace(image_dir=images, map={"/src": str(other)}))
    services = SimpleNamespace(config=config)
    stage = staging_dir(services, "m1")
    stage.mkdir(parents=True)
    (stage / "state.json").write_text("{not json")
    mine = [images / ".migsec-in-m1.ch2.part", other / ".migsec-in-m1.ch3.part"]
    theirs = images / ".migsec-in-m2.ch2.part"  # another migration's: untouched
    for p in (*mine, theirs):
        p.write_bytes(b"x")
    discard(services, "m1")
    assert not stage.exists() and not any(p.exists() for p in mine) and theirs.exists()


def test_a_disk_target_that_exists_refuses_the_move_and_says_what_to_do(tmp_path):
    from migsec.migration.link import _check_targets_free

    cfg = SimpleNamespace(storage=SimpleNamespace(image_dir=str(tmp_path), map={}))
    svc = SimpleNamespace(config=cfg, did="cloud-a.example")
    request = MigrationRequest(vm="vm1", mode="cold", dest_did="cloud-a.example", plan=plan("/b/images/vm1.qcow2"))
    _check_targets_free(svc, request)  # nothing there yet
    (tmp_path / "vm1.qcow2").write_bytes(b"old copy")
    with pytest.raises(AuthorizationDenied) as info:
        _check_targets_free(svc, request)
    message = str(info.value)
    assert str(tmp_path / "vm1.qcow2") in message and "--undefinesource" in message
    assert "virsh undefine vm1 --remove-all-storage" in message and info.value.where == "destination"
