"""What one forward step of a serving instance costs, from the roofline of its device, the model's shape and the
terms of a ``CostModel``.

A step is one forward pass over a batch that may hold decode tokens (one per running sequence) and prefill
chunks (a whole prompt, or a piece of one after ``past`` tokens already in the cache). Its GPU time is the sum of
its kernels, each a roofline time ``max(FLOPs / compute, bytes / bandwidth)`` with the FLOPs and bytes of
``disagg.roofline`` and the device's ceilings derated by that kernel class's efficiency, plus the fixed costs:

    gpu  = launches + gemm(T) + elementwise(T) + prefill_attention(chunks) + decode_attention(B, Σ context)
           + allreduce(T)
    host = host_overhead + host_per_request · (B + chunks)
    step = max(gpu, host) with an overlapping scheduler, gpu + host without

with T = B + Σ chunk tokens. The GEMMs read their weights once per step whatever T is: that is what batching
buys. An instance is ``tp`` GPUs of one device in tensor parallelism: ceilings and memory scale by ``tp`` and
each step pays two ring all-reduces per layer over the device's interconnect. What each term is, and where its
numbers come from, is in ``CostModel``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from disagg.roofline import ModelShape, Roofline
from disagg.sim.devices import Device

# Hopper's wgmma instruction computes 64 rows of a tile at a time: a GEMM over T tokens does the work of T rounded up
# to 64 (PTX ISA, "wgmma.mma_async", shapes m64nNk*), which is what makes small-batch GEMMs less efficient.
GEMM_ROWS = 64
# FlashAttention-2/3 tile a causal prefill in 128 × 128 blocks (head_dim 128; FA3 paper, 2024, and the Triton
# tutorial): the blocks on the diagonal are computed whole although half their pairs are masked, so a chunk of q
# tokens does q · 128 / 2 extra pairs per head, which short prompts feel (128 tokens: twice the exact count).
ATTENTION_TILE = 128
# Kernels of one Llama layer in a fused serving engine: input and post-attention RMSNorm (each fused with the
# residual add), the QKV GEMM, RoPE with the KV-cache write, attention, the output projection, the gate/up GEMM,
# SwiGLU and the down projection (vLLM's and TensorRT-LLM's Llama layers); plus embedding, final norm, LM head
# and sampling once per step.
KERNELS_PER_LAYER, KERNELS_PER_STEP = 9, 4


@dataclass(frozen=True)
class CostModel:
    """The terms of a step's cost beyond the GEMM and attention rooflines, each switchable (0 / False: off).

    - ``fp8_gemm``: with 1-byte weights (``dtype_bytes=1``) the GEMMs run on fp8 tensor cores at the device's fp8
      ceiling (activations quantized per tensor, as TensorRT-LLM's and vLLM's fp8 checkpoints do); off, the fp8
      weights are dequantized and the GEMMs run at the bf16 ceiling (weight-only fp8).
    - ``kernel_latency``: seconds of fixed GPU time per kernel, whatever its size (ramp-up, tail, the launch slot in a
      CUDA graph), times ``KERNELS_PER_LAYER`` × layers + ``KERNELS_PER_STEP``. Default 5.9 µs: the smallest GEMMs
      of XLA's measured sm_90 (H100) matmul table take that long whatever their size (256×512×256 bf16 at 11.46
      TFLOP/s = 5.86 µs; 256×1024×256 at 22.67 = 5.92 µs; xla/service/gpu/model/matmul_interpolator_data.h).
      It is what makes small-batch steps cost more than their bytes.
    - ``tiles``: work rounded up to the kernels' tiles: GEMM rows to 64 (``GEMM_ROWS``), causal prefill diagonal
      blocks of 128 (``ATTENTION_TILE``), decode KV to whole pages. This makes kernel efficiency a function of batch
      and context: short prompts and small batches waste part of each tile.
    - ``elementwise``: the memory-bound kernels between the GEMMs, at the bandwidth ceiling: per token and layer two
      fused residual-add + RMSNorm passes, RoPE with the KV-cache write and SwiGLU (bf16 activations in, GEMM-dtype
      activations out), and per logits row the fp32 logits written and read back by sampling.
    - ``host_overhead``: seconds of CPU work per step (scheduling, input preparation, output processing). Default
      4 ms: the GPU bubble per decode step vLLM measured before overlapping it (vLLM RFC #6854, "Multi-Step
      Scheduling", 2024: "about 4ms of GPU bubble" per step, 5-13 ms in general).
    - ``host_per_request``: seconds of CPU work per sequence in a step, on top of ``host_overhead``: an engine's
      per-step bookkeeping walks every scheduled request (admission, KV blocks, input metadata, the sampled token,
      stop checks, the response). Default 26.8 µs: TensorRT-LLM's PyTorch executor took 45.11 ms of host time per
      iteration with 1,536 requests per rank, in a configuration its authors describe as bound by host overhead
      (NVIDIA/TensorRT-LLM PR #10273, GB200, GPT-OSS-120B, ISL/OSL 1k/1k, attention DP 2 × max batch 1,536), less
      the 4 ms per step above: (45.11 − 4) ms / 1,536. It binds where a step's GPU time per sequence is short:
      large batches at short contexts (a decode step of 4,096 sequences needs 114 ms of host, more than Llama-3-8B
      in fp8 takes on an H100 or an H200 at context 200), where a faster-memory device then gains nothing.
    - ``overlap``: the scheduler prepares step n+1 while the GPU runs step n, so a step takes max(GPU, host) instead
      of GPU + host. On by default: TensorRT-LLM's overlap scheduler (on by default, docs "Overlap Scheduler"),
      SGLang's zero-overhead scheduler (v0.4 blog, 2024) and vLLM V1's async scheduling all do this.
    - ``unquantized_head``: with fp8 weights (``dtype_bytes=1``) the LM head and the embedding table stay bf16, as
      in the FP8 checkpoints TensorRT-LLM and vLLM serve: NVIDIA's quantization recipe (TensorRT Model Optimizer,
      ``FP8_DEFAULT_CFG``) disables the quantizers of every ``*lm_head*`` module, and the embedding is a lookup, not
      a quantized GEMM. The head's GEMM then runs at the bf16 ceiling and reads 2-byte weights (Llama-3-8B: 1.05 of
      its 16 GFLOP per token at half the fp8 rate), and both tables take 2 bytes per parameter of memory.
    - ``activation_memory``: the KV pool gets what is left after the weights and the activations of the largest
      step (``token_budget`` tokens through a layer: residual and normed hidden states, the gate/up output and
      SwiGLU output in bf16; fp32 logits for ``max_batch`` rows), as engines size it by profiling such a step.
    """

    fp8_gemm: bool = True
    kernel_latency: float = 5.9e-6
    tiles: bool = True
    elementwise: bool = True
    host_overhead: float = 4e-3
    host_per_request: float = 26.8e-6
    overlap: bool = True
    activation_memory: bool = True
    unquantized_head: bool = True

    def __post_init__(self) -> None:
        for name in ("kernel_latency", "host_overhead", "host_per_request"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"{name}: must be a finite number of seconds >= 0, got {v!r}")

    def describe(self) -> str:
        on = lambda b: "on" if b else "off"
        return (
            f"fp8 GEMMs {on(self.fp8_gemm)}, kernel latency {self.kernel_latency * 1e6:g} µs, tiles "
            f"{on(self.tiles)}, elementwise {on(self.elementwise)}, host {self.host_overhead * 1e3:g} ms/step + "
            f"{self.host_per_request * 1e6:g} µs/request ({'overlapped' if self.overlap else 'not overlapped'}), "
            f"activation memory {on(self.activation_memory)}, bf16 LM head {on(self.unquantized_head)}"
        )


# Every term off: the plain roofline sum, with no fixed costs (the simulator before these terms existed).
ROOFLINE = CostModel(
    fp8_gemm=False,
    kernel_latency=0.0,
    tiles=False,
    elementwise=False,
    host_overhead=0.0,
    host_per_request=0.0,
    activation_memory=False,
    unquantized_head=False,
)


class StepCost:
    """Step times of ``model`` on an instance of ``tp`` × ``device``.

    ``dtype_bytes``: weights and activations (2 = bf16, 1 = fp8); ``kv_bytes``: per KV element (2 = bf16, 1 = fp8);
    ``terms``: the ``CostModel``; ``page_size``: KV page in tokens (decode reads whole pages when ``terms.tiles``)."""

    def __init__(
        self,
        model: ModelShape,
        device: Device,
        tp: int = 1,
        *,
        dtype_bytes: int = 2,
        kv_bytes: float = 2,
        terms: CostModel = CostModel(),
        page_size: int = 16,
    ) -> None:
        if not (isinstance(tp, int) and tp >= 1):
            raise ValueError(f"tp: must be an integer >= 1, got {tp!r}")
        if not isinstance(terms, CostModel):
            raise TypeError(f"terms: expected a CostModel, got {type(terms).__name__}")
        self.model, self.device, self.tp, self.terms = model, device, tp, terms
        self.dtype_bytes, self.kv_bytes, self.page_size = dtype_bytes, kv_bytes, page_size
        e = device.efficiency
        gemm_peak = device.gemm_flops(dtype_bytes if terms.fp8_gemm else 2)
        self.gemm_roof = Roofline(tp * gemm_peak * e.gemm, tp * device.bandwidth * e.gemm)
        # The LM head's weights, and the GEMM dtype it runs at (see CostModel.unquantized_head).
        self.head_bytes = 2 if terms.unquantized_head and dtype_bytes == 1 else dtype_bytes
        self._head_rate = tp * device.gemm_flops(self.head_bytes if terms.fp8_gemm else 2) * e.gemm
        self.prefill_roof = Roofline(
            tp * device.flops * e.prefill_attention, tp * device.bandwidth * e.prefill_attention
        )
        self.decode_roof = Roofline(tp * device.flops * e.decode_attention, tp * device.bandwidth * e.decode_attention)
        self.bandwidth = tp * device.bandwidth  # what the elementwise kernels stream at
        # The counts are linear in tokens and in context, so a step needs only these coefficients: the simulator
        # evaluates millions of steps. Tests check them against the direct formulas.
        self._gemm_flops = model.gemm_flops(1, logits=0)  # per token through the layers
        self._head_flops = model.gemm_flops(0, logits=1)  # per row through the LM head
        layer_weights = model.gemm_bytes(0, dtype_bytes, logits=0)
        self._gemm_bytes0 = layer_weights + model.vocab * model.hidden * (self.head_bytes - dtype_bytes)  # weights
        self._gemm_bytes1 = model.gemm_bytes(1, dtype_bytes, logits=0) - layer_weights
        self._head_bytes = (model.gemm_bytes(0, dtype_bytes, logits=1) - layer_weights) * self.head_bytes / dtype_bytes
        self._dec_flops = model.decode_attention_flops(1)
        self._dec_q = model.decode_attention_bytes(1, 0, kv_bytes, dtype_bytes)
        self._dec_kv = model.decode_attention_bytes(1, 1, kv_bytes, dtype_bytes) - self._dec_q
        # Decode reads whole pages: on average half a page more than the context per sequence.
        self._dec_pad = page_size / 2 if terms.tiles else 0.0
        self._diag_pairs = ATTENTION_TILE / 2 if terms.tiles else 0.0
        self._elem_token = self._elem_row = 0.0
        if terms.elementwise:
            m, q = model, dtype_bytes
            norms = 2 * (3 * 2 + q) * m.hidden  # x and residual in, residual out (bf16), normed out (GEMM dtype)
            rope = 2 * 2 * (m.q_heads + m.kv_heads) * m.head_dim + 2 * m.kv_heads * m.head_dim * (2 + kv_bytes)
            swiglu = (2 * 2 + q) * m.ffn  # gate and up in (bf16), product out (GEMM dtype)
            self._elem_token = m.layers * (norms + rope + swiglu)
            self._elem_row = 2 * 4 * m.vocab  # fp32 logits written and read back by sampling
        self._fixed = terms.kernel_latency * (KERNELS_PER_LAYER * model.layers + KERNELS_PER_STEP)
        reduces = 2 * model.layers  # all-reduces per forward
        per_token = model.allreduce_bytes(1, 2) / reduces  # activations reduce in bf16
        self._ar0 = reduces * device.interconnect.allreduce_time(0.0, tp)
        self._ar1 = reduces * device.interconnect.allreduce_time(per_token, tp) - self._ar0

    @property
    def weight_bytes(self) -> float:
        """Weights in memory (all ``tp`` GPUs together): the layers at ``dtype_bytes``, the embedding and LM-head
        tables at ``head_bytes``."""
        m = self.model
        tables = (1 if m.tied_embeddings else 2) * m.vocab * m.hidden
        return m.weight_bytes(self.dtype_bytes) + tables * (self.head_bytes - self.dtype_bytes)

    @property
    def kv_bytes_per_token(self) -> float:
        return self.model.kv_bytes_per_token(self.kv_bytes)

    def activation_bytes(self, token_budget: int, max_batch: int) -> float:
        """Peak activations of the largest step (all ``tp`` GPUs together): per token the residual and normed hidden
        states (on every GPU) and the gate/up and SwiGLU outputs (sharded), bf16; fp32 logits of ``max_batch`` rows."""
        if not self.terms.activation_memory:
            return 0.0
        m = self.model
        return token_budget * 2 * (2 * self.tp * m.hidden + 3 * m.ffn) + max_batch * 4 * m.vocab

    def kv_capacity_tokens(self, mem_util: float = 0.9, token_budget: int = 0, max_batch: int = 0) -> int:
        """Tokens of KV that fit in ``mem_util`` of the memory left after the weights and (with the
        ``activation_memory`` term) the activations of a ``token_budget``-token step with ``max_batch`` logits rows
        (0: the model does not fit)."""
        free = self.tp * self.device.memory - self.weight_bytes
        free -= self.activation_bytes(token_budget, max_batch)
        return max(0, int(mem_util * free // self.kv_bytes_per_token))

    def gemm(self, tokens: int, logits: int | None = None) -> float:
        """The GEMMs of ``tokens`` tokens, ``logits`` of which (default all) go through the LM head."""
        if tokens == 0:
            return 0.0
        logits = tokens if logits is None else logits
        r = self.gemm_roof
        if self.terms.tiles:
            rows, head_rows = -(-tokens // GEMM_ROWS) * GEMM_ROWS, -(-logits // GEMM_ROWS) * GEMM_ROWS
        else:
            rows, head_rows = tokens, logits
        compute = rows * self._gemm_flops / r.flops + head_rows * self._head_flops / self._head_rate
        memory = (self._gemm_bytes0 + tokens * self._gemm_bytes1 + logits * self._head_bytes) / r.bandwidth
        return compute if compute > memory else memory

    def elementwise(self, tokens: int, logits: int) -> float:
        """The memory-bound kernels between the GEMMs (see ``CostModel.elementwise``)."""
        return (tokens * self._elem_token + logits * self._elem_row) / self.bandwidth

    def prefill_attention(self, chunks: Iterable[tuple[int, int]]) -> float:
        """One varlen attention launch over ``(tokens, past)`` chunks."""
        flops = nbytes = 0.0
        m = self.model
        for tokens, past in chunks:
            flops += m.prefill_attention_flops(tokens, past)
            flops += 4.0 * m.layers * m.q_heads * m.head_dim * tokens * self._diag_pairs  # masked halves of tiles
            nbytes += m.prefill_attention_bytes(tokens, past, self.dtype_bytes)
        return self.prefill_roof.time(flops, nbytes) if nbytes else 0.0

    def decode_attention(self, batch: int, context_sum: int) -> float:
        if batch == 0:
            return 0.0
        r = self.decode_roof
        return max(
            context_sum * self._dec_flops / r.flops,
            ((context_sum + batch * self._dec_pad) * self._dec_kv + batch * self._dec_q) / r.bandwidth,
        )

    def allreduce(self, tokens: int) -> float:
        return self._ar0 + tokens * self._ar1 if self.tp > 1 and tokens else 0.0

    def gpu_step(self, batch: int, context_sum: int, chunks: list[tuple[int, int]] = ()) -> float:
        """The GPU time of a step (see ``step``). Written for speed: the simulator calls it once per event."""
        tokens = batch
        for t, _ in chunks:
            tokens += t
        if tokens == 0:
            return 0.0
        logits = batch + len(chunks)
        time = (
            self._fixed
            + self.gemm(tokens, logits)
            + (tokens * self._elem_token + logits * self._elem_row) / (self.bandwidth)
        )
        if chunks:
            time += self.prefill_attention(chunks)
        if batch:
            time += self.decode_attention(batch, context_sum)
        if self.tp > 1:
            time += self._ar0 + tokens * self._ar1
        return time

    def host(self, requests: int) -> float:
        """The host's work for a step over ``requests`` sequences (see ``CostModel.host_overhead``)."""
        return self.terms.host_overhead + requests * self.terms.host_per_request

    def step(self, batch: int, context_sum: int, chunks: list[tuple[int, int]] = ()) -> float:
        """A step with ``batch`` decode tokens (contexts adding up to ``context_sum``, each counting the token
        being decoded) and prefill ``chunks`` of ``(tokens, past)``. Logits are computed for each decode token and
        the last token of each chunk. The host's work overlaps the GPU's or adds to it (``CostModel.overlap``)."""
        gpu = self.gpu_step(batch, context_sum, chunks)
        if gpu == 0.0:
            return 0.0
        host = self.host(batch + len(chunks))
        return max(gpu, host) if self.terms.overlap else gpu + host

    def decode_run(self, batch: int, context_sum: int, steps: int) -> tuple[int, float, float]:
        """Up to ``steps`` consecutive decode-only steps of an unchanging batch, costed in closed form: each step adds
        ``batch`` to the context sum, so step j (from 0) takes ``first + j · growth``. Returns ``(steps, first,
        growth)``, with ``steps`` cut short where the time stops being linear: where decode attention turns from
        bandwidth- to compute-bound, or where the GPU step outgrows an overlapped host step (the next run picks up
        the other side)."""
        r = self.decode_roof
        gpu = self.gpu_step(batch, context_sum)
        host = self.host(batch)
        if not self.terms.overlap:
            first = gpu + host
        else:
            first = gpu if gpu > host else host
        compute = self._dec_flops / r.flops
        memory = self._dec_kv / r.bandwidth
        if compute <= memory:
            growth = batch * memory
        else:
            crossover = batch * (self._dec_q + self._dec_pad * self._dec_kv) / r.bandwidth / (compute - memory)
            if context_sum >= crossover:
                growth = batch * compute
            else:
                steps = min(steps, math.ceil((crossover - context_sum) / batch))
                growth = batch * memory
        if self.terms.overlap and gpu < host:  # flat at the host's pace until the GPU step outgrows it
            if growth > 0:
                steps = min(steps, math.ceil((host - gpu) / growth))
            return steps, host, 0.0
        return steps, first, growth

    def prefill(self, prompts: Iterable[int]) -> float:
        """A prefill-only step over whole prompts."""
        return self.step(0, 0, [(p, 0) for p in prompts])

    def decode(self, batch: int, context_sum: int) -> float:
        """A decode-only step."""
        return self.step(batch, context_sum)


def _round_up(n: int, to: int = GEMM_ROWS) -> int:
    return -(-n // to) * to
