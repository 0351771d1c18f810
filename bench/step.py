"""``python -m bench step``: wall time per decode step of :class:`disagg.engine.Engine`, CUDA graphs on and off.

Real kernels (nothing stubbed), random weights. Models:

- ``tiny``: the embedded trained model (:func:`disagg.load_model`; 2 layers, hidden 192; context 256, so its prompt
  is shortened to fit);
- ``llama8b``: a random model of Llama-3-8B's shape (:data:`disagg.roofline.LLAMA3_8B`: 32 layers, hidden 4096,
  32/8 heads of 128, MLP 14336, vocab 128256, bf16, ~16 GB of weights drawn straight on the GPU; context 8192).
  With ``--smoke`` (CPU) it is :func:`bench.host.engine_model` instead: the same attention geometry on 2 layers
  with hidden/MLP 16, float32: it proves the path, nothing more.

For every model × batch (default 1 and 64) × mode (``eager``: ``Engine(cuda_graph=False)``; ``graph``: captured
decode steps, :mod:`disagg.cuda_graph`; with ``--compile`` also ``compile`` and ``compile+graph``), one engine
serves ``batch`` distinct prompts of ``--prompt-len`` tokens (greedy, no stop token) and every call of its decode
stage's ``step`` is timed: ``torch.cuda.synchronize`` before and after, wall clock between (a step ends by reading
the sampled tokens to the host anyway). Steps that admit requests (the first step of each graph bucket, its eager
warm-up and capture, falls among them) or run fewer than ``batch`` rows are excluded, then the first
``--warmup-steps`` full steps; the median (and 20th/80th percentiles) of the next ``--steps`` full steps is the
step time. A step includes the scheduler, metadata build and copy, the forward, sampling and retiring: what a
served token costs. tokens/s = batch / step time; ``speedup_vs_eager`` = eager step time / this mode's.

Pools are sized for exactly the run (``batch`` sequences of prompt + generated tokens, pages of 16, prefix cache
off): for the 8B shape at batch 64 and prompt 512, about 4.7 GB of bf16 KV per pool (128 KiB per token), two
pools (prefill and decode), next to 16 GB of weights. On CPU graphs are reported as skipped.
"""

from __future__ import annotations

import dataclasses
import gc
import time
from collections.abc import Callable
from typing import Any

import torch

import kernels
from bench import host, results
from bench.timing import summarize, synchronize
from disagg.roofline import LLAMA3_8B

SCHEMA = "phaseattn-bench-step/1"
MODELS = ("tiny", "llama8b")
PAGE = 16
MAX_BATCH_TOKENS = 8192
"""Prompt tokens per prefill step (the engine's default): a batch of 64 prompts of 512 arrives in 4 rounds."""
SMOKE = {"batches": (1, 2), "prompt_len": 16, "warmup_steps": 1, "steps": 2}


@dataclasses.dataclass(frozen=True)
class Mode:
    name: str
    cuda_graph: bool
    compile: bool


def modes(with_compile: bool) -> list[Mode]:
    out = [Mode("eager", False, False), Mode("graph", True, False)]
    if with_compile:
        out += [Mode("compile", False, True), Mode("compile+graph", True, True)]
    return out


def llama8b_model(device: torch.device, smoke: bool):
    """Llama-3-8B's shape with random weights, bf16, on ``device`` (``smoke``: the small stand-in, see above)."""
    if smoke:
        return host.engine_model(num_layers=2)
    from disagg import tiny
    from disagg.loader import build_model

    s = LLAMA3_8B
    config = dataclasses.replace(
        tiny.CONFIG,
        vocab_size=s.vocab,
        hidden_size=s.hidden,
        intermediate_size=s.ffn,
        num_layers=s.layers,
        num_heads=s.q_heads,
        num_kv_heads=s.kv_heads,
        head_dim=s.head_dim,
        rope=(("rope_theta", 500000.0), ("rope_type", "default")),
        max_position_embeddings=8192,
        windows=(None,) * s.layers,
        torch_dtype="bfloat16",
    )
    tensors = tiny.state_dict(config, device=device, dtype=torch.bfloat16)
    return build_model(config, tensors, torch.bfloat16, device)


def load(name: str, device: torch.device, smoke: bool):
    if name == "tiny":
        from disagg import load_model

        return load_model("tiny", device=device)[0]
    return llama8b_model(device, smoke)


def describe(name: str, model) -> dict[str, Any]:
    c = model.config
    return {
        "name": name,
        "layers": c.num_layers,
        "hidden": c.hidden_size,
        "heads": f"{c.num_heads}/{c.num_kv_heads}",
        "head_dim": c.head_dim,
        "intermediate": c.intermediate_size,
        "vocab": c.vocab_size,
        "dtype": str(model.dtype).removeprefix("torch."),
        "params": sum(p.numel() for p in model.parameters()),
        "max_position_embeddings": c.max_position_embeddings,
    }


def measure(model, mode: Mode, *, batch: int, prompt_len: int, warmup_steps: int, steps: int) -> dict[str, Any]:
    """One engine run (see the module docstring); returns the row of the results' ``rows``."""
    from disagg.engine import Engine
    from disagg.request import SamplingParams

    device = model.device
    admissions = -(-batch * prompt_len // MAX_BATCH_TOKENS)  # decode steps that admit new requests
    new_tokens = admissions + warmup_steps + steps + 2  # slack: the batch stays full through the timed steps
    prompt_len = min(prompt_len, model.config.max_position_embeddings - new_tokens - 1)
    pages = batch * -(-(prompt_len + new_tokens + 1) // PAGE) + 1
    row: dict[str, Any] = {
        "batch": batch,
        "mode": mode.name,
        "cuda_graph": mode.cuda_graph,
        "compile": mode.compile,
        "prompt_len": prompt_len,
    }
    engine = Engine(
        model,
        max_batch_size=batch,
        max_batch_tokens=MAX_BATCH_TOKENS,
        num_pages=pages,
        prefix_cache=False,
        cuda_graph=mode.cuda_graph,
        compile=mode.compile,
    )
    stage, full = engine.decode, []  # full: (ms, shortest context, longest context) of each full-batch step
    original = stage.step

    def timed_step():
        steady = not engine.prefill.has_work and not stage.scheduler.waiting and stage.num_running == batch
        contexts = [s.num_computed + 1 for s in stage.scheduler.running]  # keys each row attends over
        synchronize(device)
        t0 = time.perf_counter()
        out = original()
        synchronize(device)
        if steady:
            full.append(((time.perf_counter() - t0) * 1e3, min(contexts), max(contexts)))
        return out

    stage.step = timed_step
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    engine.generate(host.prompts(batch, prompt_len), SamplingParams(max_new_tokens=new_tokens, eos_token_ids=()))
    row["run_s"] = time.perf_counter() - start
    timed = full[warmup_steps : warmup_steps + steps]
    if not timed:
        return {**row, "status": f"error: no full-batch decode step after {warmup_steps} warm-up steps"}
    t = summarize([ms for ms, _, _ in timed], "wall clock per Engine decode step, synchronized before and after")
    row.update(
        status="ok",
        warmup_steps=warmup_steps,
        steps=len(timed),
        context_min=min(lo for _, lo, _ in timed),
        context_max=max(hi for _, _, hi in timed),
        decode_pool_max_seq_tokens=stage.pool.max_seq_tokens,
        step_ms=t.median_ms,
        step_ms_q20=t.q20_ms,
        step_ms_q80=t.q80_ms,
        tokens_per_s=batch / t.median_ms * 1e3,
        timing_method=t.method,
    )
    if device.type == "cuda":
        row["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    return row


def add_speedups(rows: list[dict[str, Any]]) -> None:
    """``speedup_vs_eager`` of every timed row: the eager row's step time (same model and batch) over its own."""
    eager = {(r["model"], r["batch"]): r for r in rows if r["mode"] == "eager" and r["status"] == "ok"}
    for r in rows:
        base = eager.get((r["model"], r["batch"]))
        r["speedup_vs_eager"] = base["step_ms"] / r["step_ms"] if base and r["status"] == "ok" else None


def format_table(data: dict[str, Any]) -> str:
    lines = [data["notice"], ""] if not data["performance_numbers"] else []
    env = data["environment"]
    lines.append(f"device: {env['device_name']}  torch {env['torch']}  triton {env['triton']}  cuda {env['cuda']}")
    lines.append(f"commit: {env['git_commit']}{' (dirty)' if env.get('git_dirty') else ''}  date: {env['date']}")
    for m in data["models"]:
        lines.append(
            f"{m['name']}: {m['layers']} layers, hidden {m['hidden']}, heads {m['heads']} x {m['head_dim']}, "
            f"MLP {m['intermediate']}, vocab {m['vocab']}, {m['dtype']}, {m['params'] / 1e6:,.1f} M parameters"
        )
    lines.append("")
    lines.append(
        f"{'model':8s} {'batch':>5s} {'mode':13s} {'context':>11s} {'steps':>5s} {'ms/step':>9s} "
        f"{'q20-q80 ms':>15s} {'tokens/s':>10s} {'x eager':>7s}"
    )
    for r in data["rows"]:
        head = f"{r['model']:8s} {r['batch']:5d} {r['mode']:13s}"
        if r["status"] != "ok":
            lines.append(f"{head} {results.clip(r['status'], 90)}")
            continue
        speedup = "-" if r["speedup_vs_eager"] is None else f"{r['speedup_vs_eager']:.2f}"
        lines.append(
            f"{head} {r['context_min']:>5d}-{r['context_max']:<5d} {r['steps']:5d} {r['step_ms']:9.3f} "
            f"{r['step_ms_q20']:7.3f}-{r['step_ms_q80']:<7.3f} {r['tokens_per_s']:10.1f} {speedup:>7s}"
        )
    return "\n".join(lines)


def run(
    *,
    models: tuple[str, ...] = MODELS,
    batches: tuple[int, ...] = (1, 64),
    prompt_len: int = 512,
    warmup_steps: int = 5,
    steps: int = 30,
    with_compile: bool = False,
    smoke: bool = False,
    command: str = "python -m bench step",
    commit: str | None = None,
    save: Callable[[dict[str, Any]], None] = lambda data: None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Measure every model × batch × mode; ``save`` gets the document after every row (a run stopped at a time
    limit keeps what it measured). Returns the results document (:data:`SCHEMA`)."""
    device = torch.device(kernels._runtime.DEVICE_TYPE)
    data: dict[str, Any] = {
        "schema": SCHEMA,
        "performance_numbers": not smoke and device.type == "cuda",
        "notice": results.SMOKE_NOTICE if smoke or device.type != "cuda" else "",
        "status": "running",
        "command": command,
        "environment": results.environment(device, kernels.INTERPRET, commit),
        "method": {
            "step": "wall clock of one Engine decode-stage step (scheduler, metadata, forward, sampling, retiring), "
            "torch.cuda.synchronize before and after; real kernels, random weights, greedy, no stop token",
            "excluded": "steps that admit requests (each graph bucket's eager warm-up and capture among them) or run "
            f"fewer rows than the batch, then the first {warmup_steps} full steps",
            "summary": f"median and 20th/80th percentiles of up to {steps} full-batch steps; tokens/s = batch / median",
            "pools": f"sized for the run: pages of {PAGE}, prefix cache off, {MAX_BATCH_TOKENS} prompt tokens per "
            "prefill step",
        },
        "models": [],
        "rows": [],
    }
    save(data)
    for name in models:
        try:
            model = load(name, device, smoke)
        except Exception as exc:  # e.g. out of memory: the other model's rows still come
            data["rows"].append({"model": name, "batch": 0, "mode": "-", "status": f"error: loading: {exc}"})
            log(f"{name}: loading failed: {type(exc).__name__}: {exc}")
            continue
        data["models"].append(describe(name, model))
        log(f"{name}: {data['models'][-1]}")
        for batch in batches:
            for mode in modes(with_compile):
                if mode.cuda_graph and device.type != "cuda":
                    row = {"batch": batch, "mode": mode.name, "status": "skipped: CUDA graphs need a CUDA device"}
                else:
                    try:
                        row = measure(
                            model, mode, batch=batch, prompt_len=prompt_len, warmup_steps=warmup_steps, steps=steps
                        )
                    except Exception as exc:  # one failed configuration must not lose the rest of the run
                        row = {"batch": batch, "mode": mode.name, "status": f"error: {type(exc).__name__}: {exc}"}
                    gc.collect()  # the engine's pools and graphs go before the next one is made
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                data["rows"].append({"model": name, **row})
                add_speedups(data["rows"])
                save(data)
                ms = f"{row['step_ms']:.3f} ms/step" if row["status"] == "ok" else row["status"].splitlines()[0]
                log(f"{name} batch {batch} {mode.name}: {ms}")
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    data["status"] = "complete"
    save(data)
    return data
