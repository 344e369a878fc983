"""Test settings: hypothesis profiles, the Triton interpreter on CPU, the gpu marker."""

import importlib.util
import os
import sys

import pytest
import torch
from hypothesis import HealthCheck, settings

# Triton reads TRITON_INTERPRET when it is first imported: set it before anything imports triton.
if not torch.cuda.is_available():
    assert "triton" not in sys.modules or os.environ.get("TRITON_INTERPRET") == "1", \
        "triton was imported before TRITON_INTERPRET=1 was set"
    os.environ.setdefault("TRITON_INTERPRET", "1")

# A GPU machine may have torch and triton but not the notebook and browser tooling (`python3 -m pytest
# -m gpu -p no:nbval tests` must still collect there): leave out the files that need what is missing.
# CI and `make test` install everything, and there a missing package is an error, not a skip.
NEEDS = {"test_browser.py": ("nbformat", "playwright"), "test_student_versions.py": ("nbformat", "nbgrader"),
         "test_nbgrader.py": ("nbformat", "nbgrader"), "test_hf.py": ("transformers",),
         "test_packaging.py": ("yaml",), "test_viz.py": ("ipywidgets",), "test_checks_nb04.py": ("ipywidgets",)}
collect_ignore = [] if os.environ.get("CI") else [
    name for name, modules in NEEDS.items() if any(importlib.util.find_spec(m) is None for m in modules)]

# ci: few, derandomized examples (interpreter tests are slow); dev: more; thorough: for a long run.
common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", max_examples=12, derandomize=True, print_blob=True, **common)
settings.register_profile("dev", max_examples=30, **common)
settings.register_profile("thorough", max_examples=300, **common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
