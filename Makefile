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
# The performance benchmark also needs MONAI (the paper's baselines) and brainchop-cli 0.2.5 in a
# venv of its own (tinygrad; its CPU backend compiles kernels with clang).
BRAINCHOP_VENV ?= .venv-brainchop

.PHONY: test test-quality test-slicer demo env bench quality fuzz synthetic-models distill-students ship-students clean

env: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[test,preview]"
	touch $@

test: env
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -m "not quality and not slicer_env"

# A stock Slicer 5.8 Python (a fresh venv with only Slicer's bundled packages and slicer-core, a PythonSlicer
# launcher that behaves as CTK's AppLauncher, the PyTorch extension standing in with the local torch wheel): the
# module's own installer installs Resources/requirements.txt, then the default model runs through the launcher.
# A few minutes; CI runs it after make test.
test-slicer: env
	$(BIN)/python -m pytest -m slicer_env

# The long suite: the acceptance bars on the real ARC scan that make test leaves out (the robustness cases but
# the skull-stripped one, the mirrored-hemisphere scan, the default against the replication's three
# restarts, the shipped students against their teacher and on the mirrored hemisphere); 8.5 minutes on 2 CPU
# cores (README).
test-quality: env
	$(BIN)/python -m pytest -m quality

demo: env
	mkdir -p $(DEMO_DIR)
	$(BIN)/meshnet-lesion segment "$$($(BIN)/meshnet-lesion models fetch sample-arc-m2265-t2w)" \
	    -o $(DEMO_DIR)/M2265_lesion.nii.gz --report $(DEMO_DIR)/M2265_report.json \
	    --preview $(DEMO_DIR)/M2265_preview.png
	@echo "wrote $(DEMO_DIR)/M2265_lesion.nii.gz, M2265_report.json and M2265_preview.png"

bench: $(VENV)/.bench $(BRAINCHOP_VENV)/.installed
	$(BIN)/python lab/benchmarks/performance.py
	$(BIN)/python lab/benchmarks/brain_mask.py --margins 32 16 8
	$(BIN)/python lab/benchmarks/cohort.py

# The readers of untrusted files under a long fuzz run (make test runs 40 inputs per reader).
fuzz: env
	MESHNET_FUZZ_EXAMPLES=5000 $(BIN)/python -m pytest -s -q MeshNetLesion/Testing/Python/test_fuzz.py

# Robustness and agreement of the lesion models on the real ARC scan (about an hour on 2 CPU cores):
# prints the table the README quotes and writes lab/benchmarks/results/quality.json.
quality: env
	$(BIN)/python lab/benchmarks/quality.py

# Renders the synthetic data (lab/training/.work), trains MeshNet-5/16/26 into meshnet_lesion/weights,
# writes their registry entries and model cards with the measured metrics, and prints the held-out
# figures. Review the result before committing weights: on 2 CPU cores the runs are far too short.
synthetic-models: env
	$(BIN)/python lab/training/synthetic_models.py

# Distils the paper's MeshNet-16 and MeshNet-5 from the arc-meshnet26 ensemble on crops of M2265: the
# teacher sees the clean scan, the student a degraded one (turned, skull-stripped, thick slices,
# intensities), a third of the crops with a training-split SOOP lesion painted in as ground truth.
# Resumable: each run writes its state to lab/training/runs/*.state every 25 steps; run it again (any
# machine) to continue. Commit the state of an unfinished run; remove it once the run is shipped or
# abandoned (docs/students.md: which commit holds each earlier run). To check a run halfway, its command
# with `--session-steps 0 --unfinished -o DIR/ID.safetensors` writes the student so far (training
# nothing); `meshnet-lesion models import DIR` (with `--tile CROP` for a student that runs on tiles).
DISTILL = $(BIN)/meshnet-lesion train "$$($(BIN)/meshnet-lesion models fetch sample-arc-m2265-t2w)" \
	--teacher arc-meshnet26 --steps 2000 --save-every 25 --teacher-cache lab/training/.work/teacher \
	--lesions $(MESHNET_LESION_MIRROR)/lesions/soop
# MeshNet-16 on 96³ crops, run on 96³ tiles as shipped (docs/students.md: on the whole grid its
# 93-voxel receptive field sees more context than any crop, and the 64³ run, shipped before, called false
# lesion there). Then MeshNet-5 (64³ crops) is fine-tuned (400 steps, lr 5e-4) with 8 label-head renderings
# (t1_crop drawn as T2; half lesion-free) making half the crops, their own truth the target: the teacher
# calls false lesion there. (The same for the 64³ MeshNet-16 made its mirrored-hemisphere false lesion worse.)
RENDERED = --steps 400 --lr 5e-4 --label-head $(MESHNET_LESION_MIRROR)/mri/t1_crop.nii.gz --renderings 8
distill-students: env
	$(DISTILL) --channels 16 --lr 1e-3 --crop 96 -o lab/training/runs/meshnet16-arc26-crop96.safetensors \
	    --state lab/training/runs/meshnet16-arc26-crop96.state
	$(DISTILL) --channels 5 --lr 2e-3 --crop 64 -o lab/training/runs/meshnet5-arc26.safetensors --state lab/training/runs/meshnet5-arc26.state
	$(DISTILL) --channels 5 --crop 64 $(RENDERED) --init lab/training/runs/meshnet5-arc26.safetensors \
	    -o lab/training/runs/meshnet5-arc26-rendered.safetensors --state lab/training/runs/meshnet5-arc26-rendered.state

# The finished students into meshnet_lesion/weights/ and models.json; then the suite's robustness part
# with their teacher in the same run, and their cards again with its figures. Review before committing.
# MeshNet-16 ships from the 96³ run (ID=RUN), on tiles of its crop.
STUDENTS = meshnet16-arc26,meshnet5-arc26
SHIP = lab/training/ship_students.py --students meshnet16-arc26=meshnet16-arc26-crop96,meshnet5-arc26 --tiled meshnet16-arc26
ship-students: env
	$(BIN)/python $(SHIP)
	$(BIN)/python lab/benchmarks/quality.py --models arc-meshnet26,$(STUDENTS) --part robustness \
	    --report lab/benchmarks/results/quality-students.json
	$(BIN)/python $(SHIP) --quality lab/benchmarks/results/quality-students.json

$(VENV)/.bench: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e ".[test,preview,bench]"
	touch $@

$(BRAINCHOP_VENV)/.installed:
	@command -v clang >/dev/null || echo "warning: no clang; brainchop will be skipped (apt-get install clang)"
	$(PYTHON) -m venv $(BRAINCHOP_VENV)
	$(BRAINCHOP_VENV)/bin/python -m pip install --quiet brainchop==0.2.5
	touch $@

clean:
	rm -rf $(VENV) $(BRAINCHOP_VENV) $(DEMO_DIR) lab/benchmarks/.work lab/training/.work
