"""Which engine runs the instruments (the GRE sender and sink): C by default, or Python.

The instruments share the machine's CPUs with the system under test.  ``benchmarks/loadgen.py``
does its per-packet work in the interpreter: at 64 B and 146 k pps the two instrument
processes took about 0.6 CPU of the 2 here, CPU the daemons then waited for on the run queue
(docs/benchmarks.md, "The instruments in C").  ``benchmarks/loadgen.c`` is the same sender and
sink (same options, probe and JSON) in C; loadgen.py stays the reference and the fallback.

The C program is built on first use with ``cc -O2 -Wall`` into
``~/.cache/routeproxy-bench/loadgen-<sha of the source and flags>`` (``$XDG_CACHE_HOME``
honoured; not /tmp, which others share), atomically: a concurrent build just replaces it with
the same bytes.  Without a compiler, or if the build fails, it says so once on stderr and the
Python engine runs.

``ROUTEPROXY_BENCH_INSTRUMENT=python|c`` (or ``--instrument`` on ``python -m benchmarks`` and
``benchmarks.fixedrate``, which set it) chooses; :func:`engine` says which one actually runs,
and the trials record it.
"""
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile

ENV = "ROUTEPROXY_BENCH_INSTRUMENT"
ENGINES = ("c", "python")
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "loadgen.c")
CFLAGS = ("-O2", "-Wall")

_built = {}   # source digest -> path of the binary, or the BuildError


class BuildError(Exception):
    """loadgen.c could not be built (no compiler, or it failed: the message says why)."""


def compiler():
    """The C compiler's path (``$CC``, else cc), or None."""
    return shutil.which(os.environ.get("CC") or "cc")


def cache_dir():
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "routeproxy-bench")


def build():
    """The path of the C instrument, compiled now if the cache has no binary of this source."""
    with open(SOURCE, "rb") as f:
        source = f.read()
    digest = hashlib.sha256(source + repr(CFLAGS).encode()).hexdigest()[:16]
    if digest in _built:
        if isinstance(_built[digest], BuildError):
            raise _built[digest]
        return _built[digest]
    try:
        _built[digest] = _compile(digest)
    except BuildError as e:
        _built[digest] = e
        raise
    return _built[digest]


def _compile(digest):
    target = os.path.join(cache_dir(), f"loadgen-{digest}")
    if os.access(target, os.X_OK):   # built before (by any compiler): no compiler needed now
        return target
    cc = compiler()
    if cc is None:
        raise BuildError(f"no C compiler ({os.environ.get('CC') or 'cc'} not found)")
    os.makedirs(cache_dir(), exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=".loadgen-", dir=cache_dir())
    os.close(fd)
    try:
        done = subprocess.run([cc, *CFLAGS, "-o", temporary, SOURCE, "-lm"],
                              capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise BuildError(f"{cc} {' '.join(CFLAGS)} {SOURCE} failed: {done.stderr.strip()[-1000:]}")
        os.chmod(temporary, 0o755)
        os.replace(temporary, target)   # atomic: a reader sees no binary or a whole one
    except (OSError, subprocess.SubprocessError) as e:
        raise BuildError(f"building {SOURCE}: {e}") from None
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return target


def selected():
    """The engine asked for (``$ROUTEPROXY_BENCH_INSTRUMENT``, default c)."""
    name = os.environ.get(ENV) or "c"
    if name not in ENGINES:
        raise ValueError(f"{ENV}={name!r}: not one of {', '.join(ENGINES)}")
    return name


def select(name):
    """Run the instruments with *name* from now on (this process and its children)."""
    if name not in ENGINES:
        raise ValueError(f"instrument {name!r}: not one of {', '.join(ENGINES)}")
    os.environ[ENV] = name


_warned = set()


def engine():
    """The engine that runs: the one selected, or python if the C one cannot be built."""
    if selected() == "python":
        return "python"
    try:
        build()
        return "c"
    except BuildError as e:
        if str(e) not in _warned:
            _warned.add(str(e))
            sys.stderr.write(f"instrument: {e}; using the Python engine (benchmarks/loadgen.py)\n")
        return "python"


def argv(*args, engine_name=None):
    """The command line of ``loadgen ARGS`` (send or sink) with *engine_name* (default: engine())."""
    name = engine_name or engine()
    head = [build()] if name == "c" else [sys.executable, "-m", "benchmarks.loadgen"]
    return head + [str(a) for a in args]


def add_argument(parser, repeatable=False):
    """``--instrument python|c`` (repeatable: each in turn, for an A/B in one run)."""
    parser.add_argument("--instrument", choices=ENGINES, action="append" if repeatable else "store",
                        help=f"the instruments' engine (default: ${ENV} or c; python: benchmarks/loadgen.py)"
                        + ("; repeat it to run each rate with each engine in turn" if repeatable else ""))
