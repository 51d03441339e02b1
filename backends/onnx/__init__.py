"""ONNX Runtime backend (``onnx:fp32``, ``onnx:int8``, ``onnx:int4``): optimum export with KV cache,
onnxruntime dynamic INT8 and MatMulNBits 4-bit weight-only quantization."""
