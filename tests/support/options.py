"""Lab certificates and the required options of both taps, for tests that parse options."""
import os
import tempfile

from routeproxy.certs import write_lab_certs

_CERTS = tempfile.mkdtemp(prefix="routeproxy-test-certs-")
write_lab_certs(_CERTS, "rrp.test", ["lrp.test"])
CA = os.path.join(_CERTS, "ca.crt")
LRP_TLS = ["--cert", os.path.join(_CERTS, "lrp.crt"), "--key", os.path.join(_CERTS, "lrp.key"), "--ca", CA]
RRP_TLS = ["--cert", os.path.join(_CERTS, "rrp.crt"), "--key", os.path.join(_CERTS, "rrp.key"), "--ca", CA]
LRP_REQUIRED = ["--rrp", "rrp.test:4443", "--rrp-name", "rrp.test"] + LRP_TLS
RRP_REQUIRED = RRP_TLS


def parse(options_class, argv):
    """*argv* parsed by a fresh *options_class* (usage.UsageError on a bad value)."""
    options = options_class()
    options.parseConfig(argv)
    return options
