"""The device block table of a KV pool: every sequence's page ids, kept on the device and edited as pages move.

A step's kernels need the block table of its sequences on the device (int32, one row per sequence, column c holding
the page of tokens [c * page_size, (c + 1) * page_size)). Rebuilding it from Python lists each step costs host work
in proportion to the batch's pages and one host→device copy of all of them; instead the pool keeps one persistent
int32 (rows, width) tensor on the device, gives each sequence a row when it gets pages, and writes only what
changes: a sequence's pages once when allocated, one entry when a page is swapped for a cached one. A step then
gathers its rows on the device (:meth:`BlockTable.gather`) from row indices that travel with the step's metadata.

``width`` is the most pages a sequence can hold (the pool's longest sequence), so every gathered table has the
same width: what a captured CUDA graph needs. Entries past a sequence's own pages are unspecified (stale ids of a
row's earlier owner, or 0): the kernels stop at each sequence's length and never read them. Rows are added by
doubling when every row is taken, so a table built into a captured graph must be gathered outside the graph.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch


class BlockTable:
    """Page ids of the sequences holding pages, one row each, on ``device``; at most ``width`` pages a sequence."""

    def __init__(self, width: int, device: torch.device | str, rows: int = 8):
        self.width, self.device = width, torch.device(device)
        self.table = torch.zeros((rows, width), dtype=torch.int32, device=self.device)
        self._free_rows = list(range(rows - 1, -1, -1))  # a stack: low rows first
        self._rows: dict[Hashable, int] = {}

    def add(self, seq: Hashable, pages: Sequence[int]) -> None:
        """Give ``seq`` a row holding ``pages`` (one host→device copy)."""
        if len(pages) > self.width:
            raise ValueError(f"{len(pages)} pages do not fit a block table row of {self.width} pages")
        if not self._free_rows:
            self._grow()
        row = self._free_rows.pop()
        self._rows[seq] = row
        if pages:
            self.table[row, : len(pages)] = torch.tensor(pages, dtype=torch.int32)

    def set(self, seq: Hashable, index: int, page: int) -> None:
        """Make ``page`` the ``index``-th page of ``seq``."""
        self.table[self._rows[seq], index] = page

    def remove(self, seq: Hashable) -> None:
        """Release ``seq``'s row (nothing happens if it has none)."""
        row = self._rows.pop(seq, None)
        if row is not None:
            self._free_rows.append(row)

    def rows(self, seqs: Sequence[Hashable]) -> list[int]:
        """The row of each sequence, for :meth:`gather`."""
        return [self._rows[s] for s in seqs]

    def gather(self, rows: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """int32 (len(rows), width): the rows ``rows`` (int64 on the device) of the table, into ``out`` if given."""
        return torch.index_select(self.table, 0, rows, out=out)

    def _grow(self) -> None:
        old = self.table
        self.table = torch.zeros((2 * old.shape[0], self.width), dtype=torch.int32, device=self.device)
        self.table[: old.shape[0]] = old
        self._free_rows = list(range(self.table.shape[0] - 1, old.shape[0] - 1, -1))
