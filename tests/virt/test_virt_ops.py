"""Life-cycle operations on libvirt's test driver: state, suspend/resume, save/restore, define."""
from __future__ import annotations

from pathlib import Path

import pytest

from migsec.errors import DomainNotFoundError, SaveImageError
from migsec.virt import (
    DomainExistsError,
    DomainState,
    DomainStateError,
    DomainXmlError,
    OperationUnsupportedError,
    check_save_image,
    define_domain,
    describe_domain,
    destroy_domain,
    domain_state,
    restore_domain,
    resume_domain,
    save_domain,
    save_image_restore_xml,
    save_image_xml,
    start_domain,
    suspend_domain,
    undefine_domain,
)
from virt_helpers import data_xml

TEST_UUID = "6695eb01-f6a4-8304-79aa-97f2502e193f"


def test_suspend_resume_and_state(conn) -> None:
    assert domain_state(conn, "test") is DomainState.RUNNING
    suspend_domain(conn, "test")
    assert domain_state(conn, "test") is DomainState.PAUSED
    with pytest.raises(DomainStateError, match="suspend: domain 'test' is paused"):
        suspend_domain(conn, "test")
    resume_domain(conn, TEST_UUID)
    assert domain_state(conn, "test") is DomainState.RUNNING
    with pytest.raises(DomainStateError, match="resume: domain 'test' is running, needs to be paused"):
        resume_domain(conn, "test")


def test_operations_on_missing_domain_name_it(conn) -> None:
    for op in (suspend_domain, resume_domain, destroy_domain, undefine_domain, domain_state):
        with pytest.raises(DomainNotFoundError, match="'ghost-vm'"):
            op(conn, "ghost-vm")


def test_save_check_and_restore(conn, tmp_path: Path) -> None:
    image = tmp_path / "test.save"
    save_domain(conn, "test", str(image))
    assert image.stat().st_size > 0
    assert domain_state(conn, "test") is DomainState.SHUTOFF
    xml = check_save_image(conn, str(image), uuid=TEST_UUID, name="test")
    assert xml == save_image_xml(conn, str(image)) and TEST_UUID in xml
    assert restore_domain(conn, str(image)) == "test"
    assert domain_state(conn, "test") is DomainState.RUNNING
    with pytest.raises(DomainStateError, match="already active"):
        restore_domain(conn, str(image))


def test_save_of_shutoff_domain_is_refused(conn, tmp_path: Path) -> None:
    destroy_domain(conn, "test")
    with pytest.raises(DomainStateError, match="save: domain 'test' is shutoff"):
        save_domain(conn, "test", str(tmp_path / "x.save"))
    assert not (tmp_path / "x.save").exists()


def test_save_image_of_another_domain_is_refused(conn, tmp_path: Path) -> None:
    name = define_domain(conn, data_xml("web1.xml"))
    start_domain(conn, name)
    image = tmp_path / "web1.save"
    save_domain(conn, name, str(image))
    with pytest.raises(SaveImageError) as err:
        check_save_image(conn, str(image), uuid=TEST_UUID)
    msg = str(err.value)
    assert str(image) in msg and "'web1'" in msg and TEST_UUID in msg
    with pytest.raises(SaveImageError, match="not 'web2'"):
        check_save_image(conn, str(image), uuid="2b1c7f0e-5a34-4c55-9d1e-0f7d1d3e9a01", name="web2")
    with pytest.raises(SaveImageError, match="not a uuid"):
        check_save_image(conn, str(image), uuid="web1")
    # Nothing changed: the saved domain is still off and the test domain still runs.
    assert domain_state(conn, name) is DomainState.SHUTOFF
    assert domain_state(conn, "test") is DomainState.RUNNING


def test_unreadable_save_images_name_the_path(conn, tmp_path: Path) -> None:
    missing = tmp_path / "missing.save"
    with pytest.raises(SaveImageError, match=str(missing)):
        save_image_xml(conn, str(missing))
    garbage = tmp_path / "garbage.save"
    garbage.write_bytes(b"not a save image" * 64)
    with pytest.raises(SaveImageError, match=str(garbage)):
        check_save_image(conn, str(garbage), uuid=TEST_UUID)
    with pytest.raises(SaveImageError, match=str(garbage)):
        restore_domain(conn, str(garbage))


def test_unsupported_flags_are_errors_not_fallbacks(conn, tmp_path: Path) -> None:
    # The test driver knows none of the save/restore flags: asking for one must fail loudly.
    image = tmp_path / "test.save"
    with pytest.raises(OperationUnsupportedError, match=r"save \(bypass-cache\).*test:///default"):
        save_domain(conn, "test", str(image), bypass_cache=True)
    assert domain_state(conn, "test") is DomainState.RUNNING and not image.exists()
    save_domain(conn, "test", str(image))
    with pytest.raises(OperationUnsupportedError, match=r"restore \(paused\)"):
        restore_domain(conn, str(image), paused=True)
    assert domain_state(conn, "test") is DomainState.SHUTOFF  # not started running instead
    with pytest.raises(OperationUnsupportedError):
        restore_domain(conn, str(image), xml=save_image_xml(conn, str(image)))
    assert domain_state(conn, "test") is DomainState.SHUTOFF


def test_unsafe_replacement_xml_never_reaches_libvirt(conn, tmp_path: Path) -> None:
    image = tmp_path / "test.save"
    save_domain(conn, "test", str(image))
    with pytest.raises(DomainXmlError, match="DOCTYPE"):
        restore_domain(conn, str(image), xml=data_xml("entity.xml"))
    assert domain_state(conn, "test") is DomainState.SHUTOFF


def test_save_image_restore_xml_checks_then_rewrites(conn, tmp_path: Path) -> None:
    image = tmp_path / "test.save"
    save_domain(conn, "test", str(image))
    xml = save_image_restore_xml(
        conn, str(image), uuid=TEST_UUID, disk_map={"/guest": "/srv/b/guest"}, network_map={"default": "net-b"}
    )
    assert "/srv/b/guest/diskimage1" in xml and "net-b" in xml and "/guest/diskimage1'" not in xml
    with pytest.raises(SaveImageError):
        save_image_restore_xml(conn, str(image), uuid="2b1c7f0e-5a34-4c55-9d1e-0f7d1d3e9a01", disk_map={"/": "/"})


def test_define_start_destroy_undefine(conn) -> None:
    name = define_domain(conn, data_xml("web1.xml"))
    assert name == "web1" and domain_state(conn, name) is DomainState.SHUTOFF
    with pytest.raises(DomainStateError, match="destroy: domain 'web1' is shutoff"):
        destroy_domain(conn, name)
    start_domain(conn, name)
    assert domain_state(conn, name) is DomainState.RUNNING
    with pytest.raises(DomainStateError, match="start"):
        start_domain(conn, name)
    destroy_domain(conn, name)
    undefine_domain(conn, name)
    with pytest.raises(DomainNotFoundError, match="'web1'"):
        describe_domain(conn, name)


def test_undefine_with_nvram_needs_driver_support(conn) -> None:
    # chain1 has an <nvram>: undefine asks libvirt to remove it, and the test driver
    # cannot; the domain must then stay defined rather than leave its nvram behind.
    name = define_domain(conn, data_xml("chain.xml"))
    with pytest.raises(OperationUnsupportedError, match="'chain1'"):
        undefine_domain(conn, name)
    assert domain_state(conn, name) is DomainState.SHUTOFF


def test_define_conflicts_and_bad_xml(conn) -> None:
    clash = data_xml("web1.xml").replace("<name>web1</name>", "<name>test</name>")
    with pytest.raises(DomainExistsError, match="test"):
        define_domain(conn, clash)
    with pytest.raises(DomainXmlError):
        define_domain(conn, "<domain><name>broken</name>")
    with pytest.raises(DomainXmlError, match="DOCTYPE"):
        define_domain(conn, data_xml("entity.xml"))
    assert conn.list_domains() == ["test"]


def test_save_to_unwritable_place_names_the_path(conn, tmp_path: Path) -> None:
    target = tmp_path / "no-such-dir" / "test.save"
    with pytest.raises(SaveImageError, match=str(target)):
        save_domain(conn, "test", str(target))
    assert domain_state(conn, "test") is DomainState.RUNNING


def test_moved_mark_round_trip_keeps_the_tags(conn) -> None:
    from migsec.handover import MovedMark, moved_mark as parse_mark
    from migsec.virt import clear_moved, domain_xml, mark_moved, moved_mark, set_tags

    set_tags(conn, "test", ["eu-west"])
    destroy_domain(conn, "test")
    assert moved_mark(conn, "test") is None
    mark = MovedMark("m-123", "cloud-b.example", "2026-12-03T09:00:00Z")
    mark_moved(conn, "test", mark)
    assert moved_mark(conn, "test") == mark
    # what the hook gets on stdin at `start begin` is this XML: the mark is visible in it
    assert parse_mark(domain_xml(conn, "test", inactive=True)) == mark
    assert describe_domain(conn, "test").tags == ("eu-west",)  # another namespace: tags untouched
    assert clear_moved(conn, "test") == mark
    assert moved_mark(conn, "test") is None and clear_moved(conn, "test") is None
    assert describe_domain(conn, "test").tags == ("eu-west",)
