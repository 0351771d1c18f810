"""torch.compile over the public kernels: ``fullgraph=True`` (any graph break fails) gives the eager outputs, the
custom ops' fake implementations agree with the real ones (``torch.library.opcheck``), bad input still raises
the public functions' errors, and (on a GPU) a compiled step replays in a CUDA graph. On CPU the graphs run with the ``aot_eager`` backend (Dynamo, fake tensors and AOT
tracing, without inductor's C++ build, which takes minutes on these machines); on CUDA with inductor."""

import pytest
import torch

import kernels
from tests.paged import random_paged_kv, slot_mapping
from tests.util import DEVICE, ON_CUDA, cu_seqlens, randn

BACKEND = "inductor" if ON_CUDA else "aot_eager"


def compiled(fn, **options):
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, backend=BACKEND, **options)


def assert_same(eager, graph):
    eager = eager if isinstance(eager, tuple) else (eager,)
    graph = graph if isinstance(graph, tuple) else (graph,)
    for a, b in zip(eager, graph, strict=True):
        assert torch.equal(a, b)


def varlen(gen, lengths, heads=4, kv_heads=2, d=32, dtype=torch.float32):
    total = sum(lengths)
    q = randn(total, heads, d, dtype=dtype, generator=gen)
    k = randn(total, kv_heads, d, dtype=dtype, generator=gen)
    v = randn(total, kv_heads, d, dtype=dtype, generator=gen)
    return q, k, v, cu_seqlens(lengths)


@pytest.mark.parametrize(
    "options",
    [dict(), dict(return_lse=True, window=5), dict(causal=False, softcap=3.0, sm_scale=0.3, return_lse=True)],
    ids=["causal", "window-lse", "full-softcap"],
)
def test_prefill_attention_fullgraph(gen, options):
    lengths = [13, 0, 30]
    q, k, v, cu = varlen(gen, lengths)

    def fn(q, k, v, cu):
        return kernels.prefill_attention(q, k, v, cu, cu, max_seqlen_q=30, max_seqlen_k=30, **options)

    assert_same(fn(q, k, v, cu), compiled(fn)(q, k, v, cu))


def test_prefill_then_merge_fullgraph_dynamic_shapes(gen):
    """Two partial attentions merged in one graph, then the same graph on a batch of another size."""

    def fn(q, k, v, cu, k2, v2, longest):
        a = kernels.prefill_attention(q, k, v, cu, cu, return_lse=True, max_seqlen_q=longest, max_seqlen_k=longest)
        b = kernels.prefill_attention(
            q, k2, v2, cu, cu, causal=False, return_lse=True, max_seqlen_q=longest, max_seqlen_k=longest
        )
        out, lse = kernels.merge_attention_states(*a, *b)
        return out * 2, lse

    graph = compiled(fn, dynamic=True)
    for lengths in ([9, 17], [5, 24, 3]):
        q, k, v, cu = varlen(gen, lengths)
        k2, v2 = torch.randn_like(k), torch.randn_like(v)
        args = (q, k, v, cu, k2, v2, max(lengths))
        assert_same(fn(*args), graph(*args))


def test_fake_implementations_match_the_kernels(gen):
    q, k, v, cu = varlen(gen, [7, 12])
    for return_lse in (False, True):
        torch.library.opcheck(
            torch.ops.phaseattn.prefill_attention.default, (q, k, v, cu, cu, True, None, 4, None, None, return_lse, 12)
        )
    lse = randn(19, 4, dtype=torch.float32, generator=gen)
    torch.library.opcheck(torch.ops.phaseattn.merge_attention_states.default, (q, lse, q.flip(0), lse.flip(0)))


def test_bad_input_raises_the_public_error_under_compile(gen):
    q, k, v, cu = varlen(gen, [4])

    def fn(q, k, v, cu):
        return kernels.prefill_attention(q, k, v, cu, cu, window=0, max_seqlen_q=4, max_seqlen_k=4)

    with pytest.raises(ValueError, match="window must be an int >= 1"):
        torch.compile(fn, backend=BACKEND)(q, k, v, cu)
    # fullgraph: Dynamo reports the exception it observed (torch._dynamo.exc.Unsupported) with the error's text
    with pytest.raises(Exception, match="window must be an int >= 1"):
        compiled(fn)(q, k, v, cu)


def paged_step_inputs(gen, dtype=torch.float8_e4m3fn):
    """Two sequences (20 and 9 tokens, pages of 8, fp8 caches) whose last 3 tokens are new this step."""
    lens, new = [20, 9], 3
    kv = random_paged_kv(gen, lens, 2, 32, 8, dtype)
    slots = torch.cat(
        [slot_mapping(kv.block_table, lens, 8)[sum(lens[:b]) : sum(lens[: b + 1])][-new:] for b in (0, 1)]
    )
    return dict(
        k_cache=kv.k_cache,
        v_cache=kv.v_cache,
        block_table=kv.block_table,
        seq_lens=kv.seq_lens,
        slots=slots,
        k_new=randn(2 * new, 2, 32, dtype=torch.float32, generator=gen),
        v_new=randn(2 * new, 2, 32, dtype=torch.float32, generator=gen),
        q_chunk=randn(2 * new, 4, 32, dtype=torch.float32, generator=gen),
        cu_q=cu_seqlens([new, new]),
        q_last=randn(2, 4, 32, dtype=torch.float32, generator=gen),
        sinks=randn(4, dtype=torch.float32, generator=gen),
        k_scale=torch.tensor([0.5], device=DEVICE),
    )


def paged_step(k_cache, v_cache, block_table, seq_lens, slots, k_new, v_new, q_chunk, cu_q, q_last, sinks, k_scale):
    """An engine step in one function: store the new tokens' K/V, attend them as a chunk (paged prefill) and the
    last one alone (decode). Sync-free: every length and split count is given."""
    scales = dict(k_scale=k_scale, v_scale=2.0)  # one in-memory scale, one Python float
    kernels.write_kv_cache(k_new, v_new, k_cache, v_cache, slots, **scales)
    chunk = kernels.paged_prefill_attention(
        q_chunk, k_cache, v_cache, block_table, cu_q, seq_lens, sinks=sinks, max_seqlen_q=3, num_splits=2,
        return_lse=True, **scales,
    )  # fmt: skip
    last = kernels.paged_decode_attention(
        q_last, k_cache, v_cache, block_table, seq_lens, sinks=sinks, num_splits=3, **scales
    )
    return (*chunk, last)


def test_paged_step_fullgraph(gen):
    inputs = paged_step_inputs(gen)
    mine = {name: t.clone() for name, t in inputs.items()}
    assert_same(paged_step(**inputs), compiled(paged_step)(**mine))
    for cache in ("k_cache", "v_cache"):  # the op's mutation of the caches survives functionalization
        assert torch.equal(inputs[cache].view(torch.uint8), mine[cache].view(torch.uint8))


def test_paged_fake_implementations_match_the_kernels(gen):
    x = paged_step_inputs(gen, torch.float32)  # opcheck's own checks do arithmetic that fp8 tensors lack on CPU
    cache = (x["k_cache"], x["v_cache"], x["block_table"])
    scales = (None, 1.0, None, 1.0)  # (tensor, value) pairs; the fp8 scale paths run in test_paged_step_fullgraph
    options = (True, None, None, 4, x["sinks"], *scales, 3, 2, False)  # causal .. return_lse
    checks = dict(test_utils=("test_schema", "test_faketensor"))  # AOT tracing: test_paged_step_fullgraph
    ops = torch.ops.phaseattn
    torch.library.opcheck(
        ops.paged_prefill_attention.default, (x["q_chunk"], *cache, x["cu_q"], x["seq_lens"], *options), **checks
    )
    options = (0.3, 5.0, None, None, *scales, 3, True)  # sm_scale .. return_lse
    torch.library.opcheck(ops.paged_decode_attention.default, (x["q_last"], *cache, x["seq_lens"], *options), **checks)
    writes = (x["k_new"], x["v_new"], x["k_cache"], x["v_cache"], x["slots"], *scales)
    torch.library.opcheck(ops.write_kv_cache.default, writes, **checks)


@pytest.mark.skipif(not ON_CUDA, reason="CUDA graphs need a GPU")
def test_compiled_paged_step_replays_in_a_cuda_graph(gen):
    """A compiled decode step captured in a CUDA graph, replayed on new inputs written into its static buffers,
    gives what eager gives on those inputs."""
    static = paged_step_inputs(gen)
    step = compiled(paged_step)
    for _ in range(2):  # warm-up (autotuning, compilation) outside the capture
        step(**{name: t.clone() for name, t in static.items()})
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = step(**static)
    fresh = paged_step_inputs(gen)
    for name in ("k_cache", "v_cache", "k_new", "v_new", "q_chunk", "q_last", "sinks"):
        static[name].copy_(fresh[name])
    graph.replay()
    torch.cuda.synchronize()
    assert_same(paged_step(**fresh), outputs)
    assert torch.equal(static["k_cache"].view(torch.uint8), fresh["k_cache"].view(torch.uint8))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["disaggregated", "colocated"])
def test_engine_decode_steps_compile_fullgraph_with_eager_tokens(mode):
    """``Engine(compile=...)``: decode-only steps run one fullgraph-compiled forward (a graph break would raise),
    and the tokens are the eager engine's, greedy and sampled."""
    from torch._dynamo.utils import counters

    from disagg.engine import Engine
    from disagg.loader import load_model
    from disagg.request import Request, SamplingParams

    model, _ = load_model("tiny", dtype="float32")
    requests = [
        Request("greedy", [256, *range(40, 57)], SamplingParams(max_new_tokens=4)),
        Request("sampled", [256, 5, 6], SamplingParams(max_new_tokens=4, temperature=0.8, top_p=0.9, seed=3)),
    ]
    eager = Engine(model, mode=mode, cuda_graph=False).generate(requests)
    torch._dynamo.reset()
    counters.clear()
    engine = Engine(model, mode=mode, cuda_graph=False, compile=BACKEND)
    compiled = engine.generate(requests)
    assert [o.output_ids for o in compiled] == [o.output_ids for o in eager]
    assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"]
    with pytest.raises(TypeError, match="compile"):
        Engine(model, compile=1)


@pytest.mark.cuda
@pytest.mark.skipif(not ON_CUDA, reason="CUDA graphs need a GPU")
def test_compiled_engine_decode_steps_replay_in_cuda_graphs():
    """With both on, each batch bucket captures the compiled decode step in a CUDA graph; tokens as without
    compiling."""
    from disagg.engine import Engine
    from disagg.loader import load_model
    from disagg.request import SamplingParams

    model, _ = load_model("tiny", dtype="float32")
    prompts = [[256, *range(40, 57)], [256, 5, 6], [256, 70, 71, 72, 73]]
    sampling = SamplingParams(max_new_tokens=8)
    graphs_only = Engine(model, num_splits=2).generate(prompts, sampling)
    torch._dynamo.reset()
    engine = Engine(model, num_splits=2, compile=BACKEND)
    both = engine.generate(prompts, sampling)
    assert engine.decode.graphs is not None and engine.decode.graphs.forward == engine.decode.compiled.logits
    assert any(b.graph is not None for b in engine.decode.graphs._buckets.values())
    assert [o.output_ids for o in both] == [o.output_ids for o in graphs_only]
