"""Running migsec on real hosts: ``migsec install`` and ``migsec doctor``.

- ``migsec.ops.layout``: ``Layout(prefix, config_dir, root, ...)``, ``plan(layout) -> [Item]``
  (directories, the systemd unit and tmpfiles entry from ``systemd/``, the libvirt hook from
  ``hooks/qemu``, the sample ``migsecd.toml``), ``apply(items, dry_run=False) -> Report``;
  idempotent, never replaces an existing configuration.
- ``migsec.ops.checks``: ``run_checks(config_path, hooks_dir=, unit=, now=) -> [Check]`` with
  ``Check(name, status in OK/WARN/FAIL, message, fix)``.
"""
from migsec.ops.cli import doctor, install

__all__ = ["doctor", "install"]
