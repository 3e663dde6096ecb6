"""jtransfer: torchvision ResNet and VGG in JAX/Flax, ported exactly, fine-tuned fast.

`import jtransfer` never imports torch; converting torchvision weights lives in
the separate `porting` package.
"""

from jtransfer import models
from jtransfer.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    DownloadError,
    JTransferError,
    NonFiniteLossError,
    PortingError,
)

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "DownloadError",
    "JTransferError",
    "NonFiniteLossError",
    "PortingError",
    "models",
]
