"""Four small Triton kernels that teach the programming model (notebook 05), in the order of the
Triton tutorials: vector add, row softmax, tiled matmul, online softmax.

The model in one paragraph: a kernel is launched on a *grid* of programs; each program runs the same
code on one *block* (tile) of the data, chosen by `tl.program_id`. A program never sees single
elements: `tl.arange(0, BLOCK)` is a vector of offsets, `ptr + offsets` a vector of addresses, and
`tl.load` / `tl.store` move whole tiles between memory and registers. Where a tile hangs past the end
of the data (a ragged tail), a boolean *mask* turns the out-of-bounds lanes off: masked loads return
`other` instead of reading memory, masked stores write nothing. Tensors are passed as pointers to their
first element plus *strides* (how many elements to step per index), so views work without copies.

Each kernel has a small Python launcher that allocates the output, picks the grid and calls it.
Without CUDA they run under Triton's interpreter (moba_edu.kernels sets TRITON_INTERPRET=1), one
program at a time: keep shapes small there.
"""

import torch
import triton
import triton.language as tl


# --- 1. vector add: one program per BLOCK elements, a mask for the tail ------------------------------

@triton.jit
def add_kernel(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0)                   # which tile this program owns
    offsets = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n                       # the last tile may hang past n: turn those lanes off
    x = tl.load(x_ptr + offsets, mask=mask)
    y = tl.load(y_ptr + offsets, mask=mask)
    tl.store(out_ptr + offsets, x + y, mask=mask)


def add(x: torch.Tensor, y: torch.Tensor, block: int = 64) -> torch.Tensor:
    """x + y for 1-D contiguous tensors x, y: [n] -> [n]."""
    out = torch.empty_like(x)
    n = x.numel()
    add_kernel[(triton.cdiv(n, block),)](x, y, out, n, BLOCK=block)
    return out


# --- 2. row softmax: one program per row, the whole row in one tile ----------------------------------

@triton.jit
def softmax_kernel(x_ptr, out_ptr, n_cols, stride_x, stride_out, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)               # BLOCK is a power of two >= n_cols
    mask = cols < n_cols
    # Padding lanes read -inf: exp(-inf) = 0, so they add nothing to the sum and never win the max.
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=-float("inf")).to(tl.float32)
    x = x - tl.max(x, axis=0)                # subtract the row max: exp never overflows
    numerator = tl.exp(x)
    out = numerator / tl.sum(numerator, axis=0)
    tl.store(out_ptr + row * stride_out + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def softmax(x: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim of x [M, N] (rows may be strided; columns contiguous) -> [M, N]."""
    assert x.stride(1) == 1, "columns must be contiguous"
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    M, N = x.shape
    softmax_kernel[(M,)](x, out, N, x.stride(0), out.stride(0), BLOCK=triton.next_power_of_2(N))
    return out


# --- 3. tiled matmul: one program per output tile, a loop over the shared dimension -----------------

@triton.jit
def matmul_kernel(a_ptr, b_ptr, c_ptr, M, N, K,
                  stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    # 2-D tiles of addresses by broadcasting: [BLOCK_M, 1] rows against [1, BLOCK_K] columns.
    a_ptrs = a_ptr + rows[:, None] * stride_am + ks[None, :] * stride_ak
    b_ptrs = b_ptr + ks[:, None] * stride_bk + cols[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)   # accumulate in float32 whatever the inputs
    for k0 in range(0, K, BLOCK_K):
        # Zeros in the padding lanes of the K tail add nothing to the dot products.
        a = tl.load(a_ptrs, mask=(rows[:, None] < M) & (ks[None, :] + k0 < K), other=0.0)
        b = tl.load(b_ptrs, mask=(ks[:, None] + k0 < K) & (cols[None, :] < N), other=0.0)
        acc = tl.dot(a, b, acc)              # the tensor-core step on a GPU (tiles >= 16)
        a_ptrs += BLOCK_K * stride_ak        # slide both tiles along K
        b_ptrs += BLOCK_K * stride_bk
    c_ptrs = c_ptr + rows[:, None] * stride_cm + cols[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(rows[:, None] < M) & (cols[None, :] < N))


def matmul(a: torch.Tensor, b: torch.Tensor, block_m: int = 32, block_n: int = 32, block_k: int = 16) -> torch.Tensor:
    """a [M, K] @ b [K, N] -> c [M, N] (any strides). float32 inputs use TF32 on a GPU."""
    M, K = a.shape
    N = b.shape[1]
    c = torch.empty(M, N, dtype=a.dtype, device=a.device)
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    matmul_kernel[grid](a, b, c, M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
                        c.stride(0), c.stride(1), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return c


# --- 4. online softmax: a row longer than one tile, max and sum in one sweep -------------------------

@triton.jit
def online_softmax_kernel(x_ptr, out_ptr, lse_ptr, n_cols, stride_x, stride_out, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    x_row = x_ptr + row * stride_x
    # Running max m and running sum l = sum_j exp(x_j - m) over the columns seen so far
    # (Milakov & Gimelshein, 2018, "Online normalizer calculation for softmax").
    m = -float("inf")
    l = 0.0
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(x_row + cols, mask=cols < n_cols, other=-float("inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        # The old sum was taken relative to m: rescale it by exp(m - m_new) before adding the new tile.
        l = l * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    # Second sweep: with the final m and l every probability is exp(x - m) / l.
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(x_row + cols, mask=cols < n_cols, other=-float("inf")).to(tl.float32)
        out = tl.exp(x - m) / l
        tl.store(out_ptr + row * stride_out + cols, out.to(out_ptr.dtype.element_ty), mask=cols < n_cols)
    tl.store(lse_ptr + row, m + tl.log(l))   # log-sum-exp of the row: FlashAttention saves this


def online_softmax(x: torch.Tensor, block: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the last dim of x [M, N], reading each row `block` columns at a time.

    Returns the probabilities [M, N] (dtype of x) and the row log-sum-exp [M] (float32).
    """
    assert x.stride(1) == 1, "columns must be contiguous"
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    lse = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    online_softmax_kernel[(x.shape[0],)](x, out, lse, x.shape[1], x.stride(0), out.stride(0), BLOCK=block)
    return out, lse
