"""disagg.block_table: the pool's persistent device block table follows allocation, adoption and freeing."""

import pytest
import torch

from disagg.attention import StepBatch
from disagg.block_table import BlockTable
from disagg.kv_pool import KVPool
from tests.util import DEVICE


def used(table: torch.Tensor, lengths: list[int]) -> list[list[int]]:
    """The page ids a gathered table holds for sequences of ``lengths`` pages (the rest is unspecified)."""
    return [row[:n] for row, n in zip(table.tolist(), lengths, strict=True)]


def test_rows_are_written_once_reused_and_grown():
    blocks = BlockTable(width=4, device=DEVICE, rows=2)
    blocks.add("a", [5, 1])
    blocks.add("b", [3])
    blocks.add("c", [7, 0, 2, 6])  # a third row: the table doubles, keeping a's and b's
    assert blocks.table.shape == (4, 4)
    blocks.set("a", 1, 4)
    blocks.remove("b")
    blocks.add("d", [9, 8])  # takes b's row; its stale entries past 2 pages are never read
    rows = torch.tensor(blocks.rows(["c", "a", "d"]), device=DEVICE)
    assert used(blocks.gather(rows), [4, 2, 2]) == [[7, 0, 2, 6], [5, 4], [9, 8]]
    out = torch.full((3, 4), -1, dtype=torch.int32, device=DEVICE)
    assert blocks.gather(rows, out=out) is out and used(out, [4, 2, 2]) == [[7, 0, 2, 6], [5, 4], [9, 8]]
    with pytest.raises(ValueError, match="do not fit"):
        blocks.add("e", [1] * 5)


def test_the_pool_keeps_its_table_in_step_with_its_pages():
    pool = KVPool(
        num_layers=1, num_kv_heads=1, head_dim=32, num_pages=12, page_size=4, dtype=torch.float32, device=DEVICE,
        max_seq_tokens=16, prefix_cache=True,
    )  # fmt: skip
    assert pool.blocks.width == 4
    pool.allocate("x", 8)
    pool.allocate("a", 13)
    pool.free("x")
    pool.allocate("b", 6)
    name = pool.page_hashes(list(range(4)))[0]
    pool.publish("a", 0, name)
    assert pool.adopt("b", 0, name)  # b's first page becomes a's (a swap of one entry)
    assert pool.pages("b")[0] == pool.pages("a")[0]
    batch = StepBatch.build(pool, decode=[("a", 12), ("b", 5)], chunks=[("b", 4, 6)])
    assert batch.decode_block_table.shape == (2, 4) and batch.chunk_block_table.shape == (1, 4)
    assert used(batch.decode_block_table, [4, 2]) == [pool.pages("a"), pool.pages("b")]
    assert used(batch.chunk_block_table, [2]) == [pool.pages("b")]
    assert batch.slots.tolist() == [
        pool.slot("a", 12),
        *pool.slots("b", 5, 6).tolist(),
        *pool.slots("b", 4, 6).tolist(),
    ]
    assert batch.decode_seq_lens.dtype == torch.int32 and batch.decode_seq_lens.tolist() == [13, 6]
    assert batch.cu_seqlens_q.tolist() == [0, 2] and batch.chunk_seq_lens.tolist() == [6]
    with pytest.raises(ValueError, match="longest sequence"):
        pool.allocate("c", 17)
