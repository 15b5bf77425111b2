"""NF4 (4-bit NormalFloat) block quantization in bitsandbytes' format, in plain torch.

The format (QLoRA; the layout that bitsandbytes and transformers' 4-bit checkpoints store):
- the weight is flattened and cut into blocks of `blocksize` elements (the last one may be short);
- each block keeps absmax = max |w| (float32) and each element the index of the NF4 level nearest to
  w * (1 / absmax), the boundaries being the float32 midpoints of adjacent levels, ties to the lower;
- two indices share a byte: element 2i in the high nibble, element 2i+1 in the low one; an odd count
  is padded with the index of 0.0; the bytes are stored as a ((numel + 1) // 2, 1) uint8 tensor;
- double quantization stores the absmax again in 8 bits: minus their mean (`offset`), in blocks of
  256, as the nearest entry of bitsandbytes' signed dynamic 8-bit map (ties to the even index, as its
  CUDA binary search goes) scaled by a float32 nested absmax per block of 256.

Decoding (level * absmax in float32, then one cast) is bitwise bitsandbytes' on CPU and CUDA. Encoding is
bitwise its CPU backend for the 4-bit codes (but where its division in a short last block rounds an ulp
away from the reciprocal product); its CUDA kernels are built with fast math, whose approximate
reciprocal moves a value across a boundary about once in 10**7, and its CPU 8-bit search is coarse
(~0.2% of absmax codes one step off the nearest): there gazelle keeps the nearest level.

This is the reference path: a Triton kernel replaces the hot loops later and must match it bit for bit.
"""

from __future__ import annotations

import functools

import dataclasses
import json
import math
from dataclasses import dataclass

import torch

from gazelle.errors import GazelleError

# The 16 NF4 levels: quantiles of N(0, 1) scaled to [-1, 1], with an exact zero (QLoRA, appendix E).
# Written as the float32 values bitsandbytes uses; index i is the 4-bit code i.
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256  # bitsandbytes double-quantizes the absmax in blocks of 256
QUANT_STATE_KEY = "weight.quant_state.bitsandbytes__nf4"
FLOAT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CHUNK = 1 << 22  # elements quantized at once: bounds the float32 temporaries to a few tens of MB


def nf4_levels(device: torch.device | str | None = None) -> torch.Tensor:
    """The NF4 code table, float32 (16,); one shared tensor per device (read-only), so that a CUDA graph
    capturing a dequantization finds it already on the GPU."""
    return _levels(torch.device(device or "cpu"))


@functools.lru_cache(maxsize=None)
def _levels(device: torch.device) -> torch.Tensor:
    return torch.tensor(NF4_LEVELS, dtype=torch.float32, device=device)


def dynamic_map(device: torch.device | str | None = None) -> torch.Tensor:
    """bitsandbytes' signed dynamic 8-bit map, float32 (256,) sorted.

    For e in 0..6 the 2**e midpoints of an even split of [0.1, 1], times 10**(e - 6), with both signs;
    then 0 and 1. All arithmetic is float32 so the values are bitwise those bitsandbytes stores.
    """
    levels = [torch.tensor([0.0, 1.0])]
    for e in range(7):
        edges = torch.linspace(0.1, 1.0, 2**e + 1)
        magnitudes = (edges[:-1] + edges[1:]) / 2 * 10.0 ** (e - 6)
        levels += [magnitudes, -magnitudes]
    return torch.sort(torch.cat(levels)).values.to(device)


@dataclass
class NF4Tensor:
    """A weight in NF4: bitsandbytes' QuantState as plain data (nested_* set iff double-quantized)."""

    packed: torch.Tensor  # uint8 ((numel + 1) // 2, 1)
    shape: torch.Size
    dtype: torch.dtype  # of the original weight, and the default of dequantize_nf4
    blocksize: int
    absmax: torch.Tensor  # float32 (blocks,), or uint8 (blocks,) codes into nested_quant_map
    offset: float | None = None  # mean of the float absmax, subtracted before the 8-bit quantization
    nested_absmax: torch.Tensor | None = None  # float32 (ceil(blocks / 256),)
    nested_quant_map: torch.Tensor | None = None  # float32 (256,): dynamic_map()

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def to(self, device: torch.device | str) -> NF4Tensor:
        def move(t):
            return None if t is None else t.to(device)

        return dataclasses.replace(self, packed=move(self.packed), absmax=move(self.absmax),
                                   nested_absmax=move(self.nested_absmax), nested_quant_map=move(self.nested_quant_map))


def _nearest_codes(values: torch.Tensor, levels: torch.Tensor, ties_to_even: bool) -> torch.Tensor:
    """uint8 index of the level nearest to each value (levels sorted ascending, float32).

    The boundaries are the float32 midpoints. A value exactly on one goes to the lower level, or with
    ties_to_even to the even index (what bitsandbytes' 8-bit binary search returns there).
    """
    mids = (levels[:-1] + levels[1:]) / 2
    idx = torch.searchsorted(mids, values, out_int32=True)
    if ties_to_even:
        tie = (idx < mids.numel()) & (mids[idx.clamp(max=mids.numel() - 1)] == values) & (idx % 2 == 1)
        idx = idx + tie.int()
    return idx.to(torch.uint8)


def _blockwise(flat: torch.Tensor, levels: torch.Tensor, blocksize: int, ties_to_even: bool = False):
    """(codes uint8 (blocks * blocksize,), absmax float32 (blocks,)) of a 1-D tensor, zero-padded to whole blocks.

    Padding zeros leave each absmax unchanged and take the code of 0.0.
    """
    n = flat.numel()
    blocks = -(-n // blocksize)
    codes = torch.empty(blocks * blocksize, dtype=torch.uint8, device=flat.device)
    absmax = torch.empty(blocks, dtype=torch.float32, device=flat.device)
    step = max(1, CHUNK // blocksize)  # blocks per chunk
    for b0 in range(0, blocks, step):
        b1 = min(b0 + step, blocks)
        chunk = flat[b0 * blocksize : b1 * blocksize].float()
        chunk = torch.nn.functional.pad(chunk, (0, (b1 - b0) * blocksize - chunk.numel()))
        chunk = chunk.view(b1 - b0, blocksize)  # (blocks in chunk, blocksize)
        absmax[b0:b1] = chunk.abs().amax(dim=1)
        # Multiply by the float32 reciprocal, as bitsandbytes does; the floor keeps an all-zero block at
        # 0 instead of NaN. The clamp only trims a rounding overshoot and never changes a code.
        scale = 1.0 / absmax[b0:b1].clamp(min=1e-38)
        scaled = (chunk * scale[:, None]).clamp(-1.0, 1.0)
        codes[b0 * blocksize : b1 * blocksize] = _nearest_codes(scaled.view(-1), levels, ties_to_even)
    return codes, absmax


def quantize_nf4(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Tensor:
    """A float weight (any shape) -> NF4Tensor on the weight's device: bitsandbytes' quantize_4bit(quant_type="nf4",
    compress_statistics=double_quant), to the precision stated in the module docstring."""
    if weight.dtype not in FLOAT_DTYPES.values():
        raise GazelleError(f"NF4 quantizes float32, bfloat16 or float16 weights, not {weight.dtype}")
    if weight.is_meta:
        raise GazelleError("cannot quantize a weight on the meta device: load the checkpoint's weights first")
    if blocksize not in BLOCKSIZES:
        raise GazelleError(f"NF4 blocksize must be one of {BLOCKSIZES}, not {blocksize}")
    if weight.numel() == 0:
        raise GazelleError(f"cannot quantize an empty weight of shape {tuple(weight.shape)}")
    flat = weight.detach().reshape(-1)
    n = flat.numel()
    levels = nf4_levels(weight.device)
    codes, absmax = _blockwise(flat, levels, blocksize)
    codes = codes[: n + n % 2]  # (even count,): the block padding supplies the odd count's zero nibble
    packed = ((codes[0::2] << 4) | codes[1::2]).unsqueeze(1)  # (ceil(n / 2), 1)
    q = NF4Tensor(packed, weight.shape, weight.dtype, blocksize, absmax)
    if double_quant:
        offset = absmax.mean()
        nested_map = dynamic_map(weight.device)
        codes8, nested_absmax = _blockwise(absmax - offset, nested_map, NESTED_BLOCKSIZE, ties_to_even=True)
        q.absmax = codes8[: absmax.numel()]
        q.offset, q.nested_absmax, q.nested_quant_map = offset.item(), nested_absmax, nested_map
    return q


def dequantize_absmax(q: NF4Tensor) -> torch.Tensor:
    """The per-block absmax, float32 (blocks,): q.absmax itself, or decoded from its 8-bit codes."""
    if not q.double_quant:
        return q.absmax
    blocks = q.absmax.numel()
    values = q.nested_quant_map[q.absmax.int()]  # (blocks,)
    values = torch.nn.functional.pad(values, (0, q.nested_absmax.numel() * NESTED_BLOCKSIZE - blocks))
    values = values.view(-1, NESTED_BLOCKSIZE) * q.nested_absmax[:, None]  # (nested blocks, 256)
    return values.view(-1)[:blocks] + q.offset


def dequantize_nf4(q: NF4Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """NF4Tensor -> tensor of q.shape in `dtype` (default: the original dtype).

    Computed in float32 (level * absmax, one rounding) and then cast, as bitsandbytes does.
    """
    levels = nf4_levels(q.device)
    byte = torch.arange(256, device=q.device)
    pairs = torch.stack([levels[byte >> 4], levels[byte & 15]], dim=1)  # (256, 2): the two values of a byte
    absmax = dequantize_absmax(q)
    packed = q.packed.reshape(-1)
    packed = torch.nn.functional.pad(packed, (0, absmax.numel() * q.blocksize // 2 - packed.numel()))
    values = pairs[packed.int()].view(-1, q.blocksize) * absmax[:, None]  # (blocks, blocksize)
    return values.view(-1)[: q.numel].view(q.shape).to(dtype or q.dtype)


def nf4_to_state(q: NF4Tensor) -> dict[str, torch.Tensor]:
    """The tensors bitsandbytes' Linear4bit state_dict holds for its weight, keyed by suffix ("weight", ...)."""
    meta = {
        "quant_type": "nf4",
        "blocksize": q.blocksize,
        "dtype": str(q.dtype).removeprefix("torch."),
        "shape": list(q.shape),
    }
    state = {"weight": q.packed, "weight.absmax": q.absmax, "weight.quant_map": nf4_levels(q.device)}
    if q.double_quant:
        state["weight.nested_absmax"] = q.nested_absmax
        state["weight.nested_quant_map"] = q.nested_quant_map
        meta |= {"nested_blocksize": NESTED_BLOCKSIZE, "nested_dtype": "float32", "nested_offset": q.offset}
    # Non-tensor fields travel as the UTF-8 bytes of a JSON object (json.dumps' default separators).
    state[QUANT_STATE_KEY] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
    return state


def nf4_from_state(state: dict[str, torch.Tensor], prefix: str = "") -> NF4Tensor:
    """bitsandbytes' serialized 4-bit weight (keys "weight", "weight.absmax", ...) -> NF4Tensor.

    `prefix` (the module's, e.g. "model.layers.0.mlp.up_proj.") only names keys in error messages.
    Tensors must come in their stored dtypes: the statistics are float32 and must not be cast.
    """
    meta = _read_meta(state, prefix)
    try:
        shape, blocksize, dtype = torch.Size(meta["shape"]), int(meta["blocksize"]), FLOAT_DTYPES[meta["dtype"]]
        nested = "nested_offset" in meta
        offset = float(meta["nested_offset"]) if nested else None
        if nested and int(meta["nested_blocksize"]) != NESTED_BLOCKSIZE:
            raise ValueError(f"nested_blocksize {meta['nested_blocksize']}")
    except (KeyError, TypeError, ValueError) as e:
        raise GazelleError(
            f"{prefix}{QUANT_STATE_KEY} has a bad or missing field ({e!r}); re-save the checkpoint"
        ) from None
    if blocksize not in BLOCKSIZES:
        raise GazelleError(f"{prefix}{QUANT_STATE_KEY} has blocksize {blocksize}; NF4 supports {BLOCKSIZES}")
    n = math.prod(shape)
    blocks = -(-n // blocksize)

    def get(key: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
        if key not in state:
            raise _missing(prefix + key)
        t = state[key]
        if key == "weight":  # bitsandbytes may keep the bytes in a wider dtype (quant_storage, e.g. bf16 for FSDP)
            t = t.contiguous().view(torch.uint8)
        if t.dtype != dtype or t.numel() != numel:
            raise GazelleError(
                f"{prefix}{key} is {t.dtype} with {t.numel()} elements, expected {dtype} with {numel} for shape "
                f"{list(shape)}: load quantization tensors in their stored dtype; does config.json match?"
            )
        return t.reshape(-1)

    packed = get("weight", torch.uint8, (n + 1) // 2).unsqueeze(1)  # ((n + 1) // 2, 1)
    if not torch.equal(get("weight.quant_map", torch.float32, 16).cpu(), nf4_levels()):
        raise GazelleError(f"{prefix}weight.quant_map is not the NF4 table: this is not an NF4 checkpoint")
    absmax = get("weight.absmax", torch.uint8 if nested else torch.float32, blocks)
    q = NF4Tensor(packed, shape, dtype, blocksize, absmax)
    if nested:
        q.offset = offset
        q.nested_absmax = get("weight.nested_absmax", torch.float32, -(-blocks // NESTED_BLOCKSIZE))
        q.nested_quant_map = get("weight.nested_quant_map", torch.float32, 256)
    return q


def _missing(key: str) -> GazelleError:
    return GazelleError(f"4-bit checkpoint lacks {key}: save it from bitsandbytes' Linear4bit (its state_dict)")


def _read_meta(state: dict[str, torch.Tensor], prefix: str) -> dict:
    """The JSON of the weight.quant_state.bitsandbytes__<type> tensor; only nf4 is accepted."""
    keys = [k for k in state if k.startswith("weight.quant_state.bitsandbytes__")]
    if not keys:
        raise _missing(prefix + QUANT_STATE_KEY)
    quant_type = keys[0].rpartition("__")[2]
    if len(keys) > 1 or quant_type != "nf4":
        raise GazelleError(
            f"{prefix}{keys[0]}: gazelle reads NF4 4-bit weights only ({quant_type} is not supported); "
            "re-quantize with bnb_4bit_quant_type='nf4'"
        )
    try:
        meta = json.loads(bytes(state[keys[0]].cpu().to(torch.uint8).tolist()).decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise GazelleError(
            f"{prefix}{keys[0]} is not bitsandbytes' JSON quant state ({e}); re-save the checkpoint"
        ) from None
    if not isinstance(meta, dict) or meta.get("quant_type") != "nf4":
        found = meta.get("quant_type") if isinstance(meta, dict) else meta
        raise GazelleError(
            f"{prefix}{keys[0]} says quant_type {found!r}: gazelle reads NF4 only (fp4 is not supported); "
            "re-quantize with bnb_4bit_quant_type='nf4'"
        )
    return meta
