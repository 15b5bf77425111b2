"""GGUF tensor encoders: float32 rows -> the exact block bytes llama.cpp writes for each tensor type.

The block layouts and the searches follow llama.cpp's reference quantizers (ggml-quants.c,
`quantize_row_*_ref`, which `ggml_quantize_chunk` and `llama-quantize` use when no importance matrix
is given), so a tensor gazelle writes is byte for byte the one llama.cpp would write from the same
float32 values. Being exact means doing C's float32 arithmetic in C's order: every product and sum
here is float32 with the same operand order, sums over a block run left to right
(`_sum_in_order`, never numpy's pairwise sum), integers come from the same mantissa trick
(`_nearest_int`), and every per-block decision compares the same two numbers with the same operator.
(That is the x86-64 build; an aarch64 build of llama.cpp may fuse multiply-adds and differ in rare
last bits.)

Blocks are encoded many at a time. Inside the k-quant searches a sub-block's elements lie along
axis 0 and the sub-blocks along axis 1 ("position-major", (n, M)), so each step of a search is a few
numpy operations over all M sub-blocks of a chunk, and a sum in order is n vector additions.
"""

from __future__ import annotations

from collections.abc import Iterator

import gguf
import numpy as np

from gazelle.errors import GazelleError

_T = gguf.GGMLQuantizationType
_F32 = np.float32
# Elements encoded per step: about 1 MiB per float32 temporary, so a search's working set stays in
# cache and memory stays bounded whatever the tensor's size.
_CHUNK_ELEMENTS = 1 << 18
# Adding 1.5 * 2**23 to a float32 leaves round-half-to-even of it in the low mantissa bits.
_MAGIC = _F32(12582912.0)
_GROUP_MAX_EPS = _F32(1e-15)  # llama.cpp: a sub-block whose largest magnitude is below this is zero


def QUANT_BLOCK(qtype: gguf.GGMLQuantizationType) -> tuple[int, int]:
    """(elements per block, bytes per block) of a GGUF tensor type."""
    return gguf.GGML_QUANT_SIZES[qtype]


def quantize(data: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """Encode float32 `data` of shape (..., n) as GGUF `qtype`: uint8 of shape (..., n // block * bytes).

    The bytes are llama.cpp's for the same input (no importance matrix). n must be a multiple of the
    type's block size; NaN or infinite values are an error for the block types (F32, F16 and BF16
    carry them as llama.cpp does). The tensor is encoded in chunks of about `_CHUNK_ELEMENTS`, so
    memory beyond the output is a few chunk-sized temporaries whatever the tensor's size.
    """
    encode = _ENCODERS.get(qtype)
    if encode is None:
        raise GazelleError(f"cannot quantize to GGUF type {_name(qtype)}: supported types are {_SUPPORTED}")
    data = np.asarray(data)
    block_size, type_size = QUANT_BLOCK(qtype)
    if data.ndim == 0 or data.shape[-1] == 0 or data.shape[-1] % block_size:
        raise GazelleError(
            f"cannot quantize a tensor of shape {data.shape} to {_name(qtype)}: its last dimension "
            f"must be a positive multiple of the {block_size}-element block"
        )
    rows = data.reshape(-1, data.shape[-1])  # (R, n)
    out = np.empty((rows.shape[0], rows.shape[1] // block_size * type_size), np.uint8)  # (R, bytes per row)
    for r0, r1, c0, c1 in _chunks(*rows.shape, block_size):  # rows r0:r1, elements c0:c1 of each
        blocks = np.asarray(rows[r0:r1, c0:c1], np.float32).reshape(-1, block_size)
        if block_size > 1 and not np.isfinite(blocks).all():
            raise GazelleError(f"cannot quantize to {_name(qtype)}: the tensor holds NaN or infinite values")
        # C's float arithmetic overflows, divides by zero and makes NaNs silently, and so do the
        # encoders, which mirror it (masking what C skips); warnings here would only be noise.
        with np.errstate(all="ignore"):
            encoded = encode(blocks)
        out[r0:r1, c0 // block_size * type_size : c1 // block_size * type_size] = encoded.reshape(r1 - r0, -1)
    return out.reshape(*data.shape[:-1], out.shape[1])


def _chunks(n_rows: int, row_length: int, block_size: int) -> Iterator[tuple[int, int, int, int]]:
    """(r0, r1, c0, c1) pieces of about _CHUNK_ELEMENTS: whole rows, or whole blocks of one long row."""
    if row_length <= _CHUNK_ELEMENTS:
        step = _CHUNK_ELEMENTS // row_length
        for r in range(0, n_rows, step):
            yield r, min(r + step, n_rows), 0, row_length
    else:
        step = max(1, _CHUNK_ELEMENTS // block_size) * block_size
        for r in range(n_rows):
            for c in range(0, row_length, step):
                yield r, r + 1, c, min(c + step, row_length)


def dequantize(blob: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """Decode GGUF bytes of shape (..., nbytes) back to float32 of shape (..., n) (via the gguf package)."""
    if qtype not in _ENCODERS:
        raise GazelleError(f"cannot dequantize GGUF type {_name(qtype)}: supported types are {_SUPPORTED}")
    blob = np.ascontiguousarray(blob).view(np.uint8)
    type_size = QUANT_BLOCK(qtype)[1]
    if blob.ndim == 0 or blob.shape[-1] % type_size:
        raise GazelleError(
            f"cannot read {blob.shape} bytes as {_name(qtype)}: rows must be whole {type_size}-byte blocks"
        )
    return np.array(gguf.quants.dequantize(blob, qtype), np.float32)  # a copy, never a view of `blob`


def _name(qtype) -> str:
    return getattr(qtype, "name", repr(qtype))


# ---------------------------------------------------------------- shared arithmetic (as llama.cpp's)


def _nearest_int(v: np.ndarray) -> np.ndarray:
    """llama.cpp's nearest_int bit for bit: round half to even (exact while |v| < 2**22), as int32."""
    return ((v + _MAGIC).view(np.int32) & 0x7FFFFF) - 0x400000


def _levels_into(out: np.ndarray, v: np.ndarray, lo: int, hi: int) -> None:
    """out[...] = clip(nearest_int(v), lo, hi) as float32, in place; v (float32) is overwritten."""
    v += _MAGIC
    bits = v.view(np.int32)
    bits &= 0x7FFFFF
    bits -= 0x400000
    np.clip(bits, lo, hi, out=bits)
    np.copyto(out, bits, casting="unsafe")


def _round_away(v: np.ndarray) -> np.ndarray:
    """C's roundf: halves away from zero (v - trunc(v) is exact, unlike floor(v + 0.5))."""
    whole = np.trunc(v)
    return np.where(np.abs(v - whole) >= 0.5, whole + np.copysign(_F32(1), v), whole)


def _sum_in_order(terms: np.ndarray, start: np.ndarray | None = None) -> np.ndarray:
    """Sum over axis 0 from left to right, starting at `start` (default +0.0): C's `s += t[i]` loop."""
    total = np.zeros(terms.shape[1:], np.float32) if start is None else start.copy()
    for term in terms:
        total += term
    return total


def _signed_absmax(x: np.ndarray, axis: int) -> np.ndarray:
    """The first element of largest magnitude along `axis`, sign kept, as C's scan from 0 with
    `if (ax > amax)`: a NaN never wins, and a line of zeros (or NaNs) gives +0.0."""
    magnitude = np.abs(x)
    magnitude[np.isnan(magnitude)] = -1
    first = np.expand_dims(magnitude.argmax(axis=axis), axis)
    top = np.take_along_axis(x, first, axis).squeeze(axis)
    return np.where(np.take_along_axis(magnitude, first, axis).squeeze(axis) > 0, top, _F32(0))


def _positive_max(x: np.ndarray) -> np.ndarray:
    """Largest value per row, or +0.0 when none is positive; NaN never wins (C's scan from `max = 0`)."""
    top = np.fmax.reduce(x, axis=1)
    return np.where(top > 0, top, _F32(0))


def _inverse(d: np.ndarray) -> np.ndarray:
    """C's `d ? 1.0f/d : 0.0f`."""
    return np.where(d != 0, _F32(1) / d, _F32(0))


def _half(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A float32 vector stored as fp16: (its (len, 2) little-endian bytes, its value read back)."""
    h = np.asarray(v, np.float32).astype("<f2")
    return h.view(np.uint8).reshape(len(h), 2), h.astype(np.float32)


def _position_major(x: np.ndarray, n: int) -> np.ndarray:
    """(B, 256) super-blocks -> (n, B * 256 // n) sub-blocks of n elements, one per column."""
    return np.ascontiguousarray(x.reshape(-1, n).T)


def _row_major(levels: np.ndarray, batch: int) -> np.ndarray:
    """Inverse of `_position_major` for integer levels: (n, M) -> (B, 256) uint8."""
    return np.ascontiguousarray(levels.T).reshape(batch, -1).astype(np.uint8)


def _pack_2bit(levels: np.ndarray) -> np.ndarray:
    """(B, 256) values 0..3 -> (B, 64): byte l of each 128-half holds elements l, l+32, l+64, l+96."""
    quarters = levels.reshape(len(levels), 2, 4, 32)  # (B, half, quarter, l)
    shifts = np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
    return np.bitwise_or.reduce(quarters << shifts, axis=2).reshape(len(levels), 64)


def _pack_nibbles(levels: np.ndarray) -> np.ndarray:
    """(B, 256) values 0..15 -> (B, 128): byte l of each 64-chunk holds elements l and l+32."""
    pairs = levels.reshape(len(levels), 4, 2, 32)  # (B, chunk, low/high, l)
    return (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(len(levels), 128)


# ---------------------------------------------------------------- plain floats


def _encode_f32(x: np.ndarray) -> np.ndarray:
    return x.astype("<f4").view(np.uint8)


def _encode_f16(x: np.ndarray) -> np.ndarray:
    """Round to nearest even (numpy's cast, as ggml's); NaN becomes ggml's quiet 0x7E00 with its sign."""
    half = x.astype("<f2").view(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        sign = (x.view(np.uint32) >> 16).astype(np.uint16) & 0x8000
        half = np.where(nan, sign | 0x7E00, half).astype(np.uint16)
    return half.astype("<u2").view(np.uint8)


def _encode_bf16(x: np.ndarray) -> np.ndarray:
    """Round to nearest even on the upper 16 bits; NaN keeps its upper bits and is made quiet."""
    bits = x.view(np.uint32)
    rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16  # wraps only for NaN, replaced below
    nan = (bits & 0x7FFFFFFF) > 0x7F800000
    return np.where(nan, (bits >> 16) | 64, rounded).astype("<u2").view(np.uint8)


# ---------------------------------------------------------------- 32-element blocks


def _encode_q8_0(x: np.ndarray) -> np.ndarray:
    """d = max|x| / 127 (fp16), q = roundf(x * (1/d)) as int8: 2 + 32 bytes."""
    d = np.abs(x).max(axis=1) / _F32(127)
    q = _round_away(x * _inverse(d)[:, None]).astype(np.int8)
    return np.concatenate([_half(d)[0], q.view(np.uint8)], axis=1)


def _symmetric(x: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray]:
    """q4_0 / q5_0: d = (signed max) / -(levels/2), q = min(levels-1, trunc(x * (1/d) + levels/2 + 0.5))."""
    d = _signed_absmax(x, axis=1) / _F32(-levels // 2)
    q = np.trunc(x * _inverse(d)[:, None] + _F32(levels // 2 + 0.5)).astype(np.int32)
    return d, np.minimum(q, levels - 1)


def _affine(x: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """q4_1 / q5_1: d = (max - min) / (levels-1), m = min, q = trunc((x - m) * (1/d) + 0.5)."""
    low, high = x.min(axis=1), x.max(axis=1)
    d = (high - low) / _F32(levels - 1)
    q = np.trunc((x - low[:, None]) * _inverse(d)[:, None] + _F32(0.5)).astype(np.int32)
    return d, low, q


def _low_nibbles(q: np.ndarray) -> np.ndarray:
    """(B, 32) -> (B, 16): byte j holds element j (low nibble) and element j+16 (high nibble)."""
    return ((q[:, :16] & 0xF) | ((q[:, 16:] & 0xF) << 4)).astype(np.uint8)


def _fifth_bits(q: np.ndarray) -> np.ndarray:
    """(B, 32) -> (B, 4): the little-endian uint32 whose bit j is bit 4 of element j."""
    return np.packbits(((q >> 4) & 1).astype(np.uint8), axis=1, bitorder="little")


def _encode_q4_0(x: np.ndarray) -> np.ndarray:
    d, q = _symmetric(x, 16)
    return np.concatenate([_half(d)[0], _low_nibbles(q)], axis=1)


def _encode_q5_0(x: np.ndarray) -> np.ndarray:
    d, q = _symmetric(x, 32)
    return np.concatenate([_half(d)[0], _fifth_bits(q), _low_nibbles(q)], axis=1)


def _encode_q4_1(x: np.ndarray) -> np.ndarray:
    d, low, q = _affine(x, 16)
    return np.concatenate([_half(d)[0], _half(low)[0], _low_nibbles(np.minimum(q, 15))], axis=1)


def _encode_q5_1(x: np.ndarray) -> np.ndarray:
    d, low, q = _affine(x, 32)
    q &= 0xFF  # C stores it through a uint8_t, with no clamp
    return np.concatenate([_half(d)[0], _half(low)[0], _fifth_bits(q), _low_nibbles(q)], axis=1)


# ---------------------------------------------------------------- k-quant searches over sub-blocks


def _best_affine_fit(x, w, nmax, rmin, rdelta, nstep, use_mad):
    """llama.cpp's make_qkx2_quants over M sub-blocks at once: x ~= scale * L - minimum.

    x, w: (n, M) values and weights. Tries the plain min/max grid, then nstep + 1 stretched grids
    (nmax + rmin + rdelta * step levels over the range), each with its weighted least-squares scale
    and offset, keeping the first one with the smallest weighted error (squared, or absolute when
    use_mad). The offset found so far feeds the next grid, as in C.
    Returns scale (M,), minimum (M,) (the stored positive offset) and levels L (n, M) in [0, nmax].
    """
    high = x.max(axis=0)
    low = x.min(axis=0)
    low = np.where(low > 0, _F32(0), low)
    flat, low_in = high == low, low
    wx = w * x
    sum_w = _sum_in_order(w[1:], start=w[0])
    sum_x = _sum_in_order(wx[1:], start=wx[0])
    error = np.abs if use_mad else np.square
    cand, work, wl = np.empty_like(x), np.empty_like(x), np.empty_like(x)  # (n, M) scratch

    def grid(iscale, low):  # cand = clip(nearest_int(iscale * (x - low)), 0, nmax)
        _levels_into(cand, np.multiply(np.subtract(x, low, out=work), iscale, out=work), 0, nmax)

    def weighted_error(scale, low):  # sum in order of w * error(scale * cand + low - x)
        diff = np.subtract(np.add(np.multiply(cand, scale, out=work), low, out=work), x, out=work)
        return _sum_in_order(np.multiply(error(diff, out=diff), w, out=diff))

    iscale = _F32(nmax) / (high - low)
    scale = _F32(1) / iscale
    grid(iscale, low)
    best_levels = cand.copy()
    best = weighted_error(scale, low)
    for step in range(nstep + 1):
        grid((_F32(rmin) + _F32(rdelta) * _F32(step) + _F32(nmax)) / (high - low), low)
        np.multiply(w, cand, out=wl)
        sum_l = _sum_in_order(wl)
        sum_l2 = _sum_in_order(np.multiply(wl, cand, out=work))
        sum_xl = _sum_in_order(np.multiply(wl, x, out=work))
        det = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        clamped = this_min > 0
        this_scale = np.where(clamped, sum_xl / sum_l2, this_scale)
        this_min = np.where(clamped, _F32(0), this_min)
        cur = weighted_error(this_scale, this_min)
        better = (det > 0) & (cur < best)
        np.copyto(best_levels, cand, where=better)
        best = np.where(better, cur, best)
        scale = np.where(better, this_scale, scale)
        low = np.where(better, this_min, low)
    scale = np.where(flat, _F32(0), scale)
    minimum = -np.where(flat, low_in, low)
    return scale, minimum, np.where(flat, _F32(0), best_levels)


def _best_symmetric_fit(x, nmax):
    """llama.cpp's make_qx_quants (rmse_type 1, weights x^2) over M sub-blocks: x ~= scale * (L - nmax).

    Tries 19 grids, -(nmax + 0.1 * step) / max for step -9..9, keeping the first that maximises
    (sum w x l)^2 / (sum w l^2). Returns scale (M,) and levels (n, M) in [0, 2 nmax) (0 for an
    all-zero sub-block).
    """
    top = _signed_absmax(x, axis=0)
    zero = np.abs(top) < _GROUP_MAX_EPS
    w = x * x
    wx = w * x

    cand, work = np.empty_like(x), np.empty_like(x)  # (n, M) scratch

    def fit(iscale):  # cand = clip(nearest_int(iscale * x), -nmax, nmax - 1); its two sums
        _levels_into(cand, np.multiply(x, iscale, out=work), -nmax, nmax - 1)
        sumlx = _sum_in_order(np.multiply(wx, cand, out=work))
        return sumlx, _sum_in_order(np.multiply(np.multiply(w, cand, out=work), cand, out=work))

    sumlx, suml2 = fit(_F32(-nmax) / top)
    best_levels = cand.copy()
    scale = np.where(suml2 != 0, sumlx / suml2, _F32(0))
    best = scale * sumlx
    for step in [*range(-9, 0), *range(1, 10)]:
        sumlx, suml2 = fit(-(_F32(nmax) + _F32(0.1) * _F32(step)) / top)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        np.copyto(best_levels, cand, where=better)
        scale = np.where(better, sumlx / suml2, scale)
        best = np.where(better, scale * sumlx, best)
    return np.where(zero, _F32(0), scale), np.where(zero, _F32(0), best_levels + nmax)


def _best_3bit_fit(x):
    """llama.cpp's make_q3_quants (nmax 4, do_rmse) over M sub-blocks: x ~= scale * (L - 4).

    Starts from the grid -4 / max and then, up to five passes, revisits each element in order and
    moves it to the level that improves (sum w x l)^2 / (sum w l^2) (w = x^2) — element by element,
    since each move changes the sums the next one sees; all M sub-blocks move together.
    Returns scale (M,) and levels (16, M) in [0, 8) (0 for an all-zero sub-block).
    """
    nmax = 4
    top = _signed_absmax(x, axis=0)
    zero = np.abs(top) < _GROUP_MAX_EPS
    w = x * x
    wx = w * x
    levels = np.clip(_nearest_int((_F32(-nmax) / top) * x), -nmax, nmax - 1).astype(np.float32)
    sumlx = _sum_in_order(wx * levels)
    suml2 = _sum_in_order(w * levels * levels)
    for _ in range(5):  # a pass that moves nothing leaves the state as it was: more passes are no-ops
        for i in range(len(x)):
            old = levels[i]
            rest_lx = sumlx - wx[i] * old  # the sums without element i
            rest_l2 = suml2 - w[i] * old * old
            new = np.clip(_nearest_int(x[i] * rest_l2 / rest_lx), -nmax, nmax - 1).astype(np.float32)
            slx = rest_lx + wx[i] * new
            sl2 = rest_l2 + w[i] * new * new
            moved = (rest_lx > 0) & (new != old) & (sl2 > 0) & (slx * slx * suml2 > sumlx * sumlx * sl2)
            levels[i] = np.where(moved, new, old)
            sumlx = np.where(moved, slx, sumlx)
            suml2 = np.where(moved, sl2, suml2)
    scale = np.where(suml2 > 0, sumlx / suml2, _F32(0))
    return np.where(zero, _F32(0), scale), np.where(zero, _F32(0), levels + nmax)


def _requantize(x, d, offset, lo, hi, kept):
    """Final levels against the stored (fp16-rounded) scales: clip(nearest_int((x + offset) / d), lo, hi).

    x, kept: (n, M); d, offset: (M,). Sub-blocks whose stored scale is 0 keep the search's levels.
    """
    fresh = np.clip(_nearest_int((x + offset) / d), lo, hi)
    return np.where(d != 0, fresh, kept.astype(np.int32))


# ---------------------------------------------------------------- k-quant super-blocks (256 elements)


def _scales_mins_6bit(scales, mins):
    """q4_K / q5_K: eight (scale, min) pairs per super-block as 6-bit multiples of two fp16 factors.

    Returns the (B, 12) packed bytes, (d, dmin) as fp16 bytes and the per-sub-block (B*8,) stored
    scale and offset.
    """
    max_scale, max_min = _positive_max(scales), _positive_max(mins)
    inv_scale = np.where(max_scale > 0, _F32(63) / max_scale, _F32(0))
    inv_min = np.where(max_min > 0, _F32(63) / max_min, _F32(0))
    ls = np.minimum(_nearest_int(inv_scale[:, None] * scales) & 0xFF, 63)  # (B, 8), via uint8_t as in C
    lm = np.minimum(_nearest_int(inv_min[:, None] * mins) & 0xFF, 63)
    packed = np.empty((len(scales), 12), np.uint8)
    packed[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    packed[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    packed[:, 8:12] = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    d_bytes, d = _half(max_scale / _F32(63))
    dmin_bytes, dmin = _half(max_min / _F32(63))
    sub_d = (d[:, None] * ls.astype(np.float32)).reshape(-1)
    sub_offset = (dmin[:, None] * lm.astype(np.float32)).reshape(-1)
    return packed, d_bytes, dmin_bytes, sub_d, sub_offset


def _affine_k(x, nmax, rmin, nstep):
    """Shared q4_K / q5_K search: 8 sub-blocks of 32, weights sqrt(mean x^2) + |x|."""
    xs = _position_major(x, 32)  # (32, B*8)
    rms = np.sqrt(_sum_in_order(xs * xs) / _F32(32))
    scales, mins, levels = _best_affine_fit(xs, rms + np.abs(xs), nmax, rmin, 0.1, nstep, use_mad=False)
    packed, d_bytes, dmin_bytes, sub_d, sub_offset = _scales_mins_6bit(scales.reshape(-1, 8), mins.reshape(-1, 8))
    levels = _requantize(xs, sub_d, sub_offset, 0, nmax, levels)
    return np.concatenate([d_bytes, dmin_bytes, packed], axis=1), _row_major(levels, len(x))


def _encode_q4_k(x: np.ndarray) -> np.ndarray:
    """d, dmin (fp16), 12 bytes of 6-bit scales/mins, 128 bytes of 4-bit levels: 144 bytes."""
    header, levels = _affine_k(x, 15, -1.0, 20)
    return np.concatenate([header, _pack_nibbles(levels)], axis=1)


def _encode_q5_k(x: np.ndarray) -> np.ndarray:
    """As q4_K plus 32 bytes of fifth bits (bit 2c+h of byte l: element 64c + 32h + l): 176 bytes."""
    header, levels = _affine_k(x, 31, -0.5, 15)
    high = (levels >> 4).reshape(len(x), 8, 32)  # (B, 2c+h, l)
    fifth = np.bitwise_or.reduce(high << np.arange(8, dtype=np.uint8).reshape(1, 8, 1), axis=1)
    return np.concatenate([header, fifth, _pack_nibbles(levels & 0xF)], axis=1)


def _encode_q2_k(x: np.ndarray) -> np.ndarray:
    """16 bytes of 4-bit scale/min pairs, 64 bytes of 2-bit levels, d, dmin (fp16): 84 bytes."""
    batch = len(x)
    xs = _position_major(x, 16)  # (16, B*16)
    scales, mins, levels = _best_affine_fit(xs, np.abs(xs), 3, -0.5, 0.1, 15, use_mad=True)
    scales, mins = scales.reshape(batch, 16), mins.reshape(batch, 16)
    max_scale, max_min = _positive_max(scales), _positive_max(mins)
    ls = np.where(max_scale[:, None] > 0, _nearest_int((_F32(15) / max_scale)[:, None] * scales), 0)
    lm = np.where(max_min[:, None] > 0, _nearest_int((_F32(15) / max_min)[:, None] * mins), 0)
    packed = ((ls | (lm << 4)) & 0xFF).astype(np.uint8)  # C writes both through a uint8_t
    d_bytes, d = _half(max_scale / _F32(15))
    dmin_bytes, dmin = _half(max_min / _F32(15))
    sub_d = (d[:, None] * (packed & 0xF).astype(np.float32)).reshape(-1)
    sub_offset = (dmin[:, None] * (packed >> 4).astype(np.float32)).reshape(-1)
    levels = _row_major(_requantize(xs, sub_d, sub_offset, 0, 3, levels), batch)
    return np.concatenate([packed, _pack_2bit(levels), d_bytes, dmin_bytes], axis=1)


def _encode_q3_k(x: np.ndarray) -> np.ndarray:
    """32 bytes of high bits, 64 bytes of low 2 bits, 12 bytes of 6-bit scales, d (fp16): 110 bytes."""
    batch = len(x)
    xs = _position_major(x, 16)  # (16, B*16)
    scales, levels = _best_3bit_fit(xs)
    scales = scales.reshape(batch, 16)
    max_scale = _signed_absmax(scales, axis=1)
    iscale = _F32(-32) / max_scale
    as_int8 = ((_nearest_int(iscale[:, None] * scales) + 128) & 0xFF) - 128
    ls = np.where(max_scale[:, None] != 0, np.clip(as_int8, -32, 31) + 32, 0)  # (B, 16) in [0, 64)
    d_bytes, d = _half(np.where(max_scale != 0, _F32(1) / iscale, _F32(0)))
    sub_d = (d[:, None] * (ls - 32).astype(np.float32)).reshape(-1)
    levels = _row_major(_requantize(xs, sub_d, _F32(0), -4, 3, levels - 4) + 4, batch)
    high = levels > 3  # the third bit goes to hmask: bit k of byte m is element 32k + m
    shifts = np.arange(8, dtype=np.uint8)[:, None]
    hmask = np.bitwise_or.reduce(high.reshape(batch, 8, 32).astype(np.uint8) << shifts, axis=1)
    packed = np.empty((batch, 12), np.uint8)
    packed[:, :8] = (ls[:, :8] & 0xF) | ((ls[:, 8:] & 0xF) << 4)
    top2 = (ls >> 4).reshape(batch, 4, 4)  # (B, j // 4, j % 4)
    packed[:, 8:] = np.bitwise_or.reduce(top2 << np.array([0, 2, 4, 6]).reshape(1, 4, 1), axis=1)
    return np.concatenate([hmask, _pack_2bit(levels - 4 * high), packed, d_bytes], axis=1)


def _encode_q6_k(x: np.ndarray) -> np.ndarray:
    """128 bytes of low 4 bits, 64 bytes of high 2 bits, 16 int8 scales, d (fp16): 210 bytes."""
    batch = len(x)
    xs = _position_major(x, 16)  # (16, B*16)
    scales, levels = _best_symmetric_fit(xs, 32)
    scales = scales.reshape(batch, 16)
    max_scale = _signed_absmax(scales, axis=1)
    iscale = _F32(-128) / max_scale
    sc = ((np.minimum(_nearest_int(iscale[:, None] * scales), 127) + 128) & 0xFF) - 128  # int8_t
    d_bytes, d = _half(_F32(1) / iscale)
    sub_d = (d[:, None] * sc.astype(np.float32)).reshape(-1)
    levels = _row_major(_requantize(xs, sub_d, _F32(0), -32, 31, levels - 32) + 32, batch)
    quarters = levels.reshape(batch, 2, 4, 32)  # (B, half, quarter, l)
    low = (quarters[:, :, :2] & 0xF) | ((quarters[:, :, 2:] & 0xF) << 4)  # ql[l], ql[l+32] of each half
    high = np.bitwise_or.reduce((quarters >> 4) << np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1), axis=2)
    out = np.concatenate(
        [low.reshape(batch, 128), high.reshape(batch, 64), sc.astype(np.int8).view(np.uint8), d_bytes], axis=1
    )
    out[np.abs(max_scale) < _GROUP_MAX_EPS] = 0  # llama.cpp zeroes the whole block
    return out


_ENCODERS = {
    _T.F32: _encode_f32,
    _T.F16: _encode_f16,
    _T.BF16: _encode_bf16,
    _T.Q8_0: _encode_q8_0,
    _T.Q4_0: _encode_q4_0,
    _T.Q4_1: _encode_q4_1,
    _T.Q5_0: _encode_q5_0,
    _T.Q5_1: _encode_q5_1,
    _T.Q2_K: _encode_q2_k,
    _T.Q3_K: _encode_q3_k,
    _T.Q4_K: _encode_q4_k,
    _T.Q5_K: _encode_q5_k,
    _T.Q6_K: _encode_q6_k,
}
_SUPPORTED = ", ".join(t.name for t in _ENCODERS)
