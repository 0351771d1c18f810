"""One serving instance while the simulation runs: its KV pages, its queues, its decode batch, its current step.

Roles: ``FIRST`` and ``CHUNKED`` (colocated, prefill-prioritised or chunked prefill), ``PREFILL`` and ``DECODE``
(disaggregated). The engine asks ``plan`` for the next step's duration whenever the instance is idle or has
finished a step, and ``complete`` when that step ends.

The decode batch is kept as aggregates, never iterated token by token: the number of running sequences, the sum
of their contexts (each step adds one token to every one), and a heap of the step count at which each finishes.
Consecutive decode-only steps of an unchanged batch are one event (a *run*), their times summed in closed form
(``StepCost.decode_run``): a run lasts until the next request finishes, or is ``cut`` at the first step boundary
after new work arrives. So the simulator's cost grows with the number of requests, not of tokens, and the result
is the same as stepping one token at a time.

Memory: a request's KV pages are reserved whole when it is admitted (colocated: prompt + output; prefill instance:
the prompt, until its KV has been sent; decode instance: prompt + output, before the transfer starts), so a running
request never waits for memory and nothing is ever preempted. A request is admitted in arrival order: when the
head of the queue does not fit, the ones behind it wait too.
"""

from __future__ import annotations

import heapq
import math
from collections import deque

from disagg.sim.costs import StepCost

FIRST, CHUNKED, PREFILL, DECODE = "prefill-first", "chunked", "prefill", "decode"


class Instance:
    __slots__ = (
        "budget",
        "busy",
        "busy_time",
        "capacity",
        "cost",
        "ctx_sum",
        "decode_tokens",
        "finishing",
        "free",
        "idx",
        "joining",
        "link_free",
        "max_batch",
        "min_free",
        "output",
        "page_size",
        "prefill_tokens",
        "prefilling",
        "progress",
        "prompt",
        "role",
        "run_first",
        "run_growth",
        "run_start",
        "run_steps",
        "running",
        "step_chunks",
        "step_decode",
        "steps",
        "steps_done",
        "version",
        "waiting",
    )

    def __init__(
        self,
        idx: int,
        role: str,
        cost: StepCost,
        capacity_pages: int,
        page_size: int,
        max_batch: int,
        token_budget: int,
        prompt: list[int],
        output: list[int],
        progress: list[int],
    ) -> None:
        self.idx, self.role, self.cost = idx, role, cost
        self.capacity = self.free = self.min_free = capacity_pages
        self.page_size, self.max_batch, self.budget = page_size, max_batch, token_budget
        self.prompt, self.output, self.progress = prompt, output, progress  # shared per-request arrays
        self.waiting: deque[int] = deque()  # arrived, nothing reserved yet
        self.prefilling: deque[int] = deque()  # admitted, prompt partly prefilled (chunked)
        self.joining: deque[int] = deque()  # KV here, waiting for a batch slot (decode)
        self.running = 0
        self.ctx_sum = 0
        self.finishing: list[tuple[int, int]] = []  # (steps_done at which it finishes, request)
        self.steps_done = 0  # decode steps run so far
        self.step_chunks: list[tuple[int, int, int]] = []  # (request, tokens, past) of the current step
        self.step_decode = False
        self.run_steps = 0  # decode steps in the current event: 1 in a mixed step, k in a run
        self.run_start = self.run_first = self.run_growth = 0.0
        self.version = 0  # bumped when a run is cut: the event of the longer run is then stale
        self.busy = False
        self.busy_time = 0.0
        self.steps = self.prefill_tokens = self.decode_tokens = 0
        self.link_free = 0.0  # when this instance's network link is next free (disaggregated)

    def pages(self, tokens: int) -> int:
        return -(-tokens // self.page_size)

    def reserve_pages(self, rid: int) -> int:
        """Pages a request holds on this instance."""
        return self.pages(self.prompt[rid] if self.role == PREFILL else self.prompt[rid] + self.output[rid])

    def release(self, rid: int) -> None:
        self.free += self.reserve_pages(rid)

    def take(self, pages: int) -> None:
        self.free -= pages
        if self.free < self.min_free:
            self.min_free = self.free

    def join(self, rid: int) -> None:
        """``rid`` enters the decode batch: its first decode step feeds the first token at context prompt + 1."""
        self.running += 1
        self.ctx_sum += self.prompt[rid] + 1
        heapq.heappush(self.finishing, (self.steps_done + self.output[rid] - 1, rid))

    def plan(self, now: float) -> float | None:
        """Choose the next step (or decode run) starting at ``now``; return its duration, or None when there is
        nothing to run now."""
        chunks: list[tuple[int, int, int]] = []
        role = self.role
        if role == DECODE:
            while self.joining and self.running < self.max_batch:
                self.join(self.joining.popleft())
        elif role == CHUNKED:
            budget = self.budget - self.running
            for rid in self.prefilling:
                if budget <= 0:
                    break
                past = self.progress[rid]
                q = min(self.prompt[rid] - past, budget)
                chunks.append((rid, q, past))
                budget -= q
            while budget > 0 and self.waiting and self.running + len(self.prefilling) < self.max_batch:
                rid = self.waiting[0]
                need = self.reserve_pages(rid)
                if need > self.free:
                    break
                self.waiting.popleft()
                self.take(need)
                self.prefilling.append(rid)
                q = min(self.prompt[rid], budget)
                chunks.append((rid, q, 0))
                budget -= q
        else:  # FIRST or PREFILL: whole prompts, decodes (if any) wait for this step
            budget, slots = self.budget, self.max_batch - self.running
            while self.waiting and slots > 0:
                rid = self.waiting[0]
                length = self.prompt[rid]
                need = self.reserve_pages(rid)
                if (chunks and length > budget) or need > self.free:
                    break
                self.waiting.popleft()
                self.take(need)
                chunks.append((rid, length, 0))
                budget -= length
                slots -= 1
        self.step_chunks = chunks
        self.step_decode = self.running > 0 and (role != FIRST or not chunks)
        if chunks:
            self.run_steps = 1 if self.step_decode else 0
            batch = self.running if self.step_decode else 0
            return self.cost.step(batch, self.ctx_sum if batch else 0, [(q, past) for _, q, past in chunks])
        if not self.step_decode:
            return None
        until_finish = self.finishing[0][0] - self.steps_done
        self.run_steps, first, growth = self.cost.decode_run(self.running, self.ctx_sum, until_finish)
        self.run_start, self.run_first, self.run_growth = now, first, growth
        return self._run_time(self.run_steps)

    def _run_time(self, steps: int) -> float:
        return steps * self.run_first + self.run_growth * (steps * (steps - 1) // 2)

    def cut(self, now: float) -> float | None:
        """New work arrived at ``now`` during a decode run: end the run at the first step boundary at or after
        ``now`` (at least one step in). Returns the new end time, or None when the run ends there anyway."""
        if self.step_chunks or self.run_steps <= 1:
            return None
        elapsed = now - self.run_start
        a, b = self.run_first, self.run_growth
        # smallest j with run_time(j) >= elapsed: the root of b/2·j² + (a − b/2)·j = elapsed, then exact checks
        if b > 0:
            j = math.ceil((-(a - b / 2) + math.sqrt((a - b / 2) ** 2 + 2 * b * elapsed)) / b)
        else:
            j = math.ceil(elapsed / a)
        j = min(max(j, 1), self.run_steps)
        while j > 1 and self._run_time(j - 1) >= elapsed:
            j -= 1
        while j < self.run_steps and self._run_time(j) < elapsed:
            j += 1
        if j == self.run_steps:
            return None
        self.busy_time -= self._run_time(self.run_steps) - self._run_time(j)
        self.run_steps = j
        self.version += 1
        return self.run_start + self._run_time(j)

    def complete(self) -> tuple[list[int], list[int]]:
        """Apply the step (or run) that just ended: return the requests that finished decoding (their pages freed)
        and those whose prefill completed (first token out)."""
        k = self.run_steps
        self.steps += k or 1
        finished: list[int] = []
        if self.step_decode:
            self.steps_done += k
            self.decode_tokens += k * self.running
            self.ctx_sum += k * self.running
            heap = self.finishing
            while heap and heap[0][0] == self.steps_done:
                rid = heapq.heappop(heap)[1]
                self.running -= 1
                self.ctx_sum -= self.prompt[rid] + self.output[rid]
                self.free += self.reserve_pages(rid)
                finished.append(rid)
        prefilled: list[int] = []
        for rid, q, past in self.step_chunks:
            self.prefill_tokens += q
            self.progress[rid] = past + q
            if past + q == self.prompt[rid]:
                prefilled.append(rid)
        if self.role == CHUNKED:
            while self.prefilling and self.progress[self.prefilling[0]] == self.prompt[self.prefilling[0]]:
                self.prefilling.popleft()
        return finished, prefilled
