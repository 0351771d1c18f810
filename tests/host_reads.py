"""Counting host reads of tensor values made by the project's own code.

A host read is a call that needs a tensor's values on the host: ``.item()``, ``.cpu()``, ``.tolist()``,
``.numpy()``, and ``bool()`` / ``int()`` / ``float()`` / ``operator.index()`` of a tensor. On CUDA each one waits
for the device (a sync); on CPU it is free, but counting it there shows where the CUDA path would stall.

Only calls whose calling frame is a file of ``kernels/`` or ``disagg/`` count: Triton's interpreter copies kernel
arguments with the same methods, and that is not the project's doing. ``kernels/_interpreter_fixes.py`` is
excluded for the same reason (it is part of the interpreter's arithmetic, which does not exist on CUDA).
"""

from __future__ import annotations

import contextlib
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
PROJECT_DIRS = (str(ROOT / "kernels") + "/", str(ROOT / "disagg") + "/")
EXCLUDED = (str(ROOT / "kernels" / "_interpreter_fixes.py"),)
READS = ("item", "cpu", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__")


def _project_site(frame) -> str | None:
    name = frame.f_code.co_filename
    if name.startswith(PROJECT_DIRS) and name not in EXCLUDED:
        return f"{Path(name).relative_to(ROOT)}:{frame.f_lineno}"
    return None


@contextlib.contextmanager
def count_host_reads() -> Iterator[Counter]:
    """Within the block, count the project's host reads; yields a Counter keyed by ``(method, "file:line")``.

    Patches ``torch.Tensor`` for the block only (not thread-safe; tests run one at a time per process).
    """
    counts: Counter = Counter()
    saved = {name: torch.Tensor.__dict__.get(name) for name in READS}

    def counting(name: str, original):
        def read(self, *args, **kwargs):
            site = _project_site(sys._getframe(1))
            if site is not None:
                counts[(name, site)] += 1
            return original(self, *args, **kwargs)

        return read

    for name in READS:
        setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
    try:
        yield counts
    finally:
        for name, original in saved.items():
            if original is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, original)


def summary(counts: Counter) -> str:
    """One line per call site, most frequent first."""
    return "\n".join(f"{n:6d}  {method:9s} {site}" for (method, site), n in counts.most_common())
