"""Boot a user-mode-linux (UML) kernel around a shell script and collect its result.

Why UML: the host kernel of the machines this runs on has no PPP, so real pppd,
pptpd and pptp-linux cannot run there.  Debian's `linux.uml` is a whole Linux
kernel running as an ordinary process; booted with the host's own files as its
root (hostfs) it sees the same binaries and Python venv, and has PPP, GRE
conntrack and namespaces of its own.

The generated init runs as PID 1 inside UML.  Because hostfs writes go straight
to the real host files, it first mounts tmpfs over every directory the lab
writes to (/tmp, /run, /etc/ppp, /var/log, /dev) and only the dedicated work
directory of one run is shared with the host, bind-mounted at `GUEST_WORK`.
"""
import os
import shlex
import shutil
import sys
import signal
import subprocess
import tempfile
import time

PACKAGED_BINARY = "/usr/bin/linux.uml"
PACKAGED_MODULES = "/usr/lib/uml/modules"
BUILT_BINARY = "/var/lib/routeproxy/uml/linux"   # routeproxy.lab.kernel's default output


def _own_kernel():
    """A UML kernel of one's own: ROUTEPROXY_UML_KERNEL, else the one routeproxy.lab.kernel
    built (everything the lab loads is built in, so it has no modules); None: the package."""
    named = os.environ.get("ROUTEPROXY_UML_KERNEL")
    if named:
        return named
    return BUILT_BINARY if os.access(BUILT_BINARY, os.X_OK) else None


_OWN_KERNEL = _own_kernel()
UML_BINARY = _OWN_KERNEL or PACKAGED_BINARY
UML_MODULES = None if _OWN_KERNEL else PACKAGED_MODULES

# where the run's host work directory appears inside UML
GUEST_WORK = "/run/lab"

# UML 6.15 and later can trap its guest processes' system calls with seccomp instead of
# ptrace (boot option ``seccomp=on``); the kernel says so in this message of its own.
SECCOMP_MARK = b"Invalid seccomp option"


class UMLError(Exception):
    """UML is missing, or could not be booted."""


class UMLTimeout(UMLError):
    """The UML kernel did not power off in time; it has been killed."""

    def __init__(self, timeout, output):
        super().__init__(f"UML still running after {timeout:.0f} s; killed")
        self.output = output


class UMLResult:
    """What one UML run produced: the payload's exit code and output, and timings."""

    def __init__(self, exit_code, output, boot_seconds, total_seconds, console):
        self.exit_code = exit_code
        self.output = output
        self.boot_seconds = boot_seconds      # UML start -> init's shell running
        self.total_seconds = total_seconds    # host wall clock, start -> process gone
        self.console = console                # kernel console (for diagnosis)

    def __iter__(self):
        # lets callers write `code, output = run_in_uml(...)`
        return iter((self.exit_code, self.output))

    def __repr__(self):
        return (f"UMLResult(exit_code={self.exit_code}, boot={self.boot_seconds:.2f}s, "
                f"total={self.total_seconds:.2f}s)")


_boot_probe = []   # the probe's answer, once per process
_seccomp = []      # whether guests boot in seccomp mode, once per process


def offers_seccomp(binary, chunk=1 << 22):
    """True if the UML kernel *binary* has the seccomp mode (it contains :data:`SECCOMP_MARK`)."""
    tail = b""
    try:
        with open(binary, "rb") as f:
            while True:
                block = f.read(chunk)
                if not block:
                    return False
                if SECCOMP_MARK in tail + block:
                    return True
                tail = (tail + block)[-len(SECCOMP_MARK):]
    except OSError:
        return False


def seccomp_options():
    """``["seccomp=on"]`` when the lab's guests run in seccomp mode, else ``[]``.

    Why: every system call and page fault of a guest process is a trap into the UML kernel,
    which in ptrace mode costs a host round trip (docs/lab.md); the proxy's two daemons pay it
    for every packet, the kernel's PPTP helper it compares them with never does.  Seccomp
    mode makes the trap cheaper (measured: the proxy's 4 MB lab transfer 2.55 -> 2.15 s, the
    helper's unchanged).  Where the kernel lacks it, the probe boot fails with it or
    ROUTEPROXY_UML_SECCOMP=off asks so, guests boot as before.
    """
    if not _seccomp:
        wanted = os.environ.get("ROUTEPROXY_UML_SECCOMP", "auto") != "off"
        _seccomp.append(wanted and offers_seccomp(UML_BINARY))
    return ["seccomp=on"] if _seccomp[0] else []


def uml_available():
    """Return None when UML can run here, else the reason it cannot.

    Besides the binary and its modules, a tiny guest is booted once per process: some host
    kernels cannot run UML at all (on hosts whose CPUs have large XSAVE state, such as AMX,
    the guest's first process dies with "ptrace set fp regs failed"), and a lab that cannot
    boot must say so in one line, not as a kernel panic in every test.
    """
    if not os.access(UML_BINARY, os.X_OK):
        return f"{UML_BINARY} not found (apt-get install user-mode-linux)"
    if UML_MODULES and not modules_version():
        return f"no UML kernel modules under {UML_MODULES}"
    if not _boot_probe:
        _boot_probe.append(_probe_boot())
    return _boot_probe[0]


def _probe_boot(timeout=60):
    """None if a guest boots and runs a command here, else why not (one line)."""
    work = tempfile.mkdtemp(prefix="routeproxy-lab-probe-", dir=_work_parent())
    try:
        for name, text in (("modules.sh", ""), ("payload.sh", "true\n")):
            with open(os.path.join(work, name), "w") as f:
                f.write(text)
        try:
            try:
                result = _boot(work, timeout, "128M")
            except (UMLError, OSError):
                if not seccomp_options():
                    raise
                _seccomp[:] = [False]  # a kernel that has the mode but cannot use it here
                result = _boot(work, timeout, "128M")
        except (UMLError, OSError) as e:
            console = str(e)
            known = [line.strip() for line in console.splitlines()
                     if "ptrace" in line or "Kernel panic" in line]
            detail = "; ".join(known[:2]) or console.splitlines()[0]
            return (f"UML cannot boot on this host (kernel {os.uname().release}): {detail}")
        if result.exit_code != 0:
            return f"UML boots but cannot run a command (exit {result.exit_code})"
        return None
    finally:
        shutil.rmtree(work, ignore_errors=True)


def modules_version():
    """The UML kernel version whose modules are installed (e.g. '6.1.176')."""
    try:
        versions = sorted(os.listdir(UML_MODULES or ""))
    except OSError:
        return None
    return versions[-1] if versions else None


INIT_TEMPLATE = r"""#!/bin/sh
# PID 1 inside UML (generated by routeproxy.lab.uml).
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root LANG=C
mount -t proc proc /proc
read UPTIME _ < /proc/uptime
mount -t sysfs sysfs /sys
# hostfs writes reach the real host files: cover everything the lab writes.
mount -t tmpfs -o mode=755 tmpfs /run
mkdir -p {guest}
mount --bind {work} {guest}
echo "$UPTIME" > {guest}/boot_uptime
{keep_before}mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t tmpfs -o mode=755 tmpfs /etc/ppp
mount -t tmpfs -o mode=755 tmpfs /var/log
mount -t tmpfs -o mode=1777 tmpfs /var/tmp
{keep_after}grep -q ' /dev devtmpfs' /proc/mounts || mount -t devtmpfs devtmpfs /dev 2>/dev/null
if ! grep -q ' /dev devtmpfs' /proc/mounts; then
    mount -t tmpfs -o mode=755 tmpfs /dev
    mknod /dev/null c 1 3; mknod /dev/zero c 1 5; mknod /dev/urandom c 1 9
    mknod /dev/random c 1 8; mknod /dev/tty c 5 0; mknod /dev/ptmx c 5 2
fi
chmod 666 /dev/null
[ -e /dev/ppp ] || mknod /dev/ppp c 108 0
mkdir -p /dev/pts /dev/shm
mount -t devpts -o newinstance,ptmxmode=0666 devpts /dev/pts
[ -e /dev/ptmx ] && [ ! -c /dev/ptmx ] && rm -f /dev/ptmx
[ -e /dev/ptmx ] || ln -s pts/ptmx /dev/ptmx
mount -t tmpfs tmpfs /dev/shm
ip link set lo up
export LAB_WORK={guest}
cd {guest}
if /bin/sh {guest}/modules.sh > {guest}/output 2>&1; then
    /bin/sh {guest}/payload.sh >> {guest}/output 2>&1 < /dev/null
    echo $? > {guest}/exit_code.tmp
else
    echo 125 > {guest}/exit_code.tmp
fi
mv {guest}/exit_code.tmp {guest}/exit_code
sync
umount {guest} 2>/dev/null
busybox poweroff -f
"""


# Directories the guest covers with tmpfs so that nothing it writes reaches the host.
COVERED = ("/tmp", "/etc/ppp", "/var/log", "/var/tmp")


def host_paths_needed():
    """Host directories the lab runs code from: this checkout and the Python environment."""
    project = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return sorted({project, os.path.realpath(sys.prefix), os.path.realpath(sys.base_prefix)})


def _keep_visible(paths):
    """Shell lines that keep *paths* visible under the tmpfs the guest mounts over COVERED.

    A checkout under /tmp (as a CI clone may be) would otherwise vanish inside the guest,
    and with it the daemons and the venv the lab runs.  Each such path is bind-mounted
    aside before the tmpfs goes on, then back to the same place (venv scripts name their
    interpreter by absolute path).
    """
    covered = [p for p in paths if any(p == c or p.startswith(c + "/") for c in COVERED)]
    outermost = [p for p in covered if not any(p.startswith(q + "/") for q in covered)]
    before, after = [], []
    for i, path in enumerate(outermost):
        aside = f"/run/keep/{i}"
        before.append(f"mkdir -p {aside} && mount --bind {shlex.quote(path)} {aside}\n")
        after.append(f"mkdir -p {shlex.quote(path)} && mount --bind {aside} {shlex.quote(path)}\n")
    return "".join(before), "".join(after)


def module_load_order(names, version=None):
    """UML module files (absolute paths) to insmod, dependencies first.

    Resolved here on the host from modules.dep: there is no kmod on these
    hosts, busybox's modprobe only looks in /lib/modules, and every exec inside
    UML costs tens of milliseconds, so the guest just runs the insmods.
    """
    if UML_MODULES is None:
        return []  # a kernel of one's own: everything built in
    version = version or modules_version()
    root = os.path.join(UML_MODULES, version)
    deps = {}
    with open(os.path.join(root, "modules.dep")) as f:
        for line in f:
            path, _, rest = line.partition(":")
            deps[_module_name(path)] = (path, rest.split())
    order, seen = [], set()

    def visit(name):
        key = name.replace("-", "_")
        if key in seen:
            return
        if key not in deps:
            raise UMLError(f"no UML module named {name!r} in {root}")
        seen.add(key)
        path, needs = deps[key]
        for dep in needs:
            visit(_module_name(dep))
        order.append(os.path.join(root, path))

    for name in names:
        visit(name)
    return order


def _module_name(path):
    return os.path.basename(path).split(".ko")[0].replace("-", "_")


def write_init(work):
    path = os.path.join(work, "init.sh")
    with open(path, "w") as f:
        before, after = _keep_visible(host_paths_needed())
        f.write(INIT_TEMPLATE.format(work=shlex.quote(work), guest=GUEST_WORK,
                                     keep_before=before, keep_after=after))

    os.chmod(path, 0o755)
    return path


def uml_command(init_path, mem, work):
    return [
        UML_BINARY, f"mem={mem}", "rootfstype=hostfs", "rootflags=/", "rw",
        f"init={init_path}", "con=null", "con0=fd:0,fd:1", "ssl=null",
        f"uml_dir={work}", "umid=" + os.path.basename(work).replace("routeproxy-", ""), "quiet",
        *seccomp_options(),
    ]


def run_in_uml(script_text, timeout, mem="1G", work=None, files=None, keep=False, modules=()):
    """Run `script_text` (a /bin/sh script) inside a fresh UML kernel.

    Returns a UMLResult, which unpacks as `(exit_code, output)`.  `files` maps
    names to extra text files written into the work directory (visible inside
    as $LAB_WORK/NAME).  `modules` are loaded (with their dependencies)
    before the script starts; exit code 125 means one failed.  Raises
    UMLTimeout when UML outlives `timeout` seconds (the whole process group
    is killed), UMLError when it cannot run or dies without a result.
    """
    reason = uml_available()
    if reason:
        raise UMLError(reason)
    own_work = work is None
    # not under /tmp: the guest mounts a tmpfs there (the bind mount would cope,
    # but a host path outside /tmp keeps the guest's view unambiguous)
    work = work or tempfile.mkdtemp(prefix="routeproxy-lab-", dir=_work_parent())
    try:
        with open(os.path.join(work, "modules.sh"), "w") as f:
            f.write("set -e\n" + "".join(f"busybox insmod {shlex.quote(p)}\n"
                                          for p in module_load_order(modules)))
        with open(os.path.join(work, "payload.sh"), "w") as f:
            f.write(script_text)
        for name, text in (files or {}).items():
            with open(os.path.join(work, name), "w") as f:
                f.write(text)
        return _boot(work, timeout, mem)
    finally:
        if own_work and not keep:
            shutil.rmtree(work, ignore_errors=True)


def _work_parent():
    parent = os.environ.get("ROUTEPROXY_LAB_DIR", "/var/tmp")
    os.makedirs(parent, exist_ok=True)
    return parent


def _boot(work, timeout, mem):
    init = write_init(work)
    console_path = os.path.join(work, "console")
    started = time.monotonic()
    with open(console_path, "wb") as console, open(os.devnull, "rb") as devnull:
        proc = subprocess.Popen(
            uml_command(init, mem, work), stdin=devnull, stdout=console,
            stderr=subprocess.STDOUT, start_new_session=True, cwd=work)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            raise UMLTimeout(timeout, _read(os.path.join(work, "output"))
                             + "\n--- console ---\n" + _read(console_path)[-4000:])
        finally:
            _kill_group(proc)   # UML's helper threads are host processes too
    total = time.monotonic() - started
    console_text = _read(console_path)
    code_text = _read(os.path.join(work, "exit_code")).strip()
    if not code_text:
        raise UMLError("UML exited without a result; console tail:\n"
                       + console_text[-4000:])
    boot = _read(os.path.join(work, "boot_uptime")).strip()
    result = UMLResult(int(code_text), _read(os.path.join(work, "output")),
                       float(boot) if boot else float("nan"), total, console_text)
    result.work = work   # gone after the run unless keep=True
    return result


def _kill_group(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def _read(path):
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""
