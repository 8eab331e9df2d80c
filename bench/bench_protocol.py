#!/usr/bin/env python3
"""Costs of the migsec protocol next to what a user would compare it with. Prints, asserts nothing.

1. Handshake CPU per side and end to end (one process, in-memory delivery), next to a
   Python ``ssl`` TLS 1.3 mutual-auth handshake with the same key type (ECDSA P-256, same CA)
   over a new loopback TCP connection, in the same run. CPU is ``time.thread_time`` per side.
2. Record-layer throughput (zero-copy path and sans-IO path) next to raw AES-256-GCM
   (``migsec.crypto.Aead.seal_into/open_into``) on the same 1 MiB buffers.
3. The size in bytes of every control message.

Usage: .venv/bin/python bench/bench_protocol.py [--rounds 40] [--mib 512] [--handshake-only]
"""
from __future__ import annotations

import argparse
import os
import socket
import ssl
import statistics
import tempfile
import threading
import time
from pathlib import Path

from cryptography.x509.oid import ExtendedKeyUsageOID

from migsec.crypto import Aead, scrypt_key
from migsec.crypto.certs import certificate_pem
from migsec.crypto.keys import SigningKey
from migsec.pki import CertificateAuthority, DomainIdentity, TrustStore
from migsec.protocol import (
    AuthorizationServer,
    ClientLogin,
    Decision,
    DestinationHandshake,
    MigrationRequest,
    Obligation,
    Receipt,
    RecordLayer,
    ReplayCache,
    Resumed,
    SourceHandshake,
    make_auth_reply,
    make_migration_request,
    token_hash,
)
from migsec.protocol.framing import HEADER_SIZE, NEED_DATA
from migsec.protocol.records import OVERHEAD, RECORD_SIZE
from migsec.protocol.replay import utc_now
from migsec.protocol.session import SessionKeys

A_DID, B_DID = "cloud-a.example", "cloud-b.example"


def setup(root: Path):
    ca = CertificateAuthority.create(root / "ca", "bench CA")
    ids = {}
    for did in (A_DID, B_DID):
        ca.issue_domain(did, root / did)
        ids[did] = DomainIdentity.load(root / did / "domain-key.pem", root / did / "domain-cert.pem")
    trust = TrustStore.from_files([root / "ca" / "ca-cert.pem"])
    return ca, ids[A_DID], ids[B_DID], trust


def local_exchange(a):
    class PasswordKey:
        salt = os.urandom(16)
        n, r, p = 2**15, 8, 1
        key = scrypt_key("pw", salt, n=2**15)

    sk3 = os.urandom(32)
    login = ClientLogin("alice")
    reply = make_auth_reply(login.request, sk3=sk3, password_key=PasswordKey)
    creds = login.finish(reply, password="pw")
    request = MigrationRequest(vm="web-01", mode="cold", dest_did=B_DID,
                               storage_map={"/var/lib/libvirt/images/web-01.qcow2": "/srv/images/web-01.qcow2"},
                               network_map={"default": "br-ext"})
    local = make_migration_request(creds, request)
    az = AuthorizationServer(did=A_DID, key=a.key, sk3=sk3, replay_cache=ReplayCache())
    checked = az.open_request(local)
    _ticket, token = az.issue(checked, obligations=[Obligation("urn:migsec:obligation:max-bandwidth", {"mbps": 1000})])
    ssh = ClientLogin("bob", ssh=True)
    ssh.sign_with(SigningKey.generate("ed25519").sign)
    sizes = {
        "AuthRequest (password user)": len(login.request.encode()),
        "AuthRequest (ssh-agent user, Ed25519 sig)": len(ssh.request.encode()),
        "AuthReply (E_SK1 part + Auth_Tkt)": len(reply.encode()),
        "  of which Auth_Tkt": len(reply.ticket),
        "MigrationRequest to AZ (E_SK2 + Auth_Tkt)": len(local.encode()),
        "Authr_Tkt (JWS ES256)": len(token),
    }
    return request, token, sizes


def handshake_once(a, b, trust, request, token, cache):
    t = {}
    src = SourceHandshake(a, trust, peer_did=B_DID, peer_cert_pem=b.cert_pem)
    dst = DestinationHandshake(b, trust, replay_cache=cache)
    wall0 = time.perf_counter()
    c0 = time.thread_time()
    req = src.initiate(request, token)
    c1 = time.thread_time()
    dst.receive_data(req)
    proposed = dst.next_event()
    resp = dst.accept()
    c2 = time.thread_time()
    src.receive_data(resp)
    accepted = src.next_event()
    c3 = time.thread_time()
    wall = time.perf_counter() - wall0
    assert accepted.keys == dst.keys and proposed.migration_id == accepted.keys.migration_id
    t["a"], t["b"], t["wall"] = (c1 - c0) + (c3 - c2), c2 - c1, wall
    return t, len(req), len(resp)


def tls_material(ca, root: Path):
    paths = {}
    for did in (A_DID, B_DID):
        key = SigningKey.generate("ec-p256")
        cert = ca.sign_domain_key(did, key, eku=[ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
        (root / f"tls-{did}-key.pem").write_bytes(key.to_pem())
        os.chmod(root / f"tls-{did}-key.pem", 0o600)
        (root / f"tls-{did}-cert.pem").write_bytes(certificate_pem(cert))
        paths[did] = (root / f"tls-{did}-cert.pem", root / f"tls-{did}-key.pem")
    return paths, root / "ca" / "ca-cert.pem"


class TlsPair:
    """A TLS 1.3 server thread on loopback; ``handshake()`` runs one mutual-auth connection."""

    def __init__(self, paths, ca_file) -> None:
        self.server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.server_ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        self.server_ctx.load_cert_chain(*paths[B_DID])
        self.server_ctx.load_verify_locations(ca_file)
        self.server_ctx.verify_mode = ssl.CERT_REQUIRED
        self.server_ctx.num_tickets = 0  # no session tickets: compare the handshake only
        self.client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self.client_ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        self.client_ctx.load_cert_chain(*paths[A_DID])
        self.client_ctx.load_verify_locations(ca_file)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.server_cpu: list[float] = []
        self.version = ""
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            c0 = time.thread_time()
            s = self.server_ctx.wrap_socket(conn, server_side=True)
            assert s.getpeercert()
            self.server_cpu.append(time.thread_time() - c0)
            s.recv(1)
            s.close()

    def handshake(self) -> tuple[float, float]:
        """(client CPU, wall) of one new connection + handshake."""
        w0 = time.perf_counter()
        raw = socket.create_connection(("127.0.0.1", self.port))
        c0 = time.thread_time()
        s = self.client_ctx.wrap_socket(raw, server_hostname=B_DID)
        cpu, wall = time.thread_time() - c0, time.perf_counter() - w0
        self.version = f"{s.version()} {s.cipher()[0]}"
        s.sendall(b"x")
        s.close()
        return cpu, wall

    def close(self) -> None:
        self.listener.close()


def throughput(total_mib: int, repeats: int = 7):
    """Each path runs ``repeats`` times, interleaved, on the same buffers; best run counts
    (the machine is shared, so the best run is the least disturbed one)."""
    keys = SessionKeys("bench", os.urandom(32), os.urandom(32), os.urandom(32), A_DID, B_DID)
    data = memoryview(os.urandom(RECORD_SIZE))
    n = max(total_mib * 1024 * 1024 // RECORD_SIZE, 64)  # records per run and path
    frame = bytearray(RECORD_SIZE + OVERHEAD)
    plain = bytearray(RECORD_SIZE)
    aead = Aead("aes-256-gcm", os.urandom(32))
    aad = bytes(29)
    ct = bytearray(RECORD_SIZE + 16)
    # the open paths both cycle over 64 distinct 1 MiB ciphertexts (same memory traffic)
    raw_sealed = [memoryview(aead.seal(i.to_bytes(12, "big"), data, aad)) for i in range(64)]
    # 64 genuine records in sequence for the receive path, replayed into fresh receivers
    sealer = RecordLayer(keys, "source")
    sealed = []
    for i in range(64):
        k = sealer.seal_data_into(1, i * RECORD_SIZE, data, frame)
        sealed.append(memoryview(bytes(frame[HEADER_SIZE:k])))

    def raw_seal():
        for i in range(n):
            aead.seal_into(i.to_bytes(12, "big"), data, aad, ct)

    def raw_open():
        done = 0
        while done < n:
            for i, body in enumerate(raw_sealed):
                aead.open_into(i.to_bytes(12, "big"), body, aad, plain)
            done += len(raw_sealed)

    def rec_seal():
        src = RecordLayer(keys, "source")
        for i in range(n):
            src.seal_data_into(1, i * RECORD_SIZE, data, frame)

    def rec_open():
        done = 0
        while done < n:
            dst = RecordLayer(keys, "destination")
            for body in sealed:
                dst.open_record_into(body, plain)
            done += len(sealed)

    def rec_sans_io():
        src, dst = RecordLayer(keys, "source"), RecordLayer(keys, "destination")
        for i in range(n // 2):
            dst.receive_data(src.send_data(1, i * RECORD_SIZE, data))
            while dst.next_event() is not NEED_DATA:
                pass

    paths = {
        "raw AES-256-GCM seal_into": (raw_seal, n),
        "record layer seal_data_into": (rec_seal, n),
        "raw AES-256-GCM open_into": (raw_open, (n + 63) // 64 * 64),
        "record layer open_record_into": (rec_open, (n + 63) // 64 * 64),
        "record layer send_data + receive_data/next_event (sans-IO)": (rec_sans_io, n // 2),
    }
    best = {name: float("inf") for name in paths}
    for _ in range(repeats):
        for name, (fn, records) in paths.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], (time.perf_counter() - t0) / records)
    return {name: RECORD_SIZE / secs for name, secs in best.items()}  # bytes per second


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--mib", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=7, help="interleaved throughput runs (best counts)")
    ap.add_argument("--handshake-only", action="store_true", help="stop after the handshake comparison")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ca, a, b, trust = setup(root)
        request, token, sizes = local_exchange(a)

        cache = ReplayCache()
        paths, ca_file = tls_material(ca, root)
        tls = TlsPair(paths, ca_file)
        for _ in range(3):  # warm up imports and caches
            handshake_once(a, b, trust, request, token, cache)
            tls.handshake()
        # interleaved, so that both see the same load on a shared machine
        ours, c_cpu, t_wall = [], [], []
        for _ in range(args.rounds):
            ours.append(handshake_once(a, b, trust, request, token, cache))
            cpu, wall = tls.handshake()
            c_cpu.append(cpu)
            t_wall.append(wall)
        time.sleep(0.05)
        tls.close()
        s_cpu = tls.server_cpu[3:]

        med = lambda xs: statistics.median(xs) * 1e3  # noqa: E731
        print(f"Handshake, median of {args.rounds} interleaved rounds (ms)  CPU source/client  CPU dest/server  wall")
        print(f"  migsec MigReq/MigResp (in-memory, 1 process)      {med([t['a'] for t, _, _ in ours]):10.2f}"
              f"  {med([t['b'] for t, _, _ in ours]):15.2f}  {med([t['wall'] for t, _, _ in ours]):8.2f}")
        print(f"  Python ssl {tls.version:<37}  {med(c_cpu):10.2f}  {med(s_cpu):15.2f}  {med(t_wall):8.2f}")
        ours_a, ours_b = med([t["a"] for t, _, _ in ours]), med([t["b"] for t, _, _ in ours])
        print(f"  ratio migsec / TLS (CPU)                          {ours_a / med(c_cpu):10.2f}  {ours_b / med(s_cpu):15.2f}")
        print("  (TLS: new loopback TCP connection each round, mutual auth, ECDSA P-256 certificates from the")
        print("   same CA, no session tickets; migsec: both sides in one thread, frames handed over in memory)")
        if args.handshake_only:
            return

        res = throughput(args.mib, args.repeats)
        raw_seal, raw_open = res["raw AES-256-GCM seal_into"], res["raw AES-256-GCM open_into"]
        raw_both = 1 / (1 / raw_seal + 1 / raw_open)
        print(f"\nThroughput, {RECORD_SIZE // 1024} KiB records, best of {args.repeats} interleaved runs of {args.mib} MiB each "
              "(GB/s, one core)")
        for name, rate in res.items():
            ref = raw_seal if "seal" in name else raw_open if "open" in name else raw_both
            print(f"  {name:<62} {rate / 1e9:6.2f}   {rate / ref * 100:5.1f}% of raw")
        print(f"  {'raw seal + open of the same record (reference for sans-IO)':<62} {raw_both / 1e9:6.2f}")

        _, req_len, resp_len = ours[0]
        src = SourceHandshake(a, trust, peer_did=B_DID, peer_cert_pem=b.cert_pem)
        dst = DestinationHandshake(b, trust, replay_cache=ReplayCache())
        dst.receive_data(src.initiate(request, token))
        dst.next_event()
        nack_len = len(dst.refuse("insufficient capacity for web-01"))
        now = utc_now()
        receipt = Receipt(migration_id="0" * 32, src_did=A_DID, dest_did=B_DID,
                          streams={"domain.xml": bytes(32), "disk:vda": bytes(32), "memory": bytes(32),
                                   "manifest": bytes(32)}, transcript_hash=bytes(32), issued_at=now).sign(b.key)
        decision = Decision(migration_id="0" * 32, src_did=A_DID, dest_did=B_DID, decision="commit",
                            receipt_hash=token_hash(receipt), issued_at=now).sign(a.key)
        resumed = Resumed(migration_id="0" * 32, src_did=A_DID, dest_did=B_DID, decision_hash=token_hash(decision),
                          issued_at=now).sign(b.key)
        sizes.update({
            "MigReq frame (JWE(JWS) + Authr_Tkt + Cert_A)": req_len,
            "MigResp frame, Ack (JWE(JWS) + Cert_B)": resp_len,
            "MigResp frame, Nack": nack_len,
            "Receipt (JWS, 4 streams)": len(receipt),
            "Decision (JWS)": len(decision),
            "Resumed (JWS)": len(resumed),
            "record overhead per record (frame 5 + header 29 + tag 16)": OVERHEAD,
            "domain certificate (PEM)": len(a.cert_pem),
        })
        print("\nControl message sizes (bytes)")
        for name, size in sizes.items():
            print(f"  {name:<62} {size:6d}")


if __name__ == "__main__":
    main()
