"""Packaging: the runtime requirements are exactly what routeproxy/ imports, and the
license file the metadata names is there.  (tests/system/test_packaging.py installs the
package both ways and asks twistd for the plugins.)"""
import ast
import configparser
import importlib.metadata
import os
import pathlib
import re
import sys

from twisted.trial import unittest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def third_party_imports():
    """Top-level modules imported anywhere in routeproxy/ that are neither stdlib nor ours."""
    found = set()
    for path in (ROOT / "routeproxy").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            found.update(name.split(".")[0] for name in names)
    return {name for name in found if name not in sys.stdlib_module_names and name != "routeproxy"}


def normalise(name):
    return re.sub(r"[-_.]+", "-", name).lower()


class PackagingTests(unittest.SynchronousTestCase):
    def setUp(self):
        self.setup = configparser.ConfigParser()
        self.setup.read(ROOT / "setup.cfg")

    def test_requirements_are_what_the_runtime_imports(self):
        required = {normalise(re.split(r"[<>=!~ ;\[]", line.strip())[0])
                    for line in self.setup["options"]["install_requires"].splitlines() if line.strip()}
        providers = importlib.metadata.packages_distributions()
        imported = {normalise(next(d for d in providers[name] if d != "routeproxy"))
                    for name in third_party_imports()}
        self.assertEqual(imported, required)
        self.assertNotIn("dpkt", required)   # only the tests read packets with it

    def test_license_file(self):
        self.assertEqual(self.setup["metadata"]["license"], "MIT")
        self.assertIn("MIT License", (ROOT / self.setup["metadata"]["license_files"]).read_text())
