# The two commands of the README: `make lab` and `make test`. Both create .venv when missing and
# reinstall only when pyproject.toml or constraints.txt changed, so a second run is quick.
# Teachers: `make assignments` (docs/teaching.md).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Where pip finds torch: on a laptop without a GPU, `make TORCH_INDEX=https://download.pytorch.org/whl/cpu test`
# takes the small CPU build instead of the multi-GB CUDA one.
TORCH_INDEX ?=
PIP_EXTRA := $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))
# Tests never see a GPU unless asked (`make test-gpu`): notebooks are stored as executed on a CPU.
CPU_ENV := CUDA_VISIBLE_DEVICES= HYPOTHESIS_PROFILE=$(if $(CI),ci,dev)

.PHONY: setup lab test test-fast test-gpu figures bench-cpu assignments assignments-check clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(PIP_EXTRA) -c constraints.txt -e ".[dev,hf,nbgrader]"
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

setup: $(STAMP)

# Headless-safe: no browser is opened, JupyterLab prints the URL (with its token) to open. It serves the
# whole repository (the README, figures/ and notes/ that notebooks cite) and opens on notebooks/.
lab: setup
	$(BIN)/jupyter lab --no-browser --ServerApp.root_dir=. --LabApp.default_url=/lab/tree/notebooks \
		$(if $(filter 0,$(shell id -u)),--allow-root)

# One thread per test process (two pytest workers, each with its notebook kernels, on two cores): torch's
# OpenMP threads spin while they wait, so two processes of two threads each slowed training cells ~10x.
TEST_ENV := $(CPU_ENV) OMP_NUM_THREADS=1

test: setup
	$(TEST_ENV) $(BIN)/python -m pytest -n 2 --dist loadfile --nbval --nbval-sanitize-with tests/nbval_sanitize.cfg

test-fast: setup
	$(TEST_ENV) $(BIN)/python -m pytest -n 2 --dist loadfile -m "not browser" tests

test-gpu:
	python3 -m pytest -m gpu -p no:nbval tests

figures: setup
	CUDA_VISIBLE_DEVICES= $(BIN)/python -m moba_edu.figures

# Re-measure the CPU suites (all, or `make bench-cpu ONLY=explorer`: suites or "suite/point" patterns).
bench-cpu: setup
	CUDA_VISIBLE_DEVICES= $(BIN)/python -m moba_edu.bench --cpu $(if $(ONLY),--only $(ONLY))

# The student versions, made by nbgrader's generate_assignment: course/release/A1, A2, A3.
assignments: setup
	$(BIN)/python course/moba_course.py

# Autograde every notebook as a full-marks, an untouched and a one-mistake student (CI grades a subset).
assignments-check: setup
	$(CPU_ENV) MOBA_EDU_GRADE_ALL=1 $(BIN)/python -m pytest -p no:nbval tests/test_nbgrader.py tests/test_student_versions.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
