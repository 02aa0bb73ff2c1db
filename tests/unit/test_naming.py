"""The naming rule of docs/architecture.md, checked over routeproxy/ (so it stays applied).

Twisted-side code (every module that imports twisted or zope.interface, and the whole
routeproxy/mux package) names functions, methods and attributes in camelCase, as Twisted does; plain
libraries that do not import twisted use PEP 8 snake_case.  In both, an acronym keeps its
capitals inside a name (``GREPort``, ``sendGRE``), never ``Gre``.
"""
import ast
import pathlib
import re

from twisted.trial import unittest

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "routeproxy"
SNAKE = re.compile(r"^_*[a-z][a-z0-9]*(_[a-z0-9]+)+$")     # two words or more, with _
CAMEL = re.compile(r"^_*[a-z][a-z0-9]*[A-Z]")               # a capital after a lower-case start
MIXED_ACRONYM = re.compile(r"(Gre|Tls|Pptp|Ppp|Lrp|Rrp)(?![a-z])|(Gre|Tls|Pptp|Lrp|Rrp)[A-Z]")
# Names a framework dictates: twisted.python.usage's opt_*, trial's test_*, Python's dunders.
EXEMPT = re.compile(r"^(opt_|test|__)")


def twistedSide(path, source):
    return "mux" in path.parts or re.search(r"^\s*(from|import) (twisted|zope)", source, re.M)


def definedNames(tree):
    """Function and method names, and the attributes set on ``self``."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node.lineno
        elif (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
              and isinstance(node.value, ast.Name) and node.value.id == "self"):
            yield node.attr, node.lineno


def violations(path):
    source = path.read_text()
    wrong = SNAKE if twistedSide(path, source) else CAMEL
    found = []
    for name, line in definedNames(ast.parse(source)):
        if EXEMPT.match(name):
            continue
        if wrong.match(name) or MIXED_ACRONYM.search(name):
            found.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {name}")
    return found


class NamingRuleTests(unittest.SynchronousTestCase):
    def test_every_module_follows_its_side(self):
        found = [v for path in sorted(PACKAGE.rglob("*.py")) for v in violations(path)]
        self.assertEqual(found, [])

    def test_the_check_can_fail(self):
        tree = "import twisted\nclass A:\n    def peer_ip(self):\n        self.sendGre = 1\n"
        plain = "def peerAddress():\n    pass\n"
        path = PACKAGE / "example.py"
        for text, expected in ((tree, {"peer_ip", "sendGre"}), (plain, {"peerAddress"})):
            source = text
            wrong = SNAKE if twistedSide(path, source) else CAMEL
            names = {name for name, _ in definedNames(ast.parse(source))
                     if wrong.match(name) or MIXED_ACRONYM.search(name)}
            self.assertEqual(names, expected)
