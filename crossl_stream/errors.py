"""Errors raised for bad input. Each message names what was wrong and where."""


class CrosslError(Exception):
    """Base class for every error this package raises on purpose."""


class ConfigError(CrosslError, ValueError):
    """A configuration file or value is invalid (names the file, the key and why)."""


class InputError(CrosslError, ValueError):
    """Data handed to the model or a loader has the wrong names, shapes or values."""


class CheckpointError(CrosslError, ValueError):
    """A model directory is missing, incomplete or not a crossl-stream checkpoint."""


class DatasetError(CrosslError, FileNotFoundError):
    """A dataset is not in the cache or is malformed."""
