# routeproxy: `make demo` runs the main job, `make test` runs the tests.
# Both work on a fresh Debian 12 machine as root: they install what they need.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
APT_PACKAGES := libpcap-dev tshark iproute2 iptables pptpd pptp-linux ppp user-mode-linux busybox tcpreplay haproxy systemd \
                openvpn \
                build-essential flex bison bc xz-utils
TRIAL_JOBS ?= 2
# trial's work directory; give each concurrent run in one checkout its own
TRIAL_TEMP ?= _trial_temp
TESTS ?= tests

.PHONY: all deps apt venv uml-kernel lab-kernel test test-unit demo bench clean

all: test

deps: apt venv uml-kernel

# System packages: installed only when one is missing (apt-get update is slow).
apt:
	@if ! dpkg -s $(APT_PACKAGES) >/dev/null 2>&1; then \
	  export DEBIAN_FRONTEND=noninteractive; \
	  echo "wireshark-common wireshark-common/install-setuid boolean false" | debconf-set-selections; \
	  apt-get update -qq && apt-get install -y -qq --no-install-recommends $(APT_PACKAGES) >/dev/null; \
	fi

venv: $(VENV)/.installed

# A UML kernel the lab can boot, built only where Debian's cannot (routeproxy/lab/kernel.py).
uml-kernel: apt venv
	$(PY) -m routeproxy.lab.kernel --if-needed

# The lab's benchmark (benchmarks.labtransfer) on a kernel with the seccomp mode, where guest
# system calls and switches cost a quarter less than in ptrace mode (docs/lab.md); opt-in: it
# builds a kernel once (~10-15 minutes on 2 cores), which the lab then always uses.
lab-kernel: apt venv
	$(PY) -m routeproxy.lab.kernel --unless-seccomp

# setup.cfg's package_dir ("" -> the checkout) makes the default editable install a plain .pth
# with the checkout, so twistd finds twisted/plugins/ here (tests/system/test_packaging.py),
# and routeproxy.native's extension, compiled in place (by pip through setup.py, then by its
# own build, which keeps one), is imported from there too.  After editing routeproxy/native/*.c,
# run `python -m routeproxy.native.build` again (load() refuses a stale module).
$(VENV)/.installed: setup.cfg setup.py pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m routeproxy.native.build
	touch $@

test: deps
	@set -o pipefail; rm -rf $(TRIAL_TEMP); \
	$(VENV)/bin/trial --temp-directory=$(TRIAL_TEMP) --jobs=$(TRIAL_JOBS) $(TESTS) 2>&1 | tee .trial.log; rc=$$?; \
	$(PY) -m tests.support.summary .trial.log; exit $$rc

# The in-memory suite: no root, no namespaces, no apt; the inner loop (well under 30 s).
test-unit: venv
	@set -o pipefail; rm -rf $(TRIAL_TEMP); \
	$(VENV)/bin/trial --temp-directory=$(TRIAL_TEMP) --jobs=$(TRIAL_JOBS) tests.unit 2>&1 | tee .trial.log; rc=$$?; \
	$(PY) -m tests.support.summary .trial.log; exit $$rc

demo: deps
	$(PY) -m routeproxy demo

clean:
	rm -rf $(VENV) _trial_temp .trial.log *.egg-info
