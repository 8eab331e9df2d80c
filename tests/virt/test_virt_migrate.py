"""migsec.virt.migrate: who libvirt runs QEMU as (qemu.conf), for the live move's socket owners."""
from __future__ import annotations

import grp
import pwd

import pytest

from migsec.errors import MigsecError
from migsec.virt.migrate import QemuOwner, qemu_owner, system_qemu_owner


def _someone() -> tuple[pwd.struct_passwd, grp.struct_group]:
    users = [u for u in pwd.getpwall() if u.pw_uid != 0]
    groups = [g for g in grp.getgrall() if g.gr_gid != 0]
    if not users or not groups:
        pytest.skip("no non-root user and group on this host")
    return users[0], groups[-1]


def test_named_user_and_group_resolve_to_their_ids():
    user, group = _someone()
    text = f'# a comment\nuser = "{user.pw_name}"\ngroup = "{group.gr_name}"\ndynamic_ownership = 1\n'
    assert qemu_owner(text) == QemuOwner(user.pw_uid, group.gr_gid)


def test_plus_number_is_an_id_and_root_means_nothing_to_change():
    assert qemu_owner('user = "+4242"\ngroup = "+4343"\n') == QemuOwner(4242, 4343)
    assert qemu_owner('user = "root"\ngroup = "root"\n') is None
    assert qemu_owner('user = "+0"\ngroup = "+0"\n') is None


def test_a_commented_setting_is_the_packaged_default_and_an_explicit_one_wins():
    user, group = _someone()
    packaged = f'#user = "{user.pw_name}"\n#group = "{group.gr_name}"\n'
    assert qemu_owner(packaged) == QemuOwner(user.pw_uid, group.gr_gid)
    assert qemu_owner(packaged + 'user = "root"\ngroup = "root"\n') is None
    assert qemu_owner("") is None  # nothing said at all: libvirt's own default, root


def test_an_unknown_name_is_refused_not_guessed():
    with pytest.raises(MigsecError, match="does not know"):
        qemu_owner('user = "no-such-user-migsec"\ngroup = "root"\n')


def test_an_unreadable_file_means_root(tmp_path):
    assert system_qemu_owner(tmp_path / "missing.conf") is None
    conf = tmp_path / "qemu.conf"
    conf.write_text('user = "+77"\ngroup = "+78"\n')
    assert system_qemu_owner(conf) == QemuOwner(77, 78)
