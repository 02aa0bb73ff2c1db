"""Certificate revocation lists for the mux link (``--crl FILE`` on both daemons).

A private CA revokes a leaked LRP or RRP certificate by listing its serial number in a
CRL it signs.  :func:`load_revoked` reads the PEM (or DER) CRLs of a file, keeps only those
signed by one of the CA certificates, and returns the (issuer, serial) pairs they revoke;
the TLS verify callback refuses a peer certificate found there.  Reading is separate from
checking so that a reload (SIGHUP) can swap the set for new connections.
"""
from cryptography import x509

__all__ = ["CRLError", "load_revoked", "is_revoked"]


class CRLError(ValueError):
    """The CRL file cannot be used (unreadable, not a CRL, not signed by the CA)."""


def _split_pem(data):
    marker = b"-----BEGIN X509 CRL-----"
    if marker not in data:
        return [x509.load_der_x509_crl(data)]
    crls = []
    for chunk in data.split(marker)[1:]:
        crls.append(x509.load_pem_x509_crl(marker + chunk.split(b"-----END X509 CRL-----")[0]
                                           + b"-----END X509 CRL-----\n"))
    return crls


def load_revoked(path, ca_certs):
    """frozenset of (issuer DER name, serial) revoked by the CRLs in *path*.

    *ca_certs* are cryptography certificates; each CRL must be signed by one of them.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise CRLError(f"CRL {path}: cannot read: {e.strerror or e}") from None
    try:
        crls = _split_pem(data)
    except ValueError as e:
        raise CRLError(f"CRL {path}: not a CRL ({e})") from None
    revoked = set()
    for crl in crls:
        signer = next((ca for ca in ca_certs if ca.subject == crl.issuer), None)
        if signer is None or not crl.is_signature_valid(signer.public_key()):
            raise CRLError(f"CRL {path}: not signed by the CA ({crl.issuer.rfc4514_string()})")
        issuer = crl.issuer.public_bytes()
        revoked.update((issuer, entry.serial_number) for entry in crl)
    return frozenset(revoked)


def is_revoked(cert, revoked):
    """Is the cryptography certificate *cert* in *revoked* (a :func:`load_revoked` set)?"""
    return (cert.issuer.public_bytes(), cert.serial_number) in revoked
