"""disagg.sim: step costs by hand, single requests against their analytic latencies, queueing theory, conservation,
memory limits, determinism, calibration from bench results, workloads, the search and the command line."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from disagg.roofline import LLAMA3_8B, ModelShape
from disagg.sim import (
    SLO,
    Bursty,
    Colocated,
    Device,
    Disaggregated,
    Efficiency,
    Fixed,
    LogNormal,
    Poisson,
    Pool,
    Requests,
    Serving,
    StepCost,
    TraceLengths,
    Uniform,
    Workload,
    attainment,
    calibrated_devices,
    device,
    link,
    read_results,
    simulate,
)
from disagg.sim import __main__ as cli
from disagg.sim.costs import ROOFLINE
from disagg.sim.devices import DEFAULT
from disagg.sim.links import Link
from disagg.sim.search import Search, Target, requests_for
from disagg.sim.study import Scenario, conclusion

DATA = Path(__file__).parent / "data"

# A toy decoder and a device with round numbers, so every cost below is arithmetic one can check by hand.
TOY = ModelShape("toy", layers=2, hidden=64, q_heads=4, kv_heads=2, head_dim=16, ffn=128, vocab=1000)
WIRE = Link("wire", bandwidth=1e10, latency=1e-6)
ROUND = Device("round", flops=1e12, bandwidth=1e11, memory=1e6, price_per_hour=1.0, interconnect=WIRE,
               efficiency=Efficiency(1.0, 1.0, 1.0))  # fmt: skip
# GEMM params: 2 layers x (q/k/v/o 64·16·12 + MLP 3·64·128), and the LM head 1000·64; 2 FLOPs per param per row.
LAYER_PARAMS, HEAD_PARAMS = 2 * (64 * 16 * 12 + 3 * 64 * 128), 1000 * 64
GEMM_PARAMS = LAYER_PARAMS + HEAD_PARAMS  # 137,728
LAYER_ACT, HEAD_ACT = 2 * 2 * (2 * 64 + 16 * 12 + 4 * 128), 2 * (64 + 1000)  # bf16 activations in/out per row
ACT_BYTES = LAYER_ACT + HEAD_ACT
KV_PER_TOKEN = 2 * 2 * 2 * 16 * 2  # K and V x layers x kv_heads x head_dim x bf16 = 256 bytes


def requests(arrival, prompt, output):
    return Requests(np.array(arrival, float), np.array(prompt, np.int64), np.array(output, np.int64))


def test_step_costs_by_hand():
    c = StepCost(TOY, ROUND, terms=ROOFLINE)
    # GEMMs: one token is bandwidth-bound (the weights), a thousand are compute-bound.
    assert c.gemm(1) == pytest.approx(max(2 * GEMM_PARAMS / 1e12, (2 * GEMM_PARAMS + ACT_BYTES) / 1e11), rel=1e-12)
    assert c.gemm(1000) == pytest.approx(1000 * 2 * GEMM_PARAMS / 1e12, rel=1e-12)
    # Prefill attention of an 8-token prompt: 36 causal pairs; q/out of 4 heads and K/V of 2 heads, 8 tokens, bf16.
    flops = 2 * 4 * 4 * 36 * 16
    nbytes = 2 * 16 * 2 * (2 * 4 * 8 + 2 * 2 * 8)
    assert c.prefill_attention([(8, 0)]) == pytest.approx(max(flops / 1e12, nbytes / 1e11), rel=1e-12)
    # A 4-token chunk after 8 cached tokens: rows see 9..12 keys.
    flops = 2 * 4 * 4 * (9 + 10 + 11 + 12) * 16
    nbytes = 2 * 16 * 2 * (2 * 4 * 4 + 2 * 2 * 12)
    assert c.prefill_attention([(4, 8)]) == pytest.approx(max(flops / 1e12, nbytes / 1e11), rel=1e-12)
    # Decode, two sequences with contexts 10 and 20: K/V of 30 tokens plus q/out of both, all layers.
    flops = 2 * 4 * 4 * 30 * 16
    nbytes = 2 * (2 * 2 * 30 * 16 * 2 + 2 * (2 * 4 * 16 * 2))
    assert c.decode_attention(2, 30) == pytest.approx(max(flops / 1e12, nbytes / 1e11), rel=1e-12)
    # A mixed step is the sum of its pieces, with the GEMMs over all 10 tokens at once and the LM head over the
    # 3 rows that need logits (2 decode tokens, the chunk's last token).
    gemm = max(
        (10 * 2 * LAYER_PARAMS + 3 * 2 * HEAD_PARAMS) / 1e12, (2 * GEMM_PARAMS + 10 * LAYER_ACT + 3 * HEAD_ACT) / 1e11
    )
    assert c.gemm(10, logits=3) == pytest.approx(gemm, rel=1e-12)
    assert c.step(2, 30, [(8, 0)]) == pytest.approx(
        gemm + c.prefill_attention([(8, 0)]) + c.decode_attention(2, 30), rel=1e-12
    )
    assert c.step(0, 0) == 0.0
    # Efficiencies derate: half the decode efficiency doubles the (bandwidth-bound) decode attention time.
    slow = Device("slow", 1e12, 1e11, 1e6, 1.0, WIRE, efficiency=Efficiency(1.0, 1.0, 0.5))
    assert StepCost(TOY, slow, terms=ROOFLINE).decode_attention(2, 30) == pytest.approx(
        2 * c.decode_attention(2, 30), rel=1e-12
    )
    # Memory: 90% of what 1 MB leaves after the weights (incl. embedding and LM head), in 256-byte tokens.
    weights = 2 * (2 * (64 * 16 * 12 + 3 * 64 * 128 + 2 * 64) + 2 * 1000 * 64)
    assert c.kv_capacity_tokens(0.9) == int(0.9 * (1e6 - weights) // KV_PER_TOKEN)
    assert c.kv_bytes_per_token == KV_PER_TOKEN


def test_tensor_parallel_step_costs_by_hand():
    c1, c2 = StepCost(TOY, ROUND, terms=ROOFLINE), StepCost(TOY, ROUND, tp=2, terms=ROOFLINE)
    # Two GPUs: both roofs double; each step adds 2 ring all-reduces per layer of tokens x hidden x bf16 bytes,
    # each 2·(2−1) rounds of (latency + bytes / (2 · bandwidth)).
    allreduce = 2 * 2 * (2 * (1e-6 + 10 * 64 * 2 / (2 * 1e10)))
    assert c2.allreduce(10) == pytest.approx(allreduce, rel=1e-12)
    assert c2.step(2, 30, [(8, 0)]) == pytest.approx(c1.step(2, 30, [(8, 0)]) / 2 + allreduce, rel=1e-12)
    assert c1.step(2, 30, [(8, 0)]) > c1.gemm(10, logits=3)
    assert c1.allreduce(10) == 0.0
    assert c2.kv_capacity_tokens(0.9) > 2 * c1.kv_capacity_tokens(0.9)  # twice the memory, the weights once


def test_decode_run_is_the_sum_of_its_steps():
    for model, dev in ((LLAMA3_8B, device("h100")), (TOY, ROUND)):
        c = StepCost(model, dev)
        steps, first, growth = c.decode_run(7, 7 * 500, 40)
        assert steps == 40
        for j in range(steps):
            assert first + j * growth == pytest.approx(c.decode(7, 7 * 500 + j * 7), rel=1e-12)
    # A device whose ridge sits just below decode's intensity (FLOP per KV byte 512/256 = 2 vs 1.98): decode
    # attention is bandwidth-bound while q/out bytes matter and turns compute-bound as contexts grow (near a context
    # sum of 800). The run stops at the turn, and each side is linear.
    odd = Device("odd", flops=1.98e11, bandwidth=1e11, memory=1e6, price_per_hour=0, interconnect=WIRE)
    c = StepCost(TOY, odd, terms=ROOFLINE)
    steps, first, growth = c.decode_run(4, 4, 10_000)
    assert 150 < steps < 250
    for j in range(steps):
        assert first + j * growth == pytest.approx(c.decode(4, 4 + 4 * j), rel=1e-9)
    _, first2, growth2 = c.decode_run(4, 4 + 4 * steps, 10_000)
    assert first2 + growth2 == pytest.approx(c.decode(4, 8 + 4 * steps), rel=1e-9)


def _decode_total(cost, prompt, output):
    return sum(cost.decode(1, prompt + j) for j in range(1, output))


@pytest.mark.parametrize("policy", ["prefill-first", "chunked"])
def test_single_request_colocated_is_analytic(policy):
    h100 = device("h100")
    cost = StepCost(LLAMA3_8B, h100)
    prompt, output, t0 = 3000, 50, 1.25
    budget = 1024 if policy == "chunked" else 8192
    r = simulate(
        Colocated(Pool(h100, 1), policy), requests([t0], [prompt], [output]), LLAMA3_8B, Serving(token_budget=budget)
    )
    if policy == "chunked":  # 1024 + 1024 + 952 tokens, each chunk attending to what came before
        ttft = sum(cost.step(0, 0, [(q, past)]) for q, past in ((1024, 0), (1024, 1024), (952, 2048)))
    else:
        ttft = cost.prefill([prompt])
    assert r.ttft[0] == pytest.approx(ttft, rel=1e-12)
    assert r.tpot[0] == pytest.approx(_decode_total(cost, prompt, output) / (output - 1), rel=1e-12)
    assert r.first_token[0] == pytest.approx(t0 + ttft, rel=1e-12)


def test_single_request_disaggregated_is_analytic():
    # Different devices and tensor-parallel sizes on the two sides; the transfer uses min(tp) links in parallel.
    h100, a100, ib = device("h100"), device("a100"), link("ib-ndr")
    prompt, output = 2000, 30
    r = simulate(
        Disaggregated(Pool(h100, 1, tp=2), Pool(a100, 1, tp=4), ib), requests([0.5], [prompt], [output]), LLAMA3_8B
    )
    prefill, decode = StepCost(LLAMA3_8B, h100, 2), StepCost(LLAMA3_8B, a100, 4)
    kv = prompt * LLAMA3_8B.kv_bytes_per_token()
    transfer = ib.latency + kv / (2 * ib.bandwidth)
    assert r.ttft[0] == pytest.approx(prefill.prefill([prompt]), rel=1e-12)
    assert r.tpot[0] == pytest.approx((transfer + _decode_total(decode, prompt, output)) / (output - 1), rel=1e-12)
    assert r.kv_bytes_sent == kv


def test_queueing_matches_md1_below_capacity_and_grows_above():
    # One instance, one-token outputs and a token budget of one prompt: every request is served alone in a fixed
    # time s, so the queue is M/D/1 and its mean wait is Pollaczek–Khinchine's rho·s / (2·(1 − rho)).
    prompt = 2048
    s = StepCost(LLAMA3_8B, device("h100")).prefill([prompt])
    serving = Serving(token_budget=prompt)
    dep = Colocated(Pool(device("h100"), 1))
    n = 20_000
    for rho in (0.5, 0.8):
        reqs = Workload(Poisson(rho / s), Fixed(prompt), Fixed(1)).generate(n, seed=1)
        r = simulate(dep, reqs, LLAMA3_8B, serving)
        wait = float(np.mean(r.ttft)) - s
        assert wait == pytest.approx(rho * s / (2 * (1 - rho)), rel=0.1)
        assert r.in_system[-n // 4 :].mean() < 2 * r.in_system[n // 4 : n // 2].mean() + 5  # bounded: no trend
        assert r.utilisation() == pytest.approx(rho, rel=0.05)
    reqs = Workload(Poisson(1.5 / s), Fixed(prompt), Fixed(1)).generate(4000, seed=1)
    r = simulate(dep, reqs, LLAMA3_8B, serving)
    # Above capacity the backlog grows linearly: after n arrivals about n·(1 − 1/rho) are still waiting.
    assert r.in_system[-1] == pytest.approx(4000 * (1 - 1 / 1.5), rel=0.1)
    assert r.in_system[-1000:].mean() > 3 * r.in_system[:1000].mean()


def test_memory_limits_the_decode_batch():
    # The KV pool holds exactly two requests' pages: of four simultaneous requests, the last two are admitted only
    # when the first two finish, and then prefill together.
    prompt, output, page = 100, 28, 16
    pages_each = math.ceil((prompt + output) / page)
    weights = TOY.weight_bytes()
    tight = Device("tight", 1e12, 1e11, weights + (2 * pages_each * page * KV_PER_TOKEN + 1) / 0.9, 1.0, WIRE)
    plain = Serving(page_size=16, terms=ROOFLINE)
    r = simulate(Colocated(Pool(tight, 1)), requests([0.0] * 4, [prompt] * 4, [output] * 4), TOY, plain)
    cost = plain.cost(TOY, tight)
    assert r.instances[0].capacity_pages == 2 * pages_each
    assert r.instances[0].min_free_pages == 0
    first_pair = cost.prefill([prompt, prompt])
    assert r.first_token[:2] == pytest.approx([first_pair] * 2, rel=1e-12)
    done = first_pair + sum(cost.decode(2, 2 * (prompt + j)) for j in range(1, output))
    assert r.finish[:2] == pytest.approx([done] * 2, rel=1e-12)
    assert r.first_token[2:] == pytest.approx([done + first_pair] * 2, rel=1e-12)


def _deployments(dev):
    return [
        Colocated(Pool(dev, 3), "prefill-first"),
        Colocated(Pool(dev, 3), "chunked"),
        Disaggregated(Pool(dev, 2), Pool(dev, 3), link("ib-ndr")),
    ]


def test_conservation_under_memory_pressure():
    # An 8B model on 24 GB GPUs leaves ~5 GB of KV: requests queue for memory on every kind of instance.
    small = Device("small", 300e12, 1e12, 24e9, 1.0, WIRE)
    workload = Workload(Bursty(40.0, 3.0), LogNormal(1500, 1.0, high=16000), LogNormal(200, 1.0, low=2, high=3000))
    reqs = workload.generate(3000, seed=7)
    for dep in _deployments(small):
        r = simulate(dep, reqs, LLAMA3_8B, Serving(max_batch=64, token_budget=4096))
        assert not r.rejected.any()
        assert np.all(np.isfinite(r.finish))  # every request finished ...
        assert np.all(r.arrival <= r.first_token) and np.all(r.first_token <= r.finish)
        # ... exactly once: every prompt token prefilled once, every later token decoded once.
        assert sum(i.prefill_tokens for i in r.instances) == reqs.prompt.sum()
        assert sum(i.decode_tokens for i in r.instances) == (reqs.output - 1).sum()
        assert all(i.free_pages_at_end == i.capacity_pages and i.min_free_pages >= 0 for i in r.instances)
        assert min(i.min_free_pages for i in r.instances) < 0.1 * r.instances[0].capacity_pages  # it was tight
        sent = float(reqs.prompt.sum()) * LLAMA3_8B.kv_bytes_per_token() if isinstance(dep, Disaggregated) else 0.0
        assert r.kv_bytes_sent == pytest.approx(sent, rel=1e-12)


def test_runs_equal_single_steps(monkeypatch):
    # Decode runs (many steps as one event, cut when work arrives) give what stepping one token at a time gives.
    reqs = Workload(Poisson(30.0), LogNormal(800, 0.8), LogNormal(120, 0.8, low=2)).generate(600, seed=3)
    h100 = device("h100")
    runs = [simulate(dep, reqs, LLAMA3_8B, Serving(max_batch=32)) for dep in _deployments(h100)]
    original = StepCost.decode_run
    monkeypatch.setattr(StepCost, "decode_run", lambda self, b, s, k: (1, *original(self, b, s, 1)[1:]))
    for dep, run in zip(_deployments(h100), runs, strict=True):
        step = simulate(dep, reqs, LLAMA3_8B, Serving(max_batch=32))
        np.testing.assert_allclose(run.first_token, step.first_token, rtol=1e-9)
        np.testing.assert_allclose(run.finish, step.finish, rtol=1e-9)
        assert [i.decode_tokens for i in run.instances] == [i.decode_tokens for i in step.instances]


def test_determinism_with_a_seed():
    w = Workload(Bursty(20.0, 2.0), LogNormal(600, 0.7), Uniform(2, 300))
    a, b, c = w.generate(500, seed=5), w.generate(500, seed=5), w.generate(500, seed=6)
    for x in ("arrival", "prompt", "output"):
        np.testing.assert_array_equal(getattr(a, x), getattr(b, x))
        assert not np.array_equal(getattr(a, x), getattr(c, x))
    dep = Disaggregated(Pool(device("h100"), 1), Pool(device("h200"), 1), link("pcie5"))
    ra, rb = simulate(dep, a, LLAMA3_8B), simulate(dep, b, LLAMA3_8B)
    np.testing.assert_array_equal(ra.first_token, rb.first_token)
    np.testing.assert_array_equal(ra.finish, rb.finish)
    # Common random numbers: another rate scales the arrivals and keeps the lengths.
    fast = w.with_rate(40.0).generate(500, seed=5)
    np.testing.assert_allclose(fast.arrival, a.arrival / 2, rtol=1e-12)
    np.testing.assert_array_equal(fast.prompt, a.prompt)


def test_workload_distributions():
    rng = np.random.default_rng(0)
    x = LogNormal(1000, 0.8).sample(rng, 200_000)
    assert x.mean() == pytest.approx(1000, rel=0.02) and x.min() >= 1
    assert LogNormal(1000, 2.0, low=10, high=4000).sample(rng, 10_000).max() <= 4000
    u = Uniform(5, 9).sample(rng, 10_000)
    assert set(np.unique(u)) == {5, 6, 7, 8, 9}
    gaps = Bursty(10.0, 3.0).gaps(rng, 200_000)
    assert gaps.mean() == pytest.approx(0.1, rel=0.03) and gaps.std() / gaps.mean() == pytest.approx(3.0, rel=0.05)
    gaps = Poisson(10.0).gaps(rng, 200_000)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.02)
    for bad in (lambda: Fixed(0), lambda: Uniform(5, 4), lambda: LogNormal(0.5, 1), lambda: Poisson(0)):
        with pytest.raises(ValueError):
            bad()
    with pytest.raises(ValueError, match="either"):
        Workload(Poisson(1.0), Fixed(3))
    with pytest.raises(ValueError, match="non-decreasing"):
        requests([1.0, 0.5], [3, 3], [3, 3])


def test_trace_files(tmp_path):
    azure = tmp_path / "azure.csv"
    azure.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46,374,44\n2023-11-16 18:15:50,396,109\n"
    )
    bare = tmp_path / "bare.csv"
    bare.write_text("374,44\n396,109\n")
    js = tmp_path / "t.json"
    js.write_text(json.dumps([{"prompt_len": 374, "output_len": 44}, {"prompt_len": 396, "output_len": 109}]))
    for path in (azure, bare, js):
        t = TraceLengths.from_file(path)
        assert (t.prompt, t.output) == ((374, 396), (44, 109))
    reqs = Workload(Poisson(5.0), trace=TraceLengths.from_file(azure)).generate(1000, seed=0)
    pairs = set(zip(reqs.prompt.tolist(), reqs.output.tolist(), strict=True))
    assert pairs == {(374, 44), (396, 109)}  # drawn as pairs, never mixed
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="columns"):
        TraceLengths.from_file(tmp_path / "bad.csv")


def test_calibration_from_bench_results(tmp_path):
    path = DATA / "bench_results_h100.json"
    m = read_results(path)
    assert (m.flops, m.bandwidth) == (8.0e14, 3.0e12)
    assert m.prefill_attention == pytest.approx(0.74)  # median of ours only: the peer and the failed row are out
    assert m.decode_attention == pytest.approx(0.85)  # the row without frac_copy counts through its GB/s
    h100 = calibrated_devices([path])["h100"]
    assert (h100.flops, h100.bandwidth, h100.memory) == (8.0e14, 3.0e12, 85520809984.0)
    assert h100.efficiency.decode_attention == pytest.approx(0.85)
    assert h100.provenance.ceilings.startswith("measured") and h100.provenance.gemm == DEFAULT
    assert not h100.measured and "default, not measured" in h100.describe()
    assert device("h100").provenance.ceilings == DEFAULT
    # Partial files: ceilings alone, in other spellings; efficiencies stay default and say so.
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"device": "NVIDIA H200", "ceilings": {"matmul_tflops": 780, "copy_gbps": 4300}}))
    h200 = calibrated_devices([partial])["h200"]
    assert (h200.flops, h200.bandwidth) == (780e12, 4300e9)
    assert h200.provenance.decode_attention == DEFAULT
    smoke = tmp_path / "smoke.json"
    smoke.write_text(json.dumps({"performance_numbers": False, "environment": {"device_name": "CPU"}}))
    with pytest.raises(ValueError, match="smoke"):
        read_results(smoke)
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"environment": {"device_name": "Some Accelerator"}}))
    with pytest.raises(ValueError, match="no preset"):
        calibrated_devices([unknown])


def test_calibration_reads_what_bench_writes(tmp_path):
    # The file as bench's own writer lays it out, so a change of schema on either side fails here.
    from bench.results import Ceilings, ResultsFile, measurement
    from bench.timing import Timing

    env = {"device_name": "NVIDIA H200", "memory_bytes": 150e9, "sm_count": 132}
    ceilings = Ceilings(matmul_flops=7.9e14, copy_bandwidth=4.3e12)
    results = ResultsFile(tmp_path / "h200.json", command="test", env=env, smoke=False)
    results.set_ceilings(ceilings, [])
    for phase, kind, flops, nbytes, ms in (
        ("prefill", "ours", 6e11, 1e9, 1.0),  # 600 TFLOP/s = 0.759 of the matmul ceiling
        ("prefill", "peer", 6e11, 1e9, 0.8),
        ("decode", "ours", 1e9, 3.87e9, 1.0),  # 3.87 TB/s = 0.9 of the copy bandwidth
    ):
        results.add(measurement(phase, "x", kind, {}, flops, nbytes, Timing(ms, ms, ms, "test"), ceilings))
    h200 = calibrated_devices([tmp_path / "h200.json"])["h200"]
    assert (h200.flops, h200.bandwidth, h200.memory) == (7.9e14, 4.3e12, 150e9)
    assert h200.efficiency.prefill_attention == pytest.approx(6e14 / 7.9e14)
    assert h200.efficiency.decode_attention == pytest.approx(0.9)
    smoke = ResultsFile(tmp_path / "smoke.json", command="test", env=env, smoke=True)
    with pytest.raises(ValueError, match="smoke"):
        read_results(smoke.path)


def test_hf_config_and_model_shape(tmp_path):
    cfg = {"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 32, "hidden_size": 4096,
           "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 128256,
           "tie_word_embeddings": False}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    shape = ModelShape.from_hf_config(tmp_path, name="llama-3-8b")
    assert shape == LLAMA3_8B
    tied = ModelShape.from_hf_config({"text_config": {**cfg, "tie_word_embeddings": True, "head_dim": 64}})
    assert (
        tied.head_dim == 64 and tied.params == ModelShape.from_hf_config({**cfg, "head_dim": 64}).params - 128256 * 4096
    )
    with pytest.raises(ValueError, match="mixture-of-experts"):
        ModelShape.from_hf_config({**cfg, "num_local_experts": 8})
    with pytest.raises(ValueError, match="vocab_size"):
        ModelShape.from_hf_config({k: v for k, v in cfg.items() if k != "vocab_size"})
    # GEMM bytes read the GEMM weights (every projection and the LM head), not the embedding table.
    assert LLAMA3_8B.gemm_bytes(0) == 2 * (LLAMA3_8B.params - 128256 * 4096 - 32 * 2 * 4096)
    # Serving steps need logits for some rows only: the LM head is counted for those.
    head = 2 * 128256 * 4096
    assert LLAMA3_8B.gemm_flops(10, logits=2) == LLAMA3_8B.gemm_flops(10) - 8 * head
    assert LLAMA3_8B.gemm_bytes(10, logits=2) == LLAMA3_8B.gemm_bytes(10) - 8 * 2 * (4096 + 128256)


def test_bad_deployments_are_refused():
    reqs = requests([0.0], [10], [2])
    with pytest.raises(ValueError, match="does not fit"):
        simulate(Colocated(Pool(device("l40s"), 1)), reqs, ModelShape.from_hf_config(
            {"num_hidden_layers": 80, "hidden_size": 8192, "num_attention_heads": 64, "num_key_value_heads": 8,
             "intermediate_size": 28672, "vocab_size": 128256}))  # fmt: skip
    for bad in (lambda: Pool(device("h100"), 0), lambda: Colocated(Pool(device("h100"), 1), "fifo"),
                lambda: Serving(mem_util=1.5), lambda: Serving(page_size=0), lambda: StepCost(TOY, ROUND, tp=0)):  # fmt: skip
        with pytest.raises(ValueError):
            bad()
    # A request whose KV can never fit is rejected on arrival and misses its SLOs; the others are served.
    r = simulate(Colocated(Pool(ROUND, 1)), requests([0.0, 0.1], [10, 100_000], [2, 2]), TOY, Serving(terms=ROOFLINE))
    assert list(r.rejected) == [False, True] and np.isfinite(r.finish[0])
    assert attainment(r, SLO(10.0, 10.0)) == 0.5


def test_search_finds_the_fewest_instances():
    w = Workload(Poisson(1.0), LogNormal(1024, 0.6, high=4096), LogNormal(128, 0.6, low=2, high=1024))
    search = Search(LLAMA3_8B, w, Target(60.0, SLO(0.5, 0.05)), n_requests=800, max_instances=32)
    h100 = (device("h100"), 1)
    plan = search.colocated([h100], policies=("chunked",))
    n = plan.deployment.pool.count
    assert plan.summary.attainment >= 0.9
    assert n >= max(search.lower_bounds(h100))
    if n > 1:  # one fewer does not meet the target
        assert not search.meets(Colocated(Pool(h100[0], n - 1), "chunked"))
    assert plan.cost_per_million == pytest.approx(n * 3.0 / (60 * 3600) * 1e6)
    frontier = search.disaggregated_frontier(h100, h100, link("nvlink4"))
    assert frontier and all(p.summary.attainment >= 0.9 for p in frontier)
    ds = [p.deployment.decode.count for p in frontier]
    assert ds == sorted(ds, reverse=True)  # more prefill instances, no more decode instances
    best = search.disaggregated([h100], [h100], link("nvlink4"))
    assert best.deployment.hourly_cost == min(p.deployment.hourly_cost for p in frontier)


def test_command_line(capsys, tmp_path):
    assert cli.main(["simulate", "--deployment", "disaggregated", "--rate", "5", "--requests", "200", "--json",
                     "--bench-results", str(DATA / "bench_results_h100.json"), "--prompt", "uniform:100,900"]) == 0  # fmt: skip
    doc = json.loads(capsys.readouterr().out)
    assert doc["requests"] == 160 and 0 <= doc["attainment"] <= 1  # the first and last 10% are not judged
    assert any("measured" in d for d in doc["devices"])
    assert cli.main(["search", "--rate", "20", "--requests", "300", "--tps", "1", "--max-instances", "8"]) == 0
    out = capsys.readouterr().out
    assert "colocated: $" in out and "disaggregated: $" in out and "default, not measured" in out
    assert cli.main(["simulate", "--trace", str(tmp_path / "missing.csv")]) == 2
    assert "error:" in capsys.readouterr().err


def test_study_max_rate_and_conclusion():
    h100 = device("h100")
    scenario = Scenario(LLAMA3_8B, Workload(Poisson(1.0), Fixed(512), Fixed(64)), SLO(0.3, 0.03), rate=20.0,
                        kinds=((h100, 1),), link=link("ib-ndr"), n_requests=300)  # fmt: skip
    dep = Colocated(Pool(h100, 1), "chunked")
    best = scenario.max_rate(dep, rel_tol=0.05)
    assert best > 1 and scenario.run(dep, best).attainment >= 0.9
    assert scenario.run(dep, 2 * best).attainment < 0.9
    # A target nothing meets within the instance limit: the conclusion says so instead of comparing.
    hopeless = scenario.with_(slo=SLO(0.001, 0.001), max_instances=2)
    cmp = hopeless.compare()
    assert cmp.colocated is None and cmp.disaggregated is None and cmp.disaggregated_over_colocated is None
    ib = link("ib-ndr")
    goodputs = {  # ties in goodput per GPU must not trip the comparison
        Colocated(Pool(h100, 1)): 10.0,
        Colocated(Pool(h100, 2)): 20.0,
        Disaggregated(Pool(h100, 1), Pool(h100, 1), ib): 16.0,
        Disaggregated(Pool(h100, 2), Pool(h100, 2), ib): 32.0,
    }
    text = conclusion(hopeless, cmp, [], [], [], [], goodputs=goodputs)
    assert "No colocated deployment of up to 2 instances meets the target" in text
    assert "sustains 10.0 req/s" in text and "8.0 req/s: 0.80× the goodput per GPU" in text
    # Sized runs: five lifetimes at the SLOs, within bounds.
    assert requests_for(scenario.workload, scenario.target) == 1000  # 20 req/s × 5 × (0.3 + 64 × 0.03) s = 222
    assert requests_for(scenario.workload, Target(1000.0, SLO(1.0, 0.1))) == 10_000
