# Build, bootstrap and test entry points.  `make test` is what CI runs (.ci/run).
#
# Installs happen only here, from PyPI (pip), npm (npm ci, exact lockfile) and Debian
# (apt-get, for redis-server); the tests themselves never download anything.
# Stamp files make a repeated `make test` skip installs whose inputs did not change.

PYTHON  ?= python3
VENV    ?= .venv
PY      := $(VENV)/bin/python
NPM     ?= npm
JOBS    ?= auto
PYTEST_ARGS ?=

VENV_STAMP := $(VENV)/.installed

# $(call ensure_installed,COMMANDS,DEBIAN PACKAGE,HINT): nothing when every command is on
# PATH; else apt-get installs the package when this is a root shell with apt-get (CI);
# else stop and say how to install it.
define ensure_installed
	@if $(foreach c,$(1),command -v $(c) >/dev/null 2>&1 &&) true; then \
		exit 0; \
	elif [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $(2); \
	else \
		echo "$(1): not installed, and this is not a root shell with apt-get ($(3))." >&2; \
		exit 1; \
	fi
endef
NODE_STAMP := node_modules/.installed

.PHONY: all venv node redis prometheus kubectl wrk test demo bench soak fuzz clean

all: test

venv: $(VENV_STAMP)

$(VENV_STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

node: $(NODE_STAMP)

$(NODE_STAMP): package.json package-lock.json
	$(NPM) ci --no-audit --no-fund --loglevel=error
	touch $@

# redis-server is started by the tests themselves (own port, no persistence);
# this only makes sure the binary exists.
redis:
	$(call ensure_installed,redis-server,redis-server,Debian/Ubuntu: sudo apt-get install redis-server; macOS: brew install redis)

# promtool checks the alert rules; a real prometheus (started by the tests on a free port)
# evaluates every dashboard and alert expression against a running gateway.
prometheus:
	$(call ensure_installed,promtool prometheus,prometheus,Debian/Ubuntu: sudo apt-get install prometheus; macOS: brew install prometheus)

# kubectl builds deploy/kubernetes (kubectl kustomize) for the manifest tests; no cluster needed.
kubectl:
	$(call ensure_installed,kubectl,kubectl,see https://kubernetes.io/docs/tasks/tools/; macOS: brew install kubectl)

# pytest exits 5 when it collected no tests: a broken collection must not pass CI.
test: venv node redis prometheus kubectl
	@$(PY) -m pytest -n $(JOBS) tests/ $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi; \
	exit $$rc

demo: venv
	$(VENV)/bin/mcp-gateway demo

BENCH_STAMP := $(VENV)/.installed-bench

$(BENCH_STAMP): $(VENV_STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test,bench]'
	touch $@

wrk:
	$(call ensure_installed,wrk,wrk,Debian/Ubuntu: sudo apt-get install wrk; macOS: brew install wrk)

bench: $(BENCH_STAMP) wrk redis
	$(PY) -m bench $(BENCH_ARGS)

# 30 minutes of mixed traffic at half the measured capacity, two workers, Redis (bench/soak.py).
soak: $(BENCH_STAMP) redis
	$(PY) -m bench.soak $(SOAK_ARGS)

# Coverage-guided fuzzing (atheris) of every parser the gateway owns, FUZZ_SECONDS per target,
# FUZZ_JOBS targets at a time.  `make test` runs the same targets for 60 s each.  The corpus
# grows in $(FUZZ_DIR)/<target>/ across runs; a crash lands in $(FUZZ_DIR)/<target>-crash-*
# (replay: $(PY) -m tests.fuzz.run <target> FILE; then add it to tests/fuzz/corpus/<target>/).
FUZZ_SECONDS ?= 600
FUZZ_TARGETS ?= codec sse header config policy jwt
FUZZ_JOBS    ?= $(shell nproc 2>/dev/null || echo 2)
FUZZ_DIR     ?= .fuzz

fuzz: venv
	@mkdir -p $(FUZZ_DIR)
	@printf '%s\n' $(FUZZ_TARGETS) | xargs -P $(FUZZ_JOBS) -I{} sh -c '\
		mkdir -p $(FUZZ_DIR)/{}; \
		$(PY) -m tests.fuzz.run {} $(FUZZ_DIR)/{} tests/fuzz/corpus/{} -max_total_time=$(FUZZ_SECONDS) \
			-timeout=10 -rss_limit_mb=1024 -print_final_stats=1 -close_fd_mask=1 \
			-artifact_prefix=$(FUZZ_DIR)/{}- 2> $(FUZZ_DIR)/{}.log; rc=$$?; \
		echo "fuzz {}: exit $$rc, $$(grep -Eo "number_of_executed_units: *[0-9]+|average_exec_per_sec: *[0-9]+" \
			$(FUZZ_DIR)/{}.log | tr -s " " | paste -sd, -)"; exit $$rc'
	FUZZ_SECONDS=$(FUZZ_SECONDS) $(PY) -m pytest -q -p no:cacheprovider tests/test_fuzz_gateway.py \
		tests/test_fuzz_parsers.py -k "not coverage_guided"

clean:
	rm -f $(VENV_STAMP) $(NODE_STAMP)
	rm -rf .pytest_cache .hypothesis results
	find . -name __pycache__ -type d -not -path './.venv/*' -not -path './node_modules/*' -prune -exec rm -rf {} +
