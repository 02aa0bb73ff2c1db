"""routeproxy.lab.kernel: a kernel built for the lab is built again when the lab came to need
more of it (make deps, --if-needed)."""
import os

from twisted.trial import unittest

from routeproxy.lab import kernel, uml


class MissingOptionsTests(unittest.TestCase):
    def built(self, options=None):
        dest = self.mktemp()
        os.makedirs(dest)
        path = os.path.join(dest, "linux")
        with open(path, "w") as f:
            f.write("#!/bin/sh\n")
        os.chmod(path, 0o755)
        if options is not None:
            with open(os.path.join(dest, kernel.STAMP), "w") as f:
                f.write("\n".join(options) + "\n")
        self.patch(uml, "UML_BINARY", path)
        return dest

    def test_built_with_every_option(self):
        self.assertEqual(kernel.missing_options(self.built(kernel.OPTIONS)), ())

    def test_built_before_an_option_was_needed(self):
        dest = self.built([o for o in kernel.OPTIONS if o != "NET_SCH_TBF"])
        self.assertEqual(kernel.missing_options(dest), ("NET_SCH_TBF",))

    def test_no_stamp_is_all_missing(self):
        self.assertEqual(kernel.missing_options(self.built()), kernel.OPTIONS)

    def test_not_the_kernel_in_use(self):
        dest = self.built()
        self.patch(uml, "UML_BINARY", uml.PACKAGED_BINARY)
        self.assertEqual(kernel.missing_options(dest), ())
        self.assertEqual(kernel.missing_options(self.mktemp()), ())


class UnlessSeccompTests(unittest.TestCase):
    """make lab-kernel: build only where the lab's kernel lacks the seccomp mode, or options."""

    def setUp(self):
        self.builds = []
        self.patch(kernel, "build", lambda dest, jobs: self.builds.append(dest) or dest + "/linux")
        self.dest = self.mktemp()
        os.makedirs(self.dest)
        self.path = os.path.join(self.dest, "linux")
        self.patch(uml, "UML_BINARY", self.path)

    def kernel_in_use(self, text, options=kernel.OPTIONS):
        with open(self.path, "wb") as f:
            f.write(b"\x7fELF" + text + b"\x00")
        os.chmod(self.path, 0o755)
        with open(os.path.join(self.dest, kernel.STAMP), "w") as f:
            f.write("\n".join(options) + "\n")

    def test_has_it_already(self):
        self.kernel_in_use(uml.SECCOMP_MARK)
        self.assertEqual(kernel.main(["--unless-seccomp", "--dest", self.dest]), 0)
        self.assertEqual(self.builds, [])

    def test_ptrace_only_is_built(self):
        self.kernel_in_use(b"no such mode here")
        self.assertEqual(kernel.main(["--unless-seccomp", "--dest", self.dest]), 0)
        self.assertEqual(self.builds, [self.dest])

    def test_seccomp_but_an_option_missing_is_built(self):
        self.kernel_in_use(uml.SECCOMP_MARK, kernel.OPTIONS[1:])
        kernel.main(["--unless-seccomp", "--dest", self.dest])
        self.assertEqual(self.builds, [self.dest])
