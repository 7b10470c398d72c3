"""Running exported models: runners (one ``infer`` interface per backend) and steppers
(prefill, then one token at a time) over PyTorch and ONNX Runtime; ``load`` opens an export
for torch-free generation (``api.py`` over ``engine.py``, ``sampling.py``, ``text.py``)."""

from .runners import (HFRunner, ORTRunner, TorchHalfRunner, TorchRunner, available_providers, check_feeds,
                      onnx_metadata, session_from_onnx)
from .steppers import ORTStepper, TorchStepper
from .api import Completion, Runtime, StreamEvent, check_export, load
from .sampling import SamplingOptions
from .scoring import TokenScores
from .text import Tokenizer

__all__ = ["Completion", "Runtime", "SamplingOptions", "StreamEvent", "TokenScores", "Tokenizer", "check_export",
           "load",
           "HFRunner", "ORTRunner", "ORTStepper", "TorchHalfRunner", "TorchRunner", "TorchStepper",
           "available_providers", "check_feeds", "onnx_metadata", "session_from_onnx"]
