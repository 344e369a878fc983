"""Rung 3: MoBA in Triton.

Without CUDA the kernels run under Triton's interpreter, which Triton reads from TRITON_INTERPRET when
it is first imported: this is the one place in the package that sets it, so import triton through
`moba_edu.kernels` (its submodules) on a CPU-only machine.
"""

import os
import sys
import warnings

import torch

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    if "triton" in sys.modules:
        warnings.warn("triton was imported before moba_edu.kernels and no CUDA device is present: "
                      "set TRITON_INTERPRET=1 before importing triton to run the kernels on the CPU")
    os.environ["TRITON_INTERPRET"] = "1"

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
