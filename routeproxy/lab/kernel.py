"""A UML kernel for the lab, built from Debian's kernel source, for hosts where the packaged one cannot boot.

``python -m routeproxy.lab.kernel [--dest DIR] [--jobs N] [--if-needed]`` (root, ~10 minutes
on 2 cores) writes DIR/linux (default ``/var/lib/routeproxy/uml``).  The lab runs on the kernel
there whenever it exists (or on ``ROUTEPROXY_UML_KERNEL``), else on Debian's package.
``make deps`` (so ``make demo`` and ``make test``) runs it with ``--if-needed``: only on a
host where the packaged kernel cannot boot.

Why: Debian 12's user-mode-linux (6.1) and Debian 13's (6.12) die at their first process on a
host kernel that demands a full-size XSAVE buffer in ``PTRACE_SETREGSET`` (6.18 on a CPU with
AMX: "ptrace set fp regs failed, errno = 14").  Debian unstable's 7.2 boots there, but its
packaged build has no netfilter NAT, which the lab's NAT needs.  So this takes unstable's
newest ``linux-source`` package (7.2 or later), configures UML (``defconfig``) with everything the lab loads as
modules on Debian's kernel built in (PPP with MPPE, veth, bridge, legacy iptables with the
filter, nat and raw tables, MASQUERADE, REJECT, CT, conntrack with the PPTP helper), and no
module support at all, so the guest loads nothing.
"""
import argparse
import lzma
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.request

from routeproxy.lab import uml

MIRROR = "http://deb.debian.org/debian"
SUITE = "sid"
OLDEST = (7, 2)   # the first UML seen to boot on a host that wants a full-size XSAVE buffer
DEFAULT_DEST = os.path.dirname(uml.BUILT_BINARY)
BUILD_PACKAGES = ("build-essential", "flex", "bison", "bc", "xz-utils")

#: Kconfig symbols the lab needs, built in (what routeproxy.lab.topology loads as modules on
#: Debian's kernel, the guest's namespaces and file systems, and what the daemons use inside).
OPTIONS = (
    "NET_NS", "UTS_NS", "IPC_NS", "PID_NS", "HOSTFS", "TMPFS", "DEVTMPFS", "UNIX98_PTYS",
    "UNIX", "INET", "PACKET", "BPF", "BPF_SYSCALL", "EPOLL", "SIGNALFD", "TIMERFD", "EVENTFD",
    "INOTIFY_USER", "FUTEX", "SYSVIPC", "PROC_FS", "SYSFS",
    "PPP", "PPP_ASYNC", "PPP_SYNC_TTY", "PPP_DEFLATE", "PPP_BSDCOMP", "PPP_MPPE",
    "VETH", "BRIDGE", "TUN",  # PPP_MPPE selects its own SHA-1 and ARC4
    "NETFILTER", "NETFILTER_ADVANCED", "NF_CONNTRACK", "NF_NAT", "NETFILTER_XTABLES",
    "NETFILTER_XTABLES_LEGACY", "IP_NF_IPTABLES", "IP_NF_IPTABLES_LEGACY", "IP_NF_FILTER",
    "IP_NF_NAT", "IP_NF_RAW", "IP_NF_TARGET_MASQUERADE", "NETFILTER_XT_TARGET_MASQUERADE",
    "IP_NF_TARGET_REJECT", "NF_REJECT_IPV4", "NETFILTER_XT_TARGET_CT", "NETFILTER_XT_NAT",
    "NF_CONNTRACK_PPTP", "NF_NAT_PPTP",
    "NET_SCHED", "NET_SCH_TBF",   # --link-rate: tc's token bucket on the NAT's links
)


class KernelBuildError(Exception):
    """The kernel could not be fetched, configured or built (one line)."""


def source_package(mirror=MIRROR, suite=SUITE, oldest=OLDEST):
    """(name, URL) of the newest ``linux-source-X.Y`` in *suite*, at least *oldest*."""
    index = f"{mirror}/dists/{suite}/main/binary-all/Packages.xz"
    with urllib.request.urlopen(index, timeout=60) as response:
        text = lzma.decompress(response.read()).decode("utf-8", "replace")
    found = {}
    for stanza in text.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in stanza.splitlines() if ": " in line)
        match = re.fullmatch(r"linux-source-(\d+)\.(\d+)", fields.get("Package", ""))
        if match and "Filename" in fields:
            found[(int(match[1]), int(match[2]))] = (fields["Package"], f"{mirror}/{fields['Filename']}")
    usable = [version for version in found if version >= oldest]
    if not usable:
        raise KernelBuildError(f"no linux-source >= {'.'.join(map(str, oldest))} in {suite} at {mirror}")
    return found[max(usable)]


def _run(argv, cwd, log):
    result = subprocess.run(argv, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
    if result.returncode:
        raise KernelBuildError(f"{' '.join(argv)} failed (exit {result.returncode}); see {log.name}")


def configure(tree, log):
    """``defconfig`` for UML plus :data:`OPTIONS` built in and modules off; checked after."""
    _run(["make", "ARCH=um", "defconfig"], tree, log)
    enable = [arg for option in OPTIONS for arg in ("--enable", option)]
    _run(["scripts/config", *enable, "--disable", "MODULES"], tree, log)
    _run(["make", "ARCH=um", "olddefconfig"], tree, log)
    with open(os.path.join(tree, ".config")) as f:
        config = f.read()
    missing = [o for o in OPTIONS if f"CONFIG_{o}=y" not in config]
    if missing:
        raise KernelBuildError(f"the kernel source does not offer {', '.join(missing)}")


def build(dest=DEFAULT_DEST, jobs=None, work=None, say=print):
    """Fetch, configure and build; returns the path of the kernel (DEST/linux)."""
    jobs = jobs or (os.cpu_count() or 1) + 1
    os.makedirs(dest, exist_ok=True)
    work = work or tempfile.mkdtemp(prefix="routeproxy-uml-build-", dir="/var/tmp")
    log_path = os.path.join(dest, "build.log")
    with open(log_path, "w") as log:
        package, url = source_package()
        say(f"fetching {url}")
        deb = os.path.join(work, "source.deb")
        with urllib.request.urlopen(url, timeout=600) as response, open(deb, "wb") as out:
            shutil.copyfileobj(response, out)
        _run(["dpkg-deb", "-x", deb, work], work, log)
        tarball = os.path.join(work, "usr", "src", f"{package}.tar.xz")
        _run(["tar", "xf", tarball], work, log)
        tree = os.path.join(work, package)
        say(f"configuring and building UML in {tree} ({jobs} jobs, log {log_path})")
        configure(tree, log)
        _run(["make", "ARCH=um", f"-j{jobs}", "linux"], tree, log)
    kernel = os.path.join(dest, "linux")
    shutil.copy2(os.path.join(tree, "linux"), kernel)
    with open(os.path.join(dest, STAMP), "w") as f:   # what it was built with (missing_options)
        f.write("\n".join(OPTIONS) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    return kernel


STAMP = "options"   # beside the kernel: the OPTIONS it was built with, one per line


def missing_options(dest=DEFAULT_DEST):
    """OPTIONS the kernel built in *dest* lacks (all of them when it says nothing of what it
    was built with), or () when the lab does not run on it: a lab that came to need more of
    the kernel (``--link-rate``: tc's token bucket) gets it at the next ``make deps``."""
    kernel = os.path.join(dest, "linux")
    if not os.access(kernel, os.X_OK) or os.path.realpath(uml.UML_BINARY) != os.path.realpath(kernel):
        return ()
    try:
        with open(os.path.join(dest, STAMP)) as f:
            built = set(f.read().split())
    except OSError:
        built = set()
    return tuple(o for o in OPTIONS if o not in built)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m routeproxy.lab.kernel",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--dest", default=DEFAULT_DEST, help=f"where to put it [{DEFAULT_DEST}]")
    parser.add_argument("--jobs", type=int, help="parallel compile jobs [CPUs + 1]")
    parser.add_argument("--if-needed", action="store_true",
                        help="only where the lab's UML cannot boot (make deps); a failed build "
                             "is one line and exit 0: the lab then says why it cannot run")
    parser.add_argument("--unless-seccomp", action="store_true",
                        help="only where the lab's UML has no seccomp mode (make lab-kernel): "
                             "the real-peer benchmark's traps cost a quarter less with it")
    args = parser.parse_args(argv)
    if args.unless_seccomp and uml.offers_seccomp(uml.UML_BINARY) and not missing_options(args.dest):
        print(f"{uml.UML_BINARY} has the seccomp mode already")
        return 0
    if args.if_needed:
        reason = uml.uml_available()
        missing = missing_options(args.dest)
        if missing and (reason is None or "cannot boot" in reason):
            without = ("says nothing of what it was built with" if missing == OPTIONS
                       else f"was built without {', '.join(missing)}")
            print(f"{args.dest}/linux {without}: building it again (~10 minutes on 2 cores)",
                  flush=True)
        elif reason is None or "cannot boot" not in reason:
            return 0  # it boots, or something else is missing (apt-get says which)
        else:
            print(f"{reason}\nbuilding a UML kernel this host can boot (once, ~10 minutes on 2 "
                  "cores)", flush=True)
    try:
        kernel = build(args.dest, args.jobs)
    except (KernelBuildError, OSError) as e:
        print(f"routeproxy.lab.kernel: {e}", file=sys.stderr)
        return 0 if args.if_needed else 2
    print(f"built {kernel}; run the lab on it with ROUTEPROXY_UML_KERNEL={kernel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
