"""``python -m tests.fuzz NAME|all [libFuzzer flags]``: run a harness under atheris.

``all`` runs each harness in turn (each with the flags given, e.g. -atheris_runs=100000).
"""
import sys

NAMES = ("pptp", "gre", "frames", "mux", "callbook", "native", "pump", "link", "tlsread")


def main(argv):
    import atheris

    with atheris.instrument_imports(include=["routeproxy"]):
        from tests.fuzz.harnesses import HARNESSES, seeds

    if len(argv) < 2 or argv[1] not in [*HARNESSES, "all"]:
        print(f"usage: python -m tests.fuzz {{{','.join(HARNESSES)},all}} [libFuzzer flags]")
        return 2
    names = list(HARNESSES) if argv[1] == "all" else [argv[1]]
    if len(names) > 1:
        import subprocess
        return max(subprocess.call([sys.executable, "-m", "tests.fuzz", name, *argv[2:]])
                   for name in names)
    if names[0] in ("native", "pump", "link", "tlsread"):
        from routeproxy.native import load
        module, reason = load()
        if module is None:
            print(f"native: nothing to compare, {reason}")
            return 0
    harness = HARNESSES[names[0]]
    for seed in seeds():
        harness(seed)
    atheris.Setup([argv[0], *argv[2:]], harness)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
