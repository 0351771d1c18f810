"""Input validation shared by the launchers: every check raises before any launch and names the argument.

Every tensor argument is first checked to be a ``torch.Tensor`` (TypeError naming it), before anything reads its
device, dtype or shape, so a list or None gives a TypeError, never an AttributeError.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from kernels import _runtime

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
HEAD_DIMS = tuple(range(32, 257, 16))
"""Head dims every kernel supports: every multiple of 16 from 32 to 256 (non-powers of two are padded inside the
kernels to the next power of two, with masked loads)."""
MAX_GRID_YZ = 65535
"""CUDA's limit on a launch grid's y and z dimensions."""
FP8_DTYPES = (torch.float8_e4m3fn,)


def is_tensor(name: str, t: object) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def tensor(name: str, t: object, ndim: int | None = None, dtypes: Iterable[torch.dtype] | None = None) -> None:
    """A tensor argument: a torch.Tensor, of one of ``dtypes``, with ``ndim`` dimensions, on the kernels' device."""
    is_tensor(name, t)
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            raise TypeError(f"{name} must have dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    _runtime.check_device(name, t)


def index_tensor(
    name: str,
    t: object,
    ndim: int,
    dtypes: Iterable[torch.dtype],
    *,
    like: torch.Tensor,
    strided: bool = False,
) -> None:
    """An index tensor argument (cu_seqlens, slot_mapping, block_table, seq_lens), checked in this order: a
    torch.Tensor (TypeError), its dtype (TypeError), its number of dimensions, its device (the kernels' device and
    ``like``'s, the data tensor it indexes), and its layout.

    Layout: a kernel either reads an index tensor through the strides its launcher passes (``strided=True``: any
    view is read correctly) or as dense memory (``strided=False``): then a non-contiguous view is refused, because
    the kernel would read the view's neighbours as indices (wrong results, or reads and writes out of bounds).
    Index tensors are small; ``.contiguous()`` makes an acceptable copy.
    """
    tensor(name, t, ndim, dtypes)
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but the tensors it indexes are on {like.device}")
    if not strided and not t.is_contiguous():
        raise ValueError(
            f"{name} must be contiguous (the kernel reads it as dense memory), got strides {t.stride()} for shape "
            f"{tuple(t.shape)}: pass {name}.contiguous()"
        )


def same_device(**tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        is_tensor(name, t)
    items = list(tensors.items())
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}")


def same_dtype(**tensors: torch.Tensor) -> None:
    items = list(tensors.items())
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.dtype != first.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {first_name} has {first.dtype}; they must match")


def head_dim(name: str, d: int, supported: Iterable[int]) -> None:
    supported = tuple(supported)
    if d not in supported:
        raise ValueError(f"{name} has head_dim {d}; supported head dims are {supported}")


def gqa(num_q_heads: int, num_kv_heads: int) -> None:
    if num_kv_heads < 1 or num_q_heads % num_kv_heads != 0:
        raise ValueError(f"num_q_heads ({num_q_heads}) must be a positive multiple of num_kv_heads ({num_kv_heads})")


def positive_finite(name: str, value: object) -> None:
    """A positive, finite Python number (not a bool): scales and caps; inf and nan would make every output NaN."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    try:
        as_float = float(value)
    except OverflowError:  # an int beyond float range
        as_float = math.inf
    if not (as_float > 0 and math.isfinite(as_float)):
        raise ValueError(f"{name} must be positive and finite, got {value!r:.40}")


def positive_float(name: str, value: float | None) -> None:
    """An optional scale: None (the default) or a positive finite number. softcap=inf is refused, not read as
    "no cap": None is the one way to say no cap."""
    if value is not None:
        positive_finite(name, value)


def window(value: int | None) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ValueError(f"window must be an int >= 1 or None, got {value!r}")


def sinks(t: object, num_q_heads: int, like: torch.Tensor) -> None:
    """The ``sinks=`` argument: None, or float32 (num_q_heads,) on ``like``'s device (one logit per query head)."""
    if t is None:
        return
    tensor("sinks", t, 1, (torch.float32,))
    if t.shape[0] != num_q_heads:
        raise ValueError(
            f"sinks must hold one float32 logit per query head ({num_q_heads}), got shape {tuple(t.shape)}"
        )
    if t.device != like.device:
        raise ValueError(f"sinks is on {t.device} but q is on {like.device}")


def cu_seqlens_values(name: str, cu: torch.Tensor, total: int) -> torch.Tensor:
    """Copy cu_seqlens to the host (a sync on CUDA), check its values (starts at 0, non-decreasing, ends at
    ``total``) and return the sequence lengths (int64, on the host)."""
    host = cu.cpu().long()
    if int(host[0]) != 0:
        raise ValueError(f"{name} must start at 0, got {int(host[0])}")
    lengths = host[1:] - host[:-1]
    if bool((lengths < 0).any()):
        raise ValueError(f"{name} must be non-decreasing, got {host.tolist()[:16]}")
    if int(host[-1]) != total:
        raise ValueError(f"{name} must end at the token count {total}, got {int(host[-1])}")
    return lengths
