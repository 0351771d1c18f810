"""Bad input to the kernels' launchers, class by class: index tensors in every form (strided views, lists, None,
wrong dtype, rank or device, out-of-range values), every tensor argument given as a non-tensor, and non-finite
scales. Each case is refused with a TypeError/ValueError naming the argument, or computes the right answer; none
reads or writes outside a tensor.

The index-tensor property runs in a child process: a launch that touched memory outside its tensors can kill the
process (SIGSEGV, "double free"), and that must fail this test, not the test run."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import kernels
from kernels import decode, kv_cache, merge, paged_prefill, prefill
from tests.paged import random_paged_kv, slot_mapping
from tests.util import DEVICE, ON_CUDA, cu_seqlens, randn, trap_launches

ROOT = Path(__file__).resolve().parent.parent
HUGE = 100_000  # far past the end of every tensor below: a kernel that used it as an index would leave its tensors
WRONG_DEVICE = "meta"


# --- the kernels' calls, with every index-tensor argument named --------------------------------------------------


def _calls(gen: torch.Generator) -> dict[str, tuple[Callable, list, dict, dict[str, int]]]:
    """kernel name -> (function, args, kwargs, {index argument: position in args}) for one valid small call."""
    lens, hq, hkv, d, ps = [3, 0, 5, 6], 2, 1, 32, 8
    q, k, v = (randn(sum(lens), h, d, dtype=torch.float32, generator=gen) for h in (hq, hkv, hkv))
    cu = cu_seqlens(lens)
    kv = random_paged_kv(gen, [5, 12], hkv, d, ps, torch.float32)
    slots = slot_mapping(kv.block_table, [5, 12], ps)
    kw, vw = (randn(slots.numel(), hkv, d, dtype=torch.float32, generator=gen) for _ in "kv")
    qd = randn(2, hq, d, dtype=torch.float32, generator=gen)
    qp = randn(2 + 5, hq, d, dtype=torch.float32, generator=gen)  # 2 and 5 new tokens of the 5- and 12-token sequences
    return {
        "prefill_attention": (
            kernels.prefill_attention,
            [q, k, v, cu, cu.clone()],
            {},
            {"cu_seqlens_q": 3, "cu_seqlens_k": 4},
        ),
        "write_kv_cache": (kernels.write_kv_cache, [kw, vw, kv.k_cache, kv.v_cache, slots], {}, {"slot_mapping": 4}),
        "paged_decode_attention": (
            kernels.paged_decode_attention,
            [qd, *kv.args],
            {"num_splits": 2},
            {"block_table": 3, "seq_lens": 4},
        ),
        "paged_prefill_attention": (
            kernels.paged_prefill_attention,
            [qp, kv.k_cache, kv.v_cache, kv.block_table, cu_seqlens([2, 5]), kv.seq_lens],
            {"num_splits": 2},
            {"block_table": 3, "cu_seqlens_q": 4, "seq_lens": 5},
        ),
    }


def _variants(t: torch.Tensor) -> dict[str, object]:
    """Every form of a valid index tensor ``t`` the property tries. The strided views sit among HUGE neighbours, so
    a kernel that ignored their strides would index far outside its tensors."""
    interleaved = torch.stack([t, torch.full_like(t, HUGE)], dim=-1)
    variants = {
        "strided view": interleaved[..., 0],
        "list": t.tolist(),
        "None": None,
        "float32": t.float(),
        "int16": t.short(),
        "int64": t.long(),
        "extra dimension": t[None],
        "wrong device": t.to(WRONG_DEVICE),
        "huge first value": t.clone().index_fill_(-1, torch.tensor([0], device=t.device), HUGE),
        "huge last value": t.clone().index_fill_(-1, torch.tensor([t.shape[-1] - 1], device=t.device), HUGE),
    }
    if t.dim() == 2:
        variants["column-major"] = t.t().contiguous().t()
    return variants


def _snapshot(args: list) -> list:
    return [a.clone() if isinstance(a, torch.Tensor) and a.device.type != "meta" else a for a in args]


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b) or bool(torch.isnan(a).all() and torch.isnan(b).all())
    return a == b


def index_cases() -> dict[str, str]:
    """Run every index-tensor variant of every kernel; return "kernel/argument/variant" -> outcome, where the outcome
    is "correct", "refused TypeError ..." / "refused ValueError ..." (the message names the argument and nothing
    changed), or something else that the test reports as a failure."""
    gen = torch.Generator().manual_seed(0)
    outcomes = {}
    for kernel, (fn, args, kwargs, index_args) in _calls(gen).items():
        before = _snapshot(args)
        expected = fn(*args, **kwargs)
        expected_args = _snapshot(args)
        for name, pos in index_args.items():
            for variant, bad in _variants(args[pos]).items():
                trial = _snapshot(before)
                trial[pos] = bad
                try:
                    out = fn(*trial, **kwargs)
                except (TypeError, ValueError) as e:
                    unchanged = all(_same(a, b) for i, (a, b) in enumerate(zip(trial, before, strict=True)) if i != pos)
                    named = name in str(e)
                    outcome = f"refused {type(e).__name__}" if named and unchanged else f"bad refusal {e!r}"
                except Exception as e:  # any other error is an outcome to report
                    outcome = f"crashed {e!r}"
                else:
                    written = all(
                        _same(a, b) for i, (a, b) in enumerate(zip(trial, expected_args, strict=True)) if i != pos
                    )
                    outcome = "correct" if _same(out, expected) and written else "WRONG RESULT"
                outcomes[f"{kernel}/{name}/{variant}"] = outcome
    return outcomes


def test_every_index_argument_in_every_form_is_refused_or_correct():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    code = "import json; from tests.test_bad_input import index_cases; print(json.dumps(index_cases()))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"the child died (rc {proc.returncode}):\n{proc.stderr[-3000:]}"
    outcomes = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(outcomes) == 8 * 10 + 2  # eight index arguments; the two block_tables also column-major
    expected_kind = {
        "list": "refused TypeError",
        "None": "refused TypeError",
        "float32": "refused TypeError",
        "int16": "refused TypeError",
        "extra dimension": "refused ValueError",
        "wrong device": "refused ValueError",
        "huge value": "refused ValueError",
    }
    for case, outcome in outcomes.items():
        _, name, variant = case.split("/")
        if variant == "int64" and name == "slot_mapping":
            assert outcome == "correct", case
        elif variant == "int64":
            assert outcome == "refused TypeError", case
        elif variant in expected_kind:
            assert outcome == expected_kind[variant], (case, outcome)
        else:  # strided views (read through their strides, or refused); a huge value past the last page
            assert outcome in ("correct", "refused ValueError"), (case, outcome)
    # The kernels that take their index tensors' strides read the views right; the others refuse them.
    assert outcomes["paged_decode_attention/block_table/strided view"] == "correct"
    assert outcomes["paged_decode_attention/seq_lens/strided view"] == "correct"
    assert outcomes["paged_decode_attention/block_table/column-major"] == "correct"
    assert outcomes["write_kv_cache/slot_mapping/strided view"] == "refused ValueError"
    assert outcomes["prefill_attention/cu_seqlens_q/strided view"] == "refused ValueError"
    assert outcomes["paged_prefill_attention/block_table/strided view"] == "correct"
    assert outcomes["paged_prefill_attention/block_table/column-major"] == "correct"
    assert outcomes["paged_prefill_attention/seq_lens/strided view"] == "correct"
    assert outcomes["paged_prefill_attention/cu_seqlens_q/strided view"] == "refused ValueError"


# --- every tensor argument given as something else ---------------------------------------------------------------


def _all_calls(gen):
    calls = {name: (fn, args) for name, (fn, args, _, _) in _calls(gen).items()}
    a = randn(4, 2, 32, dtype=torch.float32, generator=gen)
    lse = randn(4, 2, dtype=torch.float32, generator=gen)
    calls["merge_attention_states"] = (kernels.merge_attention_states, [a, lse, a.clone(), lse.clone()])
    return calls


TENSOR_ARGS = {
    "prefill_attention": ["q", "k", "v", "cu_seqlens_q", "cu_seqlens_k"],
    "write_kv_cache": ["k", "v", "k_cache", "v_cache", "slot_mapping"],
    "paged_decode_attention": ["q", "k_cache", "v_cache", "block_table", "seq_lens"],
    "paged_prefill_attention": ["q", "k_cache", "v_cache", "block_table", "cu_seqlens_q", "seq_lens"],
    "merge_attention_states": ["out_a", "lse_a", "out_b", "lse_b"],
}


@pytest.fixture
def no_launch(monkeypatch):
    trap_launches(monkeypatch, prefill, "_prefill_kernel", "_autotuned")
    trap_launches(monkeypatch, decode, "_decode_kernel", "_autotuned")
    trap_launches(monkeypatch, paged_prefill, "_paged_prefill_kernel")
    trap_launches(monkeypatch, kv_cache, "_write_kernel")
    trap_launches(monkeypatch, merge, "_merge_states_kernel", "merge_splits_kernel")


@pytest.mark.parametrize("kernel, pos", [(k, i) for k, names in TENSOR_ARGS.items() for i in range(len(names))])
@pytest.mark.parametrize("replacement", [None, [0, 1], 3.0, "tensor"])
def test_every_tensor_argument_must_be_a_tensor(no_launch, kernel, pos, replacement):
    fn, args = _all_calls(torch.Generator().manual_seed(1))[kernel]
    args[pos] = replacement
    name = TENSOR_ARGS[kernel][pos]
    with pytest.raises(TypeError, match=f"^{name} must be a torch.Tensor, got {type(replacement).__name__}$"):
        fn(*args)


# --- scales and caps ---------------------------------------------------------------------------------------------

NON_FINITE = [math.inf, -math.inf, math.nan]


@pytest.mark.parametrize("kernel", ["prefill_attention", "paged_decode_attention", "paged_prefill_attention"])
@pytest.mark.parametrize("option", ["sm_scale", "softcap"])
@pytest.mark.parametrize("value", [*NON_FINITE, 10**400, 0.0, -1.0, True, "1.0", [1.0]])
def test_scales_must_be_positive_finite_numbers(no_launch, kernel, option, value):
    fn, args = _all_calls(torch.Generator().manual_seed(2))[kernel]
    error = TypeError if isinstance(value, (bool, str, list)) else ValueError
    with pytest.raises(error, match=option):
        fn(*args, **{option: value})


@pytest.mark.skipif(ON_CUDA and torch.cuda.get_device_capability() < (8, 9), reason="fp8 caches need sm_89+")
@pytest.mark.parametrize("kernel", ["write_kv_cache", "paged_decode_attention", "paged_prefill_attention"])
@pytest.mark.parametrize("which", ["k_scale", "v_scale"])
@pytest.mark.parametrize("value", [*NON_FINITE, "tensor inf", "tensor nan"])
def test_fp8_scales_must_be_positive_and_finite(no_launch, kernel, which, value):
    fn, args = _all_calls(torch.Generator().manual_seed(3))[kernel]
    cache_pos = 2 if kernel == "write_kv_cache" else 1
    for i in (cache_pos, cache_pos + 1):
        args[i] = args[i].to(torch.float8_e4m3fn)
    if isinstance(value, str):
        value = torch.tensor([float(value.split()[1])], device=DEVICE)
    scales = {"k_scale": 1.0, "v_scale": 1.0, which: value}
    caches = [args[cache_pos].clone(), args[cache_pos + 1].clone()]
    if isinstance(value, torch.Tensor) and ON_CUDA and not kernels.debug_enabled():
        pytest.skip("a scale tensor's value is read on the host only on CPU or in debug mode")
    with pytest.raises(ValueError, match=f"{which} must be positive and finite"):
        fn(*args, **scales)
    assert torch.equal(caches[0].view(torch.uint8), args[cache_pos].view(torch.uint8))
