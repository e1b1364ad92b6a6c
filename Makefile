# Two commands do everything from a fresh clone: `make test` and `make demo`.
# Each builds its own virtual environment first (torch is pinned to the 2.13.0 CPU wheel).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
# Models and the sample scan come from the registry: the mirror directory when one exists
# (offline sites, CI), otherwise downloaded by URL and verified by SHA-256.
MESHNET_LESION_MIRROR ?= $(if $(wildcard ../shared/data),$(abspath ../shared/data),)
export MESHNET_LESION_MIRROR
DEMO_DIR ?= demo-output

.PHONY: test demo env clean

env: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[test,preview]"
	touch $@

test: env
	$(BIN)/python -m pytest

demo: env
	mkdir -p $(DEMO_DIR)
	$(BIN)/meshnet-lesion segment "$$($(BIN)/meshnet-lesion models fetch sample-arc-m2265-t2w)" \
	    -o $(DEMO_DIR)/M2265_lesion.nii.gz --report $(DEMO_DIR)/M2265_report.json \
	    --preview $(DEMO_DIR)/M2265_preview.png
	@echo "wrote $(DEMO_DIR)/M2265_lesion.nii.gz, M2265_report.json and M2265_preview.png"

clean:
	rm -rf $(VENV) $(DEMO_DIR)
