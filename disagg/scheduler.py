"""The scheduler: the one place that decides what a step carries, for every stage of both deployments.

A :class:`Scheduler` holds sequences waiting for pages and sequences running, over one :class:`KVPool`, and each
:meth:`Scheduler.schedule` returns a :class:`Step`:

1. prompt chunks of running sequences whose prompts are not done, oldest first, while the step's prompt-token
   budget (``max_batch_tokens``, None: no limit) lasts: a prompt longer than the budget is prefilled over several
   steps, each chunk attending to the pages its earlier chunks wrote;
2. then waiting sequences are admitted in arrival order (the head of the queue waits for pages, so it is never
   starved) while the batch has room (``max_batch_size``) and, for those that compute their prompt, budget is left.
   Admission allocates every page the sequence will hold over its life (``Sequence.reserve`` tokens), so a running
   sequence never runs out of pages and nothing is ever preempted. Its first pages come from the prefix cache when
   the pool has the leading pages of its prompt (at least one prompt token is always computed, for the first
   token's logits), and a chunk starting on a page boundary first adopts pages another sequence has cached since;
3. with ``decode=True``, every running sequence whose prompt is done contributes one decode row.

The stages configure it: the prefill stage (chunks only; a sequence leaves when its first token is sampled), the
decode stage (decode rows only; sequences arrive with their prompt's K/V in an export, imported at admission) and
the colocated deployment (both kinds in one step). Work per step is O(batch + pages of the batch), never
O(pages of the pool).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from disagg.errors import PoolFullError, RequestError
from disagg.export import KVExport
from disagg.kv_pool import KVPool
from disagg.request import RequestOutput, SamplingParams


def reserved_tokens(num_tokens: int, max_new_tokens: int, context: int) -> int:
    """Tokens of KV a generating request holds over its whole life: its prompt and every generated token but the
    last (which is never fed back), at most the model's ``context``."""
    return min(num_tokens + max_new_tokens - 1, context)


@dataclass(eq=False)
class Sequence:
    """A request inside a stage. ``num_computed`` tokens (prompt first, then fed-back outputs) have K/V in the
    pool; ``hashes`` names its full pages (see :mod:`disagg.prefix_cache`)."""

    key: int
    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams
    reserve: int  # tokens of KV it holds over its life
    arrival: float  # perf_counter when it reached the stage
    export: KVExport | None = None  # decode stage: the prompt's K/V, imported at admission instead of computed
    holds_pages: bool = False  # allocated before admission (DecodeStage.reserve)
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0
    cached_tokens: int = 0  # prompt tokens whose pages came from the prefix cache
    hashes: list[bytes] = field(default_factory=list)
    first_token_time: float | None = None
    ttft_s: float | None = None

    @property
    def prompt_done(self) -> bool:
        return self.num_computed >= len(self.prompt_ids)


@dataclass
class Step:
    """What one model forward carries: one decode row per sequence in ``decode`` (its last output token, at
    position ``num_computed``), then prompt tokens [start, end) of each chunk."""

    decode: list[Sequence]
    chunks: list[tuple[Sequence, int, int]]

    def __bool__(self) -> bool:
        return bool(self.decode or self.chunks)


class Scheduler:
    """Decides each step's rows (see the module docstring). ``on_import(seq, shared_pages)`` loads an admitted
    sequence's export into its pages (the first ``shared_pages`` came from the prefix cache)."""

    def __init__(
        self,
        pool: KVPool,
        *,
        max_batch_tokens: int | None,
        max_batch_size: int | None,
        decode: bool,
        on_import: Callable[[Sequence, int], None] | None = None,
    ):
        self.pool, self.max_batch_tokens, self.max_batch_size, self.decode = (
            pool,
            max_batch_tokens,
            max_batch_size,
            decode,
        )
        self.on_import = on_import
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        """Queue ``seq``, naming its prompt's full pages now (O(prompt), once) when the pool caches prefixes."""
        if self.pool.prefix_cache is not None and not seq.hashes:
            self.pool.page_hashes(seq.prompt_ids, seq.hashes)
        self.waiting.append(seq)

    def schedule(self) -> Step:
        budget = self.max_batch_tokens if self.max_batch_tokens is not None else math.inf
        step = Step([], [])
        for seq in self.running:
            if not seq.prompt_done and budget > 0:
                budget -= self._chunk(seq, budget, step)
        while self.waiting and (self.max_batch_size is None or len(self.running) < self.max_batch_size):
            seq = self.waiting[0]
            computes = seq.export is None
            if computes and budget <= 0:
                break
            shared = 0
            if not seq.holds_pages:
                page = self.pool.page_size
                usable = (len(seq.prompt_ids) - 1) // page if computes else len(seq.prompt_ids) // page
                try:
                    shared = self.pool.allocate(seq.key, seq.reserve, seq.hashes[:usable])
                except PoolFullError:
                    break
                seq.holds_pages = True
            self.running.append(self.waiting.popleft())
            if computes:
                seq.num_computed = seq.cached_tokens = shared * self.pool.page_size
                budget -= self._chunk(seq, budget, step)
            else:
                self.on_import(seq, shared)
        if self.decode:
            step.decode = [s for s in self.running if s.prompt_done]
        return step

    def _chunk(self, seq: Sequence, budget: float, step: Step) -> int:
        """Add seq's next prompt chunk to ``step``; returns its tokens."""
        page, pool = self.pool.page_size, self.pool
        usable = min((len(seq.prompt_ids) - 1) // page, len(seq.hashes))
        # pages another sequence finished since this one was admitted (a shared prefix arriving together)
        while seq.num_computed % page == 0 and seq.num_computed // page < usable:
            if not pool.adopt(seq.key, seq.num_computed // page, seq.hashes[seq.num_computed // page]):
                break
            seq.num_computed += page
            seq.cached_tokens += page
        n = int(min(len(seq.prompt_ids) - seq.num_computed, budget))
        step.chunks.append((seq, seq.num_computed, seq.num_computed + n))
        return n

    def publish(self, seq: Sequence, start: int, end: int) -> None:
        """Name the pages of ``seq`` that tokens [start, end), just written, completed (prompt or outputs)."""
        if self.pool.prefix_cache is None:
            return
        page = self.pool.page_size
        if end // page > len(seq.hashes):
            tokens = seq.prompt_ids + seq.output_ids
            self.pool.page_hashes(tokens[: (end // page) * page], seq.hashes)
        for index in range(start // page, end // page):
            self.pool.publish(seq.key, index, seq.hashes[index])

    def retire(self, seqs: list[Sequence], context: int) -> list[RequestOutput]:
        """Of generating ``seqs`` that just got a token, remove those that are finished (caching the full pages
        of their generated tokens for a later turn) and return their outputs."""
        done = []
        for seq in seqs:
            reason = finish_reason(seq, context)
            if reason is not None:
                self.publish(seq, len(seq.prompt_ids), seq.num_computed)
                self.remove(seq)
                done.append(to_output(seq, reason, time.perf_counter()))
        return done

    def check_fits(self, request_id: str, tokens: int, pool_name: str) -> None:
        """RequestError when ``tokens`` of KV are more than the whole pool (called ``pool_name`` in the message)
        holds: the request could never run."""
        if self.pool.pages_for(tokens) > self.pool.num_pages:
            raise RequestError(
                f"request {request_id}: prompt + max_new_tokens need {tokens} tokens of KV, more than the "
                f"{pool_name} holds ({self.pool.capacity})"
            )

    def remove(self, seq: Sequence) -> None:
        """Take ``seq`` out (finished or aborted) and release its pages; pages it completed stay cached."""
        if seq in self.waiting:
            self.waiting.remove(seq)
        else:
            self.running.remove(seq)
        self.pool.free(seq.key)

    def find(self, request_id: str) -> Sequence | None:
        return next((s for s in [*self.waiting, *self.running] if s.request_id == request_id), None)

    def clear(self) -> None:
        """Drop every sequence, releasing all their pages."""
        for seq in [*self.waiting, *self.running]:
            self.pool.free(seq.key)
        self.waiting.clear()
        self.running.clear()


def finish_reason(seq: Sequence, context: int) -> str | None:
    """Why a generating sequence stops after its latest token ("eos", "length"), or None if it goes on."""
    params = seq.sampling
    if seq.output_ids[-1] in (params.eos_token_ids or ()):
        return "eos"
    if len(seq.output_ids) >= params.max_new_tokens or len(seq.prompt_ids) + len(seq.output_ids) > context:
        return "length"
    return None


def to_output(seq: Sequence, reason: str, now: float) -> RequestOutput:
    """``seq``'s result, finished at ``now`` (perf_counter) for ``reason``."""
    n = len(seq.output_ids)
    done = n > 1 and reason != "aborted" and seq.first_token_time is not None
    return RequestOutput(
        request_id=seq.request_id,
        prompt_ids=list(seq.prompt_ids),
        output_ids=list(seq.output_ids),
        finish_reason=reason,
        ttft_s=seq.ttft_s,
        tpot_s=(now - seq.first_token_time) / (n - 1) if done else None,
        cached_tokens=seq.cached_tokens,
    )
