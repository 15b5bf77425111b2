"""llama.cpp's own tensor quantizer, the oracle for gazelle's GGUF encoders.

llama-cpp-python (a `test` extra, built from source) ships the ggml libraries next to its package;
`ggml_quantize_chunk` there is what `llama-quantize` calls, so its bytes are the reference. The
package is located, not imported (importing it loads all of llama.cpp), and a missing package is an
ImportError: tests that need the oracle fail rather than skip.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import os

import gguf
import numpy as np


@functools.cache
def _ggml() -> ctypes.CDLL:
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("llama-cpp-python is not installed: pip install -e '.[test]' (it builds llama.cpp)")
    path = os.path.join(spec.submodule_search_locations[0], "lib", "libggml-base.so")
    lib = ctypes.CDLL(path)
    # size_t ggml_quantize_chunk(enum ggml_type type, const float * src, void * dst, int64_t start,
    #                            int64_t nrows, int64_t n_per_row, const float * imatrix);
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [
        ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p
    ]
    return lib


def llama_quantize(data: np.ndarray, qtype: gguf.GGMLQuantizationType) -> bytes:
    """The bytes llama.cpp writes for float32 `data` of shape (..., n) as `qtype` (no importance matrix).

    gguf's GGMLQuantizationType values are ggml's `enum ggml_type` values.
    """
    rows = np.ascontiguousarray(data, np.float32).reshape(-1, data.shape[-1])
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    assert rows.shape[1] % block_size == 0, "ggml_quantize_chunk would abort: row not a multiple of the block"
    out = np.zeros(rows.shape[0] * rows.shape[1] // block_size * type_size, np.uint8)
    written = _ggml().ggml_quantize_chunk(
        int(qtype), rows.ctypes.data, out.ctypes.data, 0, rows.shape[0], rows.shape[1], None
    )
    assert written == out.size, (written, out.size)
    return out.tobytes()
