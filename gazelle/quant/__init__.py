"""4-bit NF4 quantization in bitsandbytes' format: the QLoRA base-weight storage."""

from gazelle.quant.linear4bit import Linear4bit, nf4_bytes, quantize_model
from gazelle.quant.nf4 import NF4Tensor, dequantize_nf4, nf4_from_state, nf4_to_state, quantize_nf4

__all__ = ["Linear4bit", "NF4Tensor", "dequantize_nf4", "nf4_bytes", "nf4_from_state", "nf4_to_state",
           "quantize_model", "quantize_nf4"]
