"""Helpers shared by the test modules: devices, tolerances, random varlen batches."""

from __future__ import annotations

import torch

import kernels

DEVICE = "cpu" if kernels.INTERPRET else "cuda"
ON_CUDA = DEVICE == "cuda"

# ‖out − ref‖ / ‖ref‖ bounds. fp32 dots run as IEEE fp32 in our kernels (input_precision="ieee").
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative Frobenius error; NaN anywhere in ``out`` gives inf so that it always fails."""
    out = out.detach().double().cpu()
    ref = ref.detach().double().cpu()
    if not torch.isfinite(out[torch.isfinite(ref)]).all():
        return float("inf")
    finite = torch.isfinite(ref)
    if not torch.equal(torch.isfinite(out), finite) or not torch.equal(out[~finite], ref[~finite]):
        return float("inf")
    denom = ref[finite].norm().item()
    num = (out[finite] - ref[finite]).norm().item()
    return num / denom if denom > 0 else num


def cu_seqlens(lengths: list[int]) -> torch.Tensor:
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    return torch.tensor(offsets, dtype=torch.int32, device=DEVICE)


def randn(*shape: int, dtype: torch.dtype, generator: torch.Generator | None = None) -> torch.Tensor:
    """Fresh random values (never zeros), drawn on CPU for reproducibility, moved to the kernels' device."""
    return torch.randn(*shape, generator=generator, dtype=torch.float32).to(dtype).to(DEVICE)


class _LaunchTrap:
    def __getitem__(self, grid):
        raise AssertionError("kernel launched on invalid input")


def trap_launches(monkeypatch, module, *names: str) -> None:
    """Make every named kernel of ``module`` fail the test if launched: bad input must be refused before."""
    for name in names:
        monkeypatch.setattr(module, name, _LaunchTrap())


def replace_arg(args, i: int, value) -> list:
    """A copy of the argument list ``args`` with argument ``i`` replaced (for bad-input tables)."""
    args = list(args)
    args[i] = value
    return args


def randomize(model, seed):
    """Random weights for a transformers model: it initializes biases to 0, norms to 1 (and gpt-oss sinks to 0);
    random values everywhere make every term count."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.1 * noise if "norm" in name else noise * (1.0 if "embed" in name else 0.12))
