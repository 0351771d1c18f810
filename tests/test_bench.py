"""bench: the counting it adds to disagg.roofline, its pieces (timing, results, shapes, CLI) and the whole command
path (``python -m bench all --smoke`` in a subprocess), plus the roofline figure built from a results file."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import decode, extend, prefill, roofline_plot, timing
from bench import results as res
from bench.__main__ import build_cases, parse_args
from bench.runner import max_rel_err
from disagg import roofline as rl

ROOT = Path(__file__).resolve().parents[1]


# ---- counting -------------------------------------------------------------------------------------------------


def test_copy_and_intensity_formulas_by_hand():
    assert rl.copy_bytes(1 << 30) == 2 * (1 << 30)
    # Causal S=4, one head, D=8: 10 visible pairs * 4 * 8 FLOPs over (q+out: 2*4 rows, k+v: 2*4 rows) * 8 * 2 bytes.
    assert rl.prefill_intensity(4, 8, 1, 1, causal=True) == pytest.approx(320 / 256)
    # Full S=4, 4 q heads over 2 kv heads, D=8: 4*4*16*8 FLOPs over 8*2*(2*4*4 + 2*2*4) bytes.
    assert rl.prefill_intensity(4, 8, 4, 2, causal=False) == pytest.approx(2048 / 768)
    # Decode 32/8, 4k context, d128: 4*32*4096*128 FLOPs over K+V (2*8*4096*128*kv_bytes) + q/out (2*32*128*2).
    flops = 4 * 32 * 4096 * 128
    assert rl.decode_intensity(1, 32, 8, 4096, 128, 2) == pytest.approx(flops / (2 * 8 * 4096 * 128 * 2 + 16384))
    assert rl.decode_intensity(7, 32, 8, 4096, 128, 1) == pytest.approx(flops / (2 * 8 * 4096 * 128 + 16384))
    assert rl.H100_SXM_DATASHEET.ridge == pytest.approx(989 / 3.35)


def test_gemm_intensity_by_hand():
    tiny = rl.ModelShape("tiny", layers=1, hidden=2, q_heads=1, kv_heads=1, head_dim=2, ffn=4, vocab=3)
    # FLOPs for one token: qkv 2*6*2 + o 2*2*2 + mlp 3*2*4*2 + head 2*3*2 = 24 + 8 + 48 + 12 = 92.
    # Bytes: the 46 parameters GEMMs read (projections 16, MLP 24, LM head 6; not the embedding table or norms)
    # * 2 + activations 2*(2*2 + 2*(2+2) + 4*4 + 2 + 3) = 92 + 66 = 158.
    assert tiny.gemm_intensity(1) == pytest.approx(92 / 158)
    # Weight-dominated at small batch: intensity grows about linearly with it.
    assert rl.LLAMA3_8B.gemm_intensity(2) / rl.LLAMA3_8B.gemm_intensity(1) == pytest.approx(2, rel=0.01)


def test_case_counts_come_from_roofline():
    p = prefill.PrefillCase(4096, 128, True, 32, 8, 16384)
    assert p.batch == 4 and p.shape["batch"] == 4
    assert p.flops == rl.attention_flops(4, 32, 4096, 4096, 128, True)
    assert p.nbytes == 4 * 128 * 2 * (2 * 32 * 4096 + 2 * 8 * 4096)
    d = decode.DecodeCase(64, 4096, 16, "fp8", 32, 8)
    assert d.nbytes == 64 * (2 * 8 * 4096 * 128 * 1 + 2 * 32 * 128 * 2)
    assert decode.DecodeCase(64, 4096, 16, "bf16", 32, 8).nbytes == 64 * (2 * 8 * 4096 * 128 * 2 + 2 * 32 * 128 * 2)
    # Memory: 100 tokens on pages of 16 -> 7 pages; paged K+V fp8, fill temporaries bf16, dense bf16 + fp8 gather.
    small = decode.DecodeCase(3, 100, 16, "fp8", 4, 2, head_dim=8)
    ours, peers = small.memory(sets=2)
    assert ours == 2 * (2 * 3 * 7 * 16 * 16 * 1) + 2 * 3 * 100 * 16 * 2
    assert peers == 2 * (2 * 3 * 100 * 16 * 2) + (2 * 3 * 100 * 16 * 2 + 2 * 3 * 7 * 16 * 16)
    # Extend: 512 new tokens after 8k, bottom-right causal pairs; bytes move q/out for the new tokens only.
    e = extend.ExtendCase(4, 8192, 512, 32, 8)
    assert e.context == 8704 and e.flops == 4.0 * 4 * 32 * (512 * (8193 + 8704) // 2) * 128
    assert e.nbytes == 4 * 128 * 2 * (2 * 32 * 512 + 2 * 8 * 8704)


def test_extend_sweep_covers_the_issue_shapes():
    chunked = [c for c in extend.cases() if c.new == extend.CHUNK]
    spec = [c for c in extend.cases() if c.new <= 8]
    assert {c.prefix for c in chunked} == {0, 2048, 8192, 32768}
    assert {c.new for c in spec} == {1, 4, 8} and {c.context for c in spec} == {4096, 32768, 131072}


# ---- timing and results ---------------------------------------------------------------------------------------


def test_rotation_sets_exceed_l2():
    mb = 1 << 20
    assert timing.rotation_sets(10 * mb, 50 * mb) == 10  # 10 sets of 10 MB = 2 x 50 MB
    assert timing.rotation_sets(300 * mb, 50 * mb) == 1
    assert timing.rotation_sets(1, 50 * mb) == timing.MAX_ROTATION_SETS
    assert timing.rotation_sets(10 * mb, None) == 1
    seen = []
    fn = timing.rotating([lambda: seen.append(0), lambda: seen.append(1), lambda: seen.append(2)])
    for _ in range(5):
        fn()
    assert seen == [0, 1, 2, 0, 1]


def test_cpu_timing_is_wall_clock():
    t = timing.measure(lambda: sum(range(1000)), torch.device("cpu"), cpu_reps=5)
    assert 0 < t.q20_ms <= t.median_ms <= t.q80_ms and "not a performance number" in t.method


def test_measurement_rates_by_hand():
    ceilings = res.Ceilings(matmul_flops=4000e12, copy_bandwidth=2e12)
    t = timing.Timing(median_ms=1.0, q20_ms=0.9, q80_ms=1.1, method="test")
    m = res.measurement("prefill", "x", "ours", {}, 2e12, 1e9, t, ceilings)
    assert m["tflops"] == pytest.approx(2000) and m["gbps"] == pytest.approx(1000)
    assert m["frac_matmul"] == pytest.approx(0.5) and m["frac_copy"] == pytest.approx(0.5)
    assert m["intensity"] == pytest.approx(2000)


def test_max_rel_err():
    ref = torch.tensor([1.0, -4.0, 2.0])
    assert max_rel_err(torch.tensor([1.0, -4.0, 2.5]), ref) == pytest.approx(0.5 / 4)
    assert max_rel_err(torch.tensor([1.0, float("nan"), 2.0]), ref) == math.inf
    assert max_rel_err(torch.zeros(2), ref) == math.inf


def test_validate_rejects_malformed(tmp_path):
    with pytest.raises(ValueError, match="missing"):
        res.validate({"schema": res.SCHEMA})
    path = tmp_path / "r.json"
    env = res.environment(torch.device("cpu"), interpret=True)
    f = res.ResultsFile(path, command="test", env=env, smoke=True)
    f.add({"phase": "prefill", "contender": "x", "kind": "ours", "shape": {}, "flops": 1, "bytes": 1, "status": "ok"})
    with pytest.raises(ValueError, match="without a positive time"):
        res.load(path)


# ---- CLI ------------------------------------------------------------------------------------------------------


def test_quick_is_the_headline_shapes():
    cases = build_cases(parse_args(["all", "--quick"]))
    got = {c.key for c in cases}
    assert got == {
        ("prefill", 8192, 128, True, 32, 8, 16384),
        ("prefill", 16384, 128, True, 32, 8, 16384),
        ("decode", 64, 4096, 16, "bf16", 32, 8),
        ("decode", 64, 4096, 16, "fp8", 32, 8),
        ("decode", 1, 131072, 16, "bf16", 32, 8),
        ("decode", 1, 131072, 16, "fp8", 32, 8),
        ("extend", 4, 8192, 512, 32, 8, 128),
        ("extend", 16, 32768, 4, 32, 8, 128),
    }
    assert [c.phase for c in cases[:4]] == ["prefill", "decode", "extend", "prefill"]  # phases alternate


def test_sweep_options_and_deduplication():
    args = parse_args(
        ["prefill", "--seqlens", "8k,16k", "--head-dims", "128", "--causal", "causal", "--heads", "32/8,32/32"]
    )
    cases = build_cases(args)
    assert [c.tier for c in cases] == ["headline", "headline", "sweep", "sweep"]  # 32/8 sweep == headline
    assert {(c.seqlen, c.q_heads, c.kv_heads) for c in cases[2:]} == {(8192, 32, 32), (16384, 32, 32)}
    args = parse_args(["decode", "--batches", "1,2", "--contexts", "1k", "--page-sizes", "64", "--kv-dtypes", "fp8"])
    keys = [c.key for c in build_cases(args) if c.tier == "sweep"]
    assert keys == [("decode", b, 1024, 64, "fp8", 32, kv) for kv in (8, 32) for b in (1, 2)]
    assert parse_args(["all", "--peers", "none"]).peers == ()
    assert parse_args(["all", "--sweep-peers", "sdpa-flash"]).sweep_peers == ("sdpa-flash",)
    assert parse_args(["all"]).sweep_peers is None  # the sweep then gets --peers
    assert parse_args(["all", "--peers", "flex,sdpa-flash"]).peers == ("flex", "sdpa-flash")
    for bad in (["all", "--peers", "cutlass"], ["all", "--heads", "32/5"], ["all", "--seqlens", "1x"]):
        with pytest.raises(SystemExit):
            parse_args(bad)


# ---- the whole command path -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "smoke.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "all", "--smoke", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out, done.stdout


def test_smoke_writes_a_valid_results_file(smoke_run):
    import kernels

    out, stdout = smoke_run
    data = res.load(out)
    assert data["status"] == "complete" and data["performance_numbers"] is False
    assert "NOT performance numbers" in data["notice"] and "NOT performance numbers" in stdout
    env = data["environment"]
    for key in ("device_name", "sm_count", "memory_bytes", "torch", "triton", "cuda", "git_commit", "date"):
        assert key in env
    assert env["torch"] == torch.__version__ and env["memory_bytes"] > 0 and len(env["git_commit"]) >= 7
    assert data["ceilings"]["matmul_flops"] > 0 and data["ceilings"]["copy_bandwidth"] > 0
    by = {}
    for m in data["measurements"]:
        by.setdefault((m["phase"], m["contender"]), []).append(m)
    assert {m["status"] for m in by[("ceiling", "torch.matmul bf16")]} == {"ok"}
    # Ours and the peers that run on CPU are timed and agree with ours on the same inputs.
    assert all(m["status"] == "ok" and m["time_ms"] > 0 for m in by[("prefill", "phaseattn")])
    for peer in ("sdpa-flash", "flex"):
        for m in by[("prefill", peer)]:
            assert m["status"] == "ok" and m["agrees_with_ours"], m
    # Backends that do not exist on CPU are recorded as skipped with a reason, not dropped.
    assert all(m["status"].startswith("skipped: ") for m in by[("prefill", "sdpa-cudnn")])
    decode_ours = by[("decode", "phaseattn")]
    assert len(decode_ours) == 4 and {m["shape"]["kv_dtype"] for m in decode_ours} == {"bf16", "fp8"}
    if hasattr(kernels, "paged_decode_attention"):
        # Split-KV planned outside the timed region (no host sync in the timed launch).
        assert all(m["status"] == "ok" and isinstance(m["num_splits"], int) for m in decode_ours)
        for m in by[("decode", "sdpa-flash")] + by[("decode", "sdpa-flash+gather")] + by[("decode", "flex")]:
            assert m["status"] == "ok" and m["agrees_with_ours"], m
    else:
        assert all("not in this checkout" in m["status"] for m in decode_ours)
    # Extend (paged prefill): ours timed with its splits planned outside the timed region; the CPU peers
    # (bottom-right causal masks) agree with ours.
    extend_ours = by[("extend", "phaseattn")]
    assert len(extend_ours) == 2 and all(m["status"] == "ok" and isinstance(m["num_splits"], int) for m in extend_ours)
    for peer in ("sdpa-flash", "flex"):
        for m in by[("extend", peer)]:
            assert m["status"] == "ok" and m["agrees_with_ours"], m
    assert "headline shapes" in stdout and "phaseattn" in stdout


def test_figure_leaves_smoke_files_out(smoke_run):
    out, _ = smoke_run
    loaded, notes = roofline_plot.load_results([out])
    assert loaded == [] and "smoke" in notes[0]
    assert res.roofline_points(res.load(out)) == []


# ---- the roofline figure --------------------------------------------------------------------------------------


def _results_with(points: list[tuple[str, str, str, dict, float, float, float]]) -> dict:
    """A results dict with the given (phase, contender, kind, shape, flops, bytes, ms) entries: test data only."""
    data = {
        "schema": res.SCHEMA,
        "performance_numbers": True,
        "status": "complete",
        "environment": {
            "device_name": "Test GPU",
            "sm_count": 1,
            "memory_bytes": 1,
            "torch": "x",
            "triton": "x",
            "cuda": "x",
            "git_commit": "0" * 40,
            "date": "2026-01-01T00:00:00+00:00",
        },
        "ceilings": {"matmul_flops": 500e12, "copy_bandwidth": 2e12},
        "measurements": [],
    }
    ceilings = res.ceilings_of(data)
    for phase, contender, kind, shape, flops, nbytes, ms in points:
        t = timing.Timing(ms, ms, ms, "test")
        data["measurements"].append(res.measurement(phase, contender, kind, shape, flops, nbytes, t, ceilings))
    res.validate(data)
    return data


def test_figure_places_measured_points(tmp_path):
    pshape = prefill.PrefillCase(16384, 128, True, 32, 8, 16384).shape
    dshape = decode.DecodeCase(64, 4096, 16, "bf16", 32, 8).shape
    data = _results_with(
        [
            ("prefill", "phaseattn", "ours", pshape, 4e12, 1e9, 10.0),  # intensity 4000, 400 TFLOP/s
            ("prefill", "sdpa-flash", "peer", pshape, 4e12, 1e9, 20.0),
            ("decode", "phaseattn", "ours", dshape, 4e9, 1e9, 0.5),  # intensity 4, 8 TFLOP/s
        ]
    )
    path = tmp_path / "r.json"
    path.write_text(json.dumps(data))
    loaded, notes = roofline_plot.load_results(tmp_path)
    assert len(loaded) == 1 and notes == []
    fig = roofline_plot.figure(loaded)
    ax = fig.axes[0]
    placed = sorted(tuple(float(x) for x in o) for c in ax.collections for o in c.get_offsets())
    expected = sorted([(4000.0, 400.0), (4000.0, 200.0), (4.0, 8.0)])
    assert len(placed) == len(expected)
    assert all(p == pytest.approx(e) for p, e in zip(placed, expected, strict=True)), placed
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any("Test GPU" in s and "measured" in s for s in labels)
    assert "3 measured points" in fig._suptitle.get_text()
    fig.savefig(tmp_path / "r.png")
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_figure_without_results_says_so():
    fig = roofline_plot.figure([])
    assert "No GPU results" in fig._suptitle.get_text()
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels[0] == roofline_plot.ASSUMED_LABEL and all(s.startswith("analytic") for s in labels[1:])
    assert not any(len(c.get_offsets()) for c in fig.axes[0].collections)  # no measured point is drawn


# ---- host: the launch path's CPU cost -------------------------------------------------------------------------


def test_stubbed_launches_run_everything_but_the_kernel(gen):
    """Inside stub_launches a launcher validates and allocates (a poisoned output stays NaN: nothing ran); bad
    input is still refused; outside, the kernel runs again."""
    import kernels
    from bench.host import stub_launches

    k, v = (torch.randn(5, 2, 32, generator=gen) for _ in range(2))
    q = torch.randn(5, 4, 32, generator=gen)
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    with stub_launches():
        assert torch.isnan(kernels.prefill_attention(q, k, v, cu, cu)).all()
        with pytest.raises(ValueError, match="cu_seqlens_q must end"):
            kernels.prefill_attention(q, k, v, cu[:2], cu[:2])
    assert not torch.isnan(kernels.prefill_attention(q, k, v, cu, cu)).any()


def run_bench(*args: str) -> subprocess.CompletedProcess:
    """``python -m bench ARGS`` in a subprocess from the repository root; it must exit 0."""
    done = subprocess.run([sys.executable, "-m", "bench", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def test_host_command_writes_its_results(tmp_path):
    out = tmp_path / "host.json"
    args = ["--calls", "2", "--rounds", "1", "--engine-batches", "1,3", "--engine-layers", "2", "--engine-steps", "2"]
    done = run_bench("host", *args, "--out", str(out))
    data = json.loads(out.read_text())
    assert data["schema"] == "phaseattn-bench-host/1" and "device_name" in data["environment"]
    kernels_timed = {r["kernel"] for r in data["per_call"]}
    assert {"paged_decode_attention", "paged_prefill_attention", "prefill_attention", "write_kv_cache"} <= kernels_timed
    assert {r["api"] for r in data["per_call"]} == {"one-call", "plan", "run", "run, out="}
    assert all(r["cpu_us"] > 0 and r["wall_us"] > 0 for r in data["per_call"])
    assert [r["batch"] for r in data["engine"]] == [1, 3]
    for r in data["engine"]:
        # a decode step makes two plans (KV write, decode attention), then every layer runs both
        assert r["layers"] == 2 and r["kernels_api_calls"] == 2 + 2 * 2 and r["steps"] >= 1
        assert 0 < r["kernels_api_cpu_ms"] < r["step_cpu_ms"]
    assert "engine decode step" in done.stdout and "paged_decode_attention" in done.stdout


def test_status_lines_are_clipped_at_word_boundaries():
    from bench.results import clip

    reason = "skipped: refuses this shape (Flash attention requires head_dim <= 256, got 512; " + "more words " * 20
    short = clip(reason, 90)
    assert len(short) <= 90 and short.endswith(" ...")
    kept = short.removesuffix(" ...").split()
    assert kept == reason.split()[: len(kept)]  # whole words only, the last one included
    assert clip("fits as is", 90) == "fits as is"


def test_step_command_smoke(tmp_path):
    """``python -m bench step --smoke``: real kernels through the interpreter, eager steps timed, graphs skipped on
    CPU; the admission step and the warm-up step are excluded (the contexts say which steps were timed)."""
    out, prompt = tmp_path / "step.json", 16
    args = ["--smoke", "--batches", "2", "--prompt-len", str(prompt), "--warmup-steps", "1", "--steps", "1"]
    done = run_bench("step", *args, "--out", str(out))
    data = json.loads(out.read_text())
    assert data["schema"] == "phaseattn-bench-step/1" and data["status"] == "complete"
    assert data["performance_numbers"] is False and "NOT performance" in data["notice"]
    assert "device_name" in data["environment"] and data["environment"]["git_commit"]
    assert [m["name"] for m in data["models"]] == ["tiny", "llama8b"]
    assert data["models"][1]["heads"] == "32/8" and data["models"][1]["head_dim"] == 128
    rows = {(r["model"], r["batch"], r["mode"]): r for r in data["rows"]}
    assert set(rows) == {(m, b, mode) for m in ("tiny", "llama8b") for b in (2,) for mode in ("eager", "graph")}
    for (_, batch, mode), r in rows.items():
        if mode == "graph":
            assert r["status"] == "skipped: CUDA graphs need a CUDA device" and r["speedup_vs_eager"] is None
            continue
        assert r["status"] == "ok" and r["steps"] == 1 and r["speedup_vs_eager"] == 1.0
        assert r["step_ms_q20"] <= r["step_ms"] <= r["step_ms_q80"] and r["step_ms"] > 0
        assert r["tokens_per_s"] == pytest.approx(batch / r["step_ms"] * 1e3)
        # prompt + first token in the cache; step 0 admits (writes key prompt+1), step 1 warms up, step 2 is timed
        assert r["prompt_len"] == prompt and r["context_min"] == r["context_max"] == prompt + 3
    assert "ms/step" in done.stdout and "tokens/s" in done.stdout and "skipped: CUDA graphs" in done.stdout
    assert "llama8b: 2 layers, hidden 16, heads 32/8 x 128" in done.stdout


@pytest.fixture
def small_llama(monkeypatch):
    """``bench.step``'s full-size builder (weights drawn in place in bf16 on the kernels' device) on a shrunken
    Llama shape that keeps 8B's attention geometry."""
    from bench import step
    from kernels import _runtime

    monkeypatch.setattr(step, "LLAMA3_8B", rl.ModelShape("small", 2, 256, 32, 8, 128, 512, 1000))
    return step.llama8b_model(torch.device(_runtime.DEVICE_TYPE), smoke=False)


def test_step_full_size_builder_path(small_llama):
    from bench import step

    c = small_llama.config
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim) == (2, 256, 32, 8, 128)
    assert small_llama.dtype == torch.bfloat16 and c.max_position_embeddings == 8192
    assert all(torch.isfinite(p).all() and p.std() > 0 for p in small_llama.parameters())
    row = step.measure(small_llama, step.Mode("eager", False, False), batch=2, prompt_len=16, warmup_steps=1, steps=1)
    assert row["status"] == "ok" and row["context_min"] == 16 + 3 and row["step_ms"] > 0


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_step_graph_mode_on_cuda(small_llama):
    """On a GPU: graph rows are timed (replays after the capture, which falls in an excluded admission step)."""
    from bench import step

    rows = [
        {"model": "small", **step.measure(small_llama, mode, batch=4, prompt_len=32, warmup_steps=2, steps=5)}
        for mode in step.modes(with_compile=False)
    ]
    step.add_speedups(rows)
    assert [r["status"] for r in rows] == ["ok", "ok"] and rows[1]["cuda_graph"] and rows[1]["steps"] == 5
    assert rows[0]["speedup_vs_eager"] == 1.0 and rows[1]["speedup_vs_eager"] > 0
