"""A position-wise block (the MLP) run over tiles of tokens, so its intermediates never exist for the whole sequence.

Training at long context holds, for the layer being recomputed, the MLP's gate, up and activation outputs for
every token (3 x tokens x intermediate, 17 GiB at 100k tokens on the llama-8B shape) and their gradients.
`tiled` runs the block over `tile` tokens at a time without autograd and keeps only its input; backward runs it
again one tile at a time with autograd and backpropagates that tile at once, so one tile's intermediates exist at
any moment. The price is one more forward of the block, so the decoder tiles only sequences long enough for the
memory to matter (`MLP.tile_bytes`).

Parameter gradients accumulate inside backward (as reentrant checkpointing does), and the random draws of the
forward (LoRA dropout) are replayed: the tiles run in the same order from the same RNG state.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch

from gazelle.models.offload import replaying, rng_states

_TILE_TOKENS: ContextVar[int | None] = ContextVar("mlp_tile_tokens", default=None)


@contextmanager
def tile_tokens(tokens: int) -> Iterator[None]:
    """Inside: the decoder's MLP runs in tiles of `tokens` tokens whenever its input holds more (the generation
    engine's prefill: many rows in one forward for few launches, while the MLP intermediates, the largest
    activations, stay those of `tokens` tokens)."""
    if tokens <= 0:
        raise ValueError(f"tile_tokens takes a positive number of tokens, got {tokens}")
    mark = _TILE_TOKENS.set(tokens)
    try:
        yield
    finally:
        _TILE_TOKENS.reset(mark)


def forced_tile() -> int | None:
    """The tile set by an enclosing tile_tokens(), or None; None under torch.compile, whose tracer cannot read a
    ContextVar (it would break the compiled decode step's graph at every MLP) and whose steps are never tiled."""
    if torch.compiler.is_compiling():
        return None
    return _TILE_TOKENS.get()


def _loop(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: int) -> torch.Tensor:
    """fn over `tile` tokens of x at a time, into one output."""
    rows = x.reshape(-1, x.shape[-1])
    out = None
    for start in range(0, rows.shape[0], tile):
        y = fn(rows[start : start + tile])
        if out is None:
            out = y.new_empty(rows.shape[0], y.shape[-1])
        out[start : start + tile] = y
    return out.view(*x.shape[:-1], out.shape[-1])


class _Tiled(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn, tile: int, values: bool, rng: bool, anchor, x):
        ctx.fn, ctx.tile = fn, tile
        ctx.rng = rng_states(x, rng)
        ctx.save_for_backward(x)
        if not values:  # a checkpoint's recomputation: backward recomputes every tile anyway
            return torch.empty_like(x)
        with torch.no_grad():
            return _loop(fn, x, tile)

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        rows, grads = x.detach().reshape(-1, x.shape[-1]), grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = torch.empty_like(rows) if ctx.needs_input_grad[5] else None
        with replaying(ctx.rng, x.device):
            for start in range(0, rows.shape[0], ctx.tile):
                piece = rows[start : start + ctx.tile].requires_grad_(grad_x is not None)
                with torch.enable_grad():
                    y = ctx.fn(piece)
                if y.requires_grad:
                    torch.autograd.backward(y, grads[start : start + ctx.tile])
                if grad_x is not None:
                    grad_x[start : start + ctx.tile] = piece.grad
        return None, None, None, None, None, None if grad_x is None else grad_x.view_as(x)


def tiled(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: int, values: bool = True,
          rng: bool = True) -> torch.Tensor:
    """fn(x) for a position-wise fn (each token's output depends on that token alone), `tile` tokens at a time.

    Under autograd only x is saved and backward recomputes fn tile by tile (module docstring); without autograd
    it is a plain loop over the tiles.
    values=False (under autograd, for a shape-preserving fn): the output's values are left unwritten, for a
    checkpoint's recomputation, which only backpropagates through it: fn then runs once forward and once
    backward per tile, as it would untiled.
    rng: fn draws random numbers (active dropout), so backward restores the generators' states first; without it
    nothing reads the CUDA generator's state, which a CUDA-graph capture does not allow."""
    if tile <= 0:
        raise ValueError(f"tile must be a positive number of tokens, got {tile}")
    if not torch.is_grad_enabled():
        return _loop(fn, x, tile)
    # An empty tensor that requires grad keeps the node in the graph when only fn's parameters need gradients.
    anchor = torch.empty(0, device=x.device, requires_grad=True)
    return _Tiled.apply(fn, tile, values, rng, anchor, x)
