"""Small Triton kernels used by test_interpreter_numerics (they must live in a .py file to be decorated)."""

import triton
import triton.language as tl


@triton.jit
def bf16_ops(x_ptr, y_ptr, out_ptr, rows_ptr, N: tl.constexpr):
    i = tl.arange(0, N)
    idx = i[:, None] * N + i[None, :]
    x = tl.load(x_ptr + idx)
    y = tl.load(y_ptr + idx)
    w = tl.maximum(x * y + x - y, -y)  # bf16 arithmetic, each op rounded to bf16
    acc = tl.dot(x, y)
    tl.store(out_ptr + idx, (acc + w.to(tl.float32)).to(tl.bfloat16))
    tl.store(rows_ptr + i, tl.max(w, 1).to(tl.float32) + tl.min(w, 1).to(tl.float32))


@triton.jit
def to_fp8(x_ptr, out_ptr, back_ptr, N: tl.constexpr):
    i = tl.arange(0, N)
    f8 = tl.load(x_ptr + i).to(tl.float8e4nv)
    tl.store(out_ptr + i, f8)
    tl.store(back_ptr + i, f8.to(tl.float32))
