"""One engine, both deployments, on the embedded ``tiny`` model with the real kernels (interpreted on CPU):
greedy and seeded sampled tokens do not depend on the mode, the chunk budget or the prefix cache; the prefix cache
hits across generate() calls, shares pages between concurrent requests, evicts under a tiny pool and leaks
nothing after a run, an abort or a failure; an abort mid-chunked-prefill never publishes half-written pages; the
decode stage reuses a previous turn's pages on import."""

import dataclasses

import pytest

from disagg.engine import Engine
from disagg.loader import load_model
from disagg.prefill import PrefillStage
from disagg.request import Request, SamplingParams

GREEDY = SamplingParams(max_new_tokens=2)
SAMPLED = SamplingParams(max_new_tokens=2, temperature=0.9, top_p=0.95, seed=5)
# prompts 0 and 1 share their first two pages of 8 tokens
PROMPTS = [[256, *range(40, 63)], [256, *range(40, 55), 7, 8, 9], [256, 5, 6]]  # 24, 19 and 3 tokens


def requests(sampling=GREEDY, prompts=PROMPTS):
    return [Request(str(i), p, dataclasses.replace(sampling, seed=sampling.seed + i)) for i, p in enumerate(prompts)]


def ids(outputs):
    return [(o.request_id, o.output_ids, o.finish_reason, o.error) for o in outputs]


def all_free(engine):
    return all(p.is_fully_free() for p in engine.pools)


@pytest.fixture(scope="module")
def model():
    return load_model("tiny")[0]


@pytest.fixture(scope="module")
def reference(model):
    """Disaggregated, whole prompts, no prefix cache: the plain pipeline."""
    engine = Engine(model, page_size=8, max_batch_tokens=None, prefix_cache=False)
    return ids(engine.generate(requests()))


def watch_sharing(engine):
    """Record, before every step, the pages requests 0 and 1 hold in common while both are in the same pool."""
    stages = [engine.colocated] if engine.mode == "colocated" else [engine.prefill, engine.decode]
    seen = []
    for stage in stages:
        schedule = stage.scheduler.schedule

        def watched(stage=stage, schedule=schedule):
            step = schedule()
            running = {s.request_id: s for s in stage.scheduler.running}
            if "0" in running and "1" in running:
                pages = [set(stage.pool.pages(running[r].key)) for r in ("0", "1")]
                seen.append(pages[0] & pages[1])
            return step

        stage.scheduler.schedule = watched
    return seen


@pytest.mark.parametrize("mode", ["disaggregated", "colocated"])
@pytest.mark.parametrize("budget", [8, 16, 64, None])
def test_greedy_tokens_do_not_depend_on_mode_chunks_or_cache(model, reference, mode, budget):
    """With the cache on and a budget that makes request 0's prompt take more than one step, request 1 (admitted
    later) finds request 0's two shared pages cached and runs on the same physical pages while request 0 is still
    in the pool. Budget 8 also runs with the cache off (None with the cache off is the reference)."""
    engine = Engine(model, mode=mode, page_size=8, max_batch_tokens=budget)
    seen = watch_sharing(engine)
    outputs = engine.generate(requests())
    assert ids(outputs) == reference
    if budget in (8, 16):
        assert outputs[1].cached_tokens == 16 and engine.metrics.cached_tokens == 16
        # (disaggregated with budget 8, request 0 leaves the prefill stage before request 1 is admitted)
        assert any(len(shared) == 2 for shared in seen) == (mode == "colocated" or budget == 16)
    if budget == 8:
        off = Engine(model, mode=mode, page_size=8, max_batch_tokens=budget, prefix_cache=False)
        assert ids(off.generate(requests())) == reference and off.metrics.cached_tokens == 0
    assert all_free(engine)


@pytest.mark.parametrize("page_size", [1, 4])
def test_small_pages_give_the_same_tokens(model, reference, page_size):
    """Pages below 8 tokens (SGLang's radix cache uses 1): every token its own page, chunked, cached and shared."""
    engine = Engine(model, mode="colocated", page_size=page_size, max_batch_tokens=8)
    outputs = engine.generate(requests())
    assert ids(outputs) == reference and outputs[1].cached_tokens >= 16
    assert all_free(engine)


def test_sampled_tokens_do_not_depend_on_mode_chunks_or_cache(model):
    plain = Engine(model, page_size=8, max_batch_tokens=None, prefix_cache=False).generate(requests(SAMPLED))
    mixed = Engine(model, mode="colocated", page_size=8, max_batch_tokens=8).generate(requests(SAMPLED))
    assert ids(plain) == ids(mixed) and mixed[1].cached_tokens == 16  # (seeds matter: tests/test_engine.py)


def test_cache_hits_across_generate_calls_and_clear(model, reference):
    engine = Engine(model, mode="colocated", page_size=8, max_batch_tokens=None)
    first = engine.generate(requests())
    assert [o.cached_tokens for o in first] == [0, 0, 0]  # all admitted in one step: nothing cached yet
    again = engine.generate(requests())
    assert ids(again) == reference
    # at least one prompt token is computed: 23 of 24 usable -> 2 pages; 18 of 19 -> 2 pages; 2 of 3 -> none
    assert [o.cached_tokens for o in again] == [16, 16, 0]
    summary = engine.metrics.summary(again)
    assert summary["prefix_cache_hit_rate"] == pytest.approx(32 / 46)
    assert all_free(engine) and engine.pools[0].num_cached_pages > 0
    engine.clear_prefix_cache()
    assert engine.pools[0].num_cached_pages == 0 and engine.pools[0].num_free_pages == engine.pools[0].num_pages


def test_eviction_under_a_tiny_pool_leaks_nothing(model, reference):
    """4 pages of 8 tokens, one request at a time: request 0 needs all 4 over its life, so the pages cached by
    the others must be evicted for it; tokens are unchanged and the pool comes back fully free."""
    engine = Engine(model, mode="colocated", page_size=8, num_pages=4, max_batch_size=1)
    assert ids(engine.generate(requests())) == reference
    assert ids(engine.generate(requests()[::-1])) == reference[::-1]
    pool = engine.pools[0]
    assert pool.is_fully_free() and 0 < pool.num_cached_pages <= pool.num_pages
    engine.clear_prefix_cache()
    assert pool.is_fully_free() and pool.num_cached_pages == 0


def test_abort_mid_chunked_prefill_publishes_only_complete_pages(model, reference):
    stage = PrefillStage(model, Engine(model, page_size=8).pools[0], max_batch_tokens=12)
    stage.add(requests()[0])
    assert stage.step() == []  # tokens 0..11 written: page 0 complete, page 1 half-written
    assert stage.abort("0") and not stage.has_work
    pool = stage.pool
    assert pool.is_fully_free() and pool.num_cached_pages == 1
    # the same prompt again reuses exactly the complete page and gives the same first token
    stage.add(requests()[0])
    results = []
    while stage.has_work:
        results += stage.step()
    assert results[0].cached_tokens == 8 and results[0].first_token == reference[0][1][0]
    assert pool.is_fully_free()


def test_a_failure_mid_run_leaks_nothing(model, reference):
    """(The disaggregated engine's failure path: tests/test_engine.py.)"""
    engine = Engine(model, mode="colocated", page_size=8, max_batch_tokens=8)
    calls, forward = 0, model.forward

    def failing(*args):
        nonlocal calls
        calls += 1
        if calls == 4:
            raise RuntimeError("injected")
        return forward(*args)

    model.forward = failing
    try:
        with pytest.raises(RuntimeError, match="injected"):
            engine.generate(requests())
    finally:
        del model.forward
    assert all_free(engine)
    assert ids(engine.generate(requests())) == reference  # what the cache kept is whole and right


def test_decode_stage_reuses_the_previous_turns_pages(model):
    """Turn 2's prompt is turn 1's prompt + output + 2 tokens: the decode pool still caches turn 1's full pages, so
    the import copies only the rest; tokens equal a cache-free engine's."""
    engine = Engine(model, page_size=8, decode_page_size=8)
    turn1 = engine.generate([PROMPTS[0]], GREEDY)[0]
    follow = [PROMPTS[0] + turn1.output_ids + [7, 8]]
    turn2 = engine.generate(follow, GREEDY)[0]
    assert engine.metrics.kv_import_skipped_tokens == 24  # turn 1's 24 prompt tokens: three full pages
    assert turn2.cached_tokens == 24  # the prefill side reuses its own three pages
    fresh = Engine(model, page_size=8, decode_page_size=8, prefix_cache=False).generate(follow, GREEDY)[0]
    assert turn2.output_ids == fresh.output_ids
    assert all_free(engine)
