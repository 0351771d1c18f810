"""The README's code and commands work as shown.

- Every ```python block runs; a comment on a line that calls print() is the line it must print. Blocks whose
  tensors are too large for Triton's interpreter in a test get their sizes scaled down by the exact text
  substitutions in ``SCRIPTS`` (each must still occur in the README, so an edited block fails here until the
  substitution is updated), applied to the expected output too.
- Every command in a ```bash block is classified by :func:`plan`: run as shown; run with smaller arguments
  appended (argparse keeps the last value of an option) where the shown ones take minutes in the interpreter; parsed
  by the command's own argument parser only, with the reason (a CUDA device, torchrun, a network install, the test
  suite itself, a checkpoint that is not in the repository). A command nothing classifies fails the test.
  Commands run in-process (``main(argv)``) in a temporary working directory, in README order, so ``prefill
  --export-dir kv/`` then ``decode --import-dir kv/`` hand over as in the README.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
SMALL = ["--max-new-tokens", "2"]  # decode steps dominate in the interpreter; the README shows 32
PREFILL_SHRINK = {
    "[300, 17, 1024]": "[30, 17, 64]",
    "[0, 300, 317, 1341]": "[0, 30, 47, 111]",
    "torch.randn(1341, 32, 128": "torch.randn(111, 4, 128",
    "torch.randn(1341, 8, 128": "torch.randn(111, 1, 128",
    "max_seqlen_q=1024": "max_seqlen_q=64",
    "max_seqlen_k=1024": "max_seqlen_k=64",
    "torch.Size([1341, 32, 128]) torch.Size([1341, 32])": "torch.Size([111, 4, 128]) torch.Size([111, 4])",
}
SCRIPTS = [  # (README python blocks run as one script, in one namespace; substitutions (README text -> test text))
    ((0,), PREFILL_SHRINK),
    (  # paged decode, its plan/run form, then paged prefill over the same caches
        (1, 2, 3),
        {
            "= 64, 16, 8, 32, 128": "= 64, 16, 2, 8, 128",
            "torch.Size([2, 32, 128])": "torch.Size([2, 8, 128])",
            "torch.Size([4, 32, 128])": "torch.Size([4, 8, 128])",
        },
    ),
    # torch.compile: the block defines the compiled function after block 0's imports; compiling it on CPU takes
    # minutes with inductor, so tests/test_compile.py checks fullgraph tracing of the same calls instead.
    ((0, 5), PREFILL_SHRINK),
    ((6,), {"max_new_tokens=16": "max_new_tokens=4"}),
]
SKIPPED_BLOCKS = {
    4: "downloads a Hugging Face checkpoint (no network in the tests); tests/test_hf.py runs the same "
    "integration on local random Llama/Mistral/Qwen2/Gemma-2/gpt-oss checkpoints",
}


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README, re.S)


def bash_commands() -> list[list[str]]:
    """Every command of every ```bash block, comments removed, `\\` continuations joined, `&&` chains split."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            while words:
                cut = words.index("&&") if "&&" in words else len(words)
                commands.append(words[:cut])
                words = words[cut + 1 :]
    return commands


def plan(argv: list[str]) -> tuple[str, list[str] | str]:
    """("run", argv for the module's main), ("parse", why it is only parsed) or ("skip", why it is neither)."""
    if argv[0] == "pip":
        return "skip", "installs packages from the network"
    if argv[:3] == ["python", "-m", "pytest"]:
        return "skip", "the test suite itself"
    if argv[0] == "torchrun":
        return "parse", "torchrun: several processes (tests/test_distributed.py launches the same)"
    if argv[0] != "python" or argv[1] != "-m":
        return "fail", f"unclassified README command: {shlex.join(argv)}"
    module, args = argv[2], argv[3:]
    if module == "disagg.train_tiny":
        if "--write-held-out" in args:
            return "run", args
        return "skip", "retrains tiny (minutes); tests/test_tiny.py runs the script for a few steps"
    if module == "disagg" and args[0] == "eval":
        return "parse", "minutes on the whole held-out text; tests/test_evaluate.py scores a slice of it"
    if module == "disagg":
        if "--model" in args and args[args.index("--model") + 1] not in ("tiny", "tiny-random"):
            return "parse", "needs a Hugging Face checkpoint that is not in the repository"
        return "run", args + (SMALL if args[0] in ("run", "prefill") else [])
    if module == "bench":
        if "--smoke" in args:  # minutes in the interpreter; test_bench.py's smoke_run runs exactly this
            return "parse", "run by tests/test_bench.py (smoke_run), the same command with --out in a temporary dir"
        return "parse", "needs a CUDA device"
    if module == "disagg.sim":
        return "run", args if args[0] == "validate" else [*args, "--requests", "200"]
    if module == "disagg.sim.bench":
        return "run", ["--gpus", "10", "--requests", "2000"]  # the shown 1,000 GPUs x 100k requests take ~10 s
    if module in ("kernels", "bench.roofline_plot"):
        return "run", args
    return "fail", f"unclassified README command: {shlex.join(argv)}"


def _main(module: str):
    if module == "disagg":
        from disagg.cli import main
    elif module == "disagg.sim":
        from disagg.sim.__main__ import main
    elif module == "disagg.sim.bench":
        from disagg.sim.bench import main
    elif module == "disagg.train_tiny":
        from disagg.train_tiny import main
    elif module == "kernels":
        from kernels.__main__ import main
    else:
        from bench.roofline_plot import main
    return main


def _parse(argv: list[str]) -> None:
    """Parse a command that is not run with its own parser: a typo in a README flag fails here."""
    if argv[0] == "torchrun":
        argv = ["python", *argv[argv.index("-m") :]]
    module, args = argv[2], argv[3:]
    if module == "disagg":
        from disagg.cli import build_parser

        build_parser().parse_args(args)
    elif module == "bench":
        from bench.__main__ import parse_args

        parse_args(args)
    else:
        raise AssertionError(f"no parser known for {module}")


def test_readme_commands_are_all_classified():
    plans = [plan(c) for c in bash_commands()]
    assert not [why for kind, why in plans if kind == "fail"]
    assert sum(kind == "run" for kind, _ in plans) >= 8


@pytest.mark.slow
def test_readme_commands_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if "bench.roofline_plot" in README:
        monkeypatch.setattr("bench.roofline_plot.COMMITTED_PNG", tmp_path / "roofline.png")  # not the tree's
    done = []
    for argv in bash_commands():
        if argv in done:  # the README shows `python -m disagg run` twice
            continue
        done.append(argv)
        kind, detail = plan(argv)
        if kind == "parse":
            _parse(argv)
            continue
        if kind == "skip":
            continue
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            status = _main(argv[2])(detail)
        assert status in (0, None), f"{shlex.join(argv)} exited {status}:\n{out.getvalue()}"


def test_every_python_block_is_run_or_skipped_with_a_reason():
    run = {i for blocks, _ in SCRIPTS for i in blocks}
    assert run | set(SKIPPED_BLOCKS) == set(range(len(python_blocks()))), "a README python block is not tested"


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(SCRIPTS)))
def test_readme_python_blocks_run_and_print_what_they_say(index, monkeypatch, tmp_path):
    blocks, substitutions = SCRIPTS[index]
    code = "\n".join(python_blocks()[i] for i in blocks)
    for old, new in substitutions.items():
        assert old in code, f"README blocks {blocks} no longer contain {old!r}: update SCRIPTS"
        code = code.replace(old, new)
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, f"README python blocks {blocks}", "exec"), {"__name__": "__readme__"})
    printed = out.getvalue().splitlines()
    expected = re.findall(r"^print\(.*\)\s+# (.*)$", code, re.M)
    for line in expected:
        assert line in printed, (line, printed)
