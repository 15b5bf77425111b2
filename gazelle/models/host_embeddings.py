"""The frozen embedding table and lm_head in pinned host memory while training: GPU memory holds neither.

LoRA leaves both frozen, and a Qwen2.5 vocabulary (151,936 rows) makes them large: 0.43 GiB each at the
qwen-1.5B shape (tied: one tensor), 1.16 GiB each at the llama-8B shape, as much as the 4-bit layers of a
1.5B model. Neither is needed on the GPU for long:
- the embedding is a row lookup: `inputs(batch)` gathers the batch's rows on the host (the trainer's batches are
  there already) into pinned memory, and the forward receives them as inputs_embeds, one (tokens, hidden) copy;
- the head is read by the loss alone, and only slice by slice: the linear cross-entropy takes it as a HeadStream,
  which copies 32 MB slices (gazelle.kernels.linear_cross_entropy.SLICE_BYTES) into a ring of `ring_bytes` of
  device buffers on a stream of its own, each buffer refilled as soon as the loss has issued its work on the slice
  before. A training forward (autograd on) starts the ring's first copies before its last layer
  (`prefetch_layers`), so they run under that layer's compute. The whole head is never on the GPU: at the
  llama-8B shape a copy of it (1.16 GiB) was, and SFT's peak went from 16.27 to 15.53 GiB (QLoRA: 6.71 to 5.90)
  within about 2% of the speed (H100, benchmarks/RESULTS.md).
Everything is capturable in a CUDA graph: the copies read pinned memory, and their forks and joins are events.

`HostEmbeddings(model).enable()` moves them (page-locked where they lie, cudaHostRegister), `disable()` moves them
back to the device; the trainer does both around training, so inference and sampling afterwards see the model
as it was. Elsewhere (no autograd: evaluation) the head is copied when asked for and the lookup runs on the host.
"""

from __future__ import annotations

import torch
from torch import nn

from gazelle.errors import GazelleError
from gazelle.kernels.linear_cross_entropy import HeadSlices, default_slice_rows
from gazelle.utils.pinned import pin, unpin

RING_BYTES = 2**27  # device buffers of a streamed head: 4 slices of 32 MB


def why_not(model) -> str | None:
    """Why the embeddings of `model` cannot live on the host, or None when they can."""
    body = getattr(model, "model", None)
    embed = getattr(body, "embed_tokens", None)
    head = getattr(model, "lm_head", None)
    if not isinstance(embed, nn.Embedding) or type(head) is not nn.Linear or head.bias is not None:
        return "the model has no plain embedding table and linear head"
    if embed.weight.requires_grad or head.weight.requires_grad:
        return "the embedding or the head is trained"
    if not embed.weight.is_cuda:
        return f"the model is on {embed.weight.device.type}, not CUDA"
    return None


class HostEmbeddings:
    def __init__(self, model):
        self.model = model
        self.device: torch.device | None = None
        self._registered: list[torch.Tensor] = []
        self._stream: torch.cuda.Stream | None = None
        self._pending: HeadStream | None = None  # the head's first slices on their way to the GPU
        self.ring_bytes = RING_BYTES
        """Device buffers of the streamed head: the slices copied ahead of the loss."""
        self.prefetch_layers = 1
        """A training forward starts the head's first copies before its last this many layers."""

    @property
    def enabled(self) -> bool:
        return self.device is not None

    def enable(self) -> None:
        reason = why_not(self.model)
        if reason is not None:
            raise GazelleError(f"the embeddings cannot move to host memory: {reason}")
        self.device = self.model.model.embed_tokens.weight.device
        for param in self._tables():
            host = param.data.to("cpu")
            status = pin(host)
            if status != 0:
                raise GazelleError(f"could not pin {host.nbytes / 2**30:.2f} GiB of host memory for the embeddings "
                                   f"(cudaError {status}); train with offload_embeddings=False")
            self._registered.append(host)
            param.data = host
        self.model._host_embeddings = self

    def disable(self) -> None:
        if not self.enabled:
            return
        self._drain()
        for param in self._tables():
            param.data = param.data.to(self.device)
        for host in self._registered:
            unpin(host)
        self._registered, self._pending, self.device = [], None, None
        self.model._host_embeddings = None

    def _tables(self) -> list[nn.Parameter]:
        embed, head = self.model.model.embed_tokens.weight, self.model.lm_head.weight
        return [embed] if head is embed else [embed, head]

    # -- the lookup ---------------------------------------------------------------------------
    def inputs(self, batch: dict) -> dict:
        """The batch with `inputs_embeds`: its input_ids' rows gathered on the host into pinned memory."""
        table = self.model.model.embed_tokens.weight
        ids = batch["input_ids"]
        rows = torch.empty((*ids.shape, table.shape[1]), dtype=table.dtype, pin_memory=True)
        torch.index_select(table, 0, ids.reshape(-1).cpu(), out=rows.view(-1, table.shape[1]))
        return {**batch, "inputs_embeds": rows}

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Rows for ids on the device, looked up on the host (a forward not given inputs_embeds)."""
        table = self.model.model.embed_tokens.weight
        return nn.functional.embedding(input_ids.cpu(), table).to(self.device, non_blocking=True)

    # -- the head -----------------------------------------------------------------------------
    def prefetch_head(self) -> None:
        """Start copying the head's first slices to the device (a training forward nears its loss)."""
        self._drain()
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        self._pending = HeadStream(self.model.lm_head.weight, self.device, self._stream, self.ring_bytes)

    def head_slices(self) -> HeadStream:
        """The head as a HeadStream for the linear cross-entropy: the prefetched one, else one started now."""
        if self._pending is None:
            self.prefetch_head()
        stream, self._pending = self._pending, None
        return stream

    def head(self) -> torch.Tensor:
        """The whole head on the device, copied now (logits asked for outside the streamed loss)."""
        self._drain()
        return self.model.lm_head.weight.to(self.device, non_blocking=True)

    def _drain(self) -> None:
        if self._pending is not None:
            self._pending.drain()
            self._pending = None


class HeadStream(HeadSlices):
    """A frozen head in pinned host memory, copied to `device` slice by slice on the `side` stream through a ring of
    buffers of `ring_bytes` in all, at least one slice (allocated and freed on the compute stream, which waits for
    each copy before reading it).

    The first copies, one a buffer, start at once; `done(k)` refills slice read k's buffer with the read one ring
    later once the compute stream has issued its work on it. Every copy issued is read by the loss (`plan` says how
    many reads there will be), so the side stream always joins back: inside a CUDA-graph capture too."""

    def __init__(self, host_weight: torch.Tensor, device: torch.device, side: torch.cuda.Stream, ring_bytes: int):
        super().__init__(host_weight, default_slice_rows(host_weight.shape[1], host_weight.dtype))
        self.side, self.compute = side, torch.cuda.current_stream(device)
        shape = (self.rows, host_weight.shape[1])
        ring = max(1, ring_bytes // (self.rows * host_weight.shape[1] * host_weight.element_size()))
        self.buffers = [torch.empty(shape, dtype=host_weight.dtype, device=device)
                        for _ in range(min(ring, self.count))]
        self.reads = self.count
        self.ready: dict[int, tuple[torch.Tensor, torch.cuda.Event]] = {}
        side.wait_stream(self.compute)
        for k in range(len(self.buffers)):
            self._copy(k)

    def plan(self, reads: int) -> None:
        self.reads = reads

    def _copy(self, k: int) -> None:
        start = (k % self.count) * self.rows
        source = self.weight[start : start + self.rows]
        buffer = self.buffers[k % len(self.buffers)][: source.shape[0]]
        with torch.cuda.stream(self.side):
            buffer.copy_(source, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(self.side)
        self.ready[k] = (buffer, copied)

    def get(self, k: int) -> torch.Tensor:
        buffer, copied = self.ready.pop(k)
        self.compute.wait_event(copied)
        return buffer

    def done(self, k: int) -> None:
        if k + len(self.buffers) < self.reads:
            issued = torch.cuda.Event()
            issued.record(self.compute)
            self.side.wait_event(issued)
            self._copy(k + len(self.buffers))

    def drain(self) -> None:
        """Join the copies in flight (a stream dropped unread), so the buffers can be freed."""
        for _, copied in self.ready.values():
            self.compute.wait_event(copied)
        self.ready.clear()

    def whole(self, device: torch.device) -> torch.Tensor:
        self.drain()
        return self.weight.to(device, non_blocking=True)
