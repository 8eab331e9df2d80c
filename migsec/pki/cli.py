"""``migsec ca``: make a CA, issue domain certificates, show and revoke them."""
from __future__ import annotations

import datetime as dt
from pathlib import Path

import click
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from migsec.crypto.certs import CA_KINDS, certificate_fingerprint, certificate_public_key
from migsec.pki._files import read_bytes
from migsec.pki.ca import CA_CERT, CRL, DOMAIN_KEY, DOMAIN_KINDS, CertificateAuthority, load_certificate
from migsec.pki.names import DID_URI_PREFIX, MIGSEC_DOMAIN_EKU, validate_did

DEFAULT_CA_DIR = "/etc/migsec/ca"
_EKU_NAMES = {
    MIGSEC_DOMAIN_EKU: "migsec-domain",
    ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth",
    ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth",
}
ca_dir_option = click.option(
    "--ca", "ca_dir", type=click.Path(file_okay=False, path_type=Path), envvar="MIGSEC_CA",
    default=DEFAULT_CA_DIR, show_default=True, help="CA directory (made by `migsec ca init`; env MIGSEC_CA).",
)


@click.group()
def ca() -> None:
    """Certificate authority for migsec domains (lab or federation)."""


@ca.command("init")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--name", default="migsec CA", show_default=True, help="Common name of the CA.")
@click.option("--key-type", type=click.Choice(CA_KINDS), default="ec-p256", show_default=True)
@click.option("--days", type=click.IntRange(min=1), default=3650, show_default=True, help="Validity in days.")
@click.option("--force", is_flag=True, help="Replace an existing CA key in DIRECTORY.")
def init(directory: Path, name: str, key_type: str, days: int, force: bool) -> None:
    """Create a CA in DIRECTORY (ca-key.pem 0600, ca-cert.pem)."""
    authority = CertificateAuthority.create(directory, name, key_kind=key_type, days=days, force=force)
    cert = authority.cert
    click.echo(f"CA {authority.name!r} created in {directory}")
    click.echo(f"  certificate  {directory / CA_CERT}  (give this to every domain that must trust it)")
    click.echo(f"  valid until  {cert.not_valid_after_utc:%Y-%m-%d}")
    click.echo(f"  fingerprint  {certificate_fingerprint(cert)}")


@ca.command("issue")
@click.option("--did", required=True, help="Domain id, e.g. cloud-b.example.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory for domain-key.pem, domain-cert.pem and ca-cert.pem.")
@ca_dir_option
@click.option("--days", type=click.IntRange(min=1), default=365, show_default=True)
@click.option("--key-type", type=click.Choice(DOMAIN_KINDS), default="ec-p256", show_default=True)
@click.option("--force", is_flag=True, help="Overwrite an existing domain key in --out.")
def issue(did: str, out_dir: Path, ca_dir: Path, days: int, key_type: str, force: bool) -> None:
    """Issue a key and certificate for domain DID."""
    validate_did(did)  # before touching the CA, so a typo costs nothing
    authority = CertificateAuthority.load(ca_dir)
    cert_path = authority.issue_domain(did, out_dir, key_kind=key_type, days=days, force=force)
    cert = load_certificate(cert_path.read_bytes())
    click.echo(f"issued {did} by {authority.name!r}")
    click.echo(f"  key          {out_dir / DOMAIN_KEY}  (mode 0600)")
    click.echo(f"  certificate  {cert_path}")
    click.echo(f"  valid until  {cert.not_valid_after_utc:%Y-%m-%d}")
    click.echo(f"  fingerprint  {certificate_fingerprint(cert)}")


def _describe(cert: x509.Certificate) -> list[tuple[str, str]]:
    rows = [("subject", cert.subject.rfc4514_string())]
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dids = [u[len(DID_URI_PREFIX):] for u in san.get_values_for_type(x509.UniformResourceIdentifier)
                if u.startswith(DID_URI_PREFIX)]
        rows.append(("domain id", ", ".join(dids) or "(none)"))
        others = [str(n.value) for n in san if not (isinstance(n, x509.UniformResourceIdentifier)
                                                   and n.value.startswith(DID_URI_PREFIX))]
        if others:
            rows.append(("other names", ", ".join(others)))
    except x509.ExtensionNotFound:
        rows.append(("domain id", "(none: no subjectAltName)"))
    rows.append(("issuer", cert.issuer.rfc4514_string()))
    rows.append(("serial", format(cert.serial_number, "x")))
    rows.append(("valid", f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M} .. {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"))
    try:
        rows.append(("key type", certificate_public_key(cert).kind))
    except Exception as exc:  # show what we can; a strange key is not fatal for `show`
        rows.append(("key type", f"unsupported ({exc})"))
    rows.append(("fingerprint", certificate_fingerprint(cert)))
    try:
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        names = ["digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
                 "key_agreement", "key_cert_sign", "crl_sign"]
        rows.append(("key usage", ", ".join(n for n in names if getattr(ku, n)) or "(none)"))
    except x509.ExtensionNotFound:
        rows.append(("key usage", "(none)"))
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        rows.append(("ext. key usage", ", ".join(_EKU_NAMES.get(o, o.dotted_string) for o in eku)))
    except x509.ExtensionNotFound:
        pass
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        rows.append(("CA", "yes" if bc.ca else "no"))
    except x509.ExtensionNotFound:
        pass
    return rows


@ca.command("show")
@click.argument("cert_path", metavar="CERT", type=click.Path(dir_okay=False, path_type=Path))
def show(cert_path: Path) -> None:
    """Print what a certificate says: DID, issuer, validity, key, fingerprint, usage."""
    cert = load_certificate(read_bytes(cert_path, "certificate"), str(cert_path))
    rows = _describe(cert)
    now = dt.datetime.now(dt.timezone.utc)
    if now > cert.not_valid_after_utc:
        rows.append(("status", "EXPIRED"))
    elif now < cert.not_valid_before_utc:
        rows.append(("status", "NOT YET VALID"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        click.echo(f"{k:<{width}}  {v}")


@ca.command("revoke")
@click.argument("cert_path", metavar="CERT", type=click.Path(dir_okay=False, path_type=Path))
@ca_dir_option
@click.option("--crl", "crl_path", type=click.Path(dir_okay=False, path_type=Path),
              help=f"Where to write the new CRL (default: <CA dir>/{CRL}).")
def revoke(cert_path: Path, ca_dir: Path, crl_path: Path | None) -> None:
    """Revoke CERT and write a fresh CRL."""
    authority = CertificateAuthority.load(ca_dir)
    serial = authority.revoke(read_bytes(cert_path, "certificate"))
    written = authority.write_crl(crl_path)
    click.echo(f"revoked serial {serial:x}; CRL written to {written} (distribute it to every verifying domain)")


@ca.command("crl")
@ca_dir_option
@click.option("--out", "crl_path", type=click.Path(dir_okay=False, path_type=Path),
              help=f"Where to write the CRL (default: <CA dir>/{CRL}).")
@click.option("--days", type=click.IntRange(min=1), default=30, show_default=True, help="CRL validity.")
def crl(ca_dir: Path, crl_path: Path | None, days: int) -> None:
    """Write a fresh CRL (verifiers refuse an out-of-date one)."""
    authority = CertificateAuthority.load(ca_dir)
    click.echo(f"CRL written to {authority.write_crl(crl_path, days=days)}")
