"""``python -m routeproxy.native.build``: compile gre.c, pump.c, sojourn.c, link.c, rawcap.c and loop.c
into ``routeproxy.native._gre`` in place (pump.c reads libpcap, rawcap.c compiles its filters
with it: the extension links -lpcap).

cffi's API mode (docs/fastpath.md, step 1): the compiler checks our declarations against the
C, so no ABI is guessed.  The extension lands next to this file, where the editable install
(setup.cfg's package_dir) imports it from; ``make venv`` runs this after pip.  A failure is
one line and a non-zero exit: the daemons run without the module (``load()`` says why).
``pip install`` builds the same module through setup.py's ``cffi_modules`` (ffibuilder).
"""
import hashlib
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
MODULE = "routeproxy.native._gre"
SOURCES = ("gre.h", "gre.c", "pump.h", "pump.c", "sojourn.h", "sojourn.c", "link.h", "link.c",
           "rawcap.h", "rawcap.c", "loop.h", "loop.c")


def source_digest():
    """A digest of the C sources, compiled into the module so a stale build is noticed."""
    digest = hashlib.sha256()
    for name in SOURCES:
        with open(os.path.join(HERE, name), "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()[:16]


def ffibuilder():
    from cffi import FFI

    def read(name):
        with open(os.path.join(HERE, name)) as f:
            return f.read()

    ffi = FFI()
    ffi.cdef(read("gre.h") + read("pump.h") + read("sojourn.h") + read("link.h") + read("rawcap.h")
             + read("loop.h"))
    # gre.c's and pump.c's text in one unit (pump.c calls gre.c's functions), each with its
    # own name for the compiler's messages (the generated file is _gre.c)
    # (<pcap/pcap.h> first: it brings <netinet/in.h>, whose IPPROTO_GRE gre.c then keeps)
    ffi.set_source(MODULE, f'#define RP_SOURCE_DIGEST "{source_digest()}"\n#include <pcap/pcap.h>\n'
                   f'#line 1 "gre.c"\n{read("gre.c")}\n#line 1 "pump.c"\n{read("pump.c")}\n'
                   f'#line 1 "sojourn.c"\n{read("sojourn.c")}\n#line 1 "link.c"\n{read("link.c")}\n'
                   f'#line 1 "rawcap.c"\n{read("rawcap.c")}\n#line 1 "loop.c"\n{read("loop.c")}',
                   include_dirs=[HERE], libraries=["pcap", "m"], extra_compile_args=["-Wall", "-Wextra"])
    return ffi


def main():
    root = os.path.dirname(os.path.dirname(HERE))  # the checkout: _gre lands in routeproxy/native/
    try:
        path = ffibuilder().compile(tmpdir=root, verbose=False)
    except Exception as e:
        reason = str(e).strip().splitlines()
        print(f"routeproxy.native: build failed: {type(e).__name__}: {reason[0] if reason else ''}",
              file=sys.stderr)
        return 1
    for name in os.listdir(HERE):   # one build here: an editable pip install's (abi3) goes
        other = os.path.join(HERE, name)
        if name.startswith("_gre.") and name.endswith(".so") and not os.path.samefile(other, path):
            os.remove(other)
    print(f"routeproxy.native: built {os.path.relpath(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
