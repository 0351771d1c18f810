"""Host reads of tensor values during generation: the number per step must not grow with the layer count (on
CUDA each read is a device sync; see tests/host_reads.py for what counts)."""

import dataclasses

import pytest
import torch

from disagg import tiny
from disagg.engine import Engine
from disagg.loader import build_model
from disagg.request import SamplingParams
from disagg.sampling import sample_ids
from tests import host_reads
from tests.host_reads import count_host_reads

PROMPTS = [[256, *range(40, 57)], [256, 5, 6]]
SAMPLING = SamplingParams(max_new_tokens=6, temperature=0.8, top_p=0.9, seed=1)


def random_llama(num_layers: int):
    config = dataclasses.replace(tiny.CONFIG, num_layers=num_layers, windows=(None,) * num_layers)
    return build_model(config, tiny.state_dict(config), torch.float32, torch.device("cpu"))


def reads_during_generate(num_layers: int):
    engine = Engine(random_llama(num_layers))
    with count_host_reads() as counts:
        outputs = engine.generate(PROMPTS, SAMPLING)
    assert all(len(o.output_ids) == SAMPLING.max_new_tokens for o in outputs)
    return counts


def test_the_counter_sees_project_reads_only(monkeypatch):
    t = torch.arange(4)
    with count_host_reads() as counts:
        t.sum().item(), t.tolist(), torch.testing.assert_close(t, t)  # this file is not the project's code
    assert not counts
    # a read from a project frame counts, with its method and site
    monkeypatch.setattr(host_reads, "PROJECT_DIRS", (str(host_reads.ROOT / "tests") + "/",))
    with count_host_reads() as counts:
        t.sum().item()
        bool(t.any())
        int(t[0])
        t.cpu()
    assert sorted(m for m, _ in counts) == ["__bool__", "__int__", "cpu", "item"]
    assert all(site.startswith("tests/test_host_reads.py:") for _, site in counts)


def test_batched_sampling_makes_no_host_read(gen):
    logits = torch.randn(4, 300, generator=gen)
    params = [SamplingParams(), SamplingParams(temperature=0.7, top_k=20, top_p=0.9, min_p=0.05, seed=2)] * 2
    with count_host_reads() as counts:
        sample_ids(logits, params, [0, 1, 2, 3])
    assert not counts, host_reads.summary(counts)


@pytest.mark.slow
def test_host_reads_do_not_grow_with_the_layer_count(record_property):
    counts = {layers: reads_during_generate(layers) for layers in (2, 6)}
    totals = {layers: sum(c.values()) for layers, c in counts.items()}
    record_property("host_reads", totals)
    report = "\n".join(
        f"{layers} layers: {totals[layers]} reads\n{host_reads.summary(c)}" for layers, c in counts.items()
    )
    assert totals[2] == totals[6], report
