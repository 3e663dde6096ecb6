"""porting: torchvision weights in and out of jtransfer. The only place torch is used.

Example:
    >>> import porting
    >>> v = porting.from_torchvision("r18.pth", "resnet18", num_classes=2)  # doctest: +SKIP
    >>> sd = porting.to_torchvision(v, "resnet18")  # doctest: +SKIP
"""

from jtransfer.errors import PortingError
from porting.io import read_state_dict
from porting.torchvision import (
    HeadReinitialized,
    LoadReport,
    expected_keys,
    from_torchvision,
    load_matching,
    load_pretrained,
    to_torchvision,
    torch_key,
)

__all__ = [
    "HeadReinitialized",
    "LoadReport",
    "PortingError",
    "expected_keys",
    "from_torchvision",
    "load_matching",
    "load_pretrained",
    "read_state_dict",
    "to_torchvision",
    "torch_key",
]
