"""Exceptions with messages that say what to do. Every user-facing failure in the library is one of these."""


class DPSLMError(Exception):
    """Base class for every error this package raises on purpose."""


class InvalidInput(DPSLMError, ValueError):
    """Input that cannot be processed (wrong shape, dtype, rate, NaN, out-of-range ids...)."""


class UnknownModel(DPSLMError, ValueError):
    """A release name or (k, lambda) pair that does not exist; the message lists the valid ones."""


class CheckpointError(DPSLMError, RuntimeError):
    """A checkpoint file that is corrupt, truncated, fails its hash, or does not match the architecture."""


class CheckpointUnavailable(DPSLMError, FileNotFoundError):
    """A checkpoint that is neither cached nor downloadable (e.g. no network); the message says how to pre-fetch."""


class DeviceError(DPSLMError, RuntimeError):
    """A device that cannot take a model: not a device name, CUDA unavailable, a bad ordinal, out of device memory."""
