"""Distributed start-up with a rank lost between the rendezvous and the start-up agreement check: the peer joins
the process group, then dies (SIGKILL) or falls silent (as a stopped or slow-to-load rank would), or the ranks are
launched with different WORLD_SIZEs. The real rank must exit 1 with its usual one-line status naming what happened
(no gloo traceback), within the timeout."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from tests.test_distributed import BASIC, SAMPLING, free_port

TIMEOUT = 5
# A peer that joins the group and then dies or stays silent, without ever reaching the start-up check.
PEER = """
import os, signal, sys, time
from datetime import timedelta
import torch.distributed as dist
dist.init_process_group("gloo", rank=1, world_size=2, timeout=timedelta(seconds=60))
if sys.argv[1] == "killed":
    os.kill(os.getpid(), signal.SIGKILL)
time.sleep(120)
"""


def _env(port: int, rank: int, world: int) -> dict[str, str]:
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
    return env | {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world)}


def _rank(port: int, rank: int, world: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "disagg", "run", "--prefill-ranks", "1", *BASIC, *SAMPLING]
    cmd += ["--timeout", str(TIMEOUT), "--json"]
    return subprocess.Popen(cmd, env=_env(port, rank, world), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _assert_one_line_exit(
    proc: subprocess.Popen, rank: int, role: str, reason: tuple[str, ...], started: float
) -> None:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1 and out == "", err
    assert "Traceback" not in err and "[rank" + str(rank) + "]" not in err, err  # no torch-formatted traceback
    lines = [line for line in err.splitlines() if line.startswith(f"[rank {rank} {role}]")]
    assert lines[-2].startswith(f"[rank {rank} {role}] error: ") and any(r in lines[-2] for r in reason), err
    assert lines[-1] == f"[rank {rank} {role}] exit 1", err
    assert time.time() - started < TIMEOUT + 120


@pytest.mark.slow
def test_a_rank_lost_before_the_start_up_check_gives_one_line_exits():
    """Three faults at once (their start-ups overlap, so the test costs about one start-up and two timeouts)."""
    started, peers, ports = time.time(), [], {fault: free_port() for fault in ("killed", "silent", "world size")}
    real = {fault: _rank(port, 0, 2) for fault, port in ports.items()}
    for fault in ("killed", "silent"):
        cmd = [sys.executable, "-c", PEER, fault]
        peers.append(subprocess.Popen(cmd, env=_env(ports[fault], 1, 2), stderr=subprocess.DEVNULL))
    other_world = _rank(ports["world size"], 1, 3)
    try:
        lost = "a rank was lost during the start-up check: "
        _assert_one_line_exit(real["killed"], 0, "prefill", (lost + "connection closed: the process exited",), started)
        _assert_one_line_exit(real["silent"], 0, "prefill", (lost + "no answer within --timeout",), started)
        _assert_one_line_exit(other_world, 1, "decode", ("could not join the process group of 3 ranks",), started)
        # rank 0 fails in the rendezvous or in the check, depending on how far rank 1 got
        reasons = ("could not join the process group of 2 ranks", lost)
        _assert_one_line_exit(real["world size"], 0, "prefill", reasons, started)
    finally:
        for p in [*peers, *real.values(), other_world]:
            if p.poll() is None:
                p.kill()
            p.communicate()
