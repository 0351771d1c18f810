"""phaseattn as an attention implementation of Hugging Face transformers (optional: ``pip install phaseattn[hf]``).

``register_transformers()`` registers the name ``"phaseattn"`` with transformers' ``AttentionInterface`` (the
attention function) and ``AttentionMaskInterface`` (the mask it is handed). Models load with
``attn_implementation="phaseattn"`` and every attention call, prefill and decode, runs
:func:`kernels.prefill_attention`:

- prefill: q/k/v of a batch become one packed varlen batch; causal masking is bottom-right aligned;
- decode with transformers' own KV cache (DynamicCache and friends): the new token is an Lq = 1 query against the
  cache's keys, which the bottom-right causal mask lets see every cached key;
- padding: the mask function hands over the 2D padding mask (never a 4D one); padded tokens are dropped before the
  kernel (varlen: no work on padding) and their outputs are 0;
- padding-free inputs: ``cu_seq_lens_q/k`` + ``max_length_q/k`` keyword arguments (as transformers' flattening
  collator passes them), or ``position_ids`` of one row that restart (packed sequences);
- the layer's ``sliding_window``, ``softcap`` (Gemma-2) and ``scaling`` keyword arguments, and attention sinks
  (``s_aux``, or the module's ``sinks``, gpt-oss: a per-head logit that joins the softmax's denominator only),
  which the kernel takes as ``sinks=``.

What it refuses, with a ValueError naming the fallback (``attn_implementation="sdpa"``): a 4D or otherwise custom
mask (including transformers' mask overlays), a sliding window over padding that is not one contiguous run per
row, packed sequences on top of a cache, dropout, values whose head dim differs from the queries', and a
paged-cache call (continuous batching). The kernels have no backward: a call that would need gradients is refused
too (run under ``torch.no_grad()`` / ``torch.inference_mode()``).

Continuous batching: transformers 5.x's ``generate_batch`` accepts only ``"paged|eager"``, ``"sdpa"`` and
implementation names containing "flash" (``switch_to_cb_friendly_attn`` checks the name), and strips the ``paged|``
prefix from other names; so there is no paged name to register there and ``register_transformers`` registers none.

This module imports transformers only inside :func:`register_transformers`; ``import kernels`` never does.
"""

from __future__ import annotations

import torch

from kernels.prefill import prefill_attention

NAME = "phaseattn"
FALLBACK = "sdpa"


def _refuse(what: str) -> ValueError:
    return ValueError(
        f"attn_implementation={NAME!r} cannot run {what}; load the model with attn_implementation={FALLBACK!r} "
        f"(or 'eager') for this input"
    )


def register_transformers() -> list[str]:
    """Register phaseattn with Hugging Face transformers; return the implementation names registered.

    After it, ``AutoModelForCausalLM.from_pretrained(path, attn_implementation="phaseattn")`` (or
    ``model.set_attn_implementation("phaseattn")``) runs every attention call through phaseattn's kernels.
    Calling it again is harmless.

    Raises:
        ImportError: transformers is not installed (``pip install phaseattn[hf]``).
    """
    try:
        from transformers import AttentionInterface, AttentionMaskInterface
    except ImportError as e:
        raise ImportError(
            "kernels.register_transformers needs Hugging Face transformers: pip install phaseattn[hf]"
        ) from e
    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, padding_mask)
    return [NAME]


def padding_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor | None:
    """The mask transformers hands :func:`attention_forward`: None when no key is padding, else the 2D boolean
    padding mask (batch, keys), right-aligned on the keys. Causality and the window are the kernel's, not a mask's.

    Raises:
        ValueError: transformers asked for a mask overlay (``or_mask_function`` / ``and_mask_function``, e.g. image
            tokens that attend bidirectionally), which the kernel cannot express.
    """
    if kwargs.get("use_vmap", False):  # transformers sets it exactly when a custom mask overlay is combined in
        raise _refuse("a custom mask overlay (or_mask_function / and_mask_function)")
    if attention_mask is None:
        return None
    attention_mask = attention_mask[:, -kv_length:].bool()
    if attention_mask.shape[1] == kv_length and bool(attention_mask.all()):
        return None
    return attention_mask


def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    is_causal: bool | None = None,
    s_aux: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract, run by :func:`kernels.prefill_attention`.

    Args:
        module: the attention layer (read: ``is_causal``, ``sinks``).
        query: (batch, num_q_heads, q_len, head_dim); key, value: (batch, num_kv_heads, kv_len, head_dim), the
            cache's keys included; queries are the last q_len positions of the keys.
        attention_mask: None or the 2D boolean padding mask of :func:`padding_mask`.
        dropout, scaling, sliding_window, softcap, is_causal, s_aux: as transformers passes them.
        kwargs: ``position_ids``, ``cu_seq_lens_q/k``, ``max_length_q/k`` are read; others are ignored.

    Returns:
        (out, None): out (batch, q_len, num_q_heads, head_dim) in query's dtype (0 at padded query positions), and
        no attention weights.
    """
    if any(t.requires_grad for t in (query, key, value)) and torch.is_grad_enabled():
        raise _refuse("a forward that needs gradients (the kernels have no backward; use torch.no_grad())")
    if dropout:
        raise _refuse(f"attention dropout ({dropout})")
    if kwargs.get("block_table") is not None or kwargs.get("k_cache") is not None:
        raise _refuse("a paged-cache (continuous batching) call")
    if attention_mask is not None and attention_mask.dim() != 2:
        raise _refuse(f"an arbitrary {attention_mask.dim()}D attention mask")
    if value.shape[-1] != query.shape[-1] or key.shape[-1] != query.shape[-1]:
        raise _refuse(f"values or keys of head dim {value.shape[-1]} for queries of head dim {query.shape[-1]}")
    causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
    if sliding_window is None and "sliding_window" not in kwargs:
        sliding_window = getattr(module, "sliding_window", None)
    window = int(sliding_window) if sliding_window else None
    if window is not None and not causal:
        raise _refuse("a sliding window without causal masking")
    sinks = s_aux if s_aux is not None else getattr(module, "sinks", None)
    options = dict(
        causal=causal,
        sm_scale=scaling,
        window=window,
        softcap=float(softcap) if softcap else None,
        sinks=sinks.detach().to(device=query.device, dtype=torch.float32) if isinstance(sinks, torch.Tensor) else None,
    )

    batch, num_q_heads, q_len, head_dim = query.shape
    kv_len = key.shape[2]
    q = query.transpose(1, 2)  # (batch, q_len, heads, head_dim): a view; flattening it is free for HF's layouts
    k = key.transpose(1, 2)
    v = value.transpose(1, 2)
    if attention_mask is not None:
        out = _padded(q, k, v, attention_mask, window, options)
    else:
        cu_q, cu_k, max_q, max_k = _varlen_lengths(batch, q_len, kv_len, q.device, kwargs)
        out = prefill_attention(
            q.reshape(-1, num_q_heads, head_dim),
            k.reshape(-1, k.shape[2], head_dim),
            v.reshape(-1, v.shape[2], head_dim),
            cu_q,
            cu_k,
            max_seqlen_q=max_q,
            max_seqlen_k=max_k,
            **options,
        )
    return out.view(batch, q_len, num_q_heads, head_dim), None


def _varlen_lengths(
    batch: int, q_len: int, kv_len: int, device: torch.device, kwargs: dict
) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """cu_seqlens and longest lengths of an unpadded call: padding-free keyword arguments if given, else packed
    ``position_ids`` (one row whose positions restart), else ``batch`` sequences of equal length."""
    given = [kwargs.get(n) for n in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")]
    if all(x is not None for x in given):
        if batch != 1:
            raise _refuse(
                f"cu_seq_lens keyword arguments with a batch of {batch} rows (padding-free inputs are one row)"
            )
        cu_q, cu_k, max_q, max_k = given
        return cu_q.to(torch.int32), cu_k.to(torch.int32), int(max_q), int(max_k)
    starts = _packed_starts(kwargs.get("position_ids"), batch, q_len)
    if starts is not None:
        if kv_len != q_len:
            raise _refuse("packed sequences (restarting position_ids) on top of a KV cache")
        cu = torch.cat([starts, starts.new_tensor([q_len])]).to(device=device, dtype=torch.int32)
        return cu, cu, q_len, q_len
    steps = torch.arange(batch + 1, device=device, dtype=torch.int32)
    return steps * q_len, steps * kv_len, q_len, kv_len


def _packed_starts(position_ids: torch.Tensor | None, batch: int, q_len: int) -> torch.Tensor | None:
    """Token indices where packed sequences start (a position that does not follow its predecessor), or None
    when ``position_ids`` describe one sequence. Reads the positions on the host, as transformers' flash path does,
    and only for one-row prefills."""
    if position_ids is None or batch != 1 or q_len == 1 or position_ids.shape[-1] != q_len:
        return None
    pos = position_ids.reshape(-1).cpu()
    breaks = torch.nonzero(pos[1:] != pos[:-1] + 1).flatten() + 1
    if breaks.numel() == 0:
        return None
    return torch.cat([breaks.new_zeros(1), breaks])


def _padded(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, window: int | None, options: dict
) -> torch.Tensor:
    """Attention of a padded batch: the mask's valid keys and queries become one varlen batch.

    Dropping padded keys keeps bottom-right causal masking exact because the queries are the last positions of the
    keys: the valid keys after the first query position are exactly the valid queries. A sliding window counts
    positions, so there the valid keys of a row must be one contiguous run (left or right padding)."""
    batch, q_len, num_q_heads, head_dim = q.shape
    kv_len = k.shape[1]
    mask = mask.to(device=q.device, dtype=torch.bool)
    if mask.shape[0] != batch or mask.shape[1] > kv_len or mask.shape[1] < q_len:
        raise _refuse(f"a padding mask of shape {tuple(mask.shape)} for {batch} rows, {q_len} queries, {kv_len} keys")
    keys = mask.shape[1]  # fewer keys than the cache holds: a static cache's unwritten tail, never attended
    k, v = k[:, :keys], v[:, :keys]
    q_mask = mask[:, keys - q_len :]
    n_k = mask.sum(1)
    if window is not None:
        first = mask.int().argmax(1)
        cols = torch.arange(keys, device=mask.device)
        run = (cols >= first[:, None]) & (cols < (first + n_k)[:, None])
        if not bool(torch.equal(run, mask)):
            raise _refuse("a sliding window over padding that is not one contiguous run of tokens per row")
    n_q = q_mask.sum(1)
    cu_q = torch.nn.functional.pad(n_q.cumsum(0), (1, 0)).to(torch.int32)
    cu_k = torch.nn.functional.pad(n_k.cumsum(0), (1, 0)).to(torch.int32)
    rows_q = q_mask.reshape(-1).nonzero().flatten()
    rows_k = mask.reshape(-1).nonzero().flatten()
    out = prefill_attention(
        q.reshape(-1, num_q_heads, head_dim)[rows_q],
        k.reshape(batch * keys, -1, head_dim)[rows_k],
        v.reshape(batch * keys, -1, head_dim)[rows_k],
        cu_q,
        cu_k,
        max_seqlen_q=int(n_q.max()),
        max_seqlen_k=int(n_k.max()),
        **options,
    )
    return out.new_zeros(batch * q_len, num_q_heads, head_dim).index_copy_(0, rows_q, out)
