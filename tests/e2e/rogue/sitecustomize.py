"""Loaded (via PYTHONPATH) into the source's migsecd by the refused-RPC tests only: it turns
A into a dishonest source whose libvirt asks B for what B's filter must refuse.

MIGSEC_TEST_ROGUE=tcp-uri  QEMU's migration stream to a tcp:// URI instead of migsec's socket
MIGSEC_TEST_ROGUE=rename   the guest renamed on the way (destination_name: another domain)
"""
import os

_MODE = os.environ.get("MIGSEC_TEST_ROGUE")
if _MODE:
    import libvirt

    from migsec.virt import migrate as _vmig

    _original = _vmig.migrate_live

    def migrate_live(conn, name_or_uuid, **kw):
        if _MODE == "tcp-uri":
            kw["migrate_uri"] = "tcp://198.18.0.2:49152"
            return _original(conn, name_or_uuid, **kw)
        if _MODE == "rename":
            dom = _vmig.lookup(conn, name_or_uuid)
            params = {libvirt.VIR_MIGRATE_PARAM_URI: kw["migrate_uri"],
                      libvirt.VIR_MIGRATE_PARAM_DISKS_URI: kw["disks_uri"],
                      libvirt.VIR_MIGRATE_PARAM_DEST_NAME: "someone-else"}
            with _vmig.libvirt_call("live migration", uri=conn.uri, domain=name_or_uuid):
                dom.migrateToURI3(kw["dconnuri"], params, kw["flags"])
            return None
        raise RuntimeError(f"unknown MIGSEC_TEST_ROGUE {_MODE!r}")

    _vmig.migrate_live = migrate_live
