"""disagg.sim's throughput metrics against hand-computed cases, each cost-model term moving a step's cost by the
amount a hand calculation gives, and the validation against TensorRT-LLM's published table."""

import json

import numpy as np
import pytest

from disagg.sim import Colocated, Device, Efficiency, Pool, Requests, Serving, StepCost, simulate
from disagg.sim import __main__ as cli
from disagg.sim.costs import KERNELS_PER_LAYER, KERNELS_PER_STEP, ROOFLINE, CostModel
from disagg.sim.devices import device
from disagg.sim.metrics import throughput
from disagg.sim.validate import HELD_OUT, load, trtllm_bench_limits, validate
from tests.test_sim import KV_PER_TOKEN, ROUND, TOY, WIRE

# ROUND with fp8 tensor cores at twice its bf16 rate, as H100/H200 have.
FP8 = Device("fp8", flops=1e12, bandwidth=1e11, memory=1e6, price_per_hour=1.0, interconnect=WIRE,
             efficiency=Efficiency(1.0, 1.0, 1.0), fp8_flops=2e12)  # fmt: skip
PLAIN = Serving(terms=ROOFLINE)


def reqs(arrival, prompt, output):
    return Requests(np.array(arrival, float), np.array(prompt, np.int64), np.array(output, np.int64))


def test_throughput_of_one_request_by_hand():
    cost = PLAIN.cost(TOY, ROUND)
    r = simulate(Colocated(Pool(ROUND, 1), "prefill-first"), reqs([0.5], [100], [20]), TOY, PLAIN)
    span = cost.prefill([100]) + sum(cost.decode(1, 100 + j) for j in range(1, 20))
    t = throughput(r)
    assert t.makespan_s == pytest.approx(span, rel=1e-12)  # from the arrival at 0.5 s, not from 0
    assert t.output_tokens_per_s == pytest.approx(20 / span, rel=1e-12)
    assert t.prompt_tokens_per_s == pytest.approx(100 / span, rel=1e-12)
    assert t.requests_per_s == pytest.approx(1 / span, rel=1e-12)


def test_throughput_of_a_fixed_batch_by_hand():
    # Eight identical requests at once: one prefill step of all eight prompts, then 15 decode steps of the batch.
    # In steady state each decode step emits 8 tokens, so the run's output rate is 8·16 / (prefill + Σ decode).
    cost = PLAIN.cost(TOY, ROUND)
    r = simulate(Colocated(Pool(ROUND, 1), "prefill-first"), reqs([0.0] * 8, [50] * 8, [16] * 8), TOY, PLAIN)
    span = cost.prefill([50] * 8) + sum(cost.decode(8, 8 * (50 + j)) for j in range(1, 16))
    t = throughput(r)
    assert t.output_tokens_per_s == pytest.approx(8 * 16 / span, rel=1e-12)
    assert t.prompt_tokens_per_s == pytest.approx(8 * 50 / span, rel=1e-12)
    assert t.requests_per_s == pytest.approx(8 / span, rel=1e-12)
    # Rejected requests count for nothing: one whose KV can never fit leaves the rates of the others unchanged.
    r2 = simulate(Colocated(Pool(ROUND, 1), "prefill-first"), reqs([0.0] * 9, [50] * 8 + [10**6], [16] * 9), TOY, PLAIN)
    assert throughput(r2).output_tokens_per_s == pytest.approx(t.output_tokens_per_s, rel=1e-12)


def test_fp8_runs_gemms_at_the_fp8_peak():
    bf16 = StepCost(TOY, FP8, terms=ROOFLINE)
    fp8 = StepCost(TOY, FP8, dtype_bytes=1, terms=dataclass_replace(ROOFLINE, fp8_gemm=True))
    weight_only = StepCost(TOY, FP8, dtype_bytes=1, terms=ROOFLINE)
    # 1,000 tokens are compute-bound: fp8 tensor cores halve the time; weight-only fp8 computes at the bf16 rate.
    assert fp8.gemm(1000) == pytest.approx(bf16.gemm(1000) / 2, rel=1e-12)
    assert weight_only.gemm(1000) == pytest.approx(bf16.gemm(1000), rel=1e-12)
    # One token is bandwidth-bound: one-byte weights and activations halve the bytes whichever way it computes.
    assert fp8.gemm(1) == pytest.approx(bf16.gemm(1) / 2, rel=1e-12)
    assert weight_only.gemm(1) == pytest.approx(fp8.gemm(1), rel=1e-12)
    # Presets: H100 and H200 have fp8 tensor cores at twice the bf16 peak (derated alike), A100 has none.
    for name in ("h100", "h200"):
        d = device(name)
        assert d.fp8_flops / 1979e12 == pytest.approx(0.72) and d.flops / 989e12 == pytest.approx(0.8)
    assert device("a100").fp8_flops is None and device("a100").gemm_flops(1) == device("a100").flops


def dataclass_replace(terms, **changes):
    import dataclasses

    return dataclasses.replace(terms, **changes)


def test_overhead_terms_by_hand():
    plain = StepCost(TOY, ROUND, terms=ROOFLINE)
    gpu = plain.step(4, 400)
    # Fixed kernel latency: (9 per layer × 2 layers + 4) kernels × τ on every step.
    tau = 5e-6
    lat = StepCost(TOY, ROUND, terms=dataclass_replace(ROOFLINE, kernel_latency=tau))
    assert lat.step(4, 400) - gpu == pytest.approx((KERNELS_PER_LAYER * 2 + KERNELS_PER_STEP) * tau, rel=1e-9)
    # Host work: added to every step without overlap; with overlap a step takes the longer of the two.
    host = 1e-3
    serial = StepCost(TOY, ROUND, terms=dataclass_replace(ROOFLINE, host_overhead=host, overlap=False))
    overlapped = StepCost(TOY, ROUND, terms=dataclass_replace(ROOFLINE, host_overhead=host, overlap=True))
    assert serial.step(4, 400) == pytest.approx(gpu + host, rel=1e-12)
    assert overlapped.step(4, 400) == pytest.approx(max(gpu, host), rel=1e-12) == host  # the toy's GPU step < 1 ms
    big = plain.step(0, 0, [(4000, 0)])
    assert big > host and overlapped.step(0, 0, [(4000, 0)]) == pytest.approx(big, rel=1e-12)
    # A decode run is flat at the host's pace while the GPU step is shorter, then grows with it: still exact.
    steps, first, growth = overlapped.decode_run(4, 400, 10_000)
    for j in range(steps):
        assert first + j * growth == pytest.approx(overlapped.decode(4, 400 + 4 * j), rel=1e-9)
    # Elementwise passes: per token and layer 2·(3·2 + 2)·64 (norms) + 2·2·(4 + 2)·16 + 2·2·16·4 (RoPE, KV write)
    # + (4 + 2)·128 (SwiGLU) bytes; per logits row 8 · vocab; at the bandwidth.
    per_token = 2 * (2 * 8 * 64 + 2 * 2 * 6 * 16 + 2 * 2 * 16 * 4 + 6 * 128)
    elem = StepCost(TOY, ROUND, terms=dataclass_replace(ROOFLINE, elementwise=True))
    assert elem.step(4, 400) - gpu == pytest.approx((4 * per_token + 4 * 8 * 1000) / 1e11, rel=1e-9)
    # Simulated, one request of 20 output tokens without overlap pays the host once per step: 20 steps.
    one = reqs([0.0], [100], [20])
    t_plain = simulate(Colocated(Pool(ROUND, 1), "prefill-first"), one, TOY, PLAIN).finish[0]
    t_host = simulate(Colocated(Pool(ROUND, 1), "prefill-first"), one, TOY, Serving(terms=serial.terms)).finish[0]
    assert t_host - t_plain == pytest.approx(20 * host, rel=1e-9)


def test_host_work_per_request_by_hand():
    h0, tau = 1e-3, 1e-5
    plain = StepCost(TOY, ROUND, terms=ROOFLINE)
    terms = dataclass_replace(ROOFLINE, host_overhead=h0, host_per_request=tau)
    overlapped = StepCost(TOY, ROUND, terms=terms)
    serial = StepCost(TOY, ROUND, terms=dataclass_replace(terms, overlap=False))
    # Every sequence in the step counts: 4 decodes and 2 prompt chunks are 6 requests' bookkeeping.
    chunks = [(30, 0), (20, 10)]
    assert overlapped.host(6) == pytest.approx(h0 + 6 * tau, rel=1e-12)
    assert serial.step(4, 400, chunks) == pytest.approx(plain.step(4, 400, chunks) + h0 + 6 * tau, rel=1e-12)
    # 200 decodes: the host (3 ms) outlasts the toy's GPU step, so the overlapped step is the host's, and a decode
    # run stays flat at that pace until the GPU step outgrows it.
    assert plain.step(200, 200 * 50) < h0 + 200 * tau
    assert overlapped.step(200, 200 * 50) == pytest.approx(h0 + 200 * tau, rel=1e-12)
    steps, first, growth = overlapped.decode_run(200, 200 * 50, 10_000)
    assert (first, growth) == (pytest.approx(h0 + 200 * tau, rel=1e-12), 0.0)
    for j in range(0, steps, max(1, steps // 7)):
        assert first == pytest.approx(overlapped.decode(200, 200 * (50 + j)), rel=1e-9)
    # Simulated without overlap: 8 requests of 16 output tokens, prefill-first: one prefill step of 8 prompts and
    # 15 decode steps of 8, so the host adds 16 · h0 + (8 + 15 · 8) · tau to the makespan.
    batch = reqs([0.0] * 8, [50] * 8, [16] * 8)
    span = {
        t: throughput(simulate(Colocated(Pool(ROUND, 1), "prefill-first"), batch, TOY, Serving(terms=t))).makespan_s
        for t in (ROOFLINE, dataclass_replace(terms, overlap=False))
    }
    assert span[dataclass_replace(terms, overlap=False)] - span[ROOFLINE] == pytest.approx(
        16 * h0 + (8 + 15 * 8) * tau, rel=1e-9
    )


def test_host_work_per_request_bounds_huge_batches_of_short_requests():
    # Llama-3-8B in fp8, 4,096 sequences decoding at context ~200 (the 128/128 row's batch): the GPU step is
    # 4,096 tokens of GEMMs at the fp8 rate (~52 ms) plus their attention and elementwise passes, 73 ms on the
    # H200 preset and 82 ms on the H100; the host walks 4,096 requests at 26.8 µs plus 4 ms: 113.8 ms. The step
    # takes the host's time on both: there a faster-memory device gains nothing.
    from disagg.roofline import LLAMA3_8B

    terms = CostModel()
    assert terms.host_per_request == 26.8e-6 and terms.host_overhead == 4e-3
    host = 4e-3 + 4096 * 26.8e-6
    for name in ("h100", "h200"):
        cost = StepCost(LLAMA3_8B, device(name), dtype_bytes=1, kv_bytes=1, terms=terms, page_size=32)
        gpu = cost.gpu_step(4096, 4096 * 200)
        assert 0.03 < gpu < host
        assert cost.step(4096, 4096 * 200) == pytest.approx(host, rel=1e-12)
        # Without the term the step is the GPU's alone: 4,096 tokens per gpu seconds instead of per 113.8 ms.
        flat = StepCost(LLAMA3_8B, device(name), dtype_bytes=1, kv_bytes=1, page_size=32,
                        terms=dataclass_replace(terms, host_per_request=0.0))  # fmt: skip
        assert flat.step(4096, 4096 * 200) == pytest.approx(gpu, rel=1e-12)
    # A mixed step of 4,096 decodes and 32 prompts of 128 tokens is GPU-bound (twice the GEMM rows): unchanged.
    cost = StepCost(LLAMA3_8B, device("h200"), dtype_bytes=1, kv_bytes=1, terms=terms, page_size=32)
    mixed = [(128, 0)] * 32
    assert cost.step(4096, 4096 * 200, mixed) == pytest.approx(cost.gpu_step(4096, 4096 * 200, mixed), rel=1e-12)


def test_unquantized_lm_head_by_hand():
    # fp8 weights on a device with fp8 tensor cores at twice the bf16 rate: the layers' GEMMs run at 2e12 FLOP/s,
    # the LM head's (1000 × 64, 128,000 FLOPs per row) at the bf16 1e12, reading 2-byte weights.
    fp8 = dataclass_replace(ROOFLINE, fp8_gemm=True)
    quantized = StepCost(TOY, FP8, dtype_bytes=1, terms=fp8)
    head = StepCost(TOY, FP8, dtype_bytes=1, terms=dataclass_replace(fp8, unquantized_head=True))
    flops_per_row = 2 * 1000 * 64
    # 1,000 compute-bound tokens, all through the head: the head's FLOPs take twice as long.
    assert head.gemm(1000) - quantized.gemm(1000) == pytest.approx(1000 * flops_per_row * (1 / 1e12 - 1 / 2e12))
    # One bandwidth-bound token: one more byte per head weight, and its row's activations in and out at 2 bytes.
    assert head.gemm(1) - quantized.gemm(1) == pytest.approx((1000 * 64 + (64 + 1000)) / 1e11, rel=1e-9)
    # Memory: embedding and head tables (untied) take 2 bytes per parameter, the layers 1.
    assert head.weight_bytes - quantized.weight_bytes == 2 * 1000 * 64 == head.weight_bytes - TOY.weight_bytes(1)
    assert head.kv_capacity_tokens(0.9) == int(
        0.9 * (1e6 - TOY.weight_bytes(1) - 2 * 64_000) // KV_PER_TOKEN
    )  # bf16 KV
    # bf16 weights are unaffected.
    assert StepCost(TOY, FP8, terms=dataclass_replace(fp8, unquantized_head=True)).gemm(1000) == pytest.approx(
        StepCost(TOY, FP8, terms=fp8).gemm(1000), rel=1e-12
    )


def test_activations_and_tiles_by_hand():
    terms = dataclass_replace(ROOFLINE, activation_memory=True)
    c = StepCost(TOY, ROUND, terms=terms)
    act = 64 * 2 * (2 * 64 + 3 * 128) + 8 * 4 * 1000  # 64 tokens of activations, 8 rows of fp32 logits
    assert c.activation_bytes(64, 8) == act
    free = 1e6 - TOY.weight_bytes()
    assert c.kv_capacity_tokens(0.9, 64, 8) == int(0.9 * (free - act) // KV_PER_TOKEN)
    tiled = StepCost(TOY, ROUND, terms=dataclass_replace(ROOFLINE, tiles=True), page_size=16)
    plain = StepCost(TOY, ROUND, terms=ROOFLINE)
    # GEMM rows round up to 64: 10 compute-bound tokens cost what 64 do.
    assert tiled.gemm(10, 10) == pytest.approx(max(plain.gemm(64, 64), tiled.gemm(10, 10)), rel=1e-12)
    # Decode reads half a page more per sequence on average.
    assert tiled.decode_attention(2, 30) == pytest.approx(plain.decode_attention(2, 30 + 2 * 8), rel=1e-12)


def test_trtllm_bench_limits_follow_its_rule():
    # 128/128 on an H200: memory allows far more than 4,096 requests, so the cap binds; 8,192 tokens.
    assert trtllm_bench_limits(LLAMA(), device("h200"), 128, 128, 1, 1) == (4096, 8192)
    # 20000/2000 on an H100: ~51 requests fit, rounded up to 64; tokens raised to fit a prompt beside the batch.
    assert trtllm_bench_limits(LLAMA(), device("h100"), 20000, 2000, 1, 1) == (64, 20064)


def LLAMA():
    from disagg.roofline import LLAMA3_8B

    return LLAMA3_8B


def test_validation_against_the_published_table():
    v = validate()
    table = load()
    assert len(v.rows) == 2 * len(table["rows"]) == 12
    for row in v.rows:
        assert row.predicted > 0 and row.error == pytest.approx(row.predicted / row.published - 1)
    # The bounds, on every row.
    assert v.median_abs_error <= 0.10 and v.max_abs_error <= 0.20


def test_validation_generalises_to_a_held_out_table():
    # Llama-3.3-70B on one H200 and on two H100s in tensor parallelism: rows no default was chosen on.
    v = validate(HELD_OUT)
    assert len(v.rows) == 20
    assert v.median_abs_error <= 0.10 and v.max_abs_error <= 0.20


def test_cli_throughput_validate_and_interrupts(capsys, monkeypatch):
    assert cli.main(["simulate", "--requests", "50", "--rate", "2", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    for key in ("output_tokens_per_s", "prompt_tokens_per_s", "requests_per_s", "makespan_s"):
        assert doc[key] > 0
    assert doc["model"]["name"] == "llama-3-8b" and doc["slo"]["ttft_s"] == 0.5 and doc["workload"]["rate"] == 2
    assert cli.main(["simulate", "--requests", "50", "--rate", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("model llama-3-8b") and "SLOs TTFT 0.5 s" in out and "output tokens/s" in out
    assert cli.main(["validate", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert len(doc["rows"]) == 12 and doc["median_abs_error"] <= 0.10
    # Switching a term off changes the predictions (fp8 GEMMs off: weight-only fp8 at the bf16 rate is slower).
    assert cli.main(["validate", "--json", "--no-fp8-gemm"]) == 0
    slower = json.loads(capsys.readouterr().out)
    assert all(a["predicted_output_tokens_per_s"] < b["predicted_output_tokens_per_s"]
               for a, b in zip(slower["rows"], doc["rows"], strict=True))  # fmt: skip
    # Ctrl-C: one line and status 130; search keeps the best plan found so far.
    monkeypatch.setattr(cli, "_simulate", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    assert cli.main(["simulate"]) == 130
    assert capsys.readouterr().err.strip() == "interrupted"
    calls = {"n": 0}
    real = cli.Search.evaluate

    def interrupt_later(self, dep):
        calls["n"] += 1
        if calls["n"] > 6:
            raise KeyboardInterrupt
        return real(self, dep)

    monkeypatch.setattr(cli.Search, "evaluate", interrupt_later)
    code = cli.main(["search", "--rate", "2", "--requests", "200", "--tps", "1", "--max-instances", "8"])
    out, err = capsys.readouterr()
    assert code == 130 and "interrupted after" in err and "[1] colocated" in err
    assert out.splitlines()[0].startswith("llama-3-8b: 2.0 req/s")


def test_help_shows_defaults_for_every_option(capsys):
    for cmd in ("simulate", "search", "validate"):
        with pytest.raises(SystemExit):
            cli.main([cmd, "--help"])
        text = capsys.readouterr().out
        assert "(default:" in text
        options = [line.split()[0] for line in text.splitlines() if line.startswith("  --")]
        assert options and all(o.startswith("--") for o in options)
    assert isinstance(CostModel(), CostModel)
