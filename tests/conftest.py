"""Test settings: hypothesis profiles, the Triton interpreter on CPU, the gpu marker."""

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
