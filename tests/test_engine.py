"""The two-stage engine on the embedded ``tiny-random`` model, with the real kernels (interpreted on CPU): prefill +
decode through export files equals one-process ``run``, page sizes may differ between stages, pools come back
fully free after success, failure and abort, a full decode pool makes requests wait, bad requests fail alone."""

import dataclasses

import pytest
import torch

from disagg import tiny
from disagg.attention import StepBatch
from disagg.decode import DecodeStage
from disagg.engine import Engine, make_pool
from disagg.export import read_export_file, write_export
from disagg.loader import build_model, load_model
from disagg.prefill import PrefillStage
from disagg.request import Request, SamplingParams

GREEDY = SamplingParams(max_new_tokens=5)
SAMPLED = SamplingParams(max_new_tokens=5, temperature=0.9, top_p=0.95, seed=3)
PROMPTS = [[256, *range(40, 57)], [256, 5, 6], [256, *range(100, 130)]]  # 18, 3 and 31 tokens


def requests(sampling=GREEDY, prompts=PROMPTS):
    return [Request(str(i), p, dataclasses.replace(sampling, seed=sampling.seed + i)) for i, p in enumerate(prompts)]


@pytest.fixture(scope="module")
def model():
    return load_model("tiny-random")[0]


@pytest.fixture(scope="module")
def reference(model):
    """One-process outputs for greedy and sampled requests (page size 16 in both stages)."""
    return {s: Engine(model).generate(requests(s)) for s in (GREEDY, SAMPLED)}


def ids(outputs):
    return [(o.request_id, o.output_ids, o.finish_reason) for o in outputs]


def test_run_completes_every_request(model, reference):
    for sampling, outputs in reference.items():
        assert [o.request_id for o in outputs] == ["0", "1", "2"]
        for o, p in zip(outputs, PROMPTS, strict=True):
            assert o.error is None and o.prompt_ids == p and o.finish_reason == "length"
            assert len(o.output_ids) == sampling.max_new_tokens and o.ttft_s > 0 and o.tpot_s > 0
    # sampling changes the tokens; greedy differs from sampled
    assert ids(reference[GREEDY]) != ids(reference[SAMPLED])


def test_greedy_decode_agrees_with_prefill_of_the_whole_sequence(model, reference):
    """Decode tokens (paged decode kernel) are what a prefill over prompt + outputs (prefill kernel) predicts."""
    for o in reference[GREEDY][:2]:
        seq = o.prompt_ids + o.output_ids[:-1]
        pool = make_pool(model, num_pages=4)
        pool.allocate("s", len(seq))
        batch = StepBatch.build(pool, chunks=[("s", 0, len(seq))])
        logits = model.logits(model(torch.tensor(seq), batch.positions, batch))
        assert logits[len(o.prompt_ids) - 1 :].argmax(-1).tolist() == o.output_ids


@pytest.mark.parametrize("prefill_page, decode_page, sampling", [(16, 8, GREEDY), (8, 32, SAMPLED)])
def test_prefill_then_decode_through_files_equals_run(model, reference, tmp_path, prefill_page, decode_page, sampling):
    stage = PrefillStage(model, make_pool(model, page_size=prefill_page, num_pages=8))
    for r in requests(sampling):
        stage.add(r)
    while stage.has_work:
        for res in stage.step():
            write_export(tmp_path / f"{res.request.request_id}.safetensors", res.export)
    assert stage.pool.is_fully_free()
    pool = make_pool(model, page_size=decode_page, num_pages=16)
    decode = DecodeStage(model, pool)
    for f in sorted(tmp_path.glob("*.safetensors")):
        decode.add(read_export_file(f, pool))
    outputs = []
    while decode.has_work:
        outputs += decode.step()
    assert pool.is_fully_free()
    assert sorted(ids(outputs)) == ids(reference[sampling])


def test_seeded_sampling_is_reproducible(model, reference):
    """The same seeds give the same tokens in another engine (another page size, another batch); another seed
    gives others."""
    again = requests(SAMPLED)[:2]
    reseeded = Request("reseeded", PROMPTS[0], dataclasses.replace(SAMPLED, seed=100))
    outputs = Engine(model, page_size=32).generate([*again, reseeded])
    assert ids(outputs[:2]) == ids(reference[SAMPLED][:2])
    assert outputs[2].output_ids != outputs[0].output_ids


def test_full_decode_pool_makes_requests_wait(model, reference):
    """A decode pool of 5 pages of 8 tokens cannot hold all requests at once (over their lives they need 3, 1 and
    5 pages): the last one waits for pages, and everyone finishes with the same tokens."""
    engine = Engine(model, page_size=8, decode_num_pages=5, num_pages=8)
    steps = []
    step = engine.decode.step

    def watched():
        out = step()
        steps.append(engine.decode.num_running)
        return out

    engine.decode.step = watched
    outputs = engine.generate(requests(GREEDY))
    assert ids(outputs) == ids(reference[GREEDY])
    assert max(steps) < len(PROMPTS)  # never all at once
    assert engine.prefill.pool.is_fully_free() and engine.decode.pool.is_fully_free()


def test_bad_requests_fail_alone(model, reference):
    engine = Engine(model, num_pages=2)  # 32 tokens per pool
    bad = [
        Request("empty", [], GREEDY),
        Request("longer-than-pool", [256] * 33, GREEDY),
        Request("outside-vocab", [256, 999], GREEDY),
        Request("never-fits-decode", [256, 1, 2], dataclasses.replace(GREEDY, max_new_tokens=40)),
    ]
    outputs = engine.generate([*bad, *requests(GREEDY)[:2]])
    errors = {o.request_id: o.error for o in outputs[:4]}
    assert "prompt is empty" in errors["empty"]
    assert "more than the KV pool holds (32)" in errors["longer-than-pool"]
    assert "outside the vocabulary" in errors["outside-vocab"]
    assert "more than the decode pool holds (32)" in errors["never-fits-decode"]
    assert all(o.finish_reason == "error" for o in outputs[:4])
    assert ids(outputs[4:]) == ids(reference[GREEDY][:2])
    assert engine.prefill.pool.is_fully_free() and engine.decode.pool.is_fully_free()


def test_prompt_or_generation_longer_than_context_is_refused_per_request(model):
    short = build_model(
        dataclasses.replace(tiny.CONFIG, max_position_embeddings=20), tiny.state_dict(), torch.float32, model.device
    )
    prompts = [[256] * 21, [256, *range(1, 18)], [256, *range(1, 8)]]
    outputs = Engine(short).generate(prompts, SamplingParams(max_new_tokens=10, eos_token_ids=()))
    assert "longer than the model's context of 20" in outputs[0].error
    # 18 prompt tokens + 10 new ones would feed positions up to 26: refused, saying how many fit (3)
    assert outputs[1].finish_reason == "error" and outputs[1].output_ids == []
    assert "18 prompt tokens + max_new_tokens 10 need 27 positions" in outputs[1].error
    assert "at most 3 new tokens" in outputs[1].error
    # 8 + 10 - 1 = 17 positions fit: the request runs to max_new_tokens
    assert len(outputs[2].output_ids) == 10 and outputs[2].finish_reason == "length" and outputs[2].error is None


def test_stops_at_eos(model, reference):
    greedy = reference[GREEDY][0].output_ids
    eos = greedy[2]
    out = Engine(model).generate([PROMPTS[0]], dataclasses.replace(GREEDY, eos_token_ids=(eos,)))[0]
    cut = greedy.index(eos) + 1
    assert out.output_ids == greedy[:cut] and out.finish_reason == "eos"


def test_pools_are_fully_free_after_a_failure_and_after_abort(model):
    engine = Engine(model)
    calls = 0
    forward = model.forward

    def failing(*args):
        nonlocal calls
        calls += 1
        if calls == 3:  # prefill, first decode step, then fail in the second decode step
            raise RuntimeError("injected")
        return forward(*args)

    model.forward = failing
    try:
        with pytest.raises(RuntimeError, match="injected"):
            engine.generate(requests(GREEDY))
    finally:
        del model.forward
    assert engine.prefill.pool.is_fully_free() and engine.decode.pool.is_fully_free()
    assert not engine.prefill.has_work and not engine.decode.has_work

    stage = PrefillStage(model, make_pool(model, num_pages=8))
    for r in requests(GREEDY):
        stage.add(r)
    results = stage.step()
    decode = DecodeStage(model, make_pool(model, num_pages=8))
    for res in results:
        decode.add(res.export)
    decode.step()
    aborted = decode.abort("2")
    assert aborted.finish_reason == "aborted" and len(aborted.output_ids) == 2
    decode.abort_all()
    assert decode.pool.is_fully_free() and not decode.has_work


def test_fp8_kv_cache(model, reference):
    """fp8 pools store K/V as float8_e4m3fn (scale 1.0) and hand them over as fp8; the first token comes from the
    prefill's unquantized attention, so it matches the float run exactly."""
    engine = Engine(model, kv_dtype=torch.float8_e4m3fn, page_size=8, decode_page_size=16)
    outputs = engine.generate(requests(GREEDY)[:2])
    for o, ref in zip(outputs, reference[GREEDY], strict=False):
        assert o.error is None and len(o.output_ids) == GREEDY.max_new_tokens
        assert o.output_ids[0] == ref.output_ids[0]
    assert engine.decode.pool.k[0].dtype == torch.float8_e4m3fn
    assert engine.prefill.pool.is_fully_free() and engine.decode.pool.is_fully_free()


@pytest.mark.parametrize(
    "kwargs, error, name",
    [
        ({"num_splits": 0}, ValueError, "num_splits"),
        ({"num_splits": -1}, ValueError, "num_splits"),
        ({"num_splits": "x"}, TypeError, "num_splits"),
        ({"kv_dtype": torch.int8}, ValueError, "kv_dtype"),
        ({"kv_dtype": torch.float64}, ValueError, "kv_dtype"),
        ({"max_batch_tokens": 0}, ValueError, "max_batch_tokens"),
        ({"max_batch_tokens": -5}, ValueError, "max_batch_tokens"),
        ({"decode_page_size": 0}, ValueError, "decode_page_size"),
        ({"num_pages": 2.5}, TypeError, "num_pages"),
        ({"decode_num_pages": 0}, ValueError, "decode_num_pages"),
        ({"max_batch_size": 0}, ValueError, "max_batch_size"),
        ({"mode": "both"}, ValueError, "mode"),
        ({"prefix_cache": "no"}, TypeError, "prefix_cache"),
    ],
)
def test_engine_refuses_bad_arguments_at_construction(model, kwargs, error, name):
    with pytest.raises(error, match=name):
        Engine(model, **kwargs)


def test_api_misuse_names_the_argument_and_leaks_nothing(model):
    with pytest.raises(TypeError, match="model must be"):
        Engine(None)
    stage = PrefillStage(model, make_pool(model, num_pages=4))
    with pytest.raises(TypeError, match=r"request must be a disagg\.Request, got list"):
        stage.add([[256, 1, 2]])
    assert not stage.has_work
    decode = DecodeStage(model, make_pool(model, num_pages=4))
    for args, name in [((-50, -50), "num_tokens"), ((10, -50), "max_new_tokens"), ((2.5, 3), "num_tokens")]:
        with pytest.raises((TypeError, ValueError), match=name):
            decode.reserve("r", *args)
    assert decode.reserve("r", 20, 5) and decode.pool.num_free_pages == 2
    aborted = decode.abort("r")  # the reservation goes with the request
    assert aborted.finish_reason == "aborted" and decode.pool.is_fully_free() and not decode.has_work
    assert decode.abort("r") is None
