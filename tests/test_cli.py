"""``python -m disagg``: ``run`` equals ``prefill`` then ``decode`` as separate processes handing over through
export files; a bad export makes ``decode`` fail that request clearly (no traceback) and exit non-zero."""

import argparse
import json
import subprocess
import sys

import pytest

from disagg.cli import build_parser, main
from disagg.compare import format_comparison
from disagg.engine import make_pool
from disagg.export import write_export
from disagg.loader import load_model
from disagg.prefill import PrefillStage
from disagg.request import Request, SamplingParams

ARGS = ["--prompt-ids", "256,72,101,108,108,111", "256,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18", "256"]
ARGS += ["--model", "tiny-random", "--max-new-tokens", "3", "--temperature", "0.8", "--top-k", "50", "--seed", "11"]


def disagg(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "disagg", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def handover(tmp_path_factory):
    """`run --json`, then `prefill` (page size 16) and `decode` (page size 8) as separate processes."""
    exports = tmp_path_factory.mktemp("exports")
    run = disagg("run", *ARGS, "--json")
    prefill = disagg("prefill", *ARGS, "--export-dir", str(exports), "--json")
    decode = disagg("decode", "--model", "tiny-random", "--import-dir", str(exports), "--page-size", "8", "--json")
    return run, prefill, decode, exports


def test_run_equals_prefill_then_decode_through_files(handover):
    run, prefill, decode, exports = handover
    for p in (run, prefill, decode):
        assert p.returncode == 0, p.stderr
    run_doc, prefill_doc, decode_doc = (json.loads(p.stdout) for p in (run, prefill, decode))
    assert sorted(f.name for f in exports.iterdir()) == [f"request-{i:06d}.safetensors" for i in range(3)]
    keys = ("request_id", "prompt_ids", "output_ids", "finish_reason")
    assert [{k: r[k] for k in keys} for r in decode_doc["requests"]] == [
        {k: r[k] for k in keys} for r in run_doc["requests"]
    ]
    for r in run_doc["requests"]:
        assert len(r["output_ids"]) == 3 and r["ttft_s"] > 0 and r["tpot_s"] > 0 and r["error"] is None
    # prefill reports each request's first token, which decode continues from
    assert [r["output_ids"] for r in prefill_doc["requests"]] == [[r["output_ids"][0]] for r in run_doc["requests"]]
    m = run_doc["metrics"]
    assert m["num_requests"] == 3 and m["num_failed"] == 0 and m["prefill_tokens"] == 26
    assert m["decode_tokens"] == 6 and m["kv_bytes_exported"] > 26 * 2 * 2 * 2 * 64 * 4
    assert prefill_doc["metrics"]["exports"] == 3 and decode_doc["metrics"]["imports"] == 3


def test_decode_refuses_a_bad_export_and_exits_nonzero(tmp_path):
    model, _ = load_model("tiny-random")
    stage = PrefillStage(model, make_pool(model, num_pages=4))
    for i, prompt in enumerate([[256, 1, 2], [256, 3], [256, 4, 5, 6]]):
        stage.add(Request(str(i), prompt, SamplingParams(max_new_tokens=3)))
    for res in stage.step():
        write_export(tmp_path / f"request-{int(res.request.request_id):06d}.safetensors", res.export)
    bad = tmp_path / "request-000001.safetensors"
    data = bad.read_bytes()
    bad.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    p = disagg("decode", "--model", "tiny-random", "--import-dir", str(tmp_path))
    assert p.returncode == 1
    assert "Traceback" not in p.stdout + p.stderr
    assert "error: request-000001.safetensors: checksum mismatch" in p.stderr  # per-request errors: stderr
    assert "checksum" not in p.stdout and "failed (the error is on stderr)" in p.stdout
    assert p.stdout.count("(3 tokens, length)") == 2  # the other two requests went on
    assert "requests 3 (1 failed)" in p.stdout


def test_usage_errors_are_reported_without_traceback(tmp_path, capsys):
    assert main(["decode", "--import-dir", str(tmp_path)]) == 1
    assert f"--import-dir {tmp_path} is empty" in capsys.readouterr().err
    assert main(["decode", "--import-dir", str(tmp_path / "missing")]) == 1
    assert "missing does not exist" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    assert main(["decode", "--import-dir", str(tmp_path / "file")]) == 1
    assert "file is not a directory" in capsys.readouterr().err
    assert main(["decode", "--import-dir", str(tmp_path)]) == 1
    assert f"--import-dir {tmp_path} holds no *.safetensors exports" in capsys.readouterr().err
    assert main(["run", "--model", "tiny-random", "--prompt-ids", "", "256,1", "--max-new-tokens", "1", "--json"]) == 1
    captured = capsys.readouterr()
    doc = json.loads(captured.out)
    assert "the prompt is empty" in doc["requests"][0]["error"] and doc["requests"][1]["error"] is None
    assert captured.err.strip() == "error: request 0: the prompt is empty"
    assert main(["run", "--model", str(tmp_path)]) == 1
    assert "has no config.json" in capsys.readouterr().err
    (tmp_path / "old.safetensors").write_bytes(b"")
    assert main(["prefill", "--model", "tiny-random", "--prompt-ids", "256", "--export-dir", str(tmp_path)]) == 1
    assert "already holds *.safetensors files" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["run", "--page-size", "12"])


def test_list_options_accept_repetition_and_several_values():
    parse = build_parser().parse_args
    assert parse(["run", "--prompt-ids", "1,2", "--prompt-ids", "3", "4,5"]).prompt_ids == [[1, 2], [3], [4, 5]]
    assert parse(["prefill", "--export-dir", "x", "--prompt", "a", "b", "--prompt", "c"]).prompt == ["a", "b", "c"]
    assert parse(["compare", "--prompt-ids", "1", "--prompt-ids", "2"]).prompt_ids == [[1], [2]]


def test_run_colocated_reports_cached_tokens(capsys):
    """The same 17-token prompt twice, chunks of 8: the second request finds the first's two full pages cached."""
    prompt = ",".join(map(str, [256, *range(1, 17)]))
    argv = ["run", "--mode", "colocated", "--prompt-ids", prompt, "--prompt-ids", prompt, "--max-new-tokens", "2"]
    assert main([*argv, "--max-batch-tokens", "8", "--page-size", "8", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [r["cached_tokens"] for r in doc["requests"]] == [0, 16]
    assert doc["requests"][0]["output_ids"] == doc["requests"][1]["output_ids"]
    m = doc["metrics"]
    assert m["mode"] == "colocated" and m["prefix_cache_hit_rate"] == 16 / 34 and m["kv_bytes_exported"] == 0


def test_colocated_refuses_torchrun_and_compare_refuses_two_request_sources(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["run", "--mode", "colocated"]) == 1
    assert "colocated runs in one process" in capsys.readouterr().err
    monkeypatch.delenv("WORLD_SIZE")
    assert main(["compare", "--prompt-ids", "256,1", "--num-requests", "2"]) == 1
    assert "not both" in capsys.readouterr().err


def test_compare_runs_both_modes_on_tiny(capsys):
    """Two 12-token prompts arriving together, chunks of 8: the colocated run mixes prefill chunks into decode
    steps, the disaggregated one moves KV; both give the same tokens; numbers are labelled as interpreter numbers."""
    argv = ["compare", "--num-requests", "2", "--prompt-len", "fixed:12", "--output-len", "uniform:2,3"]
    assert main([*argv, "--max-batch-tokens", "8", "--page-size", "8", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["device"] == "cpu" and doc["kernels"] == "interpreted" and doc["same_tokens"] is True
    colocated, disaggregated = doc["modes"]["colocated"], doc["modes"]["disaggregated"]
    assert colocated["mixed_steps"] >= 1 and colocated["kv_bytes_moved"] == 0
    assert disaggregated["mixed_steps"] == 0 and disaggregated["kv_bytes_moved"] > 0
    for m in (colocated, disaggregated):
        assert m["num_failed"] == 0 and m["prefill_tokens"] == 24 and m["ttft_s"]["p50"] > 0
    assert [len(r["colocated"]["output_ids"]) for r in doc["requests"]] == [
        len(r["disaggregated"]["output_ids"]) for r in doc["requests"]
    ]
    text = format_comparison(doc)
    assert "disaggregated [cpu, interpreted]" in text and "same tokens in both modes: yes" in text
    assert "measure the interpreter" in text and "decode step, with prefill chunks" in text


def test_every_option_has_a_help_line_and_help_shows_defaults():
    from disagg.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, sub in commands.items():
        for action in sub._actions:
            assert action.help, f"{name} {action.option_strings} has no help line"
        text = " ".join(sub.format_help().split())
        assert "(default: tiny)" in text and "(default: auto)" in text and "(default: 16)" in text, name
    assert "(default: 32)" in " ".join(commands["run"].format_help().split())  # --max-new-tokens


def test_metrics_summary_prints_the_cli_table_and_stays_a_dict():
    from disagg.metrics import Metrics, format_metrics

    m = Metrics(prefill_tokens=10, prefill_time_s=0.5, decode_tokens=4, decode_time_s=0.25, decode_steps=2)
    summary = m.summary([])
    assert isinstance(summary, dict) and summary["decode_tokens_per_s"] == 16.0
    assert json.loads(json.dumps(summary)) == dict(summary)
    assert str(summary) == format_metrics(summary)
    assert str(summary).splitlines()[1].split()[:2] == ["prefill", "10"] and "decode: 2 steps" in str(summary)


def test_dir_of_the_package_lists_its_public_names():
    import disagg

    assert set(disagg.__all__) <= set(dir(disagg)) and "Engine" in disagg.__all__
