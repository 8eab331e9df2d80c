"""migsec's libvirt ``qemu`` hook (installed as ``/etc/libvirt/hooks/qemu.d/50-migsec``).

libvirt runs the hook as ``50-migsec DOMAIN OPERATION SUB-OPERATION EXTRA`` with the domain
XML on stdin and waits for it, so the hook stays small, imports lazily and never calls back
into libvirt (that would deadlock libvirtd). ``migsec.hooks.qemu.main(argv)`` does:

- ``migrate begin`` (on a destination): refuse libvirt's own incoming migration, exit 1 with
  the reason on stderr, unless ``[hooks] allow_native_migration``; either way it is audited;
- ``restore begin``: apply ``[storage] map`` / ``[network] map`` / ``bridge_map`` to a save
  image's XML that comes from another host (``migsec.hooks.mapping``) and print the result;
  nothing is printed (= unchanged) for a local restore; a mapped (foreign) restore is audited
  as ``foreign-restore`` and refused if it cannot be;
- ``start begin``: refuse to start a kept definition migsec marked as given away after a
  migration (``migsec.handover``; ``migsec release DOMAIN`` clears the mark), audited as
  ``start-refused-moved``; an unmarked XML is only searched for the namespace, not parsed;
- ``started begin``, ``stopped end``, ``release end``: append a signed audit record
  (``vm-started``/``vm-stopped``/``vm-released``; ``stopped end migrated``, which libvirt
  >= 10.5 passes after its own migration out, is ``native-migration-out``; libvirt 9.0
  passes no reason, so there that stop is a plain ``vm-stopped``).

The configuration is ``$MIGSEC_CONFIG`` or ``/etc/migsec/migsecd.toml`` (``migsec install``
writes the path into the installed script, because libvirt gives hooks a minimal environment).

Nothing is imported here so that ``import migsec.hooks.qemu`` stays cheap.
"""
