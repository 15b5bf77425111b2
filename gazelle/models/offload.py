"""Offloaded activation checkpointing ("unsloth" mode): each layer's input parked in pinned CPU memory.

With checkpointing, a layer keeps only its input for backward, which recomputes the layer from it. Here that
input leaves the GPU as well: forward copies it to a pinned CPU buffer on a side stream (the copy engine runs
while the next layers compute), and backward copies it back the same way, the copy for layer i - 1 starting
as soon as layer i's recomputation is queued, so it overlaps layer i's backward. GPU memory then holds no
per-layer activations at all: one layer's recomputation and its gradients at a time.

Ordering on the GPU (streams: `compute` = the current one, `side` = the copy stream):
- save: side waits for compute (the input is written), copies GPU -> pinned; the input's block is marked as used
  by side (record_stream) so the allocator does not hand it out before the copy has read it.
- prefetch: side waits for compute, copies pinned -> a block allocated on compute; an event marks the end.
- load: compute waits for that event. The block is freed on compute after that, so it needs no record_stream.
The pinned buffers are kept across steps (pinning memory is slow) and grow when a longer input comes; each is
pinned at its exact size (ActivationOffloader._pin).

On the CPU (tests) the same autograd path runs with plain copies and no streams.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch

from gazelle.errors import GazelleError
from gazelle.utils.pinned import pin, unpin


class ActivationOffloader:
    """The pinned CPU buffers and the copy stream, shared by the forward passes of one model.

    Each forward pass takes a `session()`: its own record of which layer input sits where, so two forward
    passes whose backwards come later (or interleave) never overwrite each other's inputs. Buffers go back to
    the pool when their input has been loaded; all copies run in order on the one side stream, so a buffer
    handed out again is written only after the copy reading it has finished.
    """

    def __init__(self):
        self._free: list[torch.Tensor] = []  # flat pinned buffers not holding anything
        self._stream: torch.cuda.Stream | None = None
        self._registered: list[torch.Tensor] = []  # every buffer pinned here, unpinned when the offloader goes

    @property
    def pinned_bytes(self) -> int:
        """Host memory pinned for layer inputs so far (kept across steps)."""
        return sum(buf.nbytes for buf in self._registered)

    def __del__(self):
        for buf in self._registered:
            unpin(buf)

    def session(self, ahead: int = 1) -> OffloadSession:
        return OffloadSession(self, ahead)

    def take(self, x: torch.Tensor) -> torch.Tensor:
        """A free buffer holding at least x's elements in x's dtype, viewed as x's shape."""
        fits = [i for i, b in enumerate(self._free) if b.dtype == x.dtype and b.numel() >= x.numel()]
        if fits:
            buf = self._free.pop(min(fits, key=lambda i: self._free[i].numel()))
        else:
            buf = torch.empty(x.numel(), dtype=x.dtype)
            if x.is_cuda:
                self._pin(buf)
        return buf

    def _pin(self, buf: torch.Tensor) -> None:
        """Page-lock buf where it lies (gazelle.utils.pinned: exactly its bytes, not a power of two)."""
        status = pin(buf)
        if status != 0:
            pinned = self.pinned_bytes / 2**30
            raise GazelleError(
                f"offloaded checkpointing could not pin {buf.nbytes / 2**30:.2f} GiB more of host memory for a layer "
                f"input ({pinned:.2f} GiB pinned already; cudaError {status}). The host lacks the memory for this "
                "sequence length's layer inputs: train with use_gradient_checkpointing=True (inputs kept on the "
                "GPU), or shorter sequences")
        self._registered.append(buf)

    def give_back(self, buf: torch.Tensor) -> None:
        self._free.append(buf)

    def side(self, device: torch.device) -> torch.cuda.Stream:
        if self._stream is None or self._stream.device != device:
            self._stream = torch.cuda.Stream(device)
        return self._stream


class OffloadSession:
    """The layer inputs of one forward pass: saved on the way forward, loaded (and prefetched) on the way back.

    ahead: how many layers below the one loading have their inputs copied back already. One hides a copy under a
    layer's backward. Two when other copies share the host link in backward (layers streamed from host memory,
    gazelle.models.host_layers): copies to the device run one after another, so a layer's weights copied at the end
    of a layer's backward (longer than a layer's backward at the llama-8B shape: 8.4 against 6.5 ms) would hold up
    the input prefetched at the start of the next one, which then waits for both (2.4 ms a streamed layer, H100
    trace); prefetched two ahead, the inputs are queued before the weights. It costs one layer input more on the GPU.
    """

    def __init__(self, offloader: ActivationOffloader, ahead: int = 1):
        if ahead < 1:
            raise ValueError(f"ahead must be at least 1, got {ahead}")
        self.offloader, self.ahead = offloader, ahead
        self._saved: dict[int, tuple[torch.Tensor, torch.Size, torch.device]] = {}  # layer -> (buffer, shape, device)
        self._loading: dict[int, tuple[torch.Tensor, torch.cuda.Event | None]] = {}
        self._copying: tuple[torch.Tensor, torch.cuda.Event] | None = None  # see save, under capture

    def save(self, layer: int, x: torch.Tensor) -> None:
        """Start copying x out to a pinned buffer; x may be freed by its owner right after."""
        buf = self.offloader.take(x)
        self._saved[layer] = (buf, x.shape, x.device)
        home = buf[: x.numel()].view(x.shape)
        if not x.is_cuda:
            home.copy_(x)
            return
        compute = torch.cuda.current_stream(x.device)
        side = self.offloader.side(x.device)
        side.wait_stream(compute)
        with torch.cuda.stream(side):
            home.copy_(x, non_blocking=True)
        if not torch.cuda.is_current_stream_capturing():
            x.record_stream(side)
            return
        # Under CUDA-graph capture the allocator would hold a block marked by record_stream until the capture
        # ends, so every layer's input would stay: instead x is kept here until compute has waited for its copy.
        self._release(compute)
        done = torch.cuda.Event()
        done.record(side)
        self._copying = (x, done)

    def _release(self, compute) -> None:
        """Compute waits for the last capture-time copy out; its input may then be freed."""
        if self._copying is not None:
            compute.wait_event(self._copying[1])
            self._copying = None

    def prefetch(self, layer: int) -> None:
        """Start copying layer's input back to its device (no-op if under way or never saved)."""
        if layer not in self._saved or layer in self._loading:
            return
        buf, shape, device = self._saved[layer]
        home = buf[: shape.numel()].view(shape)
        if device.type != "cuda":
            self._loading[layer] = (home.clone(), None)
            return
        compute = torch.cuda.current_stream(device)
        self._release(compute)
        x = torch.empty(shape, dtype=buf.dtype, device=device)  # allocated on compute, freed there after use
        side = self.offloader.side(device)
        side.wait_stream(compute)
        with torch.cuda.stream(side):
            x.copy_(home, non_blocking=True)
            done = torch.cuda.Event()
            done.record(side)
        self._loading[layer] = (x, done)

    def load(self, layer: int) -> torch.Tensor:
        """Layer's input back on its device, ready for the current stream; prefetches the `ahead` layers' below."""
        self.prefetch(layer)
        x, done = self._loading.pop(layer)
        buf, _, _ = self._saved.pop(layer)
        self.offloader.give_back(buf)
        if done is not None:
            torch.cuda.current_stream(x.device).wait_event(done)
        for below in range(layer - 1, layer - 1 - self.ahead, -1):
            self.prefetch(below)
        return x


RngStates = tuple[torch.Tensor, torch.Tensor | None] | None


def rng_states(x: torch.Tensor, rng: bool) -> RngStates:
    """The CPU and (for a CUDA x) x's device generator states, for a recomputation to replay; None without rng:
    nothing reads the CUDA generator then, which a CUDA-graph capture does not allow."""
    if not rng:
        return None
    return torch.get_rng_state(), torch.cuda.get_rng_state(x.device) if x.is_cuda else None


@contextmanager
def replaying(states: RngStates, device: torch.device) -> Iterator[None]:
    """Inside: the generators at `states` (rng_states), so a recomputation draws the forward's random numbers
    (LoRA dropout); restored after. Nothing when states is None."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], enabled=states is not None):
        if states is not None:
            torch.set_rng_state(states[0])
            if states[1] is not None:
                torch.cuda.set_rng_state(states[1], device)
        yield


class _OffloadedCheckpoint(torch.autograd.Function):
    """out = run(x, *args) without saving anything on the GPU; backward reloads x and recomputes (with
    `recompute`, which computes what run does, except that its output's values may be left out: backward only
    sends the output's gradient through it).

    `anchor` is an empty tensor that requires grad, so the node is in the graph even when x does not need a
    gradient (the first layer's input, from a frozen embedding): the parameters inside `run` still get theirs,
    accumulated by the inner backward as reentrant checkpointing does.

    `weights`: the layer's frozen weights stream from host memory (gazelle.models.host_layers.HostLayers); they are
    on the device during the forward, and during the recomputation and backward together.
    """

    @staticmethod
    def forward(ctx, run, recompute, offloader: OffloadSession, layer: int, rng: bool, weights, anchor, x, *args):
        ctx.recompute, ctx.offloader, ctx.layer, ctx.args, ctx.weights = recompute, offloader, layer, args, weights
        ctx.x_needs_grad = x.requires_grad
        ctx.rng = rng_states(x, rng)
        offloader.save(layer, x)
        with torch.no_grad(), _held(weights, layer, backward=False):
            return run(x, *args)

    @staticmethod
    def backward(ctx, grad_out):
        x = ctx.offloader.load(ctx.layer).requires_grad_(ctx.x_needs_grad)
        with _held(ctx.weights, ctx.layer, backward=True):
            with replaying(ctx.rng, x.device), torch.enable_grad():
                out = ctx.recompute(x, *ctx.args)
            torch.autograd.backward(out, grad_out)
        return (None,) * 7 + (x.grad if ctx.x_needs_grad else None,) + (None,) * len(ctx.args)


def _held(weights, layer: int, backward: bool):
    if weights is None:
        return nullcontext()
    return weights.running(layer, backward=backward, then_backward=not backward)


def offloaded_checkpoint(run, offloader: OffloadSession, layer: int, x: torch.Tensor, *args,
                         recompute=None, rng: bool = True, weights=None) -> torch.Tensor:
    """run(x, *args) with x offloaded and the call recomputed in backward (see the module docstring).

    recompute: what backward calls instead of run, when there is a cheaper form whose output values are not
    computed (DecoderLayer.recompute); its gradients must be run's.
    rng: run draws random numbers (active dropout), so the recomputation restores the generators' states first.
    Without it nothing reads the CUDA generator's state, which a CUDA-graph capture does not allow.
    weights: a HostLayers streaming this layer's frozen weights, or None."""
    anchor = torch.empty(0, device=x.device, requires_grad=True)
    return _OffloadedCheckpoint.apply(run, recompute or run, offloader, layer, rng, weights, anchor, x, *args)
