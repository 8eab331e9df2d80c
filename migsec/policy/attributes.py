"""The XACML attributes migsec puts in its requests, in one place.

``authorize()`` takes plain dicts keyed by the short names below (or by a full attribute id),
and turns them into a request with these categories, ids and data types. Policies written by
an operator should use the ids given here; docs/policy.md shows them in a table.
"""
from __future__ import annotations

from dataclasses import dataclass

from migsec.policy import datatypes as T

SUBJECT = "urn:oasis:names:tc:xacml:1.0:subject-category:access-subject"
RESOURCE = "urn:oasis:names:tc:xacml:3.0:attribute-category:resource"
ACTION = "urn:oasis:names:tc:xacml:3.0:attribute-category:action"
ENVIRONMENT = "urn:oasis:names:tc:xacml:3.0:attribute-category:environment"

# action-id values
ACTION_MIGRATE = "migrate"  # asked at the source domain's AZ (protocol step 4)
ACTION_RECEIVE = "receive-migration"  # asked at the destination domain (protocol step 6)

ROLE_MIGRATION_ADMIN = "migration-admin"

# obligations and advice the default policies return
OBLIGATION_MAX_BANDWIDTH = "urn:migsec:obligation:max-bandwidth"
ASSIGN_BANDWIDTH_MIB_S = "urn:migsec:obligation:bandwidth-mib-s"  # integer, MiB/s
OBLIGATION_REQUIRE_LIVE = "urn:migsec:obligation:require-live"  # no assignments
ADVICE_REASON = "urn:migsec:advice:reason"
ASSIGN_REASON = "urn:migsec:advice:reason-text"  # string


@dataclass(frozen=True)
class AttributeSpec:
    short: str
    category: str
    id: str
    datatype: str
    multi: bool  # True when the value may be a list (a bag)
    doc: str


SPECS: tuple[AttributeSpec, ...] = (
    AttributeSpec("user-id", SUBJECT, "urn:oasis:names:tc:xacml:1.0:subject:subject-id", T.STRING, False,
                  "the administrator's user id (from the Auth_Tkt); at the destination, the source domain's user"),
    AttributeSpec("roles", SUBJECT, "urn:oasis:names:tc:xacml:2.0:subject:role", T.STRING, True,
                  "the user's roles from the user database, e.g. migration-admin"),
    AttributeSpec("source-domain", SUBJECT, "urn:migsec:subject:source-domain", T.STRING, False,
                  "the domain id (DID) the requester belongs to"),
    AttributeSpec("vm-name", RESOURCE, "urn:oasis:names:tc:xacml:1.0:resource:resource-id", T.STRING, False,
                  "the libvirt domain name of the VM"),
    AttributeSpec("vm-uuid", RESOURCE, "urn:migsec:resource:vm-uuid", T.STRING, False, "the libvirt domain UUID"),
    AttributeSpec("vcpus", RESOURCE, "urn:migsec:resource:vcpus", T.INTEGER, False, "number of virtual CPUs"),
    AttributeSpec("memory-bytes", RESOURCE, "urn:migsec:resource:memory-bytes", T.INTEGER, False,
                  "maximum memory of the VM in bytes"),
    AttributeSpec("disk-bytes", RESOURCE, "urn:migsec:resource:disk-bytes", T.INTEGER, False,
                  "sum of the virtual sizes of the VM's disks in bytes"),
    AttributeSpec("tags", RESOURCE, "urn:migsec:resource:tag", T.STRING, True,
                  "tags from the domain's <metadata> (migsec namespace)"),
    AttributeSpec("action-id", ACTION, "urn:oasis:names:tc:xacml:1.0:action:action-id", T.STRING, False,
                  "migrate (at the source) or receive-migration (at the destination)"),
    AttributeSpec("source-domain", ENVIRONMENT, "urn:migsec:environment:source-domain", T.STRING, False,
                  "DID of the domain the VM leaves"),
    AttributeSpec("destination-domain", ENVIRONMENT, "urn:migsec:environment:destination-domain", T.STRING, False,
                  "DID of the domain the VM goes to"),
    AttributeSpec("migration-mode", ENVIRONMENT, "urn:migsec:environment:migration-mode", T.STRING, False,
                  "cold or live: the mode the signed Mig_Rqst asks for"),
    AttributeSpec("current-dateTime", ENVIRONMENT, "urn:oasis:names:tc:xacml:1.0:environment:current-dateTime",
                  T.DATETIME, False, "the time of the decision (the PDP supplies it when absent)"),
)

BY_SHORT: dict[tuple[str, str], AttributeSpec] = {(s.category, s.short): s for s in SPECS}
BY_ID: dict[tuple[str, str], AttributeSpec] = {(s.category, s.id): s for s in SPECS}

USER_ID = BY_SHORT[(SUBJECT, "user-id")].id
ROLE = BY_SHORT[(SUBJECT, "roles")].id
SUBJECT_SOURCE_DOMAIN = BY_SHORT[(SUBJECT, "source-domain")].id
VM_NAME = BY_SHORT[(RESOURCE, "vm-name")].id
VM_UUID = BY_SHORT[(RESOURCE, "vm-uuid")].id
VCPUS = BY_SHORT[(RESOURCE, "vcpus")].id
MEMORY_BYTES = BY_SHORT[(RESOURCE, "memory-bytes")].id
DISK_BYTES = BY_SHORT[(RESOURCE, "disk-bytes")].id
TAG = BY_SHORT[(RESOURCE, "tags")].id
ACTION_ID = BY_SHORT[(ACTION, "action-id")].id
SOURCE_DOMAIN = BY_SHORT[(ENVIRONMENT, "source-domain")].id
DESTINATION_DOMAIN = BY_SHORT[(ENVIRONMENT, "destination-domain")].id
MIGRATION_MODE = BY_SHORT[(ENVIRONMENT, "migration-mode")].id
CURRENT_DATETIME = BY_SHORT[(ENVIRONMENT, "current-dateTime")].id
