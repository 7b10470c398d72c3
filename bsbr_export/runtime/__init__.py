"""Running exported models: runners (one ``infer`` interface per backend) and steppers
(prefill, then one token at a time) over PyTorch and ONNX Runtime."""

from .runners import (HFRunner, ORTRunner, TorchHalfRunner, TorchRunner, available_providers, check_feeds,
                      onnx_metadata, session_from_onnx)
from .steppers import ORTStepper, TorchStepper

__all__ = ["HFRunner", "ORTRunner", "ORTStepper", "TorchHalfRunner", "TorchRunner", "TorchStepper",
           "available_providers", "check_feeds", "onnx_metadata", "session_from_onnx"]
