"""gazelle's GGUF encoders write llama.cpp's bytes, and read back within each type's error.

The oracle is llama.cpp's own `ggml_quantize_chunk` (tests/export/llama_cpp_oracle.py), on random
tensors with odd row counts and on rows built to hit the edge cases of each search: all-zero and
constant blocks, one outlier, magnitudes below llama.cpp's zero threshold, negative-only rows,
values on the rounding grid (ties), large values, heavy tails, squares that overflow float32.
"""

import gguf
import numpy as np
import pytest

from gazelle.errors import GazelleError
from gazelle.export.gguf_quants import QUANT_BLOCK, dequantize, quantize
from tests.export.llama_cpp_oracle import llama_quantize

T = gguf.GGMLQuantizationType
BLOCK_TYPES = [T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]
ALL_TYPES = [T.F32, T.F16, T.BF16, *BLOCK_TYPES]
# Relative RMS error of a round trip on Gaussian weights: about 1.3x what llama.cpp's encoders give
# (measured: q8_0 0.0054, q6_k 0.018, q5_k 0.036, q4_k 0.071, q3_k 0.152, q2_k 0.292).
RELATIVE_RMS = {
    T.Q8_0: 0.01, T.Q6_K: 0.025, T.Q5_0: 0.055, T.Q5_1: 0.05, T.Q5_K: 0.05, T.Q4_0: 0.11,
    T.Q4_1: 0.10, T.Q4_K: 0.095, T.Q3_K: 0.20, T.Q2_K: 0.38,
}


def _awkward_rows(rng: np.random.Generator) -> np.ndarray:
    """(12, 512) float32 rows, each hitting one edge case (512 = two k-quant super-blocks)."""
    rows = list(rng.standard_normal((12, 512)).astype(np.float32) * 0.02)
    rows[0][:256] = 0.0  # an all-zero super-block next to a normal one
    rows[1][:] = 0.37  # constant positive
    rows[2][:256] = -1.25  # constant negative
    rows[3][77] = 40.0  # one outlier
    rows[4] *= 1e-14  # below GROUP_MAX_EPS in places; scales underflow fp16
    rows[5] = -np.abs(rows[5]) - 0.01  # negative only
    rows[6] = rng.integers(-8, 8, 512).astype(np.float32)  # values on the grid: rounding ties
    rows[7] = rng.integers(0, 4, 512).astype(np.float32) * 0.5 - 0.75
    rows[8] *= 5e5  # large values (fp16 scales still finite)
    rows[9] = rng.standard_t(2, 512).astype(np.float32)  # heavy tails
    rows[10][::3] = 0.0  # many exact zeros
    rows[11] *= 10.0 ** rng.uniform(-28, 28, 512)  # x^2, x^3 overflow inside the searches: inf and NaN
    return np.stack(rows)


@pytest.fixture(scope="module")
def tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {
        "gaussian_13x768": rng.standard_normal((13, 768)).astype(np.float32) * 0.02,
        "uniform_3x5x256": rng.uniform(-3, 1, (3, 5, 256)).astype(np.float32),
        "awkward_12x512": _awkward_rows(rng),
        "wide_gaussian_255x4096": rng.standard_normal((255, 4096)).astype(np.float32),
        "student_t_67x2048": rng.standard_t(3, (67, 2048)).astype(np.float32) * 0.05,
    }


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_bytes_equal_llama_cpp(tensors, qtype):
    for name, x in tensors.items():
        ours = quantize(x, qtype)
        block_size, type_size = QUANT_BLOCK(qtype)
        assert ours.dtype == np.uint8 and ours.shape == (*x.shape[:-1], x.shape[-1] // block_size * type_size)
        theirs = np.frombuffer(llama_quantize(x, qtype), np.uint8).reshape(-1, type_size)
        ours = ours.reshape(-1, type_size)
        differ = (ours != theirs).any(axis=1)
        first = differ.argmax()
        assert not differ.any(), f"{name}: {differ.sum()} of {len(differ)} {qtype.name} blocks differ, first {first}"


def test_float_bits_equal_llama_cpp():
    """f16 / bf16 over special values and random bit patterns: rounding, subnormals, inf, NaN payloads."""
    rng = np.random.default_rng(3)
    special = [0.0, -0.0, np.inf, -np.inf, 65504.0, 65519.99, 65520.0, 1e-8, -3e-8, 6.1e-5, 1e-40, 3.4e38]
    ties = [1 + 2**-11, 1 + 3 * 2**-11, 1 + 2**-8, 1 + 3 * 2**-8]  # halfway for fp16, then for bf16
    nan_bits = [0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF812345, 0x7FFFFFFF, 0x7F80FFFF]
    nans = np.array(nan_bits, np.uint32).view(np.float32)
    bits = rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    x = np.concatenate([np.array(special + ties, np.float32), nans, bits])
    for qtype in (T.F16, T.BF16, T.F32):
        assert quantize(x, qtype).tobytes() == llama_quantize(x, qtype), qtype.name


def test_round_trip_error():
    rng = np.random.default_rng(11)
    x = rng.standard_normal((9, 1024)).astype(np.float32) * 0.05
    assert np.array_equal(dequantize(quantize(x, T.F32), T.F32), x)
    half = dequantize(quantize(x, T.F16), T.F16)
    assert np.all(np.abs(half - x) <= np.maximum(np.abs(x) * 2.0**-11, 2.0**-25))  # half an fp16 ulp
    brain = dequantize(quantize(x, T.BF16), T.BF16)
    assert np.all(np.abs(brain - x) <= np.abs(x) * 2.0**-8)
    for qtype, bound in RELATIVE_RMS.items():
        back = dequantize(quantize(x, qtype), qtype)
        assert back.shape == x.shape and back.dtype == np.float32
        rel = np.sqrt(np.mean((back - x) ** 2) / np.mean(x**2))
        assert rel <= bound, f"{qtype.name}: relative RMS error {rel:.4f} > {bound}"


def test_zero_and_constant_blocks_round_trip():
    x = np.zeros((2, 256), np.float32)
    x[1] = -0.5
    for qtype in BLOCK_TYPES:
        back = dequantize(quantize(x, qtype), qtype)
        assert np.all(back[0] == 0), qtype.name
        assert np.allclose(back[1], -0.5, rtol=2e-3), qtype.name


def test_unsupported_type_names_the_supported_ones():
    with pytest.raises(GazelleError, match="IQ2_XXS.*Q4_K"):
        quantize(np.zeros((1, 256), np.float32), T.IQ2_XXS)


def test_row_length_must_be_a_multiple_of_the_block():
    with pytest.raises(GazelleError, match=r"\(4, 100\).*32-element"):
        quantize(np.zeros((4, 100), np.float32), T.Q4_0)
    with pytest.raises(GazelleError, match="256-element"):
        quantize(np.zeros((2, 96), np.float32), T.Q4_K)
    with pytest.raises(GazelleError, match="whole 144-byte blocks"):
        dequantize(np.zeros((2, 100), np.uint8), T.Q4_K)


def test_non_finite_values_are_refused_by_block_types():
    x = np.ones((1, 256), np.float32)
    x[0, 5] = np.nan
    with pytest.raises(GazelleError, match="NaN or infinite"):
        quantize(x, T.Q6_K)
