# ftpcluster: make run | make test | make test-fast | make mutate | make bench
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
# systemd: for systemd-analyze, which verifies deploy/ftpcluster.service in the tests
SYSPKGS := memcached haproxy lftp curl openssl iproute2 systemd
BENCHPKGS := proftpd-core proftpd-mod-crypto
.PHONY: run test test-fast mutate bench venv sysdeps bench-sysdeps clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q -U pip
	$(PIP) install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed

$(VENV)/.bench-installed: $(VENV)/.installed
	$(PIP) install -q -e '.[test,bench]'
	touch $@

run: venv
	$(VENV)/bin/ftpcluster start

# System tools the tests drive as real peers; installed when missing and root.
sysdeps:
	@missing=""; \
	for b in memcached haproxy lftp curl openssl ip systemd-analyze; do command -v $$b >/dev/null 2>&1 || missing="$$missing $$b"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing:$$missing"; \
	    (apt-get install -y -q $(SYSPKGS) >/dev/null 2>&1 || (apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(SYSPKGS) >/dev/null)); \
	  else echo "missing (tests needing them will skip):$$missing"; fi; \
	fi

# The suite mostly waits (servers starting, clients, timeouts), so files run in parallel
# workers (pytest-xdist; a file stays on one worker, so its shared servers start once;
# each worker hands out its own ports). TEST_WORKERS=0 runs everything in one process.
TEST_WORKERS ?= 2
XDIST := -n $(TEST_WORKERS) $(if $(filter 0,$(TEST_WORKERS)),,--dist loadfile)

test: venv sysdeps
	$(PY) -m pytest tests $(XDIST) $(PYTEST_ARGS)

# The same without the tests marked slow (multi-host, memcached faults): a quick loop while editing.
test-fast: venv sysdeps
	$(PY) -m pytest tests -m "not slow" $(XDIST) $(PYTEST_ARGS)

# Deliberate breakages, each on a copy of the repo, each run against the tests named
# for it: every one must turn a test red (tests/mutations.py). Not part of `make test`.
mutate: venv sysdeps
	$(PY) -m tests.mutations $(MUTATE_ARGS)

# ProFTPD (with mod_tls from proftpd-mod-crypto) is a bench peer only; the bench skips it when missing.
bench-sysdeps: sysdeps
	@if ! command -v proftpd >/dev/null 2>&1 || [ ! -e /usr/lib/proftpd/mod_tls.so ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(BENCHPKGS) >/dev/null 2>&1 || \
	     (apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(BENCHPKGS) >/dev/null 2>&1)) || \
	     echo "note: could not install $(BENCHPKGS); the bench skips ProFTPD"; \
	  fi; \
	fi

bench: $(VENV)/.bench-installed bench-sysdeps
	$(PY) -m bench $(if $(QUICK),--quick,)

clean:
	rm -rf $(VENV) .pytest_cache bench/results/*.tmp
