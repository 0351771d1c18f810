"""Loading a model: an embedded one (``tiny``, ``tiny-random``: see :mod:`disagg.tiny`) or a local Hugging Face
directory (no network).

A directory needs ``config.json`` and its weights as safetensors: either ``model.safetensors.index.json`` with the
shards it names, or one or more ``*.safetensors`` files. Pickled weights (``*.bin``, ``*.pt``) are never read.
``tokenizer.json`` (optional) gives a tokenizer; ``generation_config.json`` (optional) adds stop tokens.

The model is built on the ``meta`` device and every tensor is loaded straight to its device and dtype, so loading
needs one copy of the weights' memory. Names, shapes and the set of tensors are checked against the model: a
missing, unexpected or misshapen tensor is a :class:`ModelLoadError`, never a silently random weight.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import torch

import kernels
from disagg.config import ModelConfig, config_from_hf, token_ids
from disagg.errors import ModelLoadError
from disagg.model import CausalLM
from disagg.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some older checkpoints saved


def default_device() -> torch.device:
    """Where this process's kernels run: CPU under Triton's interpreter, else the current CUDA device."""
    return torch.device("cpu" if kernels.INTERPRET else "cuda")


def resolve_dtype(dtype: str | torch.dtype | None, config: ModelConfig) -> torch.dtype:
    """None/"auto": float32 under the interpreter (CPU), else the checkpoint's 16-bit dtype (bfloat16 if none)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if kernels.INTERPRET:
            return torch.float32
        return torch.float16 if config.torch_dtype == "float16" else torch.bfloat16
    if dtype not in DTYPES:
        raise ModelLoadError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {dtype!r}")
    return DTYPES[dtype]


def check_supported(config: ModelConfig) -> None:
    """Refuse, at load time, what the attention kernels cannot run (else the first step would fail inside a
    kernel launcher)."""
    if config.head_dim not in kernels.HEAD_DIMS:
        raise ModelLoadError(
            f"head_dim {config.head_dim} is not supported by the attention kernels (supported head dims: "
            f"{', '.join(map(str, kernels.HEAD_DIMS))})"
        )


def build_model(
    config: ModelConfig, tensors: dict[str, torch.Tensor], dtype: torch.dtype, device: torch.device
) -> CausalLM:
    """Assemble a :class:`CausalLM` from named tensors (Hugging Face names), checking that they are exactly the
    model's parameters. The tensors must already be on ``device`` in ``dtype``."""
    check_supported(config)
    with torch.device("meta"):
        model = CausalLM(config, device)
    expected = dict(model.state_dict())
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")
        tensors.pop("lm_head.weight", None)  # some tied checkpoints store the copy anyway
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing:
        raise ModelLoadError(f"the checkpoint lacks {len(missing)} tensors, e.g. {', '.join(missing[:3])}")
    if unexpected:
        raise ModelLoadError(
            f"the checkpoint has {len(unexpected)} unexpected tensors, e.g. {', '.join(unexpected[:3])}"
        )
    for name, t in tensors.items():
        if t.shape != expected[name].shape:
            raise ModelLoadError(
                f"tensor {name} has shape {tuple(t.shape)}, the config implies {tuple(expected[name].shape)}"
            )
    model.load_state_dict(tensors, strict=False, assign=True)
    model.tie_weights()
    model.eval().requires_grad_(False)
    model.weights_digest = weights_digest(model)
    return model


def weights_digest(model: CausalLM) -> str:
    """A cheap identity of the weights: sha256 over every tensor's name, shape, dtype and 64 evenly spaced values.
    Two checkpoints of the same shape (say a model and its fine-tune) get different digests, so a KV export made
    with one is refused by the other."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        flat = t.detach().reshape(-1)
        idx = torch.linspace(0, flat.numel() - 1, min(64, flat.numel()), device=flat.device).long()
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(flat[idx].cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError) as e:
            raise ModelLoadError(f"{index} is not a valid safetensors index: {e}") from None
        files = [path / n for n in names]
        for f in files:
            if not f.exists():
                raise ModelLoadError(f"{index.name} names {f.name}, which is missing from {path}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"no *.safetensors weights in {path} (pickled *.bin/*.pt weights are never loaded)")
    return files


def _read_tensors(files: list[Path], dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError, safe_open

    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt", device="cpu") as st:
                for name in st.keys():  # noqa: SIM118 (safe_open is not a dict)
                    if not name.endswith(_IGNORED_SUFFIXES):
                        tensors[name] = st.get_tensor(name).to(device=device, dtype=dtype)
        except (SafetensorError, OSError) as e:
            raise ModelLoadError(f"cannot read {f}: {e}") from None
    return tensors


def _eos_ids(path: Path, config: ModelConfig) -> ModelConfig:
    gen = path / "generation_config.json"
    if not gen.exists():
        return config
    try:
        settings = json.loads(gen.read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{gen} is not valid JSON: {e}") from None
    if not isinstance(settings, dict):
        raise ModelLoadError(f"{gen} must hold a JSON object, got a {type(settings).__name__}")
    extra = token_ids(settings.get("eos_token_id"), f"{gen.name}: eos_token_id")
    merged = tuple(dict.fromkeys([*config.eos_token_ids, *extra]))
    return dataclasses.replace(config, eos_token_ids=merged)


def load_model(
    name_or_path: str | Path = "tiny",
    *,
    dtype: str | torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> tuple[CausalLM, Tokenizer | None]:
    """Load ``"tiny"`` (trained, shipped with the package), ``"tiny-random"`` (built in memory; see
    :mod:`disagg.tiny`) or a Hugging Face checkpoint directory.

    Returns the model (eval mode, on ``device``, default: the kernels' device) and its tokenizer, or None when
    the directory has no ``tokenizer.json``. Raises :class:`ModelLoadError` with the reason when it cannot.
    """
    from disagg import tiny

    device = torch.device(device) if device is not None else default_device()
    if str(name_or_path) == "tiny-random":
        dt = resolve_dtype(dtype, tiny.CONFIG)
        tensors = {k: t.to(device=device, dtype=dt) for k, t in tiny.state_dict().items()}
        return build_model(tiny.CONFIG, tensors, dt, device), ByteTokenizer(tiny.BOS, tiny.EOS)
    path = tiny.TRAINED_DIR if str(name_or_path) == "tiny" else Path(name_or_path)
    if not path.is_dir():
        raise ModelLoadError(f"model {str(name_or_path)!r} is neither 'tiny', 'tiny-random' nor a directory")
    if not (path / "config.json").exists():
        raise ModelLoadError(f"{path} has no config.json")
    try:
        raw = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path / 'config.json'} is not valid JSON: {e}") from None
    config = _eos_ids(path, config_from_hf(raw))
    check_supported(config)  # before reading gigabytes of weights
    dt = resolve_dtype(dtype, config)
    model = build_model(config, _read_tensors(_weight_files(path), dt, device), dt, device)
    if str(name_or_path) == "tiny":
        return model, ByteTokenizer(tiny.BOS, tiny.EOS)
    tokenizer = HFTokenizer(path / "tokenizer.json") if (path / "tokenizer.json").exists() else None
    return model, tokenizer
