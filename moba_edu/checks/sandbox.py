"""Run a student's Triton code safely: a wrong address becomes a one-line `Mistake`, never a dead kernel.

Under Triton's interpreter a load or store is a raw memory access: an address past a tensor reads
garbage or corrupts the Python heap, and the Jupyter kernel dies. `run` therefore checks every active
lane's address before the interpreter touches memory, against the tensors the launched kernel was
given (by argument name), and stops at the first bad one with a sentence the check chose for it
("you stored at out_ptr + offsets: one value per program goes to out_ptr + pid").

On a GPU no such check is possible, so output tensors live inside larger *guarded* buffers
(`guarded`): guard zones on both sides hold a sentinel, and a store into them is found after the
launch. A load past an input returns the sentinel of its guard, which the check sees in the result.
An address far outside every buffer makes CUDA fail with an illegal address: reported in one line too
(the CUDA context is then unusable; the notebook must be restarted).

Usage (a check):
    out, check_guards = guarded((n,), torch.float32, device)
    run(lambda: kernel[grid](x, out, n, BLOCK=16), hints={("store", "out_ptr"): "...", ("load", "x_ptr"): "..."},
        what="tile_max_kernel")
    check_guards("you stored past the output: ...")
"""

from __future__ import annotations

import contextlib
import inspect
import sys

import numpy as np
import torch

from . import Mistake
from .grading import refuse_library_kernel

GUARD = 256  # elements on each side of a guarded buffer: more than one tile of any exercise


class OutOfBounds(Exception):
    """A load or store of an active lane outside every tensor the kernel was given."""

    def __init__(self, kind: str, name: str, offset: int, size: int):
        super().__init__(f"{kind} at element {offset} of {name} ({size} elements)")
        self.kind, self.name, self.offset, self.size = kind, name, offset, size


def _extent(t: torch.Tensor) -> tuple[int, int]:
    """[lo, hi) byte addresses a tensor (any strides) may touch."""
    if t.numel() == 0:
        return t.data_ptr(), t.data_ptr()
    last = sum((n - 1) * s for n, s in zip(t.shape, t.stride()) if n > 0)
    return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()


@contextlib.contextmanager
def _checked_interpreter():
    """While active, interpreted kernels record their tensor arguments and every masked load / store is
    checked against them (raising OutOfBounds before memory is touched)."""
    from triton.runtime import interpreter

    builder, cls = interpreter.interpreter_builder, interpreter.GridExecutor
    ranges: dict[str, tuple[int, int, int]] = {}
    original_args = cls._init_args_hst
    original_load, original_store = builder.create_masked_load, builder.create_masked_store

    def init_args(self, args_dev, kwargs):
        args_hst, kwargs_hst = original_args(self, args_dev, kwargs)
        ranges.clear()
        for name, value in inspect.getcallargs(self.fn, *args_hst, **kwargs_hst).items():
            if isinstance(value, torch.Tensor):
                ranges[name] = (*_extent(value), value.element_size())
        return args_hst, kwargs_hst

    def check(kind, ptrs, mask):
        addresses = np.broadcast_to(ptrs.data, mask.data.shape)[mask.data.astype(bool)].astype(np.int64)
        inside = np.zeros(addresses.shape, dtype=bool)
        for lo, hi, _ in ranges.values():
            inside |= (addresses >= lo) & (addresses < hi)
        if not inside.all():
            address = int(addresses[~inside][0])
            name, (lo, hi, size) = min(ranges.items(), key=lambda item: min(
                abs(address - item[1][0]), abs(address - item[1][1])))
            raise OutOfBounds(kind, name, (address - lo) // size, (hi - lo) // size)

    def load(ptrs, mask, other, cache_policy, is_volatile):
        check("load", ptrs, mask)
        return original_load(ptrs, mask, other, cache_policy, is_volatile)

    def store(ptrs, value, mask, cache_policy):
        check("store", ptrs, mask)
        return original_store(ptrs, value, mask, cache_policy)

    cls._init_args_hst, builder.create_masked_load, builder.create_masked_store = init_args, load, store
    try:
        yield
    finally:
        cls._init_args_hst = original_args
        del builder.create_masked_load, builder.create_masked_store   # back to the class's methods


def _causes(err: BaseException):
    while err is not None:
        yield err
        err = err.__cause__ or err.__context__


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[-1] if text else type(err).__name__


def run(launch, hints: dict, what: str) -> None:
    """Call `launch()` (it launches the student's kernel, or a kernel built from the student's pieces).

    hints: {("load" | "store", argument name): one-line message}: said when an active lane loads or stores
    outside every tensor and nearest that argument's (interpreter only); {"load" | "store": message}: for
    any argument (memory layout makes "nearest" a guess); a missing entry gets a generic sentence. `what`
    names the student's code in messages. A NotImplementedError raised in the student's code comes out
    as itself (the unanswered exercise); anything else Triton raises becomes a one-line Mistake.
    While grading, the caller (a check) must not have been handed the library's own kernel piece
    (`grading.refuse_library_kernel`).
    """
    from ..kernels import INTERPRET

    refuse_library_kernel(sys._getframe(1))

    try:
        with _checked_interpreter() if INTERPRET else contextlib.nullcontext():
            launch()
        if not INTERPRET:
            torch.cuda.synchronize()
    except Exception as err:  # noqa: BLE001 (Triton wraps what the kernel raised in its own errors)
        causes = list(_causes(err))
        if any(isinstance(c, NotImplementedError) for c in causes) or "NotImplementedError" in str(err):
            raise NotImplementedError(f"{what} is not written yet") from None
        bad = next((c for c in causes if isinstance(c, OutOfBounds)), None)
        if bad is not None:
            raise Mistake(hints.get((bad.kind, bad.name)) or hints.get(bad.kind) or f"{what}: a {bad.kind} outside "
                          f"every tensor, nearest {bad.name} (element "
                          f"{bad.offset} of {bad.size}): check its offsets and mask") from None
        if "illegal memory access" in str(err) or "illegal address" in str(err):
            raise Mistake(f"{what} loaded or stored far outside its tensors (CUDA: illegal memory access); "
                          "restart the kernel, then check offsets and masks") from None
        raise Mistake(f"{what} failed inside Triton: {_first_line(err)}") from None


def guarded(shape, dtype, device, fill=float("nan")):
    """An output tensor inside a larger buffer whose guard zones hold `fill` (also the tensor's start).

    Returns (view, check_guards): check_guards(message) raises Mistake(message) if a guard changed."""
    n = 1
    for size in shape:
        n *= size
    memory = torch.full((n + 2 * GUARD,), fill, dtype=dtype, device=device)
    view = memory[GUARD:GUARD + n].view(shape)

    def check_guards(message: str) -> None:
        guards = torch.cat([memory[:GUARD], memory[GUARD + n:]])
        same = guards.isnan().all() if fill != fill else (guards == fill).all()
        if not bool(same):
            raise Mistake(message)

    return view, check_guards


def device() -> str:
    """Where exercise kernels run: the GPU when there is one, else the CPU (under the interpreter)."""
    from ..kernels import INTERPRET

    return "cpu" if INTERPRET else "cuda"
