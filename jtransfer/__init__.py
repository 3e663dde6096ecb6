"""jtransfer: torchvision ResNet and VGG in JAX/Flax, ported exactly, fine-tuned fast.

`import jtransfer` never imports torch; converting torchvision weights lives in
the separate `porting` package. Submodules: `models`, `heads`, `partition`
(who trains how fast), `train` (jitted steps), and, imported on first use,
`data`, `download`, `fit`, `checkpoint`, `features`, `lr_find`, `cli`.
"""

import importlib

from jtransfer import heads, models, partition
from jtransfer.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    DownloadError,
    JTransferError,
    NonFiniteLossError,
    PortingError,
)
from jtransfer.heads import replace_head
from jtransfer.partition import Group, make_optimizer, rules_table

__version__ = "0.1.0"

# Loaded on first attribute access: they pull in grain, PIL, orbax or matplotlib.
_LAZY = ("checkpoint", "cli", "data", "download", "features", "fit", "lr_find", "nnx", "train")


def __getattr__(name):
    if name in _LAZY:
        return importlib.import_module(f"jtransfer.{name}")
    raise AttributeError(f"module 'jtransfer' has no attribute {name!r}")


__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "DownloadError",
    "Group",
    "JTransferError",
    "NonFiniteLossError",
    "PortingError",
    "heads",
    "make_optimizer",
    "models",
    "partition",
    "replace_head",
    "rules_table",
    *_LAZY,
]
