"""The frozen embedding table and lm_head in pinned host memory while training: GPU memory holds neither.

LoRA leaves both frozen, and a Qwen2.5 vocabulary (151,936 rows) makes them large: 0.43 GiB each at the
qwen-1.5B shape (tied: one tensor), 1.16 GiB each at the llama-8B shape, as much as the 4-bit layers of a
1.5B model. Neither is needed on the GPU for long:
- the embedding is a row lookup: `inputs(batch)` gathers the batch's rows on the host (the trainer's batches are
  there already) into pinned memory, and the forward receives them as inputs_embeds, one (tokens, hidden) copy;
- the head is read by the loss alone. A training forward (autograd on) starts copying it to the GPU on a stream of
  its own as it begins, so the copy runs under the layers' compute, and the loss waits for it (Decoder.linear_head).
  The frozen-head cross-entropy forms its hidden gradient in forward and keeps no weight for backward, so the copy
  is freed when the loss is done: backward, where the peak lies, runs without it.
Everything is capturable in a CUDA graph: the copy reads pinned memory, and its fork and join are events.

`HostEmbeddings(model).enable()` moves them (page-locked where they lie, cudaHostRegister), `disable()` moves them
back to the device; the trainer does both around training, so inference and sampling afterwards see the model
as it was. Elsewhere (no autograd: evaluation) the head is copied when asked for and the lookup runs on the host.
"""

from __future__ import annotations

import torch
from torch import nn

from gazelle.errors import GazelleError


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
        self._pending: tuple[torch.Tensor, torch.cuda.Event] | None = None  # the head on its way to the GPU

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
            status = int(torch.cuda.cudart().cudaHostRegister(host.data_ptr(), host.nbytes, 0))
            if status != 0:
                raise GazelleError(f"could not pin {host.nbytes / 2**30:.2f} GiB of host memory for the embeddings "
                                   f"(cudaError {status}); train with offload_embeddings=False")
            self._registered.append(host)
            param.data = host
        self.model._host_embeddings = self

    def disable(self) -> None:
        if not self.enabled:
            return
        for param in self._tables():
            param.data = param.data.to(self.device)
        for host in self._registered:
            torch.cuda.cudart().cudaHostUnregister(host.data_ptr())
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
        """Start copying the head to the device on a side stream (a training forward begins)."""
        compute = torch.cuda.current_stream(self.device)
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        host = self.model.lm_head.weight
        head = torch.empty(host.shape, dtype=host.dtype, device=self.device)  # allocated on compute, freed there
        self._stream.wait_stream(compute)
        with torch.cuda.stream(self._stream):
            head.copy_(host, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self._stream)
        self._pending = (head, done)

    def head(self) -> torch.Tensor:
        """The head on the device: the prefetched copy (compute waits for it), else a copy made now."""
        if self._pending is None:
            return self.model.lm_head.weight.to(self.device, non_blocking=True)
        head, done = self._pending
        self._pending = None
        torch.cuda.current_stream(self.device).wait_event(done)
        return head
