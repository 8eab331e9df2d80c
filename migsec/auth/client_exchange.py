"""The migration client's half of the local exchange (paper steps 1-3), over migsecd's socket.

The protocol objects are ``migsec.protocol.local``; this module only moves them
through the daemon connection and gets the credential (password or ssh-agent).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from migsec.errors import AuthenticationError, DaemonError
from migsec.protocol.local import AuthReply, ClientLogin, make_migration_request
from migsec.protocol.messages import MigrationRequest


@dataclass
class AgentCredential:
    """ssh-agent keys to try, in the agent's order."""

    keys: list

    @classmethod
    def from_environment(cls, user: str) -> "AgentCredential":
        import paramiko

        try:
            keys = list(paramiko.Agent().get_keys())
        except Exception as exc:  # paramiko raises SSHException and OSError variants
            raise AuthenticationError(f"cannot talk to ssh-agent: {exc}") from exc
        if not keys:
            raise AuthenticationError("ssh-agent holds no keys (is SSH_AUTH_SOCK set and a key added?)")
        return cls(keys)


def login(conn: Any, user: str, credential: str | AgentCredential) -> Any:
    """Steps 1-2: returns ``migsec.protocol.local.Credentials`` (SK2 + Auth_Tkt)."""
    if isinstance(credential, AgentCredential):
        last: Exception | None = None
        for key in credential.keys:
            attempt = ClientLogin(user, ssh=True)
            attempt.sign_with(lambda payload: bytes(key.sign_ssh_data(payload)))
            try:
                reply = _exchange(conn, attempt.request.encode())
                return attempt.finish(AuthReply.decode(reply))
            except AuthenticationError as exc:
                last = exc
        raise AuthenticationError(f"none of the ssh-agent's keys is registered for {user!r}") from last
    attempt = ClientLogin(user)
    reply = _exchange(conn, attempt.request.encode())
    try:
        return attempt.finish(AuthReply.decode(reply), password=credential)
    except AuthenticationError as exc:
        # an unknown user gets a decoy reply that no password opens: the AS never says which
        raise AuthenticationError(f"authentication failed for user {user!r} (wrong password, or no such "
                                  f"user at this domain's authentication server)") from exc


def _exchange(conn: Any, request: bytes) -> bytes:
    try:
        answer = conn.request({"op": "login", "request": request.decode()})
    except DaemonError as exc:
        if exc.error == "AuthenticationError":
            raise AuthenticationError(str(exc)) from exc
        raise
    reply = answer.get("reply")
    if not isinstance(reply, str):
        raise AuthenticationError("migsecd sent no AuthReply")
    return reply.encode()


def migration_message(creds: Any, request: dict, conn: Any) -> dict:
    """Step 3: E_SK2(Mig_Rqst, Dest_DID, UserID, Nonce3), Auth_Tkt as a local ``migrate`` op."""
    dest = conn.request({"op": "resolve", "host": request["destination"]["host"],
                         "port": request["destination"]["port"]})
    options: dict[str, bool | int] = {
        "persistent": bool(request.get("persistent")),
        "undefine_source": bool(request.get("undefine_source")),
        "dry_run": bool(request.get("dry_run")),
    }
    if request.get("bandwidth_mib"):
        options["bandwidth"] = int(request["bandwidth_mib"] * 1024 * 1024)  # bytes/s, integers only
    if request.get("timeout"):
        options["timeout"] = int(request["timeout"])
    mig = MigrationRequest(vm=request["domain"], mode=request.get("mode", "cold"), dest_did=dest["did"], options=options)
    sealed = make_migration_request(creds, mig)
    return {"op": "migrate", "request": sealed.encode().decode()}
