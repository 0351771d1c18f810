"""torch.compile over the public kernels: ``fullgraph=True`` (any graph break fails) gives the eager outputs, the
custom ops' fake implementations agree with the real ones (``torch.library.opcheck``), and bad input still raises
the public functions' errors. On CPU the graphs run with the ``aot_eager`` backend (Dynamo, fake tensors and AOT
tracing, without inductor's C++ build, which takes minutes on these machines); on CUDA with inductor."""

import pytest
import torch

import kernels
from tests.util import ON_CUDA, cu_seqlens, randn

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
            torch.ops.phaseattn.prefill_attention.default, (q, k, v, cu, cu, True, None, 4, None, return_lse, 12)
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
