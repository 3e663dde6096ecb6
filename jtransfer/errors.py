"""Error types. Every message says what was wrong and what to do about it."""

from __future__ import annotations


class JTransferError(Exception):
    """Base class of every error jtransfer raises on purpose."""


class PortingError(JTransferError):
    """A torchvision checkpoint does not fit the requested architecture."""


class DownloadError(JTransferError):
    """A file could not be downloaded, or its checksum did not match."""


class DataError(JTransferError):
    """An image, a dataset folder or an archive is missing or unreadable."""


class ConfigError(JTransferError, ValueError):
    """An argument or a combination of arguments is invalid."""


class CheckpointError(JTransferError):
    """A checkpoint is missing, corrupt or does not fit the model."""


class NonFiniteLossError(JTransferError, FloatingPointError):
    """Training produced a NaN or infinite loss."""
