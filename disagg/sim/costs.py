"""What one forward step of a serving instance costs, from the roofline of its device and the model's shape.

A step is one forward pass over a batch that may hold decode tokens (one per running sequence) and prefill
chunks (a whole prompt, or a piece of one after ``past`` tokens already in the cache). Its time is the sum of
the pieces, each a roofline time ``max(FLOPs / compute, bytes / bandwidth)`` with the FLOPs and bytes of
``disagg.roofline`` and the device's ceilings derated by that kernel class's efficiency:

    step = overhead + gemm(T) + prefill_attention(chunks) + decode_attention(B, Σ context) + allreduce(T)

with T = B + Σ chunk tokens. The GEMMs read their weights once per step whatever T is: that is what batching
buys. An instance is ``tp`` GPUs of one device in tensor parallelism: ceilings and memory scale by ``tp`` and
each step pays two ring all-reduces per layer over the device's interconnect.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from disagg.roofline import ModelShape, Roofline
from disagg.sim.devices import Device


class StepCost:
    """Step times of ``model`` on an instance of ``tp`` × ``device``.

    ``dtype_bytes``: weights and activations (2 = bf16); ``kv_bytes``: per KV element (2 = bf16, 1 = fp8);
    ``overhead``: seconds of per-step host work the GPU does not hide (0 = a CUDA-graph-perfect engine)."""

    def __init__(
        self,
        model: ModelShape,
        device: Device,
        tp: int = 1,
        *,
        dtype_bytes: int = 2,
        kv_bytes: float = 2,
        overhead: float = 0.0,
    ) -> None:
        if not (isinstance(tp, int) and tp >= 1):
            raise ValueError(f"tp: must be an integer >= 1, got {tp!r}")
        if not overhead >= 0:
            raise ValueError(f"overhead: must be >= 0, got {overhead}")
        self.model, self.device, self.tp = model, device, tp
        self.dtype_bytes, self.kv_bytes, self.overhead = dtype_bytes, kv_bytes, overhead
        e = device.efficiency
        self.gemm_roof = Roofline(tp * device.flops * e.gemm, tp * device.bandwidth * e.gemm)
        self.prefill_roof = Roofline(
            tp * device.flops * e.prefill_attention, tp * device.bandwidth * e.prefill_attention
        )
        self.decode_roof = Roofline(tp * device.flops * e.decode_attention, tp * device.bandwidth * e.decode_attention)
        # The counts are linear in tokens and in context, so a step needs only these coefficients: the simulator
        # evaluates millions of steps. Tests check them against the direct formulas.
        self._gemm_flops = model.gemm_flops(1, logits=0)  # per token through the layers
        self._head_flops = model.gemm_flops(0, logits=1)  # per row through the LM head
        self._gemm_bytes0 = model.gemm_bytes(0, dtype_bytes, logits=0)  # the weights
        self._gemm_bytes1 = model.gemm_bytes(1, dtype_bytes, logits=0) - self._gemm_bytes0
        self._head_bytes = model.gemm_bytes(0, dtype_bytes, logits=1) - self._gemm_bytes0
        self._dec_flops = model.decode_attention_flops(1)
        self._dec_q = model.decode_attention_bytes(1, 0, kv_bytes, dtype_bytes)
        self._dec_kv = model.decode_attention_bytes(1, 1, kv_bytes, dtype_bytes) - self._dec_q
        reduces = 2 * model.layers  # all-reduces per forward
        per_token = model.allreduce_bytes(1, dtype_bytes) / reduces
        self._ar0 = reduces * device.interconnect.allreduce_time(0.0, tp)
        self._ar1 = reduces * device.interconnect.allreduce_time(per_token, tp) - self._ar0

    @property
    def kv_bytes_per_token(self) -> float:
        return self.model.kv_bytes_per_token(self.kv_bytes)

    def kv_capacity_tokens(self, mem_util: float = 0.9) -> int:
        """Tokens of KV that fit beside the weights in ``mem_util`` of the instance's memory (0: the model does not
        fit). Activations and workspace are what the remaining 1 − mem_util is for."""
        free = mem_util * self.tp * self.device.memory - self.model.weight_bytes(self.dtype_bytes)
        return max(0, int(free // self.kv_bytes_per_token))

    def gemm(self, tokens: int, logits: int | None = None) -> float:
        """The GEMMs of ``tokens`` tokens, ``logits`` of which (default all) go through the LM head."""
        if tokens == 0:
            return 0.0
        logits = tokens if logits is None else logits
        r = self.gemm_roof
        flops = tokens * self._gemm_flops + logits * self._head_flops
        nbytes = self._gemm_bytes0 + tokens * self._gemm_bytes1 + logits * self._head_bytes
        return max(flops / r.flops, nbytes / r.bandwidth)

    def prefill_attention(self, chunks: Iterable[tuple[int, int]]) -> float:
        """One varlen attention launch over ``(tokens, past)`` chunks."""
        flops = nbytes = 0.0
        for tokens, past in chunks:
            flops += self.model.prefill_attention_flops(tokens, past)
            nbytes += self.model.prefill_attention_bytes(tokens, past, self.dtype_bytes)
        return self.prefill_roof.time(flops, nbytes) if nbytes else 0.0

    def decode_attention(self, batch: int, context_sum: int) -> float:
        if batch == 0:
            return 0.0
        r = self.decode_roof
        return max(
            context_sum * self._dec_flops / r.flops, (context_sum * self._dec_kv + batch * self._dec_q) / r.bandwidth
        )

    def allreduce(self, tokens: int) -> float:
        return self._ar0 + tokens * self._ar1 if self.tp > 1 and tokens else 0.0

    def step(self, batch: int, context_sum: int, chunks: list[tuple[int, int]] = ()) -> float:
        """A step with ``batch`` decode tokens (contexts adding up to ``context_sum``, each counting the token
        being decoded) and prefill ``chunks`` of ``(tokens, past)``. Logits are computed for each decode token and
        the last token of each chunk."""
        tokens = batch + sum(t for t, _ in chunks)
        if tokens == 0:
            return 0.0
        attn = self.prefill_attention(chunks) if chunks else 0.0
        return (
            self.overhead
            + self.gemm(tokens, batch + len(chunks))
            + attn
            + self.decode_attention(batch, context_sum)
            + self.allreduce(tokens)
        )

    def decode_run(self, batch: int, context_sum: int, steps: int) -> tuple[int, float, float]:
        """Up to ``steps`` consecutive decode-only steps of an unchanging batch, costed in closed form: each step adds
        ``batch`` to the context sum, so step j (from 0) takes ``first + j · growth``. Returns ``(steps, first,
        growth)``, with ``steps`` cut short where decode attention would turn from bandwidth- to compute-bound (the
        time stops being linear there; the next run picks up the other side)."""
        r = self.decode_roof
        first = self.step(batch, context_sum)
        compute, memory = self._dec_flops / r.flops, self._dec_kv / r.bandwidth
        if compute <= memory:
            return steps, first, batch * memory
        crossover = batch * self._dec_q / r.bandwidth / (compute - memory)  # context sum where compute takes over
        if context_sum >= crossover:
            return steps, first, batch * compute
        return min(steps, math.ceil((crossover - context_sum) / batch)), first, batch * memory

    def prefill(self, prompts: Iterable[int]) -> float:
        """A prefill-only step over whole prompts."""
        return self.step(0, 0, [(p, 0) for p in prompts])

    def decode(self, batch: int, context_sum: int) -> float:
        """A decode-only step."""
        return self.step(batch, context_sum)
