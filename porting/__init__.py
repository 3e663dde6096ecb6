"""porting: torchvision weights in and out of jtransfer. The only place torch is used.

Example:
    A torchvision state_dict file in, a Flax model's variables out, and back:

    >>> import tempfile, torch, torchvision
    >>> import porting
    >>> tmp = tempfile.TemporaryDirectory()
    >>> torch.save(torchvision.models.resnet18().state_dict(), f"{tmp.name}/r18.pth")
    >>> variables = porting.from_torchvision(f"{tmp.name}/r18.pth", "resnet18")
    >>> variables["params"]["fc"]["kernel"].shape  # torch's fc.weight is (1000, 512)
    (512, 1000)
    >>> net = torchvision.models.resnet18()
    >>> net.load_state_dict(porting.to_torchvision(variables, "resnet18"), strict=True)
    <All keys matched successfully>
    >>> tmp.cleanup()

    `load_pretrained("resnet18", num_classes=2)` does the same from torchvision's
    download cache (or downloads the file); `load_pretrained("resnet50",
    weights="hf-hub:timm/resnet50.a1_in1k")` from timm's weights on the Hugging Face hub
    (`porting.hub`, `porting.timm`).
"""

from jtransfer.errors import PortingError
from porting.hub import load_timm
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
    "load_timm",
    "read_state_dict",
    "to_torchvision",
    "torch_key",
]
