"""Errors the toolchain raises for bad input. The CLI prints their message as one line."""


class BSBRExportError(Exception):
    """Base class: a user-facing error with a one-line message."""


class ConfigError(BSBRExportError, ValueError):
    """An invalid option or configuration value."""


class ModelLoadError(BSBRExportError):
    """A model directory or hub name that cannot be loaded."""


class UnsupportedArchitectureError(ModelLoadError):
    """A checkpoint that is not a GPT-2."""


class PickleCheckpointError(ModelLoadError):
    """A pickle checkpoint refused without the explicit opt-in."""


class HubUnreachableError(ModelLoadError):
    """The HuggingFace hub could not be reached."""


class InputError(BSBRExportError, ValueError):
    """Inference inputs of the wrong dtype, rank or length."""


class DataError(BSBRExportError, ValueError):
    """Calibration data that cannot be used: a missing, empty or non-UTF-8 file, a bad JSONL
    line, or too few tokens."""
