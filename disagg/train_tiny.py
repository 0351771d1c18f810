"""Train ``tiny``, the default model: ``python -m disagg.train_tiny [--out DIR] [--steps N]``.

A byte-level Llama (see :data:`CONFIG`) trained from a fixed seed on the text of Python's own documentation
topics (``pydoc_data.topics``, the text behind ``help("if")``, ~460 KB of English and code shipped with every
CPython), so nothing is downloaded. Every tenth topic in name order is held out for evaluation
(:func:`split_topics`). The model is the engine's own :class:`~disagg.model.CausalLM`; only its attention is
replaced, for training, by PyTorch's ``scaled_dot_product_attention`` (autograd, no Triton).

Each training sequence is BOS followed by a window of the training text, the shape of a prompt the engine's byte
tokenizer makes. The script writes a Hugging Face checkpoint (``config.json``, ``generation_config.json``,
``model.safetensors``, float32) and ``training_log.csv`` (step, seconds, training loss, held-out loss, in nats
per byte and in bits per byte). It is reproducible on one machine for a fixed torch version and thread count
(float32 CPU matmul results depend on both); the topics' text depends on the Python version (a log header
records it).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from disagg import tiny
from disagg.model import CausalLM
from disagg.tiny import BOS, EOS, TRAINED_DIR

SEED = 0

# tiny-random's config with the trained model's sizes (written to TRAINED_DIR/config.json)
CONFIG = dataclasses.replace(
    tiny.CONFIG,
    hidden_size=192,
    intermediate_size=512,
    num_heads=6,
    head_dim=32,
    max_position_embeddings=256,
    tie_word_embeddings=True,
)


@dataclass(frozen=True)
class TrainSettings:
    steps: int = 1000
    batch_size: int = 16
    seq_len: int = 256  # tokens per sequence, BOS included
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup: int = 100
    weight_decay: float = 0.1
    log_every: int = 50
    eval_every: int = 100
    threads: int = 1


def split_topics() -> tuple[str, str]:
    """(training text, held-out text): the ``pydoc_data`` topics in name order, every tenth held out, each topic's
    text followed by a blank line."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    train = "".join(topics[n].strip() + "\n\n" for i, n in enumerate(names) if i % 10 != 9)
    held_out = "".join(topics[n].strip() + "\n\n" for i, n in enumerate(names) if i % 10 == 9)
    return train, held_out


class _TrainingAttention:
    """Stands in for the engine's attention backends: ``tokens`` packs ``batch`` sequences of ``seq_len``."""

    def __init__(self, batch: int, seq_len: int):
        self.batch, self.seq_len = batch, seq_len

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None):
        b, t = self.batch, self.seq_len
        q, k, v = (x.view(b, t, x.shape[1], x.shape[2]).transpose(1, 2) for x in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return out.transpose(1, 2).reshape(b * t, q.shape[1], q.shape[3])


def sequence_loss(model: CausalLM, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-byte cross-entropy (nats) over ``ids`` (batch, seq_len + 1) int64, through the model's own layers."""
    b, t = ids.shape[0], ids.shape[1] - 1
    inputs, targets = ids[:, :-1].reshape(-1), ids[:, 1:].reshape(-1)
    positions = torch.arange(t).repeat(b)
    x = model.model.embed_tokens(inputs)
    cos, sin = model.rotary.cos_sin(positions, x.dtype)
    attention = _TrainingAttention(b, t)
    for layer in model.model.layers:
        x = layer(x, cos, sin, attention)
    logits = model.lm_head(model.model.norm(x))
    return F.cross_entropy(logits.float(), targets)


def _with_bos(chunks: torch.Tensor) -> torch.Tensor:
    return torch.cat((torch.full((chunks.shape[0], 1), BOS, dtype=torch.long), chunks), dim=1)


def held_out_batches(text: bytes, seq_len: int, batch_size: int) -> list[torch.Tensor]:
    """The held-out text cut into consecutive windows of ``seq_len - 1`` bytes (the tail dropped), each preceded by
    BOS and followed by its next byte as the last target: (n, seq_len + 1) tensors of at most ``batch_size`` rows."""
    data = torch.tensor(list(text), dtype=torch.long)
    n = (len(data) - 1) // (seq_len - 1)
    rows = [data[i * (seq_len - 1) : i * (seq_len - 1) + seq_len] for i in range(n)]
    windows = _with_bos(torch.stack(rows))
    return list(windows.split(batch_size))


@torch.no_grad()
def evaluate(model: CausalLM, batches: list[torch.Tensor]) -> float:
    """Mean next-byte loss (nats) over every target byte of ``batches``."""
    total, count = 0.0, 0
    for ids in batches:
        n = ids[:, 1:].numel()
        total += sequence_loss(model, ids).item() * n
        count += n
    return total / count


def init_model(seed: int) -> CausalLM:
    """A fresh CausalLM with GPT-2 style initialisation (normal, std 0.02; residual outputs scaled by depth)."""
    torch.manual_seed(seed)
    model = CausalLM(CONFIG, "cpu")
    model.tie_weights()
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            torch.nn.init.ones_(p)
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
            torch.nn.init.normal_(p, std=0.02 / math.sqrt(2 * CONFIG.num_layers))
        else:
            torch.nn.init.normal_(p, std=0.02)
    return model


def hf_config() -> dict:
    """``config.json`` for :data:`CONFIG` as transformers' ``LlamaConfig`` reads it."""
    c = CONFIG
    return {
        "architectures": [c.architecture],
        "model_type": "llama",
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_params["rope_theta"],
        "max_position_embeddings": c.max_position_embeddings,
        "tie_word_embeddings": c.tie_word_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": BOS,
        "eos_token_id": EOS,
        "torch_dtype": "float32",
    }


def save(model: CausalLM, out: Path) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config(), indent=2) + "\n")
    generation = {"bos_token_id": BOS, "eos_token_id": EOS}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


def train(settings: TrainSettings, out: Path, seed: int = SEED) -> list[dict]:
    """Train from ``seed`` and write the checkpoint and log into ``out``. Returns the log rows."""
    torch.set_num_threads(settings.threads)
    train_text, held_out_text = split_topics()
    data = torch.tensor(list(train_text.encode("utf-8")), dtype=torch.long)
    held_out = held_out_batches(held_out_text.encode("utf-8"), settings.seq_len, settings.batch_size)
    model = init_model(seed)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() == 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=settings.lr,
        betas=(0.9, 0.95),
    )
    gen = torch.Generator().manual_seed(seed)
    window = settings.seq_len  # seq_len - 1 text inputs after BOS, plus the last target
    rows: list[dict] = []
    start, running = time.perf_counter(), []
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "training_log.csv"
    with log_path.open("w", newline="") as f:
        f.write(
            f"# python {platform.python_version()}, torch {torch.__version__}, threads {settings.threads}, "
            f"seed {seed}, {settings}\n"
        )
        f.write(f"# training text {len(data)} bytes, held-out text {len(held_out_text.encode())} bytes\n")
        writer = csv.DictWriter(f, ["step", "seconds", "lr", "train_loss", "held_out_loss", "held_out_bpb"])
        writer.writeheader()
        for step in range(1, settings.steps + 1):
            lr = _lr(step, settings)
            for group in optimizer.param_groups:
                group["lr"] = lr
            offsets = torch.randint(0, len(data) - window, (settings.batch_size,), generator=gen)
            ids = _with_bos(torch.stack([data[o : o + window] for o in offsets.tolist()]))
            loss = sequence_loss(model, ids)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            running.append(loss.item())
            if step % settings.log_every == 0 or step == settings.steps:
                row = {
                    "step": step,
                    "seconds": round(time.perf_counter() - start, 1),
                    "lr": f"{lr:.3g}",
                    "train_loss": round(sum(running) / len(running), 4),
                    "held_out_loss": "",
                    "held_out_bpb": "",
                }
                running = []
                if step % settings.eval_every == 0 or step == settings.steps:
                    model.eval()
                    val = evaluate(model, held_out)
                    model.train()
                    row.update(held_out_loss=round(val, 4), held_out_bpb=round(val / math.log(2), 4))
                writer.writerow(row)
                f.flush()
                rows.append(row)
                print(", ".join(f"{k} {v}" for k, v in row.items() if v != ""), flush=True)
    model.eval()
    save(model, out)
    return rows


def _lr(step: int, s: TrainSettings) -> float:
    if step <= s.warmup:
        return s.lr * step / s.warmup
    progress = (step - s.warmup) / max(1, s.steps - s.warmup)
    return s.min_lr + 0.5 * (s.lr - s.min_lr) * (1 + math.cos(math.pi * progress))


def main(argv: list[str] | None = None) -> int:
    defaults = TrainSettings()
    parser = argparse.ArgumentParser(
        prog="python -m disagg.train_tiny",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--out", type=Path, default=TRAINED_DIR, help="checkpoint directory to write")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=defaults.seq_len, help="tokens per sequence, BOS included")
    parser.add_argument("--threads", type=int, default=defaults.threads, help="torch CPU threads")
    parser.add_argument("--eval-every", type=int, default=defaults.eval_every, help="steps between held-out evals")
    parser.add_argument("--seed", type=int, default=SEED, help="seed of the initialisation and the batches")
    parser.add_argument(
        "--write-held-out", type=Path, metavar="FILE", help="write the held-out text to FILE and exit (no training)"
    )
    args = parser.parse_args(argv)
    if args.write_held_out is not None:
        args.write_held_out.write_text(split_topics()[1], encoding="utf-8")
        return 0
    settings = TrainSettings(
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        threads=args.threads,
        eval_every=args.eval_every,
        log_every=min(defaults.log_every, args.eval_every),
        warmup=min(defaults.warmup, max(1, args.steps // 10)),
    )
    train(settings, args.out, args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
