# zhclip: `make demo` runs the whole pipeline on the bundled demo data; `make test` runs the suite.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# The reference package ships the Chinese vocab; its declared dependencies (torchvision, lmdb==1.3.0)
# would break the pinned torch, so it is installed without them.
CN_CLIP := cn-clip==1.6.0
RUN    := PATH="$(abspath $(BIN)):$$PATH"

# A second environment that runs the reference implementation's own image transform, which needs
# torchvision; no torchvision build runs beside the pinned CPU torch, so it gets torch 2.14.1 and
# torchvision 0.29.1, with Pillow and NumPy at the locked versions. Tests only.
REF_VENV  := .venv-reference
REF_STAMP := $(REF_VENV)/.installed-stamp
REF_PINS  := torch==2.14.1 torchvision==0.29.1 $(shell grep -i -E '^(pillow|numpy|six)==' requirements.lock)

# The real img2dataset, in an environment of its own (its dependencies are none of zhclip's): the tests
# download through it from a web server on 127.0.0.1 and ingest what it wrote. Tests only.
I2D_VENV  := .venv-img2dataset
I2D_STAMP := $(I2D_VENV)/.installed-stamp

.PHONY: install reference-env img2dataset-env system-deps cjk-font demo test test-fast lint format docs audit kube-lint lock clean-demo

# Services and tools the tests start: PostgreSQL (MLflow backend store), headless Chromium (HTML
# report rendering) and kubectl (offline `kubectl kustomize`). Installed from Debian when missing.
# tool:package pairs; only packages whose tool is missing are installed (an existing kubectl from
# another package would conflict with Debian's).
SYSTEM_TOOLS := pg_ctlcluster:postgresql chromium:chromium kubectl:kubernetes-client

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml requirements.lock
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps $(CN_CLIP)
	touch $(STAMP)

# zhclip itself, editable in setuptools' strict mode: a tree of links to the repository's files under
# build/__editable__.*/zhclip/, on sys.path through a .pth file, which type checkers, editors and
# mkdocstrings read as they read any installed package (the default mode's import hook they cannot
# run). A module added or removed needs the tree made again: the stamp is named after the list of
# the package's files, so `make install` remakes it whenever that list changes.
PACKAGE_FILES := $(shell find model components workflows \( -name '*.py' -o -name '*.html' -o -name '*.csv' \) -not -path '*/__pycache__/*' | sort)
EDITABLE := $(VENV)/.editable-$(shell echo $(PACKAGE_FILES) | md5sum | cut -c1-12)

$(EDITABLE): $(STAMP)
	rm -rf $(VENV)/.editable-* build/__editable__.*
	$(BIN)/python -m pip install --quiet --no-deps --config-settings editable_mode=strict -e .
	touch $@

install: $(STAMP) $(EDITABLE)

# Reports and figures are Chinese documents: without a CJK font every caption and class name is an
# empty box (in matplotlib figures and in the browser tests). Debian's Noto CJK, when none is installed.
cjk-font:
	@if ! fc-list :lang=zh 2>/dev/null | grep -q .; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq fontconfig fonts-noto-cjk; \
	fi

system-deps: cjk-font
	@missing=""; for pair in $(SYSTEM_TOOLS); do \
	  command -v $${pair%%:*} >/dev/null || missing="$$missing $${pair##*:}"; done; \
	if [ -n "$$missing" ]; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi

# The test-only environments are byte-compiled at install, as pip does by default. Where
# PYTHONDONTWRITEBYTECODE is set (it is on the 2 vCPU machine these figures come from) Python never
# caches what it compiles, so each process of an uncompiled environment compiles every module it
# imports again: `import torch, cn_clip.clip` took 14-16 s instead of 7-8 s, and the two test modules
# that run these environments most 133 s instead of 77 s, for 26 s more of install
# (bench/investigations/2026-12-07-test-env-bytecode).
$(REF_STAMP): requirements.lock
	$(PYTHON) -m venv $(REF_VENV)
	$(REF_VENV)/bin/python -m pip install --quiet $(REF_PINS)
	$(REF_VENV)/bin/python -m pip install --quiet --no-deps $(CN_CLIP)
	touch $(REF_STAMP)

reference-env: $(REF_STAMP)

$(I2D_STAMP): requirements-img2dataset.lock
	$(PYTHON) -m venv $(I2D_VENV)
	$(I2D_VENV)/bin/python -m pip install --quiet -r requirements-img2dataset.lock
	touch $(I2D_STAMP)

img2dataset-env: $(I2D_STAMP)

# DVC's own notes (stage headers, lock-file updates) are left out (--quiet): each step prints its
# progress and a one-line result; `dvc repro` without it shows them.
demo: install cjk-font
	$(RUN) dvc repro --quiet
	$(RUN) zhclip results

# The suite runs on two pytest-xdist workers, one per core of CI's machine, a test module per work
# unit (tests/conftest.py); TEST_WORKERS=0 runs it in one process (for a debugger or -x). Every
# test's time goes to logs/junit.xml (the log shows only the slowest): where the suite's time goes.
TEST_WORKERS ?= 2
XDIST = -n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder

# The two test-only environments install side by side (one pip each, one per core).
test: install system-deps
	$(MAKE) --no-print-directory -j2 reference-env img2dataset-env
	$(RUN) pytest $(XDIST) --junitxml=logs/junit.xml

test-fast: install img2dataset-env
	$(RUN) pytest $(XDIST) -m "not slow"

# Lint and format check (ruff, configured in pyproject.toml); `make format` rewrites in place. The type
# checker (basedpyright, [tool.basedpyright] in pyproject.toml) over components/, model/ and workflows/,
# then over tests/ for unresolved imports only (tests/pyrightconfig.json).
lint: install kube-lint
	$(RUN) ruff check .
	$(RUN) ruff format --check .
	$(RUN) lint-imports --no-cache
	$(RUN) basedpyright -p pyproject.toml
	$(RUN) basedpyright -p tests/pyrightconfig.json

# checkov, the Kubernetes linter, over the kustomize output of both overlays (kubectl from
# system-deps), in an environment of its own: its dependencies are none of zhclip's. A check is
# skipped only with its reason beside the resource (checkov.io/skipN annotations) or in the overlay's
# .checkov.yaml.
CHECKOV_VENV  := .venv-checkov
CHECKOV_STAMP := $(CHECKOV_VENV)/.installed-stamp

$(CHECKOV_STAMP): requirements-checkov.lock
	$(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/python -m pip install --quiet -r requirements-checkov.lock
	touch $(CHECKOV_STAMP)

kube-lint: $(CHECKOV_STAMP) system-deps
	@for overlay in local production; do \
	  config=infra/overlays/$$overlay/.checkov.yaml; \
	  kubectl kustomize infra/overlays/$$overlay > $(CHECKOV_VENV)/$$overlay.yaml || exit 1; \
	  $(CHECKOV_VENV)/bin/checkov --quiet --compact --skip-download --framework kubernetes -f $(CHECKOV_VENV)/$$overlay.yaml \
	    $$( [ -f $$config ] && echo --config-file $$config ) || exit 1; \
	  echo "checkov: infra/overlays/$$overlay passes"; \
	done

format: install
	$(RUN) ruff check --fix .
	$(RUN) ruff format .

# The documentation site (MkDocs + Material, API pages from the docstrings) in site/; --strict turns
# every warning (a broken link, a page missing from the nav, a module that does not load) into an error.
# NO_MKDOCS_2_WARNING silences Material's banner about its end of life (May 2027; successor: Zensical).
docs: install
	$(RUN) NO_MKDOCS_2_WARNING=1 mkdocs build --strict --site-dir site

# Known vulnerabilities in the locked packages (pip-audit, in an environment of its own). It asks a
# vulnerability service (PyPI's), so it is not part of CI; --strict fails when a package could not be
# checked, rather than reporting "no known vulnerabilities" for packages it never saw.
AUDIT_VENV := .venv-audit
audit:
	test -x $(AUDIT_VENV)/bin/pip-audit || ($(PYTHON) -m venv $(AUDIT_VENV) && $(AUDIT_VENV)/bin/pip install --quiet pip-audit==2.10.1)
	$(AUDIT_VENV)/bin/pip-audit --strict --no-deps --disable-pip --requirement requirements.lock

# Re-resolve the newest versions allowed by pyproject.toml and pin them (needs the registry).
lock:
	rm -rf /tmp/zhclip-lock && $(PYTHON) -m venv /tmp/zhclip-lock
	/tmp/zhclip-lock/bin/pip install --quiet --upgrade pip
	/tmp/zhclip-lock/bin/pip install --quiet torch==2.13.0 ".[test,docs]"
	( head -3 requirements.lock; /tmp/zhclip-lock/bin/pip freeze --exclude-editable \
	  | grep -v -i '^zhclip' | sed 's/^torch==\(.*\)+cpu/torch==\1/' ) > requirements.lock.new
	mv requirements.lock.new requirements.lock

clean-demo:
	rm -rf data models metrics plots reports mlflow.db mlruns ray_results kfp_local
