"""Pure tensor codecs for quantized Hugging Face checkpoint formats (no file I/O, no model knowledge)."""

from bridge.hf.quantization.fp8_blocks import dequantize_fp8_blocks, quantize_fp8_blocks, scale_inv_shape
from bridge.hf.quantization.mxfp4 import dequantize_mxfp4, quantize_mxfp4

__all__ = ["dequantize_fp8_blocks", "dequantize_mxfp4", "quantize_fp8_blocks", "quantize_mxfp4", "scale_inv_shape"]
