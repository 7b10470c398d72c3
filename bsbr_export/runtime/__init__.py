"""Running exported models: runners (one ``infer`` interface per backend) and steppers
(prefill, then one token at a time) over PyTorch and ONNX Runtime."""

from .runners import ORTRunner, TorchRunner, available_providers, check_feeds, onnx_metadata, session_from_onnx
from .steppers import ORTStepper, TorchStepper

__all__ = ["ORTRunner", "ORTStepper", "TorchRunner", "TorchStepper", "available_providers", "check_feeds",
           "onnx_metadata", "session_from_onnx"]
