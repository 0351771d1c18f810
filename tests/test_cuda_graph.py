"""disagg.cuda_graph: decode steps in batch-size buckets with padding rows, replayed from CUDA graphs on a GPU.

On CPU the same padded static steps run eagerly (``capture=False``): their real rows must match an unpadded step
and their padding must write nothing. The ``cuda`` tests check that a replayed graph gives exactly what the same
padded step gives eagerly, and that the engine's tokens do not change with graphs on.
"""

import dataclasses

import pytest
import torch

from disagg import tiny
from disagg.attention import StepBatch
from disagg.cli import build_parser
from disagg.cuda_graph import DecodeGraphs, bucket_for, bucket_sizes
from disagg.engine import Engine, make_pool
from disagg.loader import build_model, load_model
from disagg.request import SamplingParams
from tests.util import DEVICE, ON_CUDA

PROMPTS = {"a": [256, 7, 8, 9, 10], "b": [256, *range(20, 29)], "c": [256, *range(40, 52)]}
STEPS = [["a", "b", "c"], ["a"], ["c", "a"], ["b", "c", "a"]]  # buckets 4, 1, 2, then 4 again (static tensors reused)


def test_buckets():
    assert bucket_sizes(1) == [1]
    assert bucket_sizes(64) == [1, 2, 4, 8, 16, 32, 64]
    assert bucket_sizes(48) == [1, 2, 4, 8, 16, 32, 48]
    assert [bucket_for(n, bucket_sizes(48)) for n in (1, 2, 3, 5, 33, 48, 49)] == [1, 2, 4, 8, 48, 48, None]


def random_model(dtype=torch.float32):
    config = dataclasses.replace(tiny.CONFIG, num_layers=2, windows=(None, 8))  # a windowed layer: two plans
    return build_model(config, tiny.state_dict(config), dtype, torch.device(DEVICE))


def prefilled_pool(model):
    pool = make_pool(model, page_size=4, num_pages=256)  # sequences up to the model's 1024 tokens
    for key, ids in PROMPTS.items():
        pool.allocate(key, len(ids) + len(STEPS))
        batch = StepBatch.build(pool, chunks=[(key, 0, len(ids))], input_ids=ids)
        model(batch.input_ids, batch.positions, batch)
    return pool


def decode_steps(model, graphs_or_none, pool):
    """Run STEPS; yields each step's logits. Every row feeds back a fixed id, so both runs see the same inputs."""
    lengths = {key: len(ids) for key, ids in PROMPTS.items()}
    for rows in STEPS:
        decode = [(key, lengths[key]) for key in rows]
        ids = [100 + lengths[key] for key in rows]
        if graphs_or_none is None:
            batch = StepBatch.build(pool, decode, input_ids=ids)
            logits = model.logits(model(batch.input_ids, batch.positions, batch))
        else:
            logits = graphs_or_none.logits(decode, ids)
        yield logits.clone()
        for key in rows:
            lengths[key] += 1


def test_padded_static_steps_match_unpadded_steps_and_pad_writes_nothing():
    model = random_model()
    padded_pool, plain_pool = prefilled_pool(model), prefilled_pool(model)
    graphs = DecodeGraphs(model, padded_pool, max_batch_size=4, capture=False)
    for padded, plain in zip(
        decode_steps(model, graphs, padded_pool), decode_steps(model, None, plain_pool), strict=True
    ):
        assert padded.shape == plain.shape
        torch.testing.assert_close(padded, plain, rtol=1e-5, atol=1e-5)
    assert sorted(graphs._buckets) == [1, 2, 4]
    # the static plans were made for the pool's longest context: several splits, empty ones included
    assert graphs._buckets[1].batch.plans(model.config.num_heads, model.dtype, None).decode.num_splits > 1
    for layer in range(model.config.num_layers):  # same K/V, and padding rows (slot -1) wrote nowhere
        torch.testing.assert_close(padded_pool.k[layer], plain_pool.k[layer], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(padded_pool.v[layer], plain_pool.v[layer], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="does not fit"):
        graphs.logits([("a", 10)] * 5, [1] * 5)


@pytest.mark.slow
def test_engine_tokens_are_unchanged_by_padded_decode_steps():
    model, _ = load_model("tiny")
    prompts = [[256, *range(40, 57)], [256, 5, 6], [256, 70, 71, 72, 73]]
    sampling = SamplingParams(max_new_tokens=5)
    reference = Engine(model, cuda_graph=False).generate(prompts, sampling)
    for mode in ("disaggregated", "colocated"):
        engine = Engine(model, mode=mode, cuda_graph=False)
        stage = engine.decode if mode == "disaggregated" else engine.colocated
        stage.graphs = DecodeGraphs(model, stage.pool, max_batch_size=stage.max_batch_size, capture=False)
        outputs = engine.generate(prompts, sampling)
        assert [o.output_ids for o in outputs] == [o.output_ids for o in reference], mode
        assert stage.graphs._buckets  # the padded path ran


def test_cuda_graph_switches():
    model = random_model()
    assert Engine(model).decode.graphs is None or ON_CUDA  # a no-op on CPU
    assert Engine(model, cuda_graph=False).decode.graphs is None
    with pytest.raises(TypeError, match="cuda_graph"):
        Engine(model, cuda_graph="no")
    for command in ("run", "decode", "compare"):
        extra = ["--import-dir", "x"] if command == "decode" else []
        args = build_parser().parse_args([command, "--no-cuda-graph", "--compile", *extra])
        assert args.no_cuda_graph and args.compile
    if not ON_CUDA:
        with pytest.raises(ValueError, match="CUDA pool"):
            DecodeGraphs(model, make_pool(model, num_pages=4), max_batch_size=2, capture=True)


@pytest.mark.cuda
@pytest.mark.skipif(not ON_CUDA, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graph_replays_equal_the_same_padded_steps_run_eagerly(dtype):
    model = random_model(dtype)
    graph_pool, eager_pool = prefilled_pool(model), prefilled_pool(model)
    graphs = DecodeGraphs(model, graph_pool, max_batch_size=4)
    eager = DecodeGraphs(model, eager_pool, max_batch_size=4, capture=False)
    assert graphs.capture
    for replayed, plain in zip(
        decode_steps(model, graphs, graph_pool), decode_steps(model, eager, eager_pool), strict=True
    ):
        assert torch.equal(replayed, plain)
    assert all(b.graph is not None for b in graphs._buckets.values())
    for layer in range(model.config.num_layers):
        assert torch.equal(graph_pool.k[layer], eager_pool.k[layer])
        assert torch.equal(graph_pool.v[layer], eager_pool.v[layer])


@pytest.mark.cuda
@pytest.mark.skipif(not ON_CUDA, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("mode", ["disaggregated", "colocated"])
def test_engine_tokens_with_and_without_graphs(mode):
    model, _ = load_model("tiny", dtype="float32")
    prompts = [[256, *range(40, 57)], [256, 5, 6], [256, 70, 71, 72, 73]]
    sampling = SamplingParams(max_new_tokens=8)
    eager = Engine(model, mode=mode, cuda_graph=False, num_splits=2).generate(prompts, sampling)
    engine = Engine(model, mode=mode, num_splits=2)
    graphed = engine.generate(prompts, sampling)
    stage = engine.decode if mode == "disaggregated" else engine.colocated
    assert stage.graphs is not None and any(b.graph is not None for b in stage.graphs._buckets.values())
    assert [o.output_ids for o in graphed] == [o.output_ids for o in eager]
