"""`python -m routeproxy certs`: a private CA and the LRP/RRP certificates for a lab.

The link between an LRP and an RRP is mutual TLS against one private CA
(docs/tls.md).  This module makes that CA and its leaf certificates with the
``cryptography`` library: EC P-256 keys (fast to make and to handshake with),
SAN dNSName (or iPAddress) = CN = the peer's name, serverAuth for the RRP and
clientAuth for LRPs, so an LRP certificate cannot stand in for the RRP.

``make_ca`` and ``make_leaf`` are public so tests can build the certificates a
lab must refuse: expired ones, ones from another CA, ones with the wrong name.
"""
import argparse
import datetime
import ipaddress
import os
import re
import sys
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_DAYS = 825  # the longest lifetime browsers ever accepted for leaves
CLOCK_SKEW = datetime.timedelta(minutes=5)  # not_before is backdated by this much
_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,251}[A-Za-z0-9])?$")


class CertsError(Exception):
    """A certificate could not be made or written; the message says why."""


@dataclass
class Issued:
    """A certificate and its private key."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


def check_name(name):
    """A peer name must be a DNS-style label sequence or an IP address (it is
    also used in file names, so no slashes)."""
    if not isinstance(name, str) or not name:
        raise CertsError(f"bad name {name!r}: empty")
    try:
        ipaddress.ip_address(name)
        return name
    except ValueError:
        pass
    if not _NAME.match(name) or ".." in name:
        raise CertsError(
            f"bad name {name!r}: use letters, digits, '.', '-', '_' "
            "(a host name such as rrp.example) or an IP address"
        )
    return name


def _validity(not_before, not_after, days):
    now = datetime.datetime.now(datetime.timezone.utc)
    if not_before is None:
        not_before = now - CLOCK_SKEW
    if not_after is None:
        not_after = not_before + datetime.timedelta(days=days)
    if not_after <= not_before:
        raise CertsError(f"not_after {not_after} is not after not_before {not_before}")
    return not_before, not_after


def _subject(name):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])


def _san(name):
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def make_ca(name="routeproxy lab CA", not_before=None, not_after=None, days=3650, issuer=None,
            path_length=0):
    """A CA (CA:true, keyCertSign + cRLSign): self-signed, or an intermediate
    signed by *issuer* (an ``Issued`` CA with a larger *path_length*)."""
    key = ec.generate_private_key(ec.SECP256R1())
    not_before, not_after = _validity(not_before, not_after, days)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    if issuer is None:
        issuer_name, signing_key, aki_source = _subject(name), key, ski
    else:
        issuer_name, signing_key = issuer.cert.subject, issuer.key
        aki_source = issuer.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(_subject(name))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(aki_source), critical=False)
        .sign(signing_key, hashes.SHA256())
    )
    return Issued(cert, key)


def make_leaf(ca, name, server=True, client=True, not_before=None, not_after=None,
              days=DEFAULT_DAYS, san_name=None):
    """A leaf certificate for *name* signed by *ca* (an ``Issued``).

    ``server``/``client`` choose the extendedKeyUsage (serverAuth/clientAuth).
    ``san_name`` puts a different name in the SAN than in the CN (tests).
    """
    name = check_name(name)
    if not (server or client):
        raise CertsError(f"certificate for {name!r} would be usable for neither server nor client")
    key = ec.generate_private_key(ec.SECP256R1())
    not_before, not_after = _validity(not_before, not_after, days)
    usages = ([ExtendedKeyUsageOID.SERVER_AUTH] if server else []) + (
        [ExtendedKeyUsageOID.CLIENT_AUTH] if client else []
    )
    ca_ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(_subject(name))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectAlternativeName([_san(san_name or name)]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    return Issued(cert, key)


def make_crl(ca, revoked=(), days=30):
    """A CRL signed by *ca* (an ``Issued``) listing the certificates *revoked*, as PEM bytes
    (for ``--crl``; a real CA publishes its own)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateRevocationListBuilder().issuer_name(ca.cert.subject)
               .last_update(now).next_update(now + datetime.timedelta(days=days)))
    for cert in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(cert.serial_number)
            .revocation_date(now).build())
    return builder.sign(ca.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def write_private(path, data):
    """Write *data* to *path* readable by its owner only (0600), even if it existed."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
    finally:
        os.close(fd)


def write_public(path, data):
    with open(path, "wb") as f:
        f.write(data)


def write_issued(issued, cert_path, key_path):
    write_public(cert_path, issued.cert_pem())
    write_private(key_path, issued.key_pem())


def write_lab_certs(out_dir, rrp_name, lrp_names, days=DEFAULT_DAYS, force=False):
    """Make a CA, one RRP and one or more LRP certificates and write them to *out_dir*.

    Returns a dict of paths: ``ca``, ``ca_key``, ``rrp_cert``, ``rrp_key``,
    ``lrp_cert``, ``lrp_key`` (the first LRP), and ``lrp_cert:NAME`` /
    ``lrp_key:NAME`` for every LRP name (the first included).  The first LRP's
    files are lrp.crt/lrp.key, further ones lrp-NAME.crt/lrp-NAME.key.
    Raises ``CertsError`` if ``ca.key`` already exists and *force* is false.
    """
    if isinstance(lrp_names, str):
        lrp_names = [lrp_names]
    lrp_names = [check_name(n) for n in lrp_names]
    check_name(rrp_name)
    if not lrp_names:
        raise CertsError("give at least one LRP name")
    duplicates = sorted({n for n in lrp_names if lrp_names.count(n) > 1})
    if duplicates:
        raise CertsError(f"LRP name(s) given twice: {', '.join(duplicates)}")
    if days < 1:
        raise CertsError(f"--days {days}: must be at least 1")
    os.makedirs(out_dir, exist_ok=True)
    paths = {"ca": os.path.join(out_dir, "ca.crt"), "ca_key": os.path.join(out_dir, "ca.key")}
    if os.path.exists(paths["ca_key"]) and not force:
        raise CertsError(
            f"{paths['ca_key']} exists: refusing to replace the CA (every certificate it "
            "signed would stop working); use --force to make a new one"
        )
    ca = make_ca(f"routeproxy lab CA ({rrp_name})", days=max(days, 3650))
    write_issued(ca, paths["ca"], paths["ca_key"])

    paths["rrp_cert"] = os.path.join(out_dir, "rrp.crt")
    paths["rrp_key"] = os.path.join(out_dir, "rrp.key")
    write_issued(make_leaf(ca, rrp_name, server=True, client=False, days=days),
                 paths["rrp_cert"], paths["rrp_key"])

    for i, name in enumerate(lrp_names):
        stem = "lrp" if i == 0 else f"lrp-{name}"
        cert_path = os.path.join(out_dir, stem + ".crt")
        key_path = os.path.join(out_dir, stem + ".key")
        write_issued(make_leaf(ca, name, server=False, client=True, days=days), cert_path, key_path)
        paths[f"lrp_cert:{name}"] = cert_path
        paths[f"lrp_key:{name}"] = key_path
        if i == 0:
            paths["lrp_cert"], paths["lrp_key"] = cert_path, key_path
    return paths


def load_ca(ca_dir):
    """The CA in *ca_dir* (ca.crt and ca.key, as write_lab_certs writes them)."""
    cert_path, key_path = os.path.join(ca_dir, "ca.crt"), os.path.join(ca_dir, "ca.key")
    try:
        with open(cert_path, "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())
        with open(key_path, "rb") as f:
            key = serialization.load_pem_private_key(f.read(), password=None)
    except OSError as e:
        raise CertsError(f"--ca-dir {ca_dir}: {e.filename}: {e.strerror}") from None
    except (ValueError, TypeError) as e:
        raise CertsError(f"--ca-dir {ca_dir}: not a CA certificate and unencrypted key ({e})") from None
    return Issued(cert, key)


def issue_lrp(ca_dir, name, out_dir=None, days=DEFAULT_DAYS, force=False):
    """One more LRP certificate from the existing CA in *ca_dir*, written to *out_dir* (default
    *ca_dir*) as lrp-NAME.crt / lrp-NAME.key; returns their paths.  The RRP and the other LRPs
    need no change: they trust the CA (add NAME to the RRP's --lrp-name if it lists names)."""
    name = check_name(name)
    if days < 1:
        raise CertsError(f"--days {days}: must be at least 1")
    ca = load_ca(ca_dir)
    out_dir = out_dir or ca_dir
    os.makedirs(out_dir, exist_ok=True)
    cert_path = os.path.join(out_dir, f"lrp-{name}.crt")
    key_path = os.path.join(out_dir, f"lrp-{name}.key")
    if os.path.exists(cert_path) and not force:
        raise CertsError(f"{cert_path} exists: use --force to replace it")
    write_issued(make_leaf(ca, name, server=False, client=True, days=days), cert_path, key_path)
    return cert_path, key_path


def revoke(ca_dir, cert_paths, crl_path=None, days=30):
    """Add the certificates in *cert_paths* to the CA's CRL (ca.crl in *ca_dir* unless
    *crl_path*), keeping the entries it had; signed by the CA, next update in *days*.
    Returns (the CRL's path, how many serials it lists)."""
    ca = load_ca(ca_dir)
    crl_path = crl_path or os.path.join(ca_dir, "ca.crl")
    revoked = {}
    if os.path.exists(crl_path):
        with open(crl_path, "rb") as f:
            old = x509.load_pem_x509_crl(f.read())
        if not old.is_signature_valid(ca.cert.public_key()):
            raise CertsError(f"{crl_path} was not signed by the CA in {ca_dir}")
        revoked = {entry.serial_number: entry.revocation_date_utc for entry in old}
    now = datetime.datetime.now(datetime.timezone.utc)
    for path in cert_paths:
        try:
            with open(path, "rb") as f:
                cert = x509.load_pem_x509_certificate(f.read())
        except (OSError, ValueError) as e:
            raise CertsError(f"{path}: cannot read a certificate ({e})") from None
        try:
            cert.verify_directly_issued_by(ca.cert)
        except (ValueError, TypeError, InvalidSignature):
            raise CertsError(f"{path} was not issued by the CA in {ca_dir}") from None
        revoked.setdefault(cert.serial_number, now)
    builder = (x509.CertificateRevocationListBuilder()
               .issuer_name(ca.cert.subject)
               .last_update(now - CLOCK_SKEW)
               .next_update(now + datetime.timedelta(days=days)))
    for serial, when in sorted(revoked.items()):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when).build())
    crl = builder.sign(ca.key, hashes.SHA256())
    write_public(crl_path, crl.public_bytes(serialization.Encoding.PEM))
    return crl_path, len(revoked)


def _issue_main(argv):
    p = argparse.ArgumentParser(prog="python -m routeproxy certs issue",
                                description="Issue one more LRP certificate from an existing CA.")
    p.add_argument("--ca-dir", required=True, metavar="DIR", help="holds ca.crt and ca.key")
    p.add_argument("--lrp-name", required=True, metavar="NAME", help="the new LRP's name")
    p.add_argument("--out", metavar="DIR", help="where to write lrp-NAME.crt/.key [default: --ca-dir]")
    p.add_argument("--days", type=int, default=DEFAULT_DAYS, help=f"lifetime [default: {DEFAULT_DAYS}]")
    p.add_argument("--force", action="store_true", help="replace an existing lrp-NAME.crt")
    args = p.parse_args(argv)
    paths = issue_lrp(args.ca_dir, args.lrp_name, args.out, args.days, args.force)
    return [f"wrote {path}" for path in paths]


def _revoke_main(argv):
    p = argparse.ArgumentParser(prog="python -m routeproxy certs revoke",
                                description="Add certificates to the CA's revocation list (CRL).")
    p.add_argument("--ca-dir", required=True, metavar="DIR", help="holds ca.crt and ca.key")
    p.add_argument("--crl", metavar="PATH", help="the CRL to update [default: DIR/ca.crl]")
    p.add_argument("--days", type=int, default=30, help="days until the CRL's next update [default: 30]")
    p.add_argument("cert", nargs="+", help="certificate file(s) to revoke")
    args = p.parse_args(argv)
    path, count = revoke(args.ca_dir, args.cert, args.crl, args.days)
    return [f"wrote {path} ({count} revoked)"]


def build_parser():
    p = argparse.ArgumentParser(
        prog="python -m routeproxy certs",
        description="Write a private CA and certificates for one RRP and its LRPs (a lab; "
        "see docs/tls.md for using a real CA instead).  `certs issue` adds an LRP certificate "
        "from an existing CA, `certs revoke` writes its CRL.",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="directory to write into (created)")
    p.add_argument("--rrp-name", required=True, metavar="NAME",
                   help="the RRP's name: the LRPs dial it by this name and check it")
    p.add_argument("--lrp-name", required=True, action="append", metavar="NAME",
                   help="an LRP's name (repeatable): the RRP knows each LRP by it")
    p.add_argument("--days", type=int, default=DEFAULT_DAYS,
                   help=f"lifetime of the leaf certificates [default: {DEFAULT_DAYS}]")
    p.add_argument("--force", action="store_true", help="replace an existing CA in DIR")
    return p


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("issue", "revoke"):
        try:
            lines = (_issue_main if argv[0] == "issue" else _revoke_main)(argv[1:])
        except (CertsError, OSError) as e:
            sys.stderr.write(f"routeproxy certs {argv[0]}: {e}\n")
            return 1
        print("\n".join(lines))
        return 0
    args = build_parser().parse_args(argv)
    try:
        paths = write_lab_certs(args.out, args.rrp_name, args.lrp_name, days=args.days, force=args.force)
    except (CertsError, OSError) as e:
        sys.stderr.write(f"routeproxy certs: {e}\n")
        return 1
    written = []
    for key, path in paths.items():
        if path not in written:
            written.append(path)
    for path in written:
        mode = os.stat(path).st_mode & 0o777
        print(f"wrote {path} ({mode:04o})")
    return 0
