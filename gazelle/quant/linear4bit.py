"""A frozen NF4 linear layer whose state_dict is bitsandbytes' Linear4bit's, and whole-model quantization.

Storage choice: every quantized tensor is a buffer, not a Parameter. Buffers follow `.to(device)` and
`.cuda()`, count in `named_buffers()` for memory accounting, and never reach an optimizer or
`requires_grad_()` (a uint8 tensor cannot carry a gradient anyway). `weight` (the packed bytes) is a
persistent buffer, so the base class saves and loads it under `weight` with `bias` next to it; the block
statistics are non-persistent buffers that `_save_to_state_dict` writes under bitsandbytes' dotted keys
(`weight.absmax`, ...), which buffer names cannot contain. `module.to(dtype)` casts floating buffers, so
`_apply` keeps the float32 statistics float32: bf16 absmax would silently corrupt every block.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from gazelle.errors import GazelleError
from gazelle.kernels import nf4 as kernels_nf4
from gazelle.quant.nf4 import NESTED_BLOCKSIZE, NF4Tensor, nf4_from_state, nf4_to_state, quantize_nf4

COMPUTE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
STATS = ("absmax", "nested_absmax", "nested_quant_map")  # buffer names of the statistics, besides `weight`


class Linear4bit(nn.Module):
    """y = x W^T + b with W stored in NF4 and dequantized to `compute_dtype` on each call (reference path)."""

    def __init__(self, q: NF4Tensor, bias: torch.Tensor | None, compute_dtype: torch.dtype):
        super().__init__()
        if len(q.shape) != 2:
            raise GazelleError(f"Linear4bit needs a 2-D weight, got shape {list(q.shape)}")
        if compute_dtype not in COMPUTE_DTYPES:
            raise GazelleError(f"compute_dtype must be one of {COMPUTE_DTYPES}, not {compute_dtype}")
        self.out_features, self.in_features = q.shape
        self.compute_dtype = compute_dtype
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self._store(q)

    def _store(self, q: NF4Tensor) -> None:
        self.register_buffer("weight", q.packed)
        self.register_buffer("absmax", q.absmax, persistent=False)
        self.register_buffer("nested_absmax", q.nested_absmax, persistent=False)
        self.register_buffer("nested_quant_map", q.nested_quant_map, persistent=False)
        self.blocksize, self.offset, self.weight_dtype = q.blocksize, q.offset, q.dtype

    @property
    def nf4(self) -> NF4Tensor:
        """The quantized weight as an NF4Tensor over this module's buffers (no copy)."""
        shape = torch.Size((self.out_features, self.in_features))
        return NF4Tensor(self.weight, shape, self.weight_dtype, self.blocksize, self.absmax, self.offset,
                         self.nested_absmax, self.nested_quant_map)

    @classmethod
    def from_linear(cls, linear: nn.Linear, compute_dtype: torch.dtype, blocksize: int = 64,
                    double_quant: bool = True) -> Linear4bit:
        """Quantize an nn.Linear's weight; its bias is kept as it is (16- or 32-bit)."""
        return cls(quantize_nf4(linear.weight, blocksize, double_quant), linear.bias, compute_dtype)

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], in_features: int, out_features: int,
                   bias: torch.Tensor | None, compute_dtype: torch.dtype, prefix: str = "") -> Linear4bit:
        """A pre-quantized checkpoint's tensors for one layer (keys "weight", "weight.absmax", ...)."""
        q = nf4_from_state(state, prefix)
        if tuple(q.shape) != (out_features, in_features):
            raise GazelleError(
                f"{prefix}weight is quantized with shape {list(q.shape)} but the layer is "
                f"[{out_features}, {in_features}] (out, in): does config.json match the checkpoint?"
            )
        return cls(q, bias, compute_dtype)

    def dequantized_weight(self) -> torch.Tensor:
        """W in compute_dtype, (out_features, in_features)."""
        return kernels_nf4.dequantize_nf4(self.nf4, self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Computed in compute_dtype and returned in the input's dtype, as bitsandbytes' Linear4bit does; the
        # Triton path streams the packed weight for decode-sized inputs and never keeps W whole.
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        dtype, x = x.dtype, x.to(self.compute_dtype)
        if torch.compiler.is_compiling() and x.is_cuda and not torch.is_grad_enabled():
            # The compiled decode step: one opaque op, so the compiler fuses around the NF4 kernel rather than
            # tracing (and dequantizing) the reference.
            y = torch.ops.gazelle.nf4_linear(x, self.weight, self.absmax, self.nested_absmax, self.nested_quant_map,
                                             self.offset or 0.0, self.blocksize, self.out_features,
                                             self.weight_dtype, bias)
        else:
            y = kernels_nf4.nf4_linear(x, self.nf4, bias)
        return y.to(dtype)

    def extra_repr(self) -> str:
        double = ", double_quant" if self.nested_absmax is not None else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"nf4 blocksize={self.blocksize}{double}, compute_dtype={self.compute_dtype}")

    def _apply(self, fn, recurse=True):
        stats = {name: self._buffers[name] for name in STATS if self._buffers[name] is not None}
        super()._apply(fn, recurse)
        for name, before in stats.items():
            after = self._buffers[name]
            if after.dtype != before.dtype:  # a dtype cast: take only the device move
                self._buffers[name] = before.to(after.device)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)  # weight (packed bytes), bias
        for key, t in nf4_to_state(self.nf4).items():
            if key != "weight":
                destination[prefix + key] = t if keep_vars else t.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        own = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix + "weight")}
        if own:  # without any, the base class reports weight as missing
            q = nf4_from_state(own, prefix)
            if tuple(q.shape) != (self.out_features, self.in_features):
                raise GazelleError(f"{prefix}weight is quantized with shape {list(q.shape)}, this layer is "
                                   f"[{self.out_features}, {self.in_features}]")
            self._store(q.to(self.weight.device))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        # The base class takes dotted keys for submodules'; ours were read above.
        unexpected_keys[:] = [k for k in unexpected_keys if not k.startswith(prefix + "weight.")]


@torch.library.custom_op("gazelle::nf4_linear", mutates_args=())
def _nf4_linear_op(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, nested_absmax: torch.Tensor | None,
                   nested_quant_map: torch.Tensor | None, offset: float, blocksize: int, out_features: int,
                   weight_dtype: torch.dtype, bias: torch.Tensor | None) -> torch.Tensor:
    """Linear4bit's product as a custom op for torch.compile (no gradient: the decode step only)."""
    q = _nf4_of(packed, out_features, x.shape[-1], weight_dtype, blocksize, absmax, nested_absmax, nested_quant_map,
                offset)
    return kernels_nf4.nf4_linear(x, q, bias)


def _nf4_of(packed: torch.Tensor, out_features: int, in_features: int, weight_dtype: torch.dtype, blocksize: int,
            absmax: torch.Tensor, nested_absmax: torch.Tensor | None, nested_quant_map: torch.Tensor | None,
            offset: float) -> NF4Tensor:
    """The NF4Tensor of a Linear4bit's buffers as the custom ops receive them (the offset counts only when
    double-quantized: the ops take a float where the module holds None)."""
    return NF4Tensor(packed, torch.Size((out_features, in_features)), weight_dtype, blocksize, absmax,
                     offset if nested_absmax is not None else None, nested_absmax, nested_quant_map)


@_nf4_linear_op.register_fake
def _(x, packed, absmax, nested_absmax, nested_quant_map, offset, blocksize, out_features, weight_dtype, bias):
    return x.new_empty((*x.shape[:-1], out_features))


def groupable(x: torch.Tensor, modules: Sequence[nn.Module]) -> bool:
    """Whether `modules` are Linear4bit layers that grouped_forward can run as one product over x: one
    compute_dtype (x's), one blocksize, double-quantized alike (gazelle::nf4_group takes one blocksize)."""
    first = modules[0]
    return all(type(m) is Linear4bit and m.compute_dtype == x.dtype and m.blocksize == first.blocksize
               and (m.nested_absmax is None) == (first.nested_absmax is None) for m in modules)


def grouped_forward(x: torch.Tensor, modules: Sequence[Linear4bit], act: str | None = None) -> torch.Tensor:
    """[m_1(x) | .. | m_n(x)], or act(gate(x)) * up(x) for modules (gate, up): the layers over one input as one
    launch of the fused NF4 kernel where it applies (gazelle.kernels.nf4.nf4_multi_linear, nf4_glu_linear).

    For groupable(x, modules): x is in the modules' compute_dtype, and so is the result.
    """
    biases = [None if m.bias is None else m.bias.to(x.dtype) for m in modules]
    if torch.compiler.is_compiling() and x.is_cuda and not torch.is_grad_enabled():
        # The compiled decode step: one opaque op, as Linear4bit.forward does for a single layer.
        return torch.ops.gazelle.nf4_group(
            x, [m.weight for m in modules], [m.absmax for m in modules], [m.nested_absmax for m in modules],
            [m.nested_quant_map for m in modules], [m.offset or 0.0 for m in modules], modules[0].blocksize,
            [m.out_features for m in modules], modules[0].weight_dtype, biases, act or "")
    return _group_product(x, [m.nf4 for m in modules], biases, act)


def _group_product(x: torch.Tensor, qs: list[NF4Tensor], biases: list[torch.Tensor | None],
                   act: str | None) -> torch.Tensor:
    if not act:
        return kernels_nf4.nf4_multi_linear(x, qs, biases)
    return kernels_nf4.nf4_glu_linear(x, qs[0], qs[1], act)


@torch.library.custom_op("gazelle::nf4_group", mutates_args=())
def _nf4_group_op(x: torch.Tensor, packed: list[torch.Tensor], absmax: list[torch.Tensor],
                  nested_absmax: list[torch.Tensor | None], nested_quant_map: list[torch.Tensor | None],
                  offsets: list[float], blocksize: int, out_features: list[int], weight_dtype: torch.dtype,
                  biases: list[torch.Tensor | None], act: str) -> torch.Tensor:
    """grouped_forward as a custom op for torch.compile (no gradient: the decode step only); act "" for none."""
    qs = [_nf4_of(p, n, x.shape[-1], weight_dtype, blocksize, a, na, nm, f)
          for p, a, na, nm, f, n in zip(packed, absmax, nested_absmax, nested_quant_map, offsets, out_features)]
    return _group_product(x, qs, biases, act)


@_nf4_group_op.register_fake
def _(x, packed, absmax, nested_absmax, nested_quant_map, offsets, blocksize, out_features, weight_dtype, biases,
      act):
    return x.new_empty((*x.shape[:-1], out_features[0] if act else sum(out_features)))


def quantize_model(model: nn.Module, compute_dtype: torch.dtype, skip_modules=("lm_head",), blocksize: int = 64,
                   double_quant: bool = True) -> nn.Module:
    """Replace, in place, every nn.Linear whose dotted name contains no skip_modules entry by a Linear4bit.

    One layer at a time: each 16-bit weight is dropped as soon as its layer is quantized, so the peak is
    the model plus one layer's temporaries. Embeddings and norms are not Linear and stay as they are.
    """
    targets = [(name, m) for name, m in model.named_modules()
               if name and isinstance(m, nn.Linear) and not any(skip in name for skip in skip_modules)]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, Linear4bit.from_linear(linear, compute_dtype, blocksize,
                                                                                double_quant))
        linear.weight = None  # free the 16-bit weight now (unless something else, e.g. a tied embedding, holds it)
    return model


def nf4_bytes(numel: int, blocksize: int = 64, double_quant: bool = True) -> int:
    """Bytes a Linear4bit holds for a weight of `numel` elements (packed codes + block statistics)."""
    blocks = -(-numel // blocksize)
    if not double_quant:
        return (numel + 1) // 2 + 4 * blocks
    return (numel + 1) // 2 + blocks + 4 * -(-blocks // NESTED_BLOCKSIZE) + 4 * 256
