"""TLS for the LRP<->RRP link: mutual authentication against a private CA.

Who checks what (docs/tls.md):

- the RRP (server) requires a client certificate signed by its CA, TLS >= 1.2,
  and optionally one of a list of names (``allowed_names``); it knows each LRP
  by the name in its certificate (``peerName``);
- the LRP (client) requires the RRP's certificate to chain to the CA and to
  carry the name it dialled (service_identity does the name check).

The side that refuses a peer logs one line with the reason and the peer's
address (``routeproxy.tls`` log namespace); the refused side logs the TLS alert
it received.  What one connection's checks found lives in its own record
(``_Handshake``), which its creator finds again from the info callback; a
``ClientTLS`` also remembers the latest refusal, for its reconnection backoff.

Both ends are Twisted ``CertificateOptions`` (the client side does what
``optionsForClientTLS`` does: trust root, SNI, a service_identity name check)
plus two callbacks: a per-connection verify callback that explains refusals,
and an info callback on the context that logs alerts.  ``optionsForClientTLS``
itself is not used because pyOpenSSL forbids adding the info callback to a
context that has already made a connection, and it hides its context.

Give a mux protocol ``IHandshakeListener`` to learn when to call ``peerName``.
"""
import datetime
import ipaddress
import os
import stat
import weakref

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto
from service_identity import VerificationError
from service_identity.cryptography import verify_certificate_hostname, verify_certificate_ip_address
from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet import ssl
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator, IOpenSSLServerConnectionCreator, IStreamClientEndpoint,
)
from twisted.logger import Logger
from zope.interface import implementer

from routeproxy.crl import CRLError, is_revoked, load_revoked
from routeproxy.stats import LimitedLog, printable

log = Logger(namespace="routeproxy.tls")

MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2


class TLSConfigError(Exception):
    """A certificate, key or CA file cannot be used; the message says which and why."""


class PeerRejected(Exception):
    """The peer's certificate was refused (or absent); the message says why."""


# -- loading -------------------------------------------------------------------

def _read(path, what):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise TLSConfigError(f"{what} {path}: cannot read: {e.strerror or e}") from None


def loadCertificates(path, what="certificate file"):
    """All PEM certificates in *path* (a cryptography ``x509.Certificate`` list)."""
    data = _read(path, what)
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise TLSConfigError(f"{what} {path}: not a PEM certificate ({e})") from None
    if not certs:
        raise TLSConfigError(f"{what} {path}: no certificate in it")
    return certs


def loadPrivateKey(path):
    data = _read(path, "private key")
    _warnKeyMode(path)
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise TLSConfigError(f"private key {path}: encrypted with a passphrase; use an unencrypted key") from None
    except Exception as e:  # ValueError, or UnsupportedAlgorithm for odd key types
        raise TLSConfigError(f"private key {path}: not a PEM private key ({e})") from None


def _warnKeyMode(path):
    """A private key others on the host can read is as good as published: say so."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if mode & 0o077:
        log.warn("TLS: private key {path} is readable by group or others (mode {mode:o}); "
                 "chmod 600 it", path=path, mode=stat.S_IMODE(mode))


def _publicDER(key):
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def loadIdentity(certPath, keyPath):
    """(leaf, chain, key) from a certificate file (leaf first, then any
    intermediates) and its key; the key must match the leaf."""
    certs = loadCertificates(certPath, "certificate")
    key = loadPrivateKey(keyPath)
    leaf = certs[0]
    if _publicDER(leaf.public_key()) != _publicDER(key.public_key()):
        raise TLSConfigError(
            f"private key {keyPath} does not match certificate {certPath} ({certName(leaf)})"
        )
    _warnValidity(leaf, certPath)
    return leaf, certs[1:], key


def _warnValidity(cert, path):
    now = datetime.datetime.now(datetime.timezone.utc)
    if cert.not_valid_after_utc < now:
        log.warn("TLS: our certificate {path} ({name}) expired on {when}; peers will refuse it",
                 path=path, name=certName(cert), when=cert.not_valid_after_utc.isoformat())
    elif cert.not_valid_before_utc > now:
        log.warn("TLS: our certificate {path} ({name}) is not valid before {when}; peers will refuse it",
                 path=path, name=certName(cert), when=cert.not_valid_before_utc.isoformat())


def loadCA(caPath):
    """The CA certificates in *caPath* as pyOpenSSL X509s (what Twisted's
    trust roots want)."""
    return [crypto.X509.from_cryptography(c) for c in loadCertificates(caPath, "CA file")]


# -- names -----------------------------------------------------------------------

def certName(cert):
    """The name a certificate stands for: its first SAN dNSName, else its
    first SAN iPAddress, else its CN, else its whole subject."""
    if isinstance(cert, crypto.X509):
        cert = cert.to_cryptography()
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = None
    if san is not None:
        for kind in (x509.DNSName, x509.IPAddress):
            names = san.get_values_for_type(kind)
            if names:
                return str(names[0])
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if cns:
        return str(cns[0].value)
    return cert.subject.rfc4514_string()


def peerName(transport):
    """The name in the certificate the peer of a TLS *transport* presented."""
    cert = transport.getPeerCertificate()
    if cert is None:
        raise PeerRejected("the peer presented no certificate")
    return certName(cert)


# -- explaining refusals -------------------------------------------------------------

# X509_V_ERR_* codes we expect to meet, with OpenSSL's own wording.
_VERIFY_ERRORS = {
    2: "unable to get issuer certificate",
    7: "certificate signature failure",
    9: "certificate is not yet valid",
    10: "certificate has expired",
    18: "self-signed certificate",
    19: "self-signed certificate in certificate chain",
    20: "unable to get local issuer certificate",
    21: "unable to verify the first certificate",
    24: "invalid CA certificate",
    26: "unsuitable certificate purpose",
    28: "certificate rejected",
}


def verifyErrorString(code):
    """OpenSSL's text for an X509_V_ERR_* code."""
    try:  # pyOpenSSL does not export X509_verify_cert_error_string publicly
        from OpenSSL._util import ffi, lib

        return ffi.string(lib.X509_verify_cert_error_string(code)).decode("ascii", "replace")
    except Exception:
        return _VERIFY_ERRORS.get(code, f"verify error {code}")


# TLS alert descriptions (RFC 8446 s.6, RFC 5246 s.7.2).
ALERTS = {
    0: "close notify", 10: "unexpected message", 20: "bad record mac", 22: "record overflow",
    40: "handshake failure", 42: "bad certificate", 43: "unsupported certificate",
    44: "certificate revoked", 45: "certificate expired", 46: "certificate unknown",
    47: "illegal parameter", 48: "unknown ca", 49: "access denied", 50: "decode error",
    51: "decrypt error", 70: "protocol version", 71: "insufficient security",
    80: "internal error", 86: "inappropriate fallback", 90: "user canceled",
    109: "missing extension", 110: "unsupported extension", 112: "unrecognized name",
    116: "certificate required", 120: "no application protocol",
}

# What an alert we *send* means, when the verify callback did not already say.
_SENT_ALERT_REASONS = {
    116: "the peer sent no certificate",
    70: "the peer offered no TLS version >= 1.2",
    40: "handshake failure (no client certificate, or no shared cipher)",
    71: "the peer offered no TLS version or cipher we accept",
}

# What an alert we *receive* most likely means (the peer's log says for sure).
_RECEIVED_ALERT_HINTS = {
    48: "it does not trust the CA that signed our certificate",
    45: "our certificate has expired, or its clock is wrong",
    42: "it refused our certificate: not yet valid, or a bad signature",
    43: "our certificate is not for this use: see its extendedKeyUsage",
    116: "we sent no certificate",
    80: "most likely it refused the name in our certificate",
    70: "no common TLS version >= 1.2",
    40: "no certificate, or no common cipher",
}


def _addressOf(tlsProtocol):
    try:
        peer = tlsProtocol.transport.getPeer()
        return f"{peer.host}:{peer.port}"
    except Exception:
        return "?"


# Alerts that mean "I do not accept you" (bad/unknown/expired certificate,
# access denied, certificate required) plus the two OpenSSL sends when a verify
# callback refuses a name (internal error) or no certificate came (handshake failure).
_REFUSAL_ALERTS = {40, 42, 43, 44, 45, 46, 48, 49, 80, 116}


class _Handshake:
    """One connection's peer check: the verify callback, the fatal alerts its
    creator's info callback hands on, and what they concluded.

    It is per connection so a refusal is logged once (the verify callback's
    line, not again for the alert OpenSSL then sends) and nothing outlives the
    connection.  Returning False from :meth:`verify` makes OpenSSL abort the
    handshake and send the peer the matching alert (unknown ca, certificate
    expired, ...).  *onRefusal* (the ClientTLS's ``refused``) hears every
    refusal, ours or the peer's, for the reconnection backoff.
    """

    def __init__(self, tlsProtocol, role, lines, expectedName=None, allowedNames=None,
                 onRefusal=None, revoked=frozenset()):
        self.tlsProtocol = weakref.ref(tlsProtocol)
        self.lines = lines        # the creator's LimitedLog: handshakes are remote input
        self.revoked = revoked    # (issuer, serial) pairs of the --crl file
        self.role = role
        self.expectedName = expectedName
        self.allowedNames = allowedNames
        self.onRefusal = onRefusal
        self.established = False  # the handshake finished (TLS 1.3 may still refuse after)
        self.refused = False  # either side refused the other

    def address(self):
        return _addressOf(self.tlsProtocol())

    def recordRefusal(self, text):
        self.refused = True
        if self.onRefusal is not None:
            self.onRefusal(text)

    def refuse(self, reason, cert):
        subject = printable(cert.to_cryptography().subject.rfc4514_string()) if cert is not None else "-"
        line = f"refused {self.role} at {self.address()}: {reason} [{subject}]"
        self.recordRefusal(line)
        self.lines.emit("warn", "refused", "TLS: {line}", line=line)
        return False

    def verify(self, conn, cert, errno, depth, ok):
        """The verify callback: chain errors and names, explained."""
        try:
            if not ok:
                where = "" if depth == 0 else f" (certificate at depth {depth})"
                return self.refuse(f"certificate verify failed: {verifyErrorString(errno)}{where}", cert)
            if depth != 0:
                return True
            leaf = cert.to_cryptography()
            name = certName(leaf)
            if is_revoked(leaf, self.revoked):
                return self.refuse(f"certificate of '{printable(name)}' is revoked (--crl)", cert)
            if self.allowedNames is not None and name not in self.allowedNames:
                allowed = ", ".join(sorted(self.allowedNames)) or "none"
                return self.refuse(f"name '{printable(name)}' is not in allowed_names ({allowed})", cert)
            if self.expectedName is not None:
                try:
                    _verifyName(leaf, self.expectedName)
                except VerificationError:
                    return self.refuse(
                        f"peer name mismatch: expected {self.expectedName} got {printable(name)}", cert)
            return True
        except Exception:
            log.failure("TLS: while verifying a certificate")
            return False

    def info(self, where, ret):
        """Log fatal alerts: sent ones (we refused the peer, unless
        :meth:`verify` already said why) and received ones (the peer refused us)."""
        if where & SSL.SSL_CB_HANDSHAKE_DONE:
            self.established = True
            return
        if not where & SSL.SSL_CB_ALERT:
            return
        level, desc = ret >> 8, ret & 0xFF
        if desc == 0 or level != 2:  # close_notify / warnings
            return
        alert = ALERTS.get(desc, f"alert {desc}")
        role, address = self.role, self.address()
        # TLS 1.3 servers check the client's certificate after the client
        # has finished its handshake, so a refusal can come "after" it;
        # other alerts then are for the link's connectionLost to report.
        authentication = not self.established or desc in _REFUSAL_ALERTS
        if where & SSL.SSL_CB_WRITE:
            if not authentication or self.refused:
                return
            reason = _SENT_ALERT_REASONS.get(desc, f"sent TLS alert '{alert}'")
            self.recordRefusal(f"refused {role} at {address}: {reason}")
            self.lines.emit("warn", "refused", "TLS: refused {role} at {address}: {reason}",
                            role=role, address=address, reason=reason)
        elif authentication:
            self.recordRefusal(f"{role} at {address} refused us: TLS alert '{alert}'")
            self.lines.emit(
                "warn", "refused-us",
                "TLS: {role} at {address} refused the handshake with alert '{alert}' ({hint})",
                role=role, address=address, alert=alert,
                hint=_RECEIVED_ALERT_HINTS.get(desc, "it does not accept our certificate or TLS settings"))
        else:
            self.lines.emit("info", "alert", "TLS: {role} at {address} closed the connection with "
                            "alert '{alert}'", role=role, address=address, alert=alert)


def _verifyName(cert, name):
    try:
        ipaddress.ip_address(name)
    except ValueError:
        verify_certificate_hostname(cert, name)
    else:
        verify_certificate_ip_address(cert, name)


_VERIFY_MODE = SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT


# -- the two ends ------------------------------------------------------------------

class _Creator:
    """What both ends share: the options, and each live connection's
    :class:`_Handshake`, found again by the context's info callback (pyOpenSSL
    before 25.2 has no per-connection info callback)."""

    role = None
    notAfter = None          # our certificate's expiry (a UTC datetime), for the metrics
    revoked = frozenset()     # what the --crl file revokes (crl.load_revoked)
    crlPath = None
    caCerts = ()

    def __init__(self, options):
        self.options = options
        self.handshakeFailures = 0   # refused handshakes, ours or the peer's
        self.lines = LimitedLog(log)  # a flood of bad handshakes costs a few lines per interval
        self._handshakes = weakref.WeakKeyDictionary()  # SSL.Connection -> _Handshake
        options.getContext().set_info_callback(self._info)

    def refused(self, text):
        self.handshakeFailures += 1

    def replaceWith(self, other):
        """Take *other*'s settings (a reload: certificates, CA, names) for new connections;
        connections already made keep theirs.  *other* has made no connection yet, so its
        context may still be given our info callback."""
        self.options = other.options
        self.options.getContext().set_info_callback(self._info)
        self.notAfter = other.notAfter
        for name in ("allowedNames", "rrpName", "_sni"):
            if hasattr(other, name):
                setattr(self, name, getattr(other, name))
        self.useCRLOf(other)

    def useCRLOf(self, other):
        """Take *other*'s CA and revocation list (a reload read the --crl file again)."""
        self.crlPath, self.caCerts, self.revoked = other.crlPath, other.caCerts, other.revoked

    def loadCRL(self, path, caCerts=None):
        """Use the CRL file *path* for new connections; TLSConfigError if it cannot be used.

        Call it again (``reloadCRL``) when the file changes, e.g. on SIGHUP.
        """
        caCerts = self.caCerts if caCerts is None else caCerts
        try:
            revoked = load_revoked(path, caCerts)
        except CRLError as e:
            raise TLSConfigError(str(e)) from None
        self.crlPath, self.caCerts, self.revoked = path, caCerts, revoked
        return len(revoked)

    def reloadCRL(self):
        """Read the CRL file again (a no-op without --crl); keeps the old set if it fails."""
        if self.crlPath is None:
            return None
        try:
            count = self.loadCRL(self.crlPath)
        except TLSConfigError as e:
            log.error("TLS: {error}; still using the previous CRL", error=str(e))
            return None
        log.info("TLS: CRL {path} reloaded: {count} revoked certificates",
                 path=self.crlPath, count=count)
        return count

    def _check(self, conn, handshake, mode):
        self._handshakes[conn] = handshake
        conn.set_verify(mode, handshake.verify)
        return conn

    def _info(self, conn, where, ret):
        try:
            handshake = self._handshakes.get(conn)
            if handshake is not None:
                handshake.info(where, ret)
        except Exception:
            log.failure("TLS: while logging an alert")


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS(_Creator):
    """The RRP's TLS settings; pass it wherever Twisted wants a server
    context factory (``SSL4ServerEndpoint``, ``listenSSL``, ``TLSMemoryBIOFactory``).

    It deliberately has no ``getContext``: old-style users of the bare context
    would skip the per-connection check of ``allowed_names``."""

    role = "LRP"

    def __init__(self, options, allowedNames=None):
        super().__init__(options)
        self.allowedNames = allowedNames

    def serverConnectionForTLS(self, tlsProtocol):
        conn = self.options.serverConnectionForTLS(tlsProtocol)
        return self._check(conn, _Handshake(tlsProtocol, self.role, self.lines, allowedNames=self.allowedNames,
                                            onRefusal=self.refused, revoked=self.revoked),
                           _VERIFY_MODE | SSL.VERIFY_CLIENT_ONCE)


@implementer(IOpenSSLClientConnectionCreator)
class ClientTLS(_Creator):
    """The LRP's TLS settings: what ``optionsForClientTLS`` builds (trust
    root, SNI, service_identity name check), done here so the context also
    gets our info callback (pyOpenSSL forbids changing a context once it made
    a connection) and the verify callback explains refusals."""

    role = "RRP"

    def __init__(self, rrpName, options):
        super().__init__(options)
        self.rrpName = rrpName
        try:
            ipaddress.ip_address(rrpName)
            self._sni = None  # RFC 6066: no literal addresses in SNI
        except ValueError:
            self._sni = rrpName.encode("idna")

    lastRefusal = None  # why the latest connection was refused, or None (RefusalBackoff reads it)

    def refused(self, text):
        super().refused(text)
        self.lastRefusal = text

    def clientConnectionForTLS(self, tlsProtocol):
        self.lastRefusal = None
        conn = self.options.clientConnectionForTLS(tlsProtocol)
        if self._sni:
            conn.set_tlsext_host_name(self._sni)
        return self._check(conn, _Handshake(tlsProtocol, self.role, self.lines, expectedName=self.rrpName,
                                            onRefusal=self.refused, revoked=self.revoked),
                           _VERIFY_MODE)


def _names(allowedNames):
    """None, or a frozenset of names; an empty list (an empty INI value) means
    no name restriction, like None: the CA check alone applies."""
    if allowedNames is None:
        return None
    if isinstance(allowedNames, str):
        allowedNames = allowedNames.replace(",", " ").split()
    names = frozenset(n.strip() for n in allowedNames if n.strip())
    return names or None


def serverCreator(certPath, keyPath, caPath, allowed_names=None, crlPath=None):  # rrp_tap passes allowed_names=
    """TLS settings for the RRP: our certificate, TLS >= 1.2, and a client
    certificate signed by *caPath* required (with a name in *allowed_names*,
    if given: a list, or a string of names separated by spaces or commas).
    Raises ``TLSConfigError``."""
    leaf, chain, key = loadIdentity(certPath, keyPath)
    cas = loadCA(caPath)
    try:
        options = ssl.CertificateOptions(
            privateKey=key, certificate=leaf, extraCertChain=chain or None,
            verify=True, caCerts=cas, requireCertificate=True,
            raiseMinimumTo=MINIMUM_VERSION,
        )
        options.getContext()  # build it now so errors surface here, not per connection
    except (SSL.Error, ValueError, TypeError) as e:
        raise TLSConfigError(f"cannot use {certPath} / {keyPath} / {caPath}: {e}") from None
    creator = ServerTLS(options, _names(allowed_names))
    creator.notAfter = leaf.not_valid_after_utc
    return _withCRL(creator, cas, crlPath)


def clientCreator(rrpName, certPath, keyPath, caPath, crlPath=None):
    """TLS settings for the LRP: our certificate, TLS >= 1.2, and the RRP's
    certificate must chain to *caPath* and carry *rrpName*.  Raises
    ``TLSConfigError``."""
    if not isinstance(rrpName, str) or not rrpName.strip():
        raise TLSConfigError(f"RRP name {rrpName!r}: empty")
    rrpName = rrpName.strip()
    try:
        ipaddress.ip_address(rrpName)
    except ValueError:
        try:
            rrpName.encode("idna")
        except UnicodeError as e:
            raise TLSConfigError(f"RRP name {rrpName!r} is not a valid host name ({e})") from None
    leaf, chain, key = loadIdentity(certPath, keyPath)
    cas = loadCA(caPath)
    trust = ssl.trustRootFromCertificates([ssl.Certificate(c) for c in cas])
    try:
        options = ssl.CertificateOptions(
            privateKey=key, certificate=leaf, extraCertChain=chain or None,
            trustRoot=trust, raiseMinimumTo=MINIMUM_VERSION,
        )
        options.getContext()
    except (SSL.Error, ValueError, TypeError) as e:
        raise TLSConfigError(f"cannot use {certPath} / {keyPath} / {caPath} for {rrpName!r}: {e}") from None
    creator = ClientTLS(rrpName, options)
    creator.notAfter = leaf.not_valid_after_utc
    return _withCRL(creator, cas, crlPath)


def _withCRL(creator, cas, crlPath):
    """*creator* knowing its CA (for CRL signatures) and, with *crlPath*, what it revokes."""
    creator.caCerts = [c.to_cryptography() for c in cas]
    if crlPath is not None:
        count = creator.loadCRL(crlPath)
        log.info("TLS: CRL {path}: {count} revoked certificates", path=crlPath, count=count)
    return creator


class RefusalBackoff:
    """A ClientService retry policy that keeps backing off while the RRP
    refuses us (or we refuse it) during TLS setup.

    ClientService counts any TCP connection as a success and resets its
    attempt counter, so a refused handshake would be retried every
    *initialDelay* for ever; this policy counts consecutive refused
    connections itself (from the ``ClientTLS`` that made them).
    """

    def __init__(self, creator, policy):
        self.creator = creator
        self.policy = policy
        self.refusedInARow = 0

    def __call__(self, attempt):
        if getattr(self.creator, "lastRefusal", None):
            self.refusedInARow += 1
            self.creator.lastRefusal = None
        elif attempt == 1:
            self.refusedInARow = 0
        return self.policy(max(attempt, self.refusedInARow))


@implementer(IStreamClientEndpoint)
class _ReportingEndpoint:
    """An endpoint that tells *onFailure* why each connection attempt failed (DNS, refused,
    timed out), so the LRP logs one line with the reason instead of ClientService's."""

    def __init__(self, endpoint, onFailure):
        self.endpoint = endpoint
        self.onFailure = onFailure

    def connect(self, factory):
        def failed(reason):
            self.onFailure(reason.getErrorMessage())
            return reason
        return self.endpoint.connect(factory).addErrback(failed)


class _QuietClientService(ClientService):
    """ClientService without its own "Scheduling retry N to connect <endpoint>" lines."""

    _log = Logger(observer=lambda event: None)


def rrpClientService(reactor, host, port, creator, factory, initialDelay=1.0, maxDelay=60.0,
                     factor=1.5, jitter=None, timeout=10, prepareConnection=None, more=(),
                     retryDelay=None, onFailure=None):
    """The LRP's side of the link: a ClientService that dials the RRP over
    TLS (*creator* from ``clientCreator``) and reconnects with exponential
    backoff, also after refused handshakes (``RefusalBackoff``).

    *prepareConnection* is passed on to ClientService: a callable taking the
    protocol and returning a Deferred that fires once the link is usable (the
    mux HELLO) and fails if it is lost; ``whenConnected`` waits for it.

    *more* are further (host, port) RRPs, tried in order after the first
    (``failover.FailoverEndpoint``).  *retryDelay(attempt, delay)* may shorten the backoff's
    *delay* (the LRP retries fast while sessions wait for a resume).
    """
    policy = backoffPolicy(initialDelay=initialDelay, maxDelay=maxDelay, factor=factor,
                           **({"jitter": jitter} if jitter is not None else {}))
    addresses = [(host, port), *more]
    endpoints = [wrapClientTLS(creator, HostnameEndpoint(reactor, h, p, timeout=timeout))
                 for h, p in addresses]
    service = ClientService
    if onFailure is not None:
        endpoints = [_ReportingEndpoint(e, lambda why, a=f"{h}:{p}": onFailure(a, why))
                     for e, (h, p) in zip(endpoints, addresses)]
        service = _QuietClientService
    if len(endpoints) > 1:
        from routeproxy.failover import FailoverEndpoint
        endpoint = FailoverEndpoint(endpoints, [f"{h}:{p}" for h, p in addresses])
    else:
        endpoint = endpoints[0]
    retry = RefusalBackoff(creator, policy)
    if retryDelay is not None:
        backoff = retry
        retry = lambda attempt: retryDelay(attempt, backoff(attempt))  # noqa: E731
    return service(endpoint, factory, retryPolicy=retry, clock=reactor,
                         prepareConnection=prepareConnection)
