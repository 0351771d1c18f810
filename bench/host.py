"""``python -m bench host``: what our launch path costs the CPU, per call and per decode step.

A decode step of a 32-layer model makes 64 launches (KV write + attention per layer); on a GPU the step is only as
fast as the host can issue them. This measures the host side alone, on CPU and GPU alike: Triton's final launch
(``JITFunction.run``, or the interpreter's ``InterpretedFunction.run``) is replaced by a no-op, so what is timed is
everything of ours before it (validation, host reads, split choice, allocation, grid, and on a GPU the
autotuner's cache lookup), plus the ``kernel[grid]`` proxy call.

Two parts:

- **per call**: each public launcher on the attention shape of Llama-3-8B (32 query / 8 KV heads, head_dim 128,
  bf16, pages of 16): the one-call API and, where a kernel has one, its plan/run API (``plan``: making the plan,
  once per step; ``run``: one layer's call with it; ``run, out=``: the same into a preallocated output). Timed with the thread's CPU clock (``time.thread_time_ns``: other processes on a shared machine do not
  inflate it) and the wall clock; median over rounds of many calls.
- **engine**: :class:`disagg.engine.Engine` decode steps of a 32-layer model with Llama-8B's attention geometry,
  kernels stubbed, batch 1 and 64: CPU time per step, and how much of it is spent inside ``kernels``' API (the
  engine makes one set of plans per step and runs them in every layer: ``calls`` counts plans made and runs), with
  CUDA graphs off on a GPU as well (a replay would skip the Python measured here). The
  model's hidden and MLP sizes are shrunk to 16 and the vocabulary is the tiny model's 258, so on CPU its
  arithmetic stays small next to the host work (on a GPU it would run asynchronously anyway); the step time still
  includes that arithmetic on CPU.

On CPU tensors the launchers also check index values (free there: no device sync), which they skip on CUDA unless
debugging, so the per-call figures differ by device: always quote them with the machine.
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

import kernels
from kernels import _runtime

SCHEMA = "phaseattn-bench-host/1"
HQ, HKV, HEAD_DIM, PAGE = 32, 8, 128, 16
CONTEXT = 4096
"""Keys per sequence in the decode cases (the block table is as wide as this needs)."""


@contextlib.contextmanager
def stub_launches() -> Iterator[None]:
    """Within the block, Triton kernel launches do nothing (and compile nothing); everything before them runs."""
    from triton.runtime import interpreter, jit

    saved = jit.JITFunction.run, interpreter.InterpretedFunction.run

    def no_launch(self, *args, grid, warmup, **kwargs):
        return None

    jit.JITFunction.run = interpreter.InterpretedFunction.run = no_launch
    try:
        yield
    finally:
        jit.JITFunction.run, interpreter.InterpretedFunction.run = saved


def time_calls(fn: Callable[[], Any], *, calls: int, rounds: int) -> dict[str, float]:
    """Median µs per call of ``fn`` over ``rounds`` rounds of ``calls`` calls: CPU (this thread) and wall."""
    for _ in range(max(3, calls // 10)):
        fn()
    cpu, wall = [], []
    for _ in range(rounds):
        c0, w0 = time.thread_time_ns(), time.perf_counter_ns()
        for _ in range(calls):
            fn()
        cpu.append((time.thread_time_ns() - c0) / calls / 1e3)
        wall.append((time.perf_counter_ns() - w0) / calls / 1e3)
    return {"cpu_us": statistics.median(cpu), "wall_us": statistics.median(wall)}


@dataclasses.dataclass(frozen=True)
class Case:
    """One launcher call to time: ``make`` builds the inputs and returns the call (and its plan/run twin)."""

    kernel: str
    shape: dict[str, Any]
    make: Callable[[torch.device], dict[str, Callable[[], Any]]]


def _decode_inputs(batch: int, device: torch.device, gen: torch.Generator):
    # One sequence's worth of pages is enough: block-table rows may share page ids, and the launch never happens.
    num_pages = CONTEXT // PAGE
    k_cache = torch.randn(num_pages, PAGE, HKV, HEAD_DIM, generator=gen).to(torch.bfloat16).to(device)
    v_cache = torch.randn(num_pages, PAGE, HKV, HEAD_DIM, generator=gen).to(torch.bfloat16).to(device)
    q = torch.randn(batch, HQ, HEAD_DIM, generator=gen).to(torch.bfloat16).to(device)
    table = torch.randint(0, num_pages, (batch, CONTEXT // PAGE), generator=gen, dtype=torch.int32).to(device)
    seq_lens = torch.full((batch,), CONTEXT, dtype=torch.int32, device=device)
    return q, k_cache, v_cache, table, seq_lens


def decode_case(batch: int, num_splits: int | None) -> Case:
    def make(device: torch.device) -> dict[str, Callable[[], Any]]:
        q, k_cache, v_cache, table, seq_lens = _decode_inputs(batch, device, torch.Generator().manual_seed(batch))
        lens = [CONTEXT] * batch

        def make_plan():
            return kernels.PagedDecodePlan(
                k_cache,
                v_cache,
                lens,
                num_q_heads=HQ,
                q_dtype=q.dtype,
                block_table_width=table.shape[1],
                num_splits=num_splits,
                workspace=workspace,
            )

        workspace = kernels.Workspace(device)
        plan = make_plan()
        out = torch.empty_like(q)
        return {
            "one-call": lambda: kernels.paged_decode_attention(
                q, k_cache, v_cache, table, seq_lens, num_splits=num_splits
            ),
            "plan": make_plan,
            "run": lambda: plan.run(q, k_cache, v_cache, table, seq_lens),
            "run, out=": lambda: plan.run(q, k_cache, v_cache, table, seq_lens, out=out),
        }

    shape = {"batch": batch, "context": CONTEXT, "heads": f"{HQ}/{HKV}", "head_dim": HEAD_DIM, "page_size": PAGE}
    return Case("paged_decode_attention", {**shape, "num_splits": num_splits}, make)


def prefill_case(num_seqs: int, seqlen: int) -> Case:
    def make(device: torch.device) -> dict[str, Callable[[], Any]]:
        gen = torch.Generator().manual_seed(seqlen)
        total = num_seqs * seqlen
        q = torch.randn(total, HQ, HEAD_DIM, generator=gen).to(torch.bfloat16).to(device)
        k = torch.randn(total, HKV, HEAD_DIM, generator=gen).to(torch.bfloat16).to(device)
        v = torch.randn(total, HKV, HEAD_DIM, generator=gen).to(torch.bfloat16).to(device)
        cu = torch.arange(0, total + 1, seqlen, dtype=torch.int32, device=device)
        lens = [seqlen] * num_seqs

        def make_plan():
            return kernels.PrefillPlan(
                lens, num_q_heads=HQ, num_kv_heads=HKV, head_dim=HEAD_DIM, dtype=q.dtype, device=device
            )

        plan = make_plan()
        return {  # as the engine calls it: the longest length known on the host
            "one-call": lambda: kernels.prefill_attention(
                q, k, v, cu, cu, causal=True, max_seqlen_q=seqlen, max_seqlen_k=seqlen
            ),
            "plan": make_plan,
            "run": lambda: plan.run(q, k, v, cu, cu),
        }

    return Case("prefill_attention", {"batch": num_seqs, "seqlen": seqlen, "heads": f"{HQ}/{HKV}"}, make)


def paged_prefill_case(batch: int, chunk: int) -> Case:
    """Chunked prefill: ``chunk`` new tokens per sequence after a prefix, CONTEXT tokens in all."""

    def make(device: torch.device) -> dict[str, Callable[[], Any]]:
        q1, k_cache, v_cache, table, seq_lens = _decode_inputs(batch, device, torch.Generator().manual_seed(chunk))
        q = q1.repeat_interleave(chunk, dim=0)
        cu = torch.arange(0, batch * chunk + 1, chunk, dtype=torch.int32, device=device)
        q_lens, lens = [chunk] * batch, [CONTEXT] * batch

        def make_plan():
            return kernels.PagedPrefillPlan(
                k_cache,
                v_cache,
                q_lens,
                lens,
                num_q_heads=HQ,
                q_dtype=q.dtype,
                block_table_width=table.shape[1],
                workspace=workspace,
            )

        workspace = kernels.Workspace(device)
        plan = make_plan()
        return {  # the one-call path as an engine would call it: lengths known, the split count not
            "one-call": lambda: kernels.paged_prefill_attention(
                q, k_cache, v_cache, table, cu, seq_lens, max_seqlen_q=chunk
            ),
            "plan": make_plan,
            "run": lambda: plan.run(q, k_cache, v_cache, table, cu, seq_lens),
        }

    shape = {"batch": batch, "chunk": chunk, "context": CONTEXT, "heads": f"{HQ}/{HKV}", "page_size": PAGE}
    return Case("paged_prefill_attention", shape, make)


def write_case(num_tokens: int) -> Case:
    def make(device: torch.device) -> dict[str, Callable[[], Any]]:
        gen = torch.Generator().manual_seed(num_tokens)
        num_pages = max(64, -(-num_tokens // PAGE))
        k_cache = torch.zeros(num_pages, PAGE, HKV, HEAD_DIM, dtype=torch.bfloat16, device=device)
        v_cache = torch.zeros_like(k_cache)
        k = torch.randn(num_tokens, HKV, HEAD_DIM, generator=gen).to(torch.bfloat16).to(device)
        v = torch.randn(num_tokens, HKV, HEAD_DIM, generator=gen).to(torch.bfloat16).to(device)
        slots = torch.randperm(num_pages * PAGE, generator=gen)[:num_tokens].to(device)
        plan = kernels.WriteKVPlan(k_cache, v_cache, num_tokens, kv_dtype=k.dtype)
        return {
            "one-call": lambda: kernels.write_kv_cache(k, v, k_cache, v_cache, slots),
            "plan": lambda: kernels.WriteKVPlan(k_cache, v_cache, num_tokens, kv_dtype=k.dtype),
            "run": lambda: plan.run(k, v, k_cache, v_cache, slots),
        }

    return Case("write_kv_cache", {"tokens": num_tokens, "kv_heads": HKV, "page_size": PAGE}, make)


def cases() -> list[Case]:
    return [
        decode_case(1, None),
        decode_case(64, None),
        decode_case(64, 1),
        prefill_case(4, 512),
        paged_prefill_case(4, 512),
        write_case(1),
        write_case(64),
        write_case(2048),
    ]


def measure_calls(device: torch.device, *, calls: int, rounds: int, log: Callable[[str], None]) -> list[dict]:
    rows = []
    with stub_launches():
        for case in cases():
            for api, fn in case.make(device).items():
                t = time_calls(fn, calls=calls, rounds=rounds)
                rows.append({"kernel": case.kernel, "api": api, "shape": case.shape, **t})
                log(f"{case.kernel} {api} {case.shape}: {t['cpu_us']:.1f} µs CPU, {t['wall_us']:.1f} µs wall")
    return rows


def engine_model(num_layers: int = 32):
    """A random Llama with Llama-8B's attention geometry and layer count, but hidden/MLP sizes of 16."""
    from disagg import tiny
    from disagg.loader import build_model

    config = dataclasses.replace(
        tiny.CONFIG,
        num_layers=num_layers,
        num_heads=HQ,
        num_kv_heads=HKV,
        head_dim=HEAD_DIM,
        hidden_size=16,
        intermediate_size=16,
        windows=(None,) * num_layers,
    )
    return build_model(config, tiny.state_dict(config), torch.float32, torch.device(_runtime.DEVICE_TYPE))


@contextlib.contextmanager
def _timed_api(spent: list[int], calls: list[int]) -> Iterator[None]:
    """Accumulate the CPU time spent inside ``kernels``' public API as the engine reaches it: the one-call
    functions, making plans, and the plans' ``run``."""
    names = [n for n in kernels.__all__ if callable(getattr(kernels, n)) and not n.startswith(("set_", "debug"))]
    plans = [getattr(kernels, n) for n in names if n.endswith("Plan")]
    saved = [(kernels, n, getattr(kernels, n)) for n in names] + [(cls, "run", cls.run) for cls in plans]

    def timed(fn):
        def call(*args, **kwargs):
            t0 = time.thread_time_ns()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[0] += time.thread_time_ns() - t0
                calls[0] += 1

        return call

    for owner, name, fn in saved:
        setattr(owner, name, timed(fn))
    try:
        yield
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)


def prompts(batch: int, prompt_len: int) -> list[list[int]]:
    """``batch`` distinct prompts of ``prompt_len`` token ids (BOS of the tiny model, then ids in 32-231: valid in
    any vocabulary of 258 or more); up to 200 rows, no two share a page, so no prefix cache would share them."""
    return [[256, *[(7 * i + j) % 200 + 32 for j in range(prompt_len - 1)]] for i in range(batch)]


def measure_engine(batch: int, *, prompt_len: int, steps: int, model) -> dict[str, Any]:
    """CPU time per decode step of ``model`` at ``batch`` (kernels stubbed); the first step (admission) excluded."""
    from disagg.engine import Engine
    from disagg.request import SamplingParams

    # eager steps, on a GPU too: the plan path's host cost (a CUDA graph replay would skip the Python this times)
    pages = batch * (-(-(prompt_len + steps + 1) // PAGE)) + 1
    engine = Engine(model, max_batch_size=batch, num_pages=pages, cuda_graph=False)
    step_cpu, step_wall, api_cpu, api_calls = [], [], [], []
    original = engine.decode.step
    spent, calls = [0], [0]

    def timed_step():
        spent[0] = calls[0] = 0
        c0, w0 = time.thread_time_ns(), time.perf_counter_ns()
        out = original()
        step_cpu.append((time.thread_time_ns() - c0) / 1e6)
        step_wall.append((time.perf_counter_ns() - w0) / 1e6)
        api_cpu.append(spent[0] / 1e6)
        api_calls.append(calls[0])
        return out

    engine.decode.step = timed_step
    params = SamplingParams(max_new_tokens=steps + 1, eos_token_ids=())
    threads = torch.get_num_threads()
    torch.set_flush_denormal(True)  # stubbed kernels leave garbage outputs: denormals would be slow
    torch.set_num_threads(1)  # the host's work is one thread's: thread time then covers all of it
    try:
        with stub_launches(), _timed_api(spent, calls):
            engine.generate(prompts(batch, prompt_len), params)
    finally:
        torch.set_num_threads(threads)
        torch.set_flush_denormal(False)
    timed = slice(1, None)  # step 0 admits the batch (copies every prompt's KV into the decode pool)
    return {
        "batch": batch,
        "layers": model.config.num_layers,
        "context": prompt_len,
        "steps": len(step_cpu[timed]),
        "step_cpu_ms": statistics.median(step_cpu[timed]),
        "step_wall_ms": statistics.median(step_wall[timed]),
        "kernels_api_cpu_ms": statistics.median(api_cpu[timed]),
        "kernels_api_calls": statistics.median(api_calls[timed]),
    }


def format_table(data: dict[str, Any]) -> str:
    lines = [f"{'kernel':24s} {'api':10s} {'shape':58s} {'CPU µs':>8s} {'wall µs':>8s}"]
    for r in data["per_call"]:
        shape = ", ".join(f"{k}={v}" for k, v in r["shape"].items())
        lines.append(f"{r['kernel']:24s} {r['api']:10s} {shape:58s} {r['cpu_us']:8.1f} {r['wall_us']:8.1f}")
    if data["engine"]:
        lines.append("")
        lines.append(
            f"{'engine decode step':24s} {'batch':>5s} {'layers':>6s} {'CPU ms':>8s} {'wall ms':>8s} "
            f"{'in kernels API ms':>17s} {'calls':>5s}"
        )
        for r in data["engine"]:
            lines.append(
                f"{'':24s} {r['batch']:5d} {r['layers']:6d} {r['step_cpu_ms']:8.2f} {r['step_wall_ms']:8.2f} "
                f"{r['kernels_api_cpu_ms']:17.2f} {r['kernels_api_calls']:5.0f}"
            )
    return "\n".join(lines)


def run(
    *,
    calls: int = 200,
    rounds: int = 7,
    engine_batches: tuple[int, ...] = (1, 64),
    engine_layers: int = 32,
    engine_steps: int = 5,
    engine_prompt: int = 32,
    commit: str | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Measure everything; returns the results document (see :data:`SCHEMA`)."""
    from bench import results

    device = torch.device(_runtime.DEVICE_TYPE)
    data: dict[str, Any] = {
        "schema": SCHEMA,
        "environment": results.environment(device, kernels.INTERPRET, commit),
        "method": {
            "launch": "Triton's JITFunction.run / InterpretedFunction.run replaced by a no-op",
            "per_call": f"median over {rounds} rounds of {calls} calls; CPU = time.thread_time_ns of this thread",
            "engine": "median decode step (the admission step excluded) of Engine.generate, kernels stubbed, "
            "CUDA graphs off; model: Llama-8B attention geometry and layer count, hidden/MLP 16, vocab 258, float32",
        },
        "per_call": measure_calls(device, calls=calls, rounds=rounds, log=log),
        "engine": [],
    }
    if engine_batches:
        model = engine_model(engine_layers)
        for batch in engine_batches:
            r = measure_engine(batch, prompt_len=engine_prompt, steps=engine_steps, model=model)
            log(
                f"engine batch {batch}: {r['step_cpu_ms']:.2f} ms CPU per step, {r['kernels_api_cpu_ms']:.2f} in kernels"
            )
            data["engine"].append(r)
    return data
