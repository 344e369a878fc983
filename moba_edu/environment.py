"""What this machine can run: versions, the device, and how the Triton notebooks (05-07) will run.

`describe()` returns a short report for notebook 00 and bug reports (`python -m moba_edu.environment`).
It never imports triton (importing it before `TRITON_INTERPRET` is set would fix the mode too early;
`moba_edu.kernels` is the one place that sets it), nor matplotlib or ipywidgets.
"""

from __future__ import annotations

import importlib.metadata
import platform

import torch

TRITON_ON_GPU = "gpu"
TRITON_INTERPRETED = "interpreter"
NO_TRITON = "none"


def triton_version() -> str | None:
    """The installed triton's version, read from its metadata without importing it; None if absent."""
    try:
        return importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return None


def triton_mode() -> str:
    """How the Triton kernels run here: TRITON_ON_GPU, TRITON_INTERPRETED (CPU) or NO_TRITON."""
    if triton_version() is None:
        return NO_TRITON
    return TRITON_ON_GPU if torch.cuda.is_available() else TRITON_INTERPRETED


def describe() -> str:
    """A few lines: python, torch and triton versions, the device, and what notebooks 05-07 will do."""
    lines = [
        f"python {platform.python_version()} on {platform.system()} {platform.machine()}",
        f"torch {torch.__version__}",
        f"triton {triton_version() or 'not installed'}",
    ]
    mode = triton_mode()
    if torch.cuda.is_available():
        lines.append(f"GPU: {torch.cuda.get_device_name()}")
    if mode == TRITON_ON_GPU:
        lines.append("Triton kernels run on the GPU")
    elif mode == TRITON_INTERPRETED:
        lines.append("CPU: Triton kernels run under the interpreter (slow, small shapes)")
    elif platform.system() == "Linux":
        lines.append("no Triton: `pip install triton` to run notebooks 05-07; they show stored outputs")
    else:
        lines.append(f"no Triton ({platform.system()}: Triton ships Linux wheels only): "
                     "notebooks 05-07 show stored outputs")
    return "\n".join(lines)


if __name__ == "__main__":
    print(describe())
