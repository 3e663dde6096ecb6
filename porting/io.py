"""Reading checkpoint files safely, and torchvision's published weights.

`.pth`/`.pt` files are read with `torch.load(weights_only=True)`: a file that
would need arbitrary Python objects unpickled is refused, never executed.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from jtransfer.errors import ConfigError, PortingError

# torch.hub's rule: the hash prefix is the hex run between "-" and "." in the name.
_HASH_IN_NAME = re.compile(r"-([a-f0-9]+)\.")
BASE_URL_ENV = "JTRANSFER_WEIGHTS_BASE_URL"


def to_numpy(value: Any) -> np.ndarray:
    """A torch tensor or array-like as a float32 (or integer) numpy array."""
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch here
        value = value.detach().cpu()
        if value.is_floating_point():
            value = value.float()
        value = value.numpy()
    arr = np.asarray(value)
    if np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float32, copy=False)
    return arr


def read_state_dict(src: str | os.PathLike | Mapping[str, Any]) -> dict[str, np.ndarray]:
    """A state_dict from a mapping, a `.pth`/`.pt` file or a `.safetensors` file.

    Args:
        src: a state_dict (torch tensors or arrays), or a path to one.

    Returns:
        {torch key: numpy array}.

    Raises:
        PortingError: the file is missing, truncated, not a checkpoint, holds
            something other than a flat state_dict, or needs unsafe unpickling.
    """
    if isinstance(src, Mapping):
        sd = src
    else:
        path = Path(src)
        if not path.is_file():
            raise PortingError(
                f"weights file not found: {path}. Check the path, or pass a state_dict."
            )
        sd = _read_safetensors(path) if path.suffix == ".safetensors" else _read_torch(path)
    if not isinstance(sd, Mapping):
        raise PortingError(
            f"expected a state_dict (a mapping of names to tensors), got {type(sd).__name__}"
            f"{' from ' + str(src) if not isinstance(src, Mapping) else ''}. "
            "Save the weights with torch.save(model.state_dict(), path)."
        )
    for wrapper in ("state_dict", "model"):
        if set(sd) == {wrapper} or (wrapper in sd and isinstance(sd[wrapper], Mapping)):
            raise PortingError(
                f"the checkpoint holds its weights under the key {wrapper!r} (a training "
                f"checkpoint, not a state_dict). Pass checkpoint[{wrapper!r}] instead."
            )
    out = {}
    for key, value in sd.items():
        try:
            out[str(key)] = to_numpy(value)
        except (TypeError, ValueError) as e:
            raise PortingError(
                f"entry {key!r} is not a tensor ({type(value).__name__}): {e}"
            ) from e
    return out


def _read_torch(path: Path) -> Any:
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise PortingError(
            f"{path} needs arbitrary Python objects unpickled, which is refused for safety "
            f"(torch.load weights_only=True said: {str(e).splitlines()[0]}). If you trust the "
            "file, load it yourself with torch.load(path, weights_only=False) and pass "
            "model.state_dict() (or the dict of tensors) instead."
        ) from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise PortingError(
            f"could not read {path} as a torch checkpoint ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else 'no detail'}). The file is truncated or "
            "is not a .pth/.pt file: delete it and download or save it again."
        ) from e


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own untyped errors
        raise PortingError(
            f"could not read {path} as safetensors ({type(e).__name__}: {e}). The file is "
            "truncated or corrupt: delete it and download or save it again."
        ) from e


def weights_url(arch: str, weights: str) -> str:
    """The URL torchvision publishes for `arch` with weights tag `weights`.

    Args:
        arch: e.g. "resnet18".
        weights: "DEFAULT" or a tag such as "IMAGENET1K_V1".
    """
    from torchvision.models import get_model_weights

    enum = get_model_weights(arch)
    names = [w.name for w in enum]
    try:
        member = enum[weights] if weights != "DEFAULT" else enum.DEFAULT
    except KeyError:
        raise ConfigError(
            f"{arch} has no weights {weights!r}; torchvision publishes: "
            f"{', '.join(['DEFAULT', *names])}. Or pass a path to a local .pth file."
        ) from None
    url = member.url
    base = os.environ.get(BASE_URL_ENV)
    if base:
        url = base.rstrip("/") + "/" + url.rsplit("/", 1)[1]
    return url


def hash_prefix(filename: str) -> str | None:
    """The sha256 prefix torchvision writes into its file names (resnet18-f37072fd.pth)."""
    m = _HASH_IN_NAME.search(filename)
    return m.group(1) if m else None


def torch_cache_dir() -> Path:
    """torch.hub's checkpoint cache: $TORCH_HOME/hub/checkpoints (default ~/.cache/torch)."""
    home = os.environ.get("TORCH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "torch"
    )
    return Path(home) / "hub" / "checkpoints"
