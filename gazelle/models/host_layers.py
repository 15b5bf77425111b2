"""Frozen weights of some decoder layers in pinned host memory, copied into a ring of device slots before each use.

LoRA never changes a layer's base weights, and with offloaded checkpointing a layer needs them only while it runs:
in the forward (under no autograd) and in backward, where its recomputation and its backward run back to back. So
`count` layers, spread evenly through the checkpointed ones (Decoder.uncheckpointed_layers run under autograd),
keep their frozen tensors (base weights, biases, norms, NF4 data and scales) in one pinned host buffer each, and
the GPU holds `slots` device buffers of one layer's size. GPU memory then holds count - slots layers fewer: at the
llama-8B shape in bf16 a layer is 0.41 GiB.

The copies run on a stream of their own and are started ahead, so they overlap the compute of the layers between
the streamed ones:
- when a streamed layer is done, its slot is refilled with the next streamed layer not held yet, in the order of
  use: upwards through a forward, then (a training forward, whose backward follows) downwards from the top; in
  backward downwards, then upwards for the next forward. So the top `slots` streamed layers are still held when
  backward begins, and the bottom ones when the next forward begins: each streamed layer beyond the slots crosses
  once a forward and once a backward, and a pass never waits for a copy at its start;
- every finished pass (a training forward and its backward, or a forward without autograd) leaves the slots holding
  the first streamed layers, which is what a CUDA graph captured from one pass assumes when it is replayed. A pass
  left unfinished (a training forward whose backward never ran) is noticed at the next forward's start, which
  copies the first layers again (`start`).
A slot is refilled only once the compute stream has passed the last kernel reading it (an event); the compute
stream waits for a layer's copy (an event) before its first kernel. While a layer is not running its parameters
point at their host copies, so nothing outside a layer's run can read a slot that is being overwritten.

Per training step, count - slots layers cross the host link twice: at the llama-8B shape with 8 layers streamed,
5.2 GB a step under about 340 ms of compute. Layers are spread out so that each copy has several layers of compute
to hide under.

Only layers run through offloaded checkpointing (gazelle.models.offload) or without autograd can be streamed: an
autograd graph kept from forward to backward would keep views of a slot that is reused meanwhile. `HostLayers`
is enabled by the SFT trainer around training (SFTConfig.stream_layers) and disabled after, which puts every
tensor back on the device. On the CPU (tests) the same schedule runs with plain copies.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from gazelle.errors import GazelleError
from gazelle.utils.pinned import pin, unpin

SLOTS = 2
ALIGN = 256  # bytes: every tensor's view into a layer's flat buffer starts at a multiple of this


def spread(n: int, count: int) -> list[int]:
    """count of range(n), evenly spaced and ending at the top layer: the first streamed layer has the most layers
    before it to hide its copy under (n=32, count=8: 3, 7, 11, ..., 31)."""
    return sorted({(j + 1) * n // count - 1 for j in range(count)})


def _frozen_tensors(layer: nn.Module) -> list[torch.Tensor]:
    """The layer's parameters that do not require grad and its buffers, each once (tied tensors share one)."""
    tensors = [p for p in layer.parameters() if not p.requires_grad] + list(layer.buffers())
    return list({id(t): t for t in tensors}.values())


class _Layer:
    """One streamed layer: its frozen tensors, their byte offsets in its flat buffer, and the pinned host buffer."""

    def __init__(self, index: int, tensors: list[torch.Tensor]):
        self.index, self.tensors = index, tensors
        self.offsets, size = [], 0
        for t in tensors:
            self.offsets.append(size)
            size += -(-t.nbytes // ALIGN) * ALIGN
        self.nbytes = size
        self.device = tensors[0].device
        self.host = torch.empty(size, dtype=torch.uint8)
        for t, view in zip(tensors, self.views(self.host)):
            view.copy_(t.data)

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Each tensor's shape and dtype over its bytes of `flat` (a host buffer or a device slot)."""
        return [flat[off : off + t.nbytes].view(t.dtype).view(t.shape) for t, off in zip(self.tensors, self.offsets)]

    def point(self, flat: torch.Tensor) -> None:
        for t, view in zip(self.tensors, self.views(flat)):
            t.data = view


class HostLayers:
    """`count` layers of a gazelle Decoder streamed through `slots` device slots (see the module docstring).
    `enable()` moves their frozen tensors to pinned host memory, `disable()` back to the device; while enabled the
    decoder's forward calls `start()` and runs each streamed layer inside `running(...)`."""

    def __init__(self, model, count: int, slots: int = SLOTS):
        layers = model.model.layers
        if count < 1:
            raise GazelleError(f"stream_layers must be at least 1, got {count}")
        if slots < 1:
            raise GazelleError(f"a layer stream needs at least one device slot, got {slots}")
        self.model, self.count, self.slots = model, count, min(slots, count)
        candidates = len(layers) - model.uncheckpointed_layers  # autograd keeps the top ones' weights: none of those
        if count > candidates:
            raise GazelleError(f"stream_layers={count} exceeds the {candidates} checkpointed layers (the model's "
                               f"{len(layers)} less its {model.uncheckpointed_layers} uncheckpointed_layers)")
        self.indices = spread(candidates, count)
        self._layers: dict[int, _Layer] = {}
        self._buffers: list[torch.Tensor] = []  # the device slots
        self._held: list[int | None] = []  # the layer each slot holds (or is being filled with)
        self._copied: list[torch.cuda.Event | None] = []  # the end of each slot's last copy
        self._running: int | None = None  # the slot of the layer running now
        self._open = False  # a pass has started and not finished
        self._stream: torch.cuda.Stream | None = None
        self.copies = 0
        """Layer copies issued so far (host to slot)."""

    @property
    def enabled(self) -> bool:
        return bool(self._layers)

    @property
    def device_bytes(self) -> int:
        """The device slots' bytes; the streamed layers' frozen tensors would take count / slots as much."""
        return sum(b.nbytes for b in self._buffers)

    def __contains__(self, layer: int) -> bool:
        return layer in self._layers

    def enable(self) -> None:
        model = self.model
        if not (model.gradient_checkpointing and model.checkpoint_offload):
            raise GazelleError("stream_layers needs offloaded gradient checkpointing: load the model with "
                               "use_gradient_checkpointing='unsloth' (get_peft_model), or leave stream_layers unset")
        for i in self.indices:
            tensors = _frozen_tensors(model.model.layers[i])
            if not tensors:
                raise GazelleError(f"layer {i} has no frozen tensors to stream")
            if any(t.device != tensors[0].device for t in tensors):
                raise GazelleError(f"layer {i}'s frozen tensors lie on several devices; stream_layers needs one")
            entry = _Layer(i, tensors)
            if entry.device.type == "cuda":
                status = pin(entry.host)
                if status != 0:
                    self._unregister()
                    raise GazelleError(f"could not pin {entry.host.nbytes / 2**30:.2f} GiB of host memory for layer "
                                       f"{i}'s weights (cudaError {status}); lower stream_layers or leave it unset")
            self._layers[i] = entry
        size = max(e.nbytes for e in self._layers.values())
        device = next(iter(self._layers.values())).device
        for entry in self._layers.values():  # the device copies go; each slot takes the place of one
            entry.point(entry.host)
        self._buffers = [torch.empty(size, dtype=torch.uint8, device=device) for _ in range(self.slots)]
        self._held = [None] * self.slots
        self._copied = [None] * self.slots
        model._host_layers = self

    def disable(self) -> None:
        """Every streamed tensor back on its device (as a tensor of its own), the slots and host buffers freed."""
        if not self.enabled:
            return
        if self._stream is not None:
            torch.cuda.current_stream(self._buffers[0].device).wait_stream(self._stream)
        for entry in self._layers.values():
            for t, view in zip(entry.tensors, entry.views(entry.host)):
                t.data = view.to(entry.device, copy=True)  # a tensor of its own, on the CPU too
        self._unregister()
        self._layers, self._buffers, self._held = {}, [], []
        self.model._host_layers = None

    def _unregister(self) -> None:
        for entry in self._layers.values():
            if entry.device.type == "cuda":
                unpin(entry.host)

    # -- the schedule -------------------------------------------------------------------------
    def start(self) -> None:
        """A forward begins. After a finished pass the slots hold the first streamed layers already (every pass ends
        by refilling them for the next forward). After an unfinished one (a training forward whose backward never
        ran, a failed graph capture) what they hold is forgotten and the first layers are copied again."""
        if self._open:
            self._held = [None] * self.slots
        self._open = True
        self._refill(self.indices[: self.slots])

    @contextmanager
    def running(self, layer: int, backward: bool = False, then_backward: bool = False) -> Iterator[None]:
        """Inside: the layer's frozen tensors are views of the slot holding it (copied now if no slot does).
        After: they point at the host again, and freed slots take the next streamed layers to run that no slot
        holds (`upcoming`). backward: the layer's recomputation and backward; then_backward: a forward whose
        backward follows (a training forward)."""
        upcoming = self.upcoming(layer, backward, then_backward)
        if layer not in self._held:
            self._refill([layer])
        slot = self._held.index(layer)
        compute = self._compute()
        if compute is not None and self._copied[slot] is not None:
            compute.wait_event(self._copied[slot])
        entry = self._layers[layer]
        entry.point(self._buffers[slot])
        self._running = slot
        try:
            yield
        finally:
            entry.point(entry.host)
            self._running = None
            self._refill(upcoming)
            if layer == (self.indices[0] if backward else self.indices[-1]) and not then_backward:
                self._finish()

    def _finish(self) -> None:
        """The pass is over. The compute stream joins the copies (a CUDA-graph capture must join every stream it forked,
        and a pass must not wait on an event of another: the next one may be captured); in a training step the slots
        hold the next forward's first layers already by then, so nothing is left in flight to wait for."""
        self._open = False
        if self._stream is not None:
            self._compute().wait_stream(self._stream)
        self._copied = [None] * self.slots

    def upcoming(self, layer: int, backward: bool, then_backward: bool) -> list[int]:
        """The streamed layers that run after `layer`: below it in backward, above it in a forward; then the whole
        stack downwards after a training forward (its backward), upwards after a pass (the next forward)."""
        ascending, descending = self.indices, self.indices[::-1]
        if backward:
            return [i for i in descending if i < layer] + ascending
        return [i for i in ascending if i > layer] + (descending if then_backward else ascending)

    def _refill(self, wanted: list[int]) -> None:
        """Start copying the first `slots` distinct layers of `wanted` that no slot holds into slots holding none of
        them (and not the running layer's)."""
        target = list(dict.fromkeys(wanted))[: self.slots]
        for layer in target:
            if layer in self._held:
                continue
            free = [s for s in range(self.slots) if s != self._running and self._held[s] not in target]
            if not free:
                return
            self._copy(layer, free[0])

    def _copy(self, layer: int, slot: int) -> None:
        entry, buffer = self._layers[layer], self._buffers[slot]
        self._held[slot] = layer
        self.copies += 1
        target = buffer[: entry.nbytes]
        if buffer.device.type != "cuda":
            target.copy_(entry.host)
            return
        side = self._side(buffer.device)
        side.wait_stream(self._compute())  # the slot's last readers are queued on compute already
        with torch.cuda.stream(side):
            target.copy_(entry.host, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(side)
        self._copied[slot] = copied

    def _compute(self) -> torch.cuda.Stream | None:
        device = self._buffers[0].device
        return torch.cuda.current_stream(device) if device.type == "cuda" else None

    def _side(self, device: torch.device) -> torch.cuda.Stream:
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
        return self._stream
