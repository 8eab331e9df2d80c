"""The authentication server (AS) and authorization server (AZ) of a domain, on top of
``migsec.protocol.local`` (the messages) and ``migsec.policy`` (the PDP).

AS (paper steps 1-2): looks the user up, answers with E_SK1(...) and Auth_Tkt. An
unknown user gets a decoy reply that cannot be opened, so that the client cannot
tell an unknown name from a wrong password.

AZ (steps 3-4) at the source: opens the ticket and request, builds the typed
migration plan from libvirt's description of the VM (``plan_for``), asks the source
PDP (action ``migrate``) and, on Permit, signs the AuthorizationTicket over the
request with its plan. At the destination: ``admit_incoming`` asks the destination
PDP (``receive-migration``) and checks capacity, both from the signed plan. Both
PDPs get the plan's attributes through one mapping (``vm_attributes``). Obligations
the PEP cannot fulfil turn a Permit into a denial (XACML 3.0 §7.18).
"""
from __future__ import annotations

import hmac
import logging
import uuid
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from migsec import virt
from migsec.auth.users import SCRYPT_N, SCRYPT_P, SCRYPT_R, UserError
from migsec.crypto import random_bytes
from migsec.errors import AuthenticationError, AuthorizationDenied, MigsecError
from migsec.policy import attributes as A, authorize
from migsec.protocol.local import (
    AuthorizationServer as ProtocolAZ,
    AuthRequest,
    LocalMigrationRequest,
    make_auth_reply,
)
from migsec.protocol.messages import MigrationRequest, Obligation
from migsec.protocol.plan import DiskPlan, MigrationPlan

if TYPE_CHECKING:
    from migsec.daemon.services import Services
    from migsec.protocol.local import PasswordKey
    from migsec.protocol.messages import AuthorizationTicket
    from migsec.virt.describe import DomainInfo

log = logging.getLogger("migsecd.auth")
MIB = 1024 * 1024


@dataclass(frozen=True)
class _Decoy:
    """Password parameters for a user that does not exist (the reply never opens)."""

    key: bytes
    salt: bytes
    n: int
    r: int
    p: int


class AuthenticationServer:
    def __init__(self, services: Services) -> None:
        self.services = services

    def handle(self, request_text: str) -> dict:
        services = self.services
        request = AuthRequest.decode(request_text.encode())
        lifetime = timedelta(seconds=services.config.limits.ticket_lifetime_s)
        try:
            user = services.users.get(request.user_id)
        except UserError:
            user = None
        if request.ssh_signature is not None:
            if user is None or not user.ssh_public_key:
                log.info("login of %r refused: no such user with an ssh key", request.user_id)
                raise AuthenticationError(f"ssh-agent authentication failed for user {request.user_id!r}")

            def verify(payload: bytes, signature: bytes) -> None:
                services.users.verify_ssh_signature(request.user_id, payload, signature)

            reply = make_auth_reply(request, sk3=services.sk3, ssh_verify=verify, lifetime=lifetime,
                                    clock=services.clock)
        else:
            password_key: PasswordKey | None = user.password if user is not None else None
            if password_key is None:
                # same shape as a real reply; the salt is stable per name so probing learns nothing
                salt = hmac.new(services.sk3, b"decoy-salt " + request.user_id.encode(), "sha256").digest()[:16]
                password_key = _Decoy(random_bytes(32), salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
            reply = make_auth_reply(request, sk3=services.sk3, password_key=password_key,
                                    lifetime=lifetime, clock=services.clock)
        log.info("issued Auth_Tkt to %r", request.user_id)
        return {"reply": reply.encode().decode()}


@dataclass(frozen=True)
class Grant:
    """What the AZ hands the VMM agent after a Permit."""

    migration_id: str
    user: str
    roles: tuple[str, ...]
    request: MigrationRequest
    ticket: AuthorizationTicket
    token: str  # its compact JWS
    destination_did: str
    max_bandwidth: int | None  # bytes/s, from an obligation


class AuthorizationServer:
    def __init__(self, services: Services) -> None:
        self.services = services

    def authorize(self, request_text: str) -> Grant:
        """Steps 3-4 at the source; raises AuthorizationDenied (where="source") on anything but Permit."""
        services = self.services
        az = ProtocolAZ(did=services.did, key=services.identity.key, sk3=services.sk3,
                        replay_cache=services.replay, clock=services.clock)
        checked = az.open_request(LocalMigrationRequest.decode(request_text.encode()))
        mig = checked.request
        try:
            roles = tuple(services.users.get(checked.user_id).roles)
        except UserError as exc:
            raise AuthenticationError(f"user {checked.user_id!r} no longer exists") from exc
        try:
            services.peers.get(mig.dest_did)
        except MigsecError as exc:
            raise AuthorizationDenied(f"{mig.dest_did!r} is not in the peer directory", where="source") from exc
        with virt.connect(services.config.libvirt.uri) as conn:
            info = virt.describe_domain(conn, mig.vm)
        if info.state.value not in ("running", "paused", "blocked"):
            raise virt.DomainStateError(f"{mig.vm} is {info.state.value}: migsec moves a running or paused "
                                        f"guest (start it, or copy a stopped one's disks)")
        mig = replace(mig, vm=info.name)  # libvirt's name, however the user named it (a UUID, say)
        plan = plan_for(mig, info)  # the AZ vouches for these facts: both PDPs and both data paths use them
        decision = authorize(
            services.pdp_source,
            subject={"user-id": checked.user_id, "roles": list(roles), "source-domain": services.did},
            resource=vm_attributes(plan),
            action=A.ACTION_MIGRATE,
            environment={"source-domain": services.did, "destination-domain": mig.dest_did,
                         "migration-mode": mig.mode, "current-dateTime": services.clock()},
        )
        if not decision.permitted:
            reason = _reason(decision)
            services.audit("denied", where="source", user=checked.user_id, vm=mig.vm,
                           destination=mig.dest_did, decision=decision.decision, reason=reason)
            raise AuthorizationDenied(
                f"{services.did} policy: {decision.decision} for {checked.user_id!r} to migrate "
                f"{mig.vm!r} to {mig.dest_did!r}{': ' + reason if reason else ''}",
                where="source", decision=decision.decision)
        max_bandwidth, obligations = apply_obligations(decision, mig, where="source")
        virt.check_migratable(info)
        mig = MigrationRequest(vm=mig.vm, mode=mig.mode, dest_did=mig.dest_did, storage_map=mig.storage_map,
                               network_map=mig.network_map, options=mig.options, plan=plan)
        checked = replace(checked, request=mig)
        ticket, token = az.issue(checked, obligations=[Obligation(o.id, _scalars(o.attributes)) for o in obligations])
        migration_id = uuid.uuid4().hex
        services.audit("authr-tkt", migration_id, role="source", token=token)
        log.info("%s: permitted %r to migrate %r to %r", migration_id, checked.user_id, mig.vm, mig.dest_did)
        return Grant(migration_id, checked.user_id, roles, mig, ticket, token, mig.dest_did, max_bandwidth)


def plan_for(request: MigrationRequest, info: DomainInfo) -> MigrationPlan:
    """The typed plan of ``request`` for the VM ``info`` describes (the AZ signs it with the request)."""
    disks = tuple(DiskPlan(target=d.target, type=d.type, source=d.source, format=d.format,
                           virtual_size=int(d.virtual_size or 0),
                           backing=d.files[1:],  # a file disk's backing files, nearest first
                           readonly=d.readonly, shareable=d.shareable) for d in info.disks)
    return MigrationPlan(vm_name=request.vm, vm_uuid=info.uuid, mode=request.mode, vcpus=int(info.vcpus),
                         memory_bytes=int(info.memory_bytes), disks=disks,
                         tags=tuple(t for t in info.tags if t), paused=info.state.value == "paused",
                         storage_map=request.storage_map, network_map=request.network_map)


def admit_incoming(services: Services, *, src_did: str, user_id: str,
                   request: MigrationRequest) -> tuple[int | None, list]:
    """Step 6 at the destination: PDP (receive-migration) + capacity, from the request's signed
    plan; AuthorizationDenied otherwise (MalformedMessageError for a request without a plan).

    Returns the bandwidth limit obligations ask for and the obligations.
    """
    plan = request.require_plan()
    decision = authorize(
        services.pdp_destination,
        subject={"user-id": user_id, "source-domain": src_did},
        resource=vm_attributes(plan),
        action=A.ACTION_RECEIVE,
        environment={"source-domain": src_did, "destination-domain": services.did,
                     "migration-mode": request.mode, "current-dateTime": services.clock()},
    )
    if not decision.permitted:
        reason = _reason(decision)
        raise AuthorizationDenied(
            f"{services.did} policy: {decision.decision} for receiving {plan.vm_name!r} from "
            f"{src_did!r}{': ' + reason if reason else ''}", where="destination", decision=decision.decision)
    check_capacity(services, plan)
    return apply_obligations(decision, request, where="destination")


def check_capacity(services: Services, plan: MigrationPlan) -> None:
    """Configured limits and the host's free memory; AuthorizationDenied naming what is short."""
    limits = services.config.limits
    vcpus, memory = plan.vcpus, plan.memory_bytes
    if limits.max_vcpus and vcpus > limits.max_vcpus:
        raise AuthorizationDenied(f"{services.did}: {vcpus} vCPUs exceed [limits].max_vcpus = {limits.max_vcpus}",
                                  where="destination", decision="Capacity")
    if limits.max_memory_mib and memory > limits.max_memory_mib * MIB:
        raise AuthorizationDenied(f"{services.did}: {memory // MIB} MiB exceed [limits].max_memory_mib = "
                                  f"{limits.max_memory_mib}", where="destination", decision="Capacity")
    with virt.connect(services.config.libvirt.uri) as conn:
        capacity = conn.capacity()
    if memory > capacity.free_memory_bytes:
        raise AuthorizationDenied(f"{services.did}: not enough free memory ({capacity.free_memory_bytes // MIB} MiB "
                                  f"free, {memory // MIB} MiB needed)", where="destination", decision="Capacity")


def vm_attributes(plan: MigrationPlan) -> dict[str, Any]:
    """The VM's resource attributes for a PDP: the one mapping A's and B's policies both see."""
    attributes: dict[str, Any] = {"vm-name": plan.vm_name, "vm-uuid": plan.vm_uuid, "vcpus": plan.vcpus,
                                  "memory-bytes": plan.memory_bytes, "disk-bytes": plan.disk_bytes}
    if plan.tags:  # no tags: no attribute (an empty bag, as XACML reads an absent one)
        attributes["tags"] = list(plan.tags)
    return attributes


def apply_obligations(decision: Any, request: MigrationRequest, *, where: str) -> tuple[int | None, list]:
    """The obligations this PEP understands; any other makes the Permit unusable."""
    bandwidth: int | None = None
    for ob in decision.obligations:
        if ob.id == A.OBLIGATION_MAX_BANDWIDTH:
            value = ob.attributes.get(A.ASSIGN_BANDWIDTH_MIB_S)
            if not isinstance(value, int) or value <= 0:
                raise AuthorizationDenied(f"obligation {ob.id} has no usable bandwidth value", where=where,
                                          decision="Indeterminate")
            limit = value * MIB
            bandwidth = limit if bandwidth is None else min(bandwidth, limit)
        elif ob.id == A.OBLIGATION_REQUIRE_LIVE:
            if request.mode != "live":
                raise AuthorizationDenied(f"policy at the {where} requires a live migration "
                                          f"(obligation {ob.id}); use `migsec migrate --live`",
                                          where=where, decision="Obligation")
        else:
            raise AuthorizationDenied(f"policy at the {where} returned obligation {ob.id!r}, which this "
                                      f"host cannot fulfil", where=where, decision="Obligation")
    return bandwidth, list(decision.obligations)


def _scalars(attributes: dict) -> dict:
    out = {}
    for k, v in attributes.items():
        out[k] = ",".join(map(str, v)) if isinstance(v, list) else v
    return out


def _reason(decision: Any) -> str:
    for advice in decision.advice:
        text = advice.attributes.get(A.ASSIGN_REASON)
        if text:
            return str(text if not isinstance(text, list) else "; ".join(map(str, text)))
    return decision.status_message or ""
