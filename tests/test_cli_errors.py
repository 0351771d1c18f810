"""One line, never a traceback, for what a careless user or a broken checkpoint gives the command lines: non-UTF-8
prompts, absurd or unallocatable pool sizes, unusable export directories, malformed checkpoints (config.json,
generation_config.json, unsupported head dims), and Ctrl-C (exit 130) during start-up and in ``python -m kernels``
and ``python -m bench``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import disagg.cli
import kernels
from disagg.cli import main
from disagg.errors import ModelLoadError
from disagg.loader import load_model
from tests.test_config import BASE

ROOT = Path(__file__).resolve().parent.parent


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    return lines[-1]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["run", "--prompt", "caf\udce9"], "argument --prompt: not valid UTF-8 text: b'caf\\\\xe9'"),
        (["run", "--num-pages", "999999999999999"], "argument --num-pages: must be at most 2147483647"),
        (["decode", "--import-dir", ".", "--num-pages", "0"], "argument --num-pages: must be >= 1"),
    ],
)
def test_bad_arguments_are_one_usage_error(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert message.replace("\\\\", "\\") in _error_line(capsys)


def test_a_pool_that_cannot_be_allocated_is_one_line(tmp_path, capsys, monkeypatch):
    def no_memory(*args, **kwargs):
        raise RuntimeError(
            "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to "
            "allocate 16384000000000 bytes. Error code 12 (Cannot allocate memory)"
        )

    monkeypatch.setattr(disagg.cli, "make_pool", no_memory)
    assert main(["prefill", "--prompt-ids", "256", "--export-dir", str(tmp_path / "x")]) == 1
    line = _error_line(capsys)
    assert line.startswith("error: out of memory (") and line.endswith("try a smaller --num-pages")

    def a_bug(*args, **kwargs):
        raise RuntimeError("something else")

    monkeypatch.setattr(disagg.cli, "make_pool", a_bug)  # other errors are bugs: they keep their traceback
    with pytest.raises(RuntimeError, match="something else"):
        main(["prefill", "--prompt-ids", "256", "--export-dir", str(tmp_path / "y")])


def test_unusable_export_dirs_are_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    for export_dir, reason in [
        (tmp_path / "file", "File exists"),
        (tmp_path / "file" / "sub", "Not a directory"),
        (Path("/proc/no-such-dir/x"), "No such file or directory"),
    ]:
        assert main(["prefill", "--prompt-ids", "256", "--export-dir", str(export_dir)]) == 1
        assert _error_line(capsys) == f"error: --export-dir {export_dir}: cannot create the directory ({reason})"


def _checkpoint(path: Path, config, generation=None) -> Path:
    """A checkpoint directory without weights: everything here is refused before weights are looked for."""
    path.mkdir()
    (path / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    if generation is not None:
        (path / "generation_config.json").write_text(generation)
    return path


@pytest.mark.parametrize(
    "config, generation, message",
    [
        ([BASE], None, "config.json must hold a JSON object, got a list"),
        ("not json", None, "config.json is not valid JSON"),
        ({**BASE, "hidden_size": "256"}, None, "config.json: hidden_size must be an integer >= 1, got '256'"),
        ({**BASE, "hidden_size": 256.5}, None, "hidden_size must be an integer >= 1, got 256.5"),
        ({**BASE, "num_attention_heads": 0}, None, "num_attention_heads must be an integer >= 1, got 0"),
        ({**BASE, "num_key_value_heads": 3}, None, "must be a multiple of num_key_value_heads (3)"),
        ({**BASE, "eos_token_id": 1.5}, None, "config.json: eos_token_id must be a token id"),
        ({**BASE, "eos_token_id": [1, "x"]}, None, "config.json: eos_token_id must be a token id"),
        ({**BASE, "rope_theta": "fast"}, None, "config.json has a value of the wrong type"),
        (BASE, "{not json", "generation_config.json is not valid JSON"),
        (BASE, "[1]", "generation_config.json must hold a JSON object"),
        (BASE, '{"eos_token_id": -1}', "generation_config.json: eos_token_id must be a token id"),
        ({**BASE, "head_dim": 16}, None, "head_dim 16 is not supported by the attention kernels"),
        ({**BASE, "head_dim": 72}, None, "head_dim 72 is not supported by the attention kernels"),
        ({**BASE, "hidden_size": 4 * 300}, None, "head_dim 300 is not supported by the attention kernels"),
    ],
)
def test_malformed_checkpoints_are_refused_at_load_time(tmp_path, capsys, config, generation, message):
    path = _checkpoint(tmp_path / "model", config, generation)
    with pytest.raises(ModelLoadError, match=message.replace("(", "\\(").replace(")", "\\)")):
        load_model(path)
    assert main(["run", "--model", str(path), "--prompt-ids", "1"]) == 1
    line = _error_line(capsys)
    assert line.startswith("error: ") and message in line
    if "head_dim" in message:  # the supported dims are the kernels' own list
        assert line.endswith(f"(supported head dims: {', '.join(map(str, kernels.HEAD_DIMS))})")


# --- Ctrl-C --------------------------------------------------------------------------------------------------------


def _interrupt(cmd: list[str], after: str | None, stream: str = "stderr", delay_s: float = 0.0):
    """Start ``cmd``; once ``after`` appears on ``stream`` (or after ``delay_s``), send SIGINT; return (code, out,
    err)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = ""
    try:
        if after is not None:
            pipe = proc.stdout if stream == "stdout" else proc.stderr
            while after not in seen:
                line = pipe.readline()
                assert line, f"{cmd} ended before printing {after!r}: {seen}"
                seen += line
        time.sleep(delay_s)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, (seen + out) if stream == "stdout" else out, (seen + err) if stream == "stderr" else err


@pytest.mark.slow
def test_ctrl_c_during_start_up_exits_130_with_one_line():
    """SIGINT once torch has started importing (``-X importtime`` reports each import on stderr), not after a fixed
    delay: on a loaded machine a delay can land before Python runs ``disagg.__main__`` at all."""
    cmd = [sys.executable, "-X", "importtime", "-m", "disagg", "run", "--prompt-ids", "256"]
    code, _, err = _interrupt(cmd, " torch", delay_s=0.2)
    lines = [line for line in err.splitlines() if not line.startswith("import time:")]
    assert code == 130 and lines == ["interrupted"], err[-2000:]


@pytest.mark.slow
def test_ctrl_c_in_the_kernels_demo_keeps_its_lines():
    code, out, err = _interrupt([sys.executable, "-m", "kernels"], "mode:", stream="stdout")
    assert code == 130 and out.startswith("mode: ") and err.strip() == "interrupted", err


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the smoke run is the CPU interpreter's")
def test_ctrl_c_in_the_benchmark_keeps_partial_results(tmp_path):
    out_file = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "bench", "prefill", "--smoke", "--peers", "none", "--out", str(out_file)]
    code, _, err = _interrupt(cmd, "[1/2]", stream="stdout")  # in the first of the two smoke shapes
    assert code == 130, err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("interrupted"), err
    data = json.loads(out_file.read_text())
    assert data["status"] == "interrupted" and data["cases_not_run"] >= 1
