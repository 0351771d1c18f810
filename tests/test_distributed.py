"""``run --prefill-ranks`` on torch.distributed (gloo, CPU, the kernels through Triton's interpreter).

Launched like a user would (torchrun) or, for the fault tests, as plain processes with the torchrun environment
(torchrun kills the survivors of a dead worker): 1+1 and 2+2 ranks give exactly the single-process ``run``'s
outputs; decode pools too small for all requests at once still serve all (their acknowledgements wait); a stalled
prefill rank, a killed one (rank 0) and a killed decode rank make the others fail what depended on it, or offer it
elsewhere, and exit non-zero within the timeout with their pools fully free; ranks that disagree on the model or
the options are refused at start-up. In-process: the header codec, the spread of requests, a model difference in
words, and the decode stage's reservations.
"""

import contextlib
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from disagg.cli import main
from disagg.decode import DecodeStage
from disagg.distributed import model_difference
from disagg.engine import make_pool
from disagg.errors import DistributedError, RequestError
from disagg.export import fingerprint
from disagg.loader import load_model
from disagg.prefill import PrefillStage
from disagg.ranks import Layout, assign_requests
from disagg.request import Request, SamplingParams
from disagg.transport import HEADER_LEN, Header, Kind

SAMPLING = ["--model", "tiny-random", "--max-new-tokens", "4", "--temperature", "0.8", "--top-k", "50", "--seed", "11"]
BASIC = ["--prompt-ids", "256,72,101,108,108,111", "256,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18", "256"]
# pools of 3 pages of 8 tokens: the five servable requests need 2+3+1+1+2 = 9 pages over two decode pools of 3;
# the empty prompt fails at prefill, the 23-token one (23 + 4 - 1 > 24 tokens) is refused by the decode rank
TINY_POOL = ["--page-size", "8", "--num-pages", "3", "--prompt-ids", "", *BASIC[1:]]
TINY_POOL += ["256,5,6,7", "256,30,31,32,33,34,35,36,37,38,39,40", "256," + ",".join(map(str, range(60, 82)))]
KEYS = ("request_id", "prompt_ids", "output_ids", "finish_reason", "error")
TIMEOUT = 15  # seconds of silence before a rank counts as lost, in the fault tests


def single_process(args):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main(["run", *args, "--json"])
    return json.loads(out.getvalue())


@pytest.fixture(scope="module")
def basic_reference():
    return single_process(BASIC + SAMPLING)


@pytest.fixture(scope="module")
def tiny_pool_reference():
    return single_process(TINY_POOL + SAMPLING)


def torchrun(nproc, prefill_ranks, args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "disagg"]
    cmd += ["run", "--prefill-ranks", str(prefill_ranks), *args, *SAMPLING, "--json"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=400)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def spawn(tmp_path):
    """``spawn(world, prefill_ranks, args_of_rank)``: each rank as a plain process with the environment torchrun
    would give it, stderr in a file that can be read while it runs; whatever still runs at the end is killed."""
    started = []

    def launch(world, prefill_ranks, args_of_rank):
        port, procs = free_port(), []
        for rank in range(world):
            env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
            env |= {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)}
            env["LOCAL_WORLD_SIZE"] = str(world)
            cmd = [sys.executable, "-m", "disagg", "run", "--prefill-ranks", str(prefill_ranks), *args_of_rank(rank)]
            err = (tmp_path / f"rank{rank}.log").open("w+")
            procs.append((subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=err, text=True), err))
        started.extend(procs)
        return procs

    yield launch
    for p, err in started:
        if p.poll() is None:
            p.kill()
            p.communicate()
        err.close()


def wait_for_line(err, pattern, deadline_s=300):
    start = time.time()
    while time.time() - start < deadline_s:
        err.seek(0)
        if re.search(pattern, err.read()):
            return
        time.sleep(0.05)
    raise AssertionError(f"no line matching {pattern!r}")


def finish(procs, skip=()):
    """(returncode, stdout, stderr, seconds until exit) of every rank not in ``skip``."""
    results, start = {}, time.time()
    for rank, (p, err) in enumerate(procs):
        if rank not in skip:
            out, _ = p.communicate(timeout=300)
            err.seek(0)
            results[rank] = (p.returncode, out, err.read(), time.time() - start)
    return results


def rows(doc):
    return [{k: r[k] for k in KEYS} for r in doc["requests"]]


def test_one_prefill_and_one_decode_rank_give_the_single_process_outputs(basic_reference):
    p = torchrun(2, 1, BASIC)
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert rows(doc) == rows(basic_reference)
    assert all(len(r["output_ids"]) == 4 for r in doc["requests"])
    m = doc["metrics"]
    assert m["kv_transfers"] == 3 and m["kv_bytes_transferred"] == m["kv_bytes_exported"] > 26 * 2 * 2 * 2 * 64 * 4
    assert m["prefill_tokens"] == 26 and m["decode_tokens"] == 9 and m["faults"] == []
    for r in doc["requests"]:
        assert (r["prefill_rank"], r["decode_rank"]) == (0, 1)
        assert r["kv_transfer_bytes"] > len(r["prompt_ids"]) * 2048 and r["kv_transfer_s"] > 0
        assert r["kv_transfer_bytes_per_s"] == pytest.approx(r["kv_transfer_bytes"] / r["kv_transfer_s"])
        assert r["ttft_s"] > 0 and r["tpot_s"] > 0
    assert [(r["pool_free_pages"], r["lost"]) for r in m["ranks"]] == [(1024, None), (1024, None)]
    assert "[rank 1 decode] exit 0, pool 1024/1024 pages free" in p.stderr


def test_two_plus_two_ranks_with_tiny_decode_pools_serve_every_request(tiny_pool_reference):
    p = torchrun(4, 2, TINY_POOL)
    assert p.returncode != 0  # two requests fail, as in the single-process run
    doc = json.loads(p.stdout)
    assert rows(doc) == rows(tiny_pool_reference)
    assert "prompt is empty" in doc["requests"][0]["error"]
    assert "more than the decode pool holds (24)" in doc["requests"][6]["error"]
    assert doc["requests"][0]["decode_rank"] is None and doc["requests"][6]["decode_rank"] in (2, 3)
    served = [r for r in doc["requests"] if r["error"] is None]
    assert len(served) == 5 and {r["prefill_rank"] for r in served} == {0, 1}
    assert {r["decode_rank"] for r in served} == {2, 3}
    ranks = doc["metrics"]["ranks"]
    assert [r["pool_free_pages"] for r in ranks] == [3, 3, 3, 3]
    assert sum(r["acks_delayed"] for r in ranks[2:]) >= 1  # a full pool made a sender wait
    assert doc["metrics"]["faults"] == []
    for rank in range(4):
        assert re.search(rf"\[rank {rank} \w+\] exit 1, pool 3/3 pages free", p.stderr)


def test_a_stalled_prefill_rank_fails_only_its_requests_within_the_timeout(spawn, basic_reference):
    procs = spawn(3, 2, lambda rank: [*BASIC, *SAMPLING, "--timeout", str(TIMEOUT), "--json"])
    wait_for_line(procs[1][1], r"\[rank 1 prefill\] 1 of 3 requests")
    procs[1][0].send_signal(signal.SIGSTOP)  # alive but silent: only the timeout can tell
    results = finish(procs, skip={1})
    for rank, (code, _, err, seconds) in results.items():
        assert code == 1 and seconds < TIMEOUT + 60, err
        assert f"error: prefill rank 1 was lost: no message from it for {TIMEOUT} s" in err
        assert re.search(rf"\[rank {rank} \w+\] exit 1, pool 1024/1024 pages free", err)
    doc = json.loads(results[0][1])
    expected = rows(basic_reference)
    assert [rows(doc)[i] for i in (0, 2)] == [expected[i] for i in (0, 2)]  # prefill rank 0's requests
    assert doc["requests"][1]["error"] == (
        f"request 1: prefill rank 1 was lost (no message from it for {TIMEOUT} s) before handing it over"
    )
    assert [r["lost"] is not None for r in doc["metrics"]["ranks"]] == [False, True, False]


def test_a_killed_prefill_rank_makes_the_decode_rank_exit_with_its_pool_free(spawn):
    procs = spawn(2, 1, lambda rank: [*BASIC, *SAMPLING, "--timeout", str(TIMEOUT), "--json"])
    wait_for_line(procs[0][1], r"\[rank 0 prefill\] 3 of 3 requests")
    procs[0][0].kill()
    procs[0][0].wait()
    code, out, err, seconds = finish(procs, skip={0})[1]
    assert code == 1 and out == "" and seconds < TIMEOUT, err
    assert "error: prefill rank 0 was lost: connection closed: the process exited" in err
    assert "[rank 1 decode] exit 1, pool 1024/1024 pages free" in err
    assert "Traceback" not in err


def test_requests_offered_to_a_killed_decode_rank_go_to_another(spawn, basic_reference):
    """Killed before it could acknowledge anything: whatever had been offered to it is offered again elsewhere."""
    procs = spawn(3, 1, lambda rank: [*BASIC, *SAMPLING, "--timeout", str(TIMEOUT), "--json"])
    wait_for_line(procs[2][1], r"\[rank 2 decode\] pool")
    procs[2][0].kill()
    procs[2][0].wait()
    results = finish(procs, skip={2})
    for rank, (code, _, err, seconds) in results.items():
        assert code == 1 and seconds < TIMEOUT + 60, err  # decode rank 1 learns the status from rank 0
        assert re.search(rf"\[rank {rank} \w+\] exit 1, pool 1024/1024 pages free", err)
    assert "error: decode rank 2 was lost: connection closed: the process exited" in results[0][2]
    doc = json.loads(results[0][1])
    assert rows(doc) == rows(basic_reference)
    assert [r["decode_rank"] for r in doc["requests"]] == [1, 1, 1]
    assert doc["metrics"]["faults"] == ["decode rank 2 was lost: connection closed: the process exited"]


@pytest.mark.parametrize(
    "rank1, message",
    [
        (["--dtype", "bfloat16"], "fingerprint mismatch: rank 1 has dtype 'bfloat16', rank 0 has 'float32'"),
        (["--max-new-tokens", "5"], "rank 1 got other requests or options than rank 0"),
    ],
)
def test_ranks_that_disagree_are_refused_at_start_up(spawn, rank1, message):
    procs = spawn(2, 1, lambda rank: [*BASIC, *SAMPLING, *(rank1 if rank == 1 else []), "--json"])
    for code, out, err, _ in finish(procs).values():
        assert code == 1 and out == "" and message in err and "Traceback" not in err, err


# --- in-process pieces ---------------------------------------------------------------------------------------------


def test_header_round_trip_and_refusal():
    h = Header(Kind.META, 7, 12, (5, 4, 9000, 0, 123, -(2**62), 2**62), last=True)
    t = h.encode()
    assert t.dtype == torch.int64 and t.shape == (HEADER_LEN,)
    assert Header.decode(t) == h
    for field, value in ((0, 1), (1, 99)):  # not our magic number; no such kind
        bad = t.clone()
        bad[field] = value
        with pytest.raises(DistributedError, match="malformed header"):
            Header.decode(bad)
    with pytest.raises(ValueError, match="holds 7 fields"):
        Header(Kind.META, fields=tuple(range(8))).encode()


def test_a_model_difference_is_named():
    model = load_model("tiny-random")[0]
    ids = [{"fingerprint": fingerprint(model), "kv_dtype": "float32", "kv_scale": None} for _ in range(3)]
    assert model_difference([*ids[:1], {**ids[1], "kv_dtype": "float8_e4m3fn", "kv_scale": 1.0}, *ids[2:]]) == (
        "fingerprint mismatch: rank 1 has KV dtype 'float8_e4m3fn', rank 0 has 'float32'; every rank must load the "
        "same model with the same --dtype and --kv-dtype"
    )
    other = {**ids[2], "fingerprint": {**ids[2]["fingerprint"], "weights": "0" * 32}}
    assert model_difference([*ids[:2], other]).startswith("fingerprint mismatch: rank 2 has weights '000")


def test_requests_spread_by_prompt_tokens_and_who_talks_to_whom():
    assert assign_requests([6, 19, 1, 4, 12, 23], 2) == [0, 1, 0, 0, 0, 1]
    assert assign_requests([5, 5, 5, 5], 2) == [0, 1, 0, 1]
    assert assign_requests([5, 5], 1) == [0, 0]
    layout = Layout(world_size=4, num_prefill=2)
    assert [layout.peers(r) for r in range(4)] == [{1, 2, 3}, {0, 2, 3}, {0, 1}, {0, 1}]
    assert [layout.role(r) for r in range(4)] == ["prefill", "prefill", "decode", "decode"]


def test_decode_stage_reserves_pages_before_the_export_arrives():
    model = load_model("tiny-random")[0]
    params = SamplingParams(max_new_tokens=3, eos_token_ids=())
    prefill = PrefillStage(model, make_pool(model, num_pages=4))
    prefill.add(Request("a", [256, *range(1, 12)], params))  # 12 tokens: 12 + 3 - 1 = 14 of KV
    prefill.add(Request("b", [256, 5], params))
    exports = {r.request.request_id: r.export for r in prefill.step()}

    plain = DecodeStage(model, make_pool(model, page_size=8, num_pages=4))
    plain.add(exports["a"])
    expected = [o.output_ids for o in plain.step() + plain.step() + plain.step()]

    stage = DecodeStage(model, make_pool(model, page_size=8, num_pages=3))
    with pytest.raises(RequestError, match="need 30 tokens of KV, more than the decode pool holds"):
        stage.reserve("huge", 28, 3)
    assert stage.reserve("a", 12, 3) and stage.pool.num_free_pages == 1
    assert not stage.reserve("b", 2, 10) and stage.pool.num_free_pages == 1  # 11 tokens: not now, nothing taken
    with pytest.raises(RequestError, match="already in the decode stage"):
        stage.reserve("a", 12, 3)
    stage.add(exports["a"])
    assert stage.pool.num_free_pages == 1  # the export went into the reserved pages
    assert [o.output_ids for o in stage.step() + stage.step() + stage.step()] == expected
    assert stage.pool.is_fully_free()

    assert stage.reserve("b", 2, 10)
    with pytest.raises(RequestError, match="its export needs 4 tokens of KV, 11 were reserved"):
        stage.add(exports["b"])  # max_new_tokens differs from the reservation: refused, reservation kept
    assert stage.pool.num_free_pages == 1 and stage.release("b") and not stage.release("b")
    assert stage.pool.is_fully_free()
    assert stage.reserve("b", 2, 3)
    stage.abort_all()
    assert stage.pool.is_fully_free()


def test_usage_errors(monkeypatch, capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    assert main(["run", "--prefill-ranks", "1"]) == 1
    assert "--prefill-ranks needs a distributed launch" in capsys.readouterr().err
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["run", "--prefill-ranks", "2"]) == 1
    assert "--prefill-ranks must leave at least one decode rank of 2" in capsys.readouterr().err
    assert main(["run"]) == 1
    assert "launched as rank 0 of 2: give --prefill-ranks" in capsys.readouterr().err
    for bad in ("0", "-1", "nan", "inf"):
        with pytest.raises(SystemExit):
            main(["run", "--prefill-ranks", "1", "--timeout", bad])
