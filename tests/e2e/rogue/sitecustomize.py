"""Loaded (via PYTHONPATH) into the source's migsecd by the refused-RPC tests only: it turns
A into a dishonest source whose libvirt asks B for what B's filter must refuse.

MIGSEC_TEST_ROGUE=tcp-uri  QEMU's migration stream to a tcp:// URI instead of migsec's socket
MIGSEC_TEST_ROGUE=rename   the guest renamed on the way (destination_name: another domain)
MIGSEC_TEST_ROGUE=drop-finish-reply  not dishonest but unlucky: A's end of the libvirt channel loses
    B's reply to libvirt's Finish (it never reaches A's libvirtd, whose connection then ends), the
    failure window of issue 10: B's Finish succeeded, A's libvirt sees it fail, Confirm(cancelled)
    resumes the guest at A
"""
import os

_MODE = os.environ.get("MIGSEC_TEST_ROGUE")
if _MODE == "drop-finish-reply":
    import logging
    import socket
    import struct

    from migsec.migration import bridge as _bridge

    _FINISH3_PARAMS, _REPLY = 306, 1
    _pending: dict = {}
    _original_write = _bridge.ChannelBridge._write_local

    def _write_local(self, conn, data):
        if self.role != "source" or conn.kind != "libvirt":
            return _original_write(self, conn, data)
        buf = _pending.setdefault(conn.channel, bytearray())
        buf += bytes(data)
        while len(buf) >= 4:
            (length,) = struct.unpack(">I", buf[:4])
            if len(buf) < length:
                return None
            packet, buf[:] = bytes(buf[:length]), buf[length:]
            _prog, _vers, proc, kind = struct.unpack(">IIiI", packet[4:20])
            if proc == _FINISH3_PARAMS and kind == _REPLY:
                logging.getLogger("migsecd.rogue").warning("dropping B's Finish reply; ending A's libvirt connection")
                try:
                    conn.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                conn.target_broken = True
                buf.clear()
                return None
            _original_write(self, conn, packet)
        return None

    _bridge.ChannelBridge._write_local = _write_local
elif _MODE:
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
