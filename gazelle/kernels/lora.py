"""Fused LoRA projections: hand-written backward passes that keep only what backward needs.

`LoraLinear` computes base(x) + lora_B(lora_A(x)) * s. Autograd through it keeps, besides x, every input of
every op (the MLP's gate output, its activation, up, their product), forms the adapter output in three extra
passes over the (N, out) result (B's output, its scaled copy, the sum), and for a 4-bit base keeps the
dequantized weight of every projection until backward. Here one autograd node covers one projection
(`lora_linear`), the three attention projections reading the same x (`lora_qkv`), or the whole gated MLP
(`lora_mlp`). A 4-bit base is dequantized on the fly, one matrix at a time, in forward and again in backward;
it is never kept.

Notation: x (N, in) the tokens, W (out, in) the frozen base weight, b its bias, A (r, in), B (out, r) the
float32 adapter weights cast to x's dtype, s the scaling; g = dL/dy (N, out).

    y = x W^T + b + s (x A^T) B^T

    grad_x = g W + s (g B) A          grad_A = s (g B)^T x          grad_B = s g^T (x A^T)
    grad_b = sum over tokens of g     (only when the bias requires grad; a trainable W takes the reference)

Saved: x and xa = x A^T (N, r); not the output, not the cast or dequantized W. The scaling is folded into
s B (out, r) once, so g (s B) = s (g B) is an (N, r) product. The small-K adapter matmul runs first and the
big base GEMM accumulates onto its result (addmm with beta = 1), so the adapter costs one pass over the
output instead of three. `lora_qkv` stacks [A_q; A_k; A_v] so x A^T, the adapter part of grad_x and the
three grad_A are one matmul each; grad_x sums the three projections' terms into one buffer.

MLP, act in {"silu", "gelu_tanh", "gelu"} (gazelle.kernels.glu):

    e = x Wg^T + bg + s_g (x Ag^T) Bg^T     u = x Wu^T + bu + s_u (x Au^T) Bu^T     (N, I) each
    h = act(e) * u                          y = h Wd^T + bd + s_d (h Ad^T) Bd^T     (N, H)

    backward: h is recomputed from (e, u) (kept instead when the forward was a recomputation);
    grad_h = g Wd + s_d (g Bd) Ad, grad_Ad = s_d (g Bd)^T h, grad_Bd = s_d g^T (h Ad^T);
    (grad_e, grad_u) = glu_backward(grad_h, e, u); then gate and up as above with g = grad_e, grad_u and the
    same x (their grad_x summed).

Saved per token, in x's dtype: H + 2 I + r_g + r_u + r_d elements (x, e, u, x Ag^T, x Au^T, h Ad^T). Backward
writes grad_e and grad_u over e and u (glu_backward(inplace=True)): a layer's backward then holds three (N, I)
tensors at once (e, u, grad_h), not five. Saved e and u are therefore spent by a backward: the graph cannot be
run backward twice (retain_graph), which nothing in gazelle does.
Plain autograd through the modules keeps H + 4 I + (the same ranks): x, e (the activation's input),
act(e) and u (the product's inputs), h (down_proj's input), plus, for NF4 bases, the three dequantized
weights (3 H I elements per layer). For qwen2.5-1.5B (H 1536, I 8960) in bf16 that is 39 KB against 75 KB
per token.

A fused gate_up projection (decoder.MLP with cfg.fused_gate_up: one (2I, in) weight whose output halves are
gate and up) is `lora_mlp(x, down=..., act=..., gate_up=p)`: e and u are the halves of one (N, 2I) output
(glu reads strided halves), and its backward takes grad_e and grad_u against the row halves of W and B,
without concatenating them. A fused qkv_proj is `lora_linear` followed by a split.

Everything here is torch matmuls (cuBLAS) in x's dtype plus the glu and nf4 launchers, so the fused path is
valid on any device; `dispatch.use_triton("lora", x)` picks it (CUDA by default, CPU with GAZELLE_KERNELS=triton)
and the `_ref` functions, autograd through the same math as LoraLinear, are the oracles. An NF4 base runs
in its compute_dtype with x cast to it and the result cast back, as Linear4bit.forward does; the adapter
runs in x's dtype. LoRA gradients are returned in their parameters' dtype (float32).
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from gazelle.kernels import dispatch
from gazelle.kernels.glu import ACTS, glu_backward, glu_forward, glu_ref
from gazelle.kernels.launch import addmm_takes_out_dtype
from gazelle.kernels.nf4 import dequantize_nf4
from gazelle.quant.nf4 import NF4Tensor


@dataclass(frozen=True, eq=False)
class LoraProjection:
    """One adapted projection y = x W^T + b + s (x A^T) B^T, as the tensors of a LoraLinear (no copies)."""

    weight: torch.Tensor | NF4Tensor  # (out, in), frozen: a dense tensor or an NF4 weight
    bias: torch.Tensor | None  # (out,)
    lora_a: torch.Tensor  # (r, in), float32 Parameter
    lora_b: torch.Tensor  # (out, r), float32 Parameter
    scaling: float
    compute_dtype: torch.dtype | None = None  # NF4 only: the dtype the base matmul runs in (default: q.dtype)

    def __post_init__(self):
        if isinstance(self.weight, NF4Tensor) and self.compute_dtype is None:
            object.__setattr__(self, "compute_dtype", self.weight.dtype)

    @classmethod
    def of(cls, module: nn.Module) -> LoraProjection | None:
        """The projection of a LoraLinear, or None where the fused path would not compute what it computes:
        active dropout (training with lora_dropout > 0), adapters disabled, a base other than nn.Linear or
        Linear4bit, a trainable base weight, or forward hooks that the fused path would skip."""
        from gazelle.lora.layers import LoraLinear
        from gazelle.quant.linear4bit import Linear4bit

        if not isinstance(module, LoraLinear) or module.disabled:
            return None
        dropout = module.lora_dropout
        if isinstance(dropout, nn.Dropout) and dropout.p > 0 and dropout.training:
            return None
        base = module.base_layer
        parts = (module, base, module.lora_A, module.lora_B)
        if any(m._forward_hooks or m._forward_pre_hooks for m in parts):
            return None
        a, b = module.lora_A.weight, module.lora_B.weight
        if isinstance(base, Linear4bit):
            return cls(base.nf4, base.bias, a, b, module.scaling, base.compute_dtype)
        if isinstance(base, nn.Linear) and type(base).forward is nn.Linear.forward and not base.weight.requires_grad:
            return cls(base.weight, base.bias, a, b, module.scaling)
        return None

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def rank(self) -> int:
        return self.lora_a.shape[0]

    @property
    def quantized(self) -> bool:
        return isinstance(self.weight, NF4Tensor)

    def base_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype the base matmul runs in for activations of `dtype`."""
        return self.compute_dtype if self.quantized else dtype

    def dense_weight(self) -> torch.Tensor:
        """W (out, in): the dense weight itself, or the NF4 weight dequantized now to compute_dtype (a temporary)."""
        return dequantize_nf4(self.weight, self.compute_dtype) if self.quantized else self.weight


# ----------------------------------------------------------------------------------------------- references


def _base_ref(x: torch.Tensor, p: LoraProjection) -> torch.Tensor:
    if p.quantized:  # as Linear4bit.forward: in compute_dtype, returned in x's dtype
        cd = p.compute_dtype
        bias = None if p.bias is None else p.bias.to(cd)
        return F.linear(x.to(cd), dequantize_nf4(p.weight, cd), bias).to(x.dtype)
    return F.linear(x, p.weight, p.bias)


def lora_linear_ref(x: torch.Tensor, p: LoraProjection) -> torch.Tensor:
    """x (..., in) -> (..., out): LoraLinear.forward (without dropout) by autograd, the oracle."""
    a, b = p.lora_a.to(x.dtype), p.lora_b.to(x.dtype)
    return _base_ref(x, p) + F.linear(F.linear(x, a), b) * p.scaling


def lora_qkv_ref(x: torch.Tensor, q: LoraProjection, k: LoraProjection,
                 v: LoraProjection) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return lora_linear_ref(x, q), lora_linear_ref(x, k), lora_linear_ref(x, v)


def lora_mlp_ref(x: torch.Tensor, gate: LoraProjection | None = None, up: LoraProjection | None = None,
                 down: LoraProjection | None = None, act: str = "silu", *,
                 gate_up: LoraProjection | None = None) -> torch.Tensor:
    """down(act(gate(x)) * up(x)) as decoder.MLP computes it over LoraLinear modules (act by glu_ref)."""
    _check_mlp(gate, up, down, act, gate_up)
    if gate_up is not None:
        e, u = lora_linear_ref(x, gate_up).chunk(2, dim=-1)
    else:
        e, u = lora_linear_ref(x, gate), lora_linear_ref(x, up)
    return lora_linear_ref(glu_ref(e, u, act), down)


# ------------------------------------------------------------------------------------------- fused helpers


_CASTS: dict[int, dict] = {}
"""id of a lora parameter -> {(kind, dtype, count): _Cast}: adapter weights cast (and scaled) for the products;
an entry goes when its parameter does (weakref.finalize; tensors compare by value, not identity, so a
WeakKeyDictionary cannot hold them)."""

_KEEP_IN_CAPTURE = False  # casts_kept_in_capture() sets it
_OPTIMIZER_STEPS = 0  # torch optimizer steps taken in this process (every kept cast is stale after one)


def _count_step(optimizer, args, kwargs) -> None:
    global _OPTIMIZER_STEPS
    _OPTIMIZER_STEPS += 1


# Fused optimizers (torch's AdamW(fused=True) among them) write the parameters without bumping their version
# counters, so a step would go unseen by the stamps alone; this global hook runs after every torch.optim step.
register_optimizer_step_post_hook(_count_step)


@dataclass
class _Cast:
    stamp: tuple
    out: torch.Tensor
    refs: tuple  # weak references to the parameters cast, for refresh_casts
    scaling: float
    fill: object  # fill(out, tensors, scaling) -> out: module-level, so the entry keeps no parameter alive


def _stamp(tensors: tuple[torch.Tensor, ...], scaling: float) -> tuple:
    return tuple((id(t), t._version, t.data_ptr()) for t in tensors) + (scaling, _OPTIMIZER_STEPS)


def _cached(kind: str, tensors: tuple[torch.Tensor, ...], dtype: torch.dtype, scaling: float,
            shape: tuple[int, ...], fill) -> torch.Tensor:
    """fill(out, tensors, scaling) (a cast of `tensors` into out, (shape) in dtype), kept until one of them changes.

    A step of training runs every projection three times (forward, recomputation, backward) on unchanged adapters,
    and sampling runs it once per token: casting the float32 adapters each time was half of a step's kernel
    launches. The copy is kept beside the parameters (x's dtype, 2 bytes a LoRA parameter for bf16) and written
    again, in place, when a parameter's version counter moves (every in-place write bumps it: a load under no_grad,
    most optimizer steps), its storage moves, the scaling changes, or any torch optimizer has stepped (fused
    optimizers write without bumping the counters). Writes through `.data` outside an optimizer go unseen.
    Under CUDA-graph capture nothing is kept: the graph then casts on every replay, so it reads the adapters'
    values of that moment, as it must after the optimizer has stepped. Inside casts_kept_in_capture() the graph
    reads the kept copies instead, and brings them up to date itself first (refresh_casts(every=True) captured)."""
    device = tensors[0].device
    if device.type == "cuda" and not _KEEP_IN_CAPTURE and torch.cuda.is_current_stream_capturing():
        return fill(torch.empty(shape, dtype=dtype, device=device), tensors, scaling)
    stamp = _stamp(tensors, scaling)
    entries = _CASTS.get(id(tensors[0]))
    if entries is None:
        entries = _CASTS[id(tensors[0])] = {}
        weakref.finalize(tensors[0], _CASTS.pop, id(tensors[0]), None)
    key = (kind, dtype, len(tensors))
    hit = entries.get(key)
    if hit is not None and hit.stamp == stamp:
        return hit.out
    out = hit.out if hit is not None and hit.out.shape == shape and hit.out.device == device else None
    with torch.inference_mode(False), torch.no_grad():  # a normal tensor even when sampling made it
        out = fill(torch.empty(shape, dtype=dtype, device=device) if out is None else out, tensors, scaling)
    entries[key] = _Cast(stamp, out, tuple(weakref.ref(t) for t in tensors), scaling, fill)
    return out


@contextmanager
def casts_kept_in_capture():
    """A CUDA graph captured inside reads the kept adapter casts (one cast per adapter a replay, not one per use);
    the capture must begin with refresh_casts(every=True), so that every replay writes them from the adapters'
    values of its moment (gazelle.trainers.graphed)."""
    global _KEEP_IN_CAPTURE
    _KEEP_IN_CAPTURE = True
    try:
        yield
    finally:
        _KEEP_IN_CAPTURE = False


@torch.no_grad()
def refresh_casts(every: bool = False) -> None:
    """Writes again, in place, every kept cast whose parameters changed since it was written (an optimizer step);
    every=True: all of them, changed or not (the start of a captured training step, which each replay then begins
    with: the adapters' values of that moment, without a launch per cast from the host between steps)."""
    for entries in list(_CASTS.values()):
        for cast in entries.values():
            tensors = tuple(ref() for ref in cast.refs)
            if any(t is None for t in tensors):
                continue
            stamp = _stamp(tensors, cast.scaling)
            if every or stamp != cast.stamp:
                cast.fill(cast.out, tensors, cast.scaling)
                cast.stamp = stamp


def _fill_stacked(out: torch.Tensor, tensors: tuple[torch.Tensor, ...], scaling: float) -> torch.Tensor:
    return torch.cat(tensors, out=out)


def _fill_scaled(out: torch.Tensor, tensors: tuple[torch.Tensor, ...], scaling: float) -> torch.Tensor:
    """s B scaled in float32 (or wider: the parameter's dtype promoted) and rounded once."""
    b = tensors[0]
    wide = b if torch.promote_types(b.dtype, out.dtype) == b.dtype else b.to(out.dtype)  # float64 x: in float64
    return torch.mul(wide, scaling, out=out)


def _stacked_a(ps, dtype: torch.dtype) -> torch.Tensor:
    """[A_1; ...; A_k] (R, in) in dtype, R = sum of the ranks: one cast-and-copy launch."""
    tensors = tuple(p.lora_a for p in ps)
    shape = (sum(a.shape[0] for a in tensors), tensors[0].shape[1])
    return _cached("a", tensors, dtype, 0.0, shape, _fill_stacked)


def _scaled_b(p: LoraProjection, dtype: torch.dtype) -> torch.Tensor:
    """s B (out, r) in dtype."""
    return _cached("b", (p.lora_b,), dtype, p.scaling, tuple(p.lora_b.shape), _fill_scaled)


def _mm_wide(a: torch.Tensor, b: torch.Tensor, alpha: float, out_dtype: torch.dtype,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """alpha * a @ b in out_dtype (float32 or wider), for the adapter gradients: on CUDA one product that
    accumulates and writes float32 (addmm's out_dtype, torch >= 2.8), elsewhere a product in the inputs' dtype,
    widened, then scaled."""
    if a.dtype != out_dtype and a.is_cuda and addmm_takes_out_dtype():
        if out is None:
            out = torch.empty(a.shape[0], b.shape[1], dtype=out_dtype, device=a.device)
        return torch.addmm(out, a, b, beta=0, alpha=alpha, out_dtype=out_dtype, out=out)
    result = torch.mm(a, b).to(out_dtype)
    if alpha != 1.0:
        result.mul_(alpha)
    if out is None:
        return result
    return out.copy_(result)


def _project(x2: torch.Tensor, xa: torch.Tensor, p: LoraProjection,
             residual: torch.Tensor | None = None) -> torch.Tensor:
    """x2 (N, in), xa = x2 A^T (N, r) -> y (N, out) in x2's dtype, plus residual (N, out) when given. The base
    weight lives only inside this call."""
    dt = x2.dtype
    cd = p.base_dtype(dt)
    bs = _scaled_b(p, dt)  # (out, r)
    w = p.dense_weight()  # (out, in)
    if cd != dt:  # as Linear4bit: base in compute_dtype, cast back; the adapter is added in x's dtype
        bias = None if p.bias is None else p.bias.to(cd)
        y = F.linear(x2.to(cd), w, bias).to(dt).addmm_(xa, bs.T)
        return y if residual is None else y.add_(residual)
    # The small-K adapter product first, onto the residual (read in its epilogue, instead of a separate add
    # kernel); the base GEMM then accumulates onto that (beta = 1).
    if residual is None:
        y = torch.mm(xa, bs.T) if p.bias is None else torch.addmm(p.bias.to(dt), xa, bs.T)  # (N, out)
    else:
        y = torch.addmm(residual, xa, bs.T)
        if p.bias is not None:
            y.add_(p.bias.to(dt))
    return y.addmm_(x2, w.T)


def _group_forward(x2: torch.Tensor, ps, residual: torch.Tensor | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Projections of the same x2 (N, in): their outputs (N, out_i) and xa = x2 [A_1; ...]^T (N, R).
    residual (N, out): added to the only projection's output (a group of one)."""
    xa = torch.mm(x2, _stacked_a(ps, x2.dtype).T)  # (N, R)
    outs = [_project(x2, xa_i, p, residual) for p, xa_i in zip(ps, xa.split([p.rank for p in ps], dim=1))]
    return outs, xa


def _group_backward(x2: torch.Tensor, xa: torch.Tensor, ps, grads, need_x: bool, needs):
    """Gradients of projections of the same x2 (N, in), saved xa = x2 [A_1; ...]^T (N, R).

    grads[i]: the output gradient of projection i as [(lo, hi, g)], g (N, hi - lo) for its output columns
    lo:hi (the chunks cover the output; one chunk, or the gate and up halves of a gate_up projection).
    needs[i]: (A, B, bias) flags. Returns grad_x (N, in) or None, and per projection (grad_A, grad_B, grad_bias).
    """
    dt = x2.dtype
    wide = torch.promote_types(dt, torch.float32)
    ranks = [p.rank for p in ps]
    gbs, grad_bs = [], []  # gbs[i] = g_i (s_i B_i) (N, r_i)
    for p, xa_i, chunks, (_, need_b, _) in zip(ps, xa.split(ranks, dim=1), grads, needs):
        bs = _scaled_b(p, dt)  # (out, r)
        gb = None
        for lo, hi, g in chunks:
            gb = torch.mm(g, bs[lo:hi]) if gb is None else gb.addmm_(g, bs[lo:hi])
        gbs.append(gb)
        grad_b = None
        if need_b:  # s g^T xa (out, r), accumulated and scaled in float32 (float64)
            grad_b = torch.empty(p.lora_b.shape, dtype=wide, device=x2.device)
            for lo, hi, g in chunks:
                _mm_wide(g.T, xa_i, p.scaling, wide, out=grad_b[lo:hi])
            grad_b = grad_b.to(p.lora_b.dtype)
        grad_bs.append(grad_b)
    g_all = gbs[0] if len(gbs) == 1 else torch.cat(gbs, dim=1)  # (N, R)
    grad_x = torch.mm(g_all, _stacked_a(ps, dt)) if need_x else None  # sum_i s_i (g_i B_i) A_i, (N, in)
    grad_biases = []
    for p, chunks, (_, _, need_bias) in zip(ps, grads, needs):  # + sum_i g_i W_i, one weight at a time
        cd = p.base_dtype(dt)
        if cd != dt and (need_x or need_bias):
            # As autograd through Linear4bit: the base's gradient in compute_dtype, whole (the cast copies anyway).
            g_cd = torch.empty(x2.shape[0], p.out_features, dtype=cd, device=x2.device)  # (N, out)
            for lo, hi, g in chunks:
                g_cd[:, lo:hi] = g
            chunks = [(0, p.out_features, g_cd)]
        grad_biases.append(torch.cat([g.sum(0) for _, _, g in chunks]).to(p.bias.dtype) if need_bias else None)
        if need_x:
            w = p.dense_weight()  # (out, in)
            for lo, hi, g in chunks:
                if cd == dt:
                    grad_x.addmm_(g, w[lo:hi])
                else:  # cast back, added in x's dtype
                    grad_x.add_(torch.mm(g, w[lo:hi]).to(dt))
            del w
        del chunks
    grad_as = [None] * len(ps)
    if any(n[0] for n in needs):
        grad_as = _mm_wide(g_all.T, x2, 1.0, wide).split(ranks)  # s_i (g_i B_i)^T x (r_i, in)
        grad_as = [ga.to(p.lora_a.dtype) if n[0] else None for p, ga, n in zip(ps, grad_as, needs)]
    return grad_x, list(zip(grad_as, grad_bs, grad_biases))


def _params(ps) -> list:
    """The tensors autograd tracks for each projection: (lora_a, lora_b, bias) per projection."""
    return [t for p in ps for t in (p.lora_a, p.lora_b, p.bias)]


def _needs(flags, n: int) -> list[tuple[bool, bool, bool]]:
    return [tuple(flags[3 * i : 3 * i + 3]) for i in range(n)]


def _flat(grads) -> list:
    return [t for triple in grads for t in triple]


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])  # (N, features)


class _LoraGroupFunction(torch.autograd.Function):
    """Projections of one x (lora_linear: one, lora_qkv: three); saves x (N, in) and xa (N, R) only.
    residual: None, or (..., out) added to the output of a group of one (its gradient is the output's)."""

    @staticmethod
    def forward(ctx, x, residual, ps, *params):  # params: _params(ps), listed so autograd routes their gradients
        x2 = _rows(x)  # (N, in)
        outs, xa = _group_forward(x2, ps, None if residual is None else _rows(residual))
        ctx.ps, ctx.x_shape = ps, x.shape
        ctx.save_for_backward(x2, xa)
        return tuple(y.view(*x.shape[:-1], y.shape[-1]) for y in outs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grad_outs):
        x2, xa = ctx.saved_tensors
        ps = ctx.ps
        grads = [[(0, p.out_features, _rows(g))] for p, g in zip(ps, grad_outs)]
        need_x = ctx.needs_input_grad[0]
        grad_x, pgrads = _group_backward(x2, xa, ps, grads, need_x, _needs(ctx.needs_input_grad[3:], len(ps)))
        grad_x = grad_x.view(ctx.x_shape) if need_x else None
        grad_residual = grad_outs[0] if ctx.needs_input_grad[1] else None
        return grad_x, grad_residual, None, *_flat(pgrads)


class _LoraMlpFunction(torch.autograd.Function):
    """down(act(gate(x)) * up(x)); saves x, e, u and the (N, r) adapter inputs; h is recomputed in backward.

    output=False leaves the down projection out (its output is returned unwritten): backward needs e, u and
    h Ad^T, never y, so a checkpoint's recomputation, whose output only routes gradients, skips that product.
    Its backward follows at once, so it also keeps h instead of forming it again: one (N, I) tensor more between
    the two, which backward holds at its peak (with e, u and grad_h) either way.
    residual (..., H): added to y by the down projection (its gradient is grad_y), or None."""

    @staticmethod
    def forward(ctx, x, residual, act, ups, down, output, *params):
        # ups: (gate, up) or (gate_up,); params: _params(ups + (down,)); residual None or (..., H), added to y
        x2 = _rows(x)  # (N, H)
        outs, xa = _group_forward(x2, ups)  # [(N, I), (N, I)] or [(N, 2I)]
        e, u = outs if len(outs) == 2 else outs[0].chunk(2, dim=-1)  # (N, I) each, halves may be strided
        h = glu_forward(e, u, act)  # (N, I)
        if output:
            (y,), ha = _group_forward(h, (down,), None if residual is None else _rows(residual))  # (N, H), (N, r_d)
        else:
            ha = torch.mm(h, _stacked_a((down,), h.dtype).T)  # (N, r_d)
            y = x2.new_empty(x2.shape[0], down.out_features)
        ctx.act, ctx.ups, ctx.down, ctx.x_shape, ctx.kept_h = act, ups, down, x.shape, not output
        ctx.save_for_backward(x2, xa, ha, *outs, *(() if output else (h,)))
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        x2, xa, ha, *outs = ctx.saved_tensors
        h = outs.pop() if ctx.kept_h else None
        ups, down, act = ctx.ups, ctx.down, ctx.act
        e, u = outs if len(outs) == 2 else outs[0].chunk(2, dim=-1)
        needs = ctx.needs_input_grad
        n_up = len(ups)
        up_needs = _needs(needs[6:], n_up)
        down_needs = _needs(needs[6 + 3 * n_up :], 1)
        need_h = needs[0] or any(any(n) for n in up_needs)
        g = _rows(grad_y)  # (N, H)
        if h is None:
            h = glu_forward(e, u, act)  # recomputed, (N, I)
        grad_h, down_grads = _group_backward(h, ha, (down,), [[(0, down.out_features, g)]], need_h, down_needs)
        del h
        grad_x, up_grads = None, [(None, None, None)] * n_up
        if need_h:
            grad_e, grad_u = glu_backward(grad_h, e, u, act, inplace=True)  # (N, I) each, over e and u
            del grad_h
            inter = e.shape[1]
            if n_up == 2:
                chunks = [[(0, inter, grad_e)], [(0, inter, grad_u)]]
            else:  # the halves of gate_up, against the row halves of its W and B
                chunks = [[(0, inter, grad_e), (inter, 2 * inter, grad_u)]]
            grad_x, up_grads = _group_backward(x2, xa, ups, chunks, needs[0], up_needs)
            if grad_x is not None:
                grad_x = grad_x.view(ctx.x_shape)
        grad_residual = grad_y if needs[1] else None
        return grad_x, grad_residual, None, None, None, None, *_flat(up_grads), *_flat(down_grads)


# ---------------------------------------------------------------------------------------------- public ops


def _fused(x: torch.Tensor, ps) -> bool:
    if not dispatch.use_triton("lora", x):
        return False
    if any(not p.quantized and p.weight.requires_grad for p in ps):
        dispatch.fallback("lora", "a base weight requires grad; the fused path trains adapters only")
        return False
    return True


def fusable(x: torch.Tensor, *modules: nn.Module) -> list[LoraProjection] | None:
    """The modules as LoraProjections when the fused LoRA path runs for x and every module can take it, else None."""
    if not dispatch.use_triton("lora", x):
        return None
    projections = [LoraProjection.of(m) for m in modules]
    return projections if all(p is not None for p in projections) else None


FOLD_RESIDUAL = True  # benchmarks/sft.py fold=off turns it off to measure the residual adds as kernels of their own


def _folded(residual: torch.Tensor | None, x: torch.Tensor, out_features: int) -> torch.Tensor | None:
    """residual where the fused products can add it themselves (x's dtype, the output's shape), else None."""
    if FOLD_RESIDUAL and residual is not None and residual.dtype == x.dtype \
            and residual.shape == (*x.shape[:-1], out_features):
        return residual
    return None


def lora_linear(x: torch.Tensor, p: LoraProjection, residual: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., in) -> (..., out) = x W^T + b + s (x A^T) B^T (+ residual): fused, or lora_linear_ref per dispatch.

    residual (..., out): a residual stream to add; the fused path adds it in the adapter product's epilogue,
    so the sum costs no kernel of its own."""
    if _fused(x, (p,)):
        folded = _folded(residual, x, p.out_features)
        y = _LoraGroupFunction.apply(x, folded, (p,), *_params((p,)))[0]
        if folded is not None:
            return y
    else:
        y = lora_linear_ref(x, p)
    return y if residual is None else residual + y


def lora_qkv(x: torch.Tensor, q: LoraProjection, k: LoraProjection,
             v: LoraProjection) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The three attention projections of the same x (..., hidden) as one node: x saved once, grad_x summed."""
    ps = (q, k, v)
    if _fused(x, ps):
        return _LoraGroupFunction.apply(x, None, ps, *_params(ps))
    return lora_qkv_ref(x, q, k, v)


def _check_mlp(gate, up, down, act, gate_up) -> None:
    if act not in ACTS:
        raise ValueError(f"unknown activation {act!r}; expected one of {', '.join(ACTS)}")
    separate = gate is not None and up is not None and gate_up is None
    fused = gate_up is not None and gate is None and up is None
    if down is None or not (separate or fused):
        raise ValueError("lora_mlp takes down and either gate and up or gate_up")
    if gate_up is not None and gate_up.out_features % 2:
        raise ValueError(f"gate_up has {gate_up.out_features} outputs; its halves are gate and up")


def lora_mlp(x: torch.Tensor, gate: LoraProjection | None = None, up: LoraProjection | None = None,
             down: LoraProjection | None = None, act: str = "silu", *,
             gate_up: LoraProjection | None = None, output: bool = True,
             residual: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., H) -> down(act(gate(x)) * up(x)) (..., H), act in ACTS; gate_up= replaces gate and up for a
    fused (2I, H) projection whose output halves are gate and up. Fused, or lora_mlp_ref per dispatch.

    output=False: the caller uses only the gradients that flow back through the result, not its values (a
    checkpoint's recomputation); the fused path then skips the down projection and leaves the values unwritten.
    residual (..., H): added to the result; the fused path adds it in the down projection (no kernel of its own,
    none at all with output=False)."""
    _check_mlp(gate, up, down, act, gate_up)
    ups = (gate_up,) if gate_up is not None else (gate, up)
    if _fused(x, ups + (down,)):
        folded = _folded(residual, x, down.out_features)
        y = _LoraMlpFunction.apply(x, folded, act, ups, down, output, *_params(ups + (down,)))
        if folded is not None:
            return y
    else:
        y = lora_mlp_ref(x, gate, up, down, act, gate_up=gate_up)
    return y if residual is None else residual + y
