"""bsbr-export: GPT-2 -> BSBR attention -> ONNX / TensorRT, with parity and benchmarks.

Heavy and optional dependencies (onnx, onnxruntime, triton, tensorrt) are imported
lazily by the stages that need them.
"""

__version__ = "0.1.0"
