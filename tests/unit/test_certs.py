"""routeproxy.certs: the lab CA tool, checked with openssl(1) where installed
and with cryptography's own signature check always."""
import datetime
import io
import os
import shutil
import stat
import subprocess
import sys

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.trial import unittest

from routeproxy import certs

FILES = ("ca.crt", "rrp.crt", "rrp.key", "lrp.crt", "lrp.key")


def load(path):
    with open(path, "rb") as f:
        return x509.load_pem_x509_certificate(f.read())


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


class CLITests(unittest.TestCase):
    def setUp(self):
        self.out = self.mktemp()

    def run_cli(self, *args):
        """main(argv) with stdout/stderr captured -> (rc, stdout, stderr)."""
        out, err = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", out)
        self.patch(sys, "stderr", err)
        rc = certs.main(list(args))
        return rc, out.getvalue(), err.getvalue()

    def make(self, *extra):
        return self.run_cli("--out", self.out, "--rrp-name", "rrp.example", "--lrp-name", "lrp1", *extra)

    def test_writesTheFiveFiles(self):
        rc, out, err = self.make()
        self.assertEqual((rc, err), (0, ""))
        for name in FILES:
            path = os.path.join(self.out, name)
            self.assertTrue(os.path.exists(path), name)
            self.assertIn(path, out)
        self.assertTrue(os.path.exists(os.path.join(self.out, "ca.key")))

    def test_keysAreOwnerOnly(self):
        self.make()
        for name in ("ca.key", "rrp.key", "lrp.key"):
            self.assertEqual(mode(os.path.join(self.out, name)), 0o600, name)
        self.assertIn("(0600)", self.make("--force")[1])

    def test_existingKeyFileIsTightened(self):
        os.makedirs(self.out)
        path = os.path.join(self.out, "rrp.key")
        with open(path, "w") as f:
            f.write("old")
        os.chmod(path, 0o644)
        self.make()
        self.assertEqual(mode(path), 0o600)

    def test_opensslVerifies(self):
        if shutil.which("openssl") is None:
            raise unittest.SkipTest("openssl(1) is not installed; test_signedByCA checks the signatures")
        self.make()
        ca = os.path.join(self.out, "ca.crt")
        for name, purpose in (("rrp.crt", "sslserver"), ("lrp.crt", "sslclient")):
            result = subprocess.run(
                ["openssl", "verify", "-CAfile", ca, "-purpose", purpose, os.path.join(self.out, name)],
                capture_output=True, text=True,
            )
            self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
            self.assertIn(": OK", result.stdout)
        # and the purposes are not interchangeable
        wrong = subprocess.run(
            ["openssl", "verify", "-CAfile", ca, "-purpose", "sslserver", os.path.join(self.out, "lrp.crt")],
            capture_output=True, text=True,
        )
        self.assertNotEqual(wrong.returncode, 0)

    def test_signedByCA(self):
        self.make()
        ca = load(os.path.join(self.out, "ca.crt"))
        for name in ("rrp.crt", "lrp.crt"):
            load(os.path.join(self.out, name)).verify_directly_issued_by(ca)
        other = certs.make_ca("other")
        self.assertRaises(Exception, load(os.path.join(self.out, "lrp.crt")).verify_directly_issued_by, other.cert)

    def test_contents(self):
        self.make("--days", "30")
        ca = load(os.path.join(self.out, "ca.crt"))
        constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints)
        self.assertTrue(constraints.critical)
        self.assertTrue(constraints.value.ca)
        self.assertTrue(ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign)

        for name, cn, usage in (("rrp.crt", "rrp.example", ExtendedKeyUsageOID.SERVER_AUTH),
                                ("lrp.crt", "lrp1", ExtendedKeyUsageOID.CLIENT_AUTH)):
            cert = load(os.path.join(self.out, name))
            self.assertEqual(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value, cn)
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            self.assertEqual(san.get_values_for_type(x509.DNSName), [cn])
            self.assertEqual(list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value), [usage])
            self.assertFalse(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
            lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
            self.assertEqual(lifetime, datetime.timedelta(days=30))
            self.assertEqual(cert.issuer, ca.subject)

    def test_moreLRPs(self):
        rc, out, _ = self.make("--lrp-name", "lrp2", "--lrp-name", "lrp3")
        self.assertEqual(rc, 0)
        for name in ("lrp2", "lrp3"):
            cert = load(os.path.join(self.out, f"lrp-{name}.crt"))
            self.assertEqual(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value, name)
            self.assertEqual(mode(os.path.join(self.out, f"lrp-{name}.key")), 0o600)
        self.assertEqual(load(os.path.join(self.out, "lrp.crt")).subject.rfc4514_string(), "CN=lrp1")

    def test_refusesToReplaceTheCA(self):
        self.assertEqual(self.make()[0], 0)
        before = open(os.path.join(self.out, "ca.crt"), "rb").read()
        rc, out, err = self.make()
        self.assertEqual(rc, 1)
        self.assertIn("ca.key exists", err)
        self.assertIn("--force", err)
        self.assertEqual(open(os.path.join(self.out, "ca.crt"), "rb").read(), before)
        rc, _, _ = self.make("--force")
        self.assertEqual(rc, 0)
        self.assertNotEqual(open(os.path.join(self.out, "ca.crt"), "rb").read(), before)

    def test_badName(self):
        rc, _, err = self.run_cli("--out", self.out, "--rrp-name", "rrp.example", "--lrp-name", "../evil")
        self.assertEqual(rc, 1)
        self.assertIn("bad name '../evil'", err)
        self.assertFalse(os.path.exists(os.path.join(self.out, "ca.key")))

    def test_duplicateLRP(self):
        rc, _, err = self.make("--lrp-name", "lrp1")
        self.assertEqual(rc, 1)
        self.assertIn("given twice: lrp1", err)

    def test_missingOption(self):
        e = self.assertRaises(SystemExit, self.run_cli, "--out", self.out, "--lrp-name", "x")
        self.assertEqual(e.code, 2)

    def test_throughTheDispatcher(self):
        from routeproxy.__main__ import main

        self.patch(sys, "stdout", io.StringIO())
        self.assertEqual(main(["certs", "--out", self.out, "--rrp-name", "r", "--lrp-name", "l"]), 0)
        self.assertTrue(os.path.exists(os.path.join(self.out, "lrp.key")))


class APITests(unittest.SynchronousTestCase):
    def test_writeLabCertsPaths(self):
        out = self.mktemp()
        paths = certs.write_lab_certs(out, "rrp.example", ["a", "b"])
        self.assertEqual(paths["ca"], os.path.join(out, "ca.crt"))
        self.assertEqual(paths["rrp_cert"], os.path.join(out, "rrp.crt"))
        self.assertEqual(paths["lrp_key"], os.path.join(out, "lrp.key"))
        self.assertEqual(paths["lrp_cert:a"], paths["lrp_cert"])
        self.assertEqual(paths["lrp_cert:b"], os.path.join(out, "lrp-b.crt"))
        for path in paths.values():
            self.assertTrue(os.path.exists(path), path)

    def test_ipName(self):
        ca = certs.make_ca()
        cert = certs.make_leaf(ca, "192.0.2.7").cert
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual([str(a) for a in san.get_values_for_type(x509.IPAddress)], ["192.0.2.7"])

    def test_expiredLeaf(self):
        past = datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone.utc)
        cert = certs.make_leaf(certs.make_ca(), "x", not_before=past, days=1).cert
        self.assertEqual(cert.not_valid_after_utc, past + datetime.timedelta(days=1))

    def test_badValidity(self):
        now = datetime.datetime.now(datetime.timezone.utc)
        self.assertRaises(certs.CertsError, certs.make_leaf, certs.make_ca(), "x", not_before=now, not_after=now)

    def test_neitherUsage(self):
        self.assertRaises(certs.CertsError, certs.make_leaf, certs.make_ca(), "x", server=False, client=False)

    def test_names(self):
        for good in ("rrp", "rrp.example", "lrp-1", "a_b", "10.0.0.1", "::1"):
            self.assertEqual(certs.check_name(good), good)
        for bad in ("", "a/b", "-x", "x.", "a..b", "spa ce", "ünï"):
            self.assertRaises(certs.CertsError, certs.check_name, bad)


class IssueRevokeTests(unittest.TestCase):
    """`certs issue` and `certs revoke` against a CA that write_lab_certs made."""

    def setUp(self):
        import tempfile
        self.dir = tempfile.mkdtemp(prefix="routeproxy-issue-")
        self.paths = certs.write_lab_certs(self.dir, "rrp.test", ["lrp1"])

    def test_issue_from_existing_ca_is_trusted(self):
        from cryptography import x509
        from routeproxy import tls
        self.assertEqual(certs.main(["issue", "--ca-dir", self.dir, "--lrp-name", "lrp2"]), 0)
        path = os.path.join(self.dir, "lrp-lrp2.crt")
        with open(path, "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())
        with open(self.paths["ca"], "rb") as f:
            cert.verify_directly_issued_by(x509.load_pem_x509_certificate(f.read()))
        self.assertEqual(tls.certName(cert), "lrp2")
        self.assertEqual(os.stat(os.path.join(self.dir, "lrp-lrp2.key")).st_mode & 0o777, 0o600)
        tls.clientCreator("rrp.test", path, os.path.join(self.dir, "lrp-lrp2.key"), self.paths["ca"])
        self.assertEqual(certs.main(["issue", "--ca-dir", self.dir, "--lrp-name", "lrp2"]), 1)  # exists

    def test_revoke_writes_a_crl_and_keeps_earlier_entries(self):
        from cryptography import x509
        certs.main(["issue", "--ca-dir", self.dir, "--lrp-name", "lrp2"])
        second = os.path.join(self.dir, "lrp-lrp2.crt")
        self.assertEqual(certs.main(["revoke", "--ca-dir", self.dir, self.paths["lrp_cert"]]), 0)
        self.assertEqual(certs.main(["revoke", "--ca-dir", self.dir, second]), 0)
        with open(os.path.join(self.dir, "ca.crl"), "rb") as f:
            crl = x509.load_pem_x509_crl(f.read())
        with open(self.paths["ca"], "rb") as f:
            ca = x509.load_pem_x509_certificate(f.read())
        self.assertTrue(crl.is_signature_valid(ca.public_key()))
        for path in (self.paths["lrp_cert"], second):
            with open(path, "rb") as f:
                serial = x509.load_pem_x509_certificate(f.read()).serial_number
            self.assertIsNotNone(crl.get_revoked_certificate_by_serial_number(serial))
        with open(self.paths["rrp_cert"], "rb") as f:
            self.assertIsNone(crl.get_revoked_certificate_by_serial_number(
                x509.load_pem_x509_certificate(f.read()).serial_number))

    def test_revoke_refuses_a_foreign_certificate(self):
        import tempfile
        other = certs.write_lab_certs(tempfile.mkdtemp(), "rrp.test", ["lrp1"])
        self.assertEqual(certs.main(["revoke", "--ca-dir", self.dir, other["lrp_cert"]]), 1)
