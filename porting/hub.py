"""``hf-hub:ORG/NAME`` weights: timm checkpoints from the Hugging Face hub, and local copies.

Files are fetched with ``huggingface_hub.hf_hub_download``, the hub's own client, so its
cache (``$HF_HOME/hub``, shared with timm and transformers), mirrors (``HF_ENDPOINT``),
offline mode (``HF_HUB_OFFLINE=1``), tokens and resumed downloads all work as they do
there. A repo's ``model.safetensors`` (else ``pytorch_model.bin``) and ``config.json`` are
fetched; the config names the architecture and the preprocessing (``pretrained_cfg``).

A downloaded weights file is read before it is used; one that is truncated or corrupt is
removed from the cache (the snapshot link and its blob), so the next try downloads it again
instead of failing on the same bytes. huggingface_hub itself writes to a process-unique
``.incomplete`` file and deletes it when a download fails.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from jtransfer.errors import ConfigError, DownloadError, PortingError
from porting import io
from porting import timm as timm_port

__all__ = ["HF_PREFIX", "download", "is_hub_name", "load_timm", "parse_hub_name", "preprocessing"]

HF_PREFIX = "hf-hub:"
_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def is_hub_name(weights: Any) -> bool:
    """Whether `weights` names a hub repo (``hf-hub:ORG/NAME``, optionally ``@REVISION``)."""
    return isinstance(weights, str) and weights.startswith(HF_PREFIX)


def parse_hub_name(weights: str) -> tuple[str, str | None]:
    """``"hf-hub:timm/resnet50.a1_in1k@main"`` -> ``("timm/resnet50.a1_in1k", "main")``.

    Raises:
        ConfigError: not ``hf-hub:ORG/NAME[@REVISION]``.
    """
    name = weights[len(HF_PREFIX) :] if is_hub_name(weights) else weights
    repo_id, _, revision = name.partition("@")
    if not _REPO_ID.match(repo_id):
        raise ConfigError(
            f"{weights!r} is not a hub name: use hf-hub:ORG/NAME, e.g. "
            "hf-hub:timm/resnet50.a1_in1k (optionally @REVISION)."
        )
    return repo_id, revision or None


def _url(repo_id: str, filename: str, revision: str | None) -> str:
    from huggingface_hub import hf_hub_url

    return hf_hub_url(repo_id, filename, revision=revision)


def _offline_hint(repo_id: str) -> str:
    return (
        f"To use a copy you already have, pass the file: --weights /path/model.safetensors "
        f"(a config.json beside it gives the architecture and preprocessing), or a directory "
        f"holding both (Python: porting.load_pretrained(arch, weights='/path/model.safetensors'))"
        f"; or fill the hub cache where there is network (`hf download {repo_id}`) and set "
        "HF_HUB_OFFLINE=1 here; or point HF_ENDPOINT at a mirror."
    )


def _fetch(repo_id: str, filename: str, revision: str | None) -> Path | None:
    """One file of the repo from the hub's cache or the hub; None when the repo lacks it."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    url = _url(repo_id, filename, revision)
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision, library_name="jtransfer"))
    except LocalEntryNotFoundError as e:  # offline, or the server cannot be reached
        from huggingface_hub import constants

        why = (
            "HF_HUB_OFFLINE is set, so nothing was requested"
            if constants.HF_HUB_OFFLINE
            else _first_line(e)
        )
        raise DownloadError(
            f"could not download {filename} of hub repo {repo_id} ({url}), and the hub cache "
            f"({constants.HF_HUB_CACHE}) has no copy: {why.rstrip('.')}.\n{_offline_hint(repo_id)}"
        ) from e
    except RemoteEntryNotFoundError:
        return None
    except RepositoryNotFoundError as e:
        raise DownloadError(
            f"hub repo {repo_id} was not found ({url}): check the name (e.g. "
            "hf-hub:timm/resnet50.a1_in1k); a private or gated repo needs a token (HF_TOKEN)."
        ) from e
    except RevisionNotFoundError as e:
        raise DownloadError(
            f"hub repo {repo_id} has no revision {revision!r} ({url}): check the name after '@'."
        ) from e
    except HfHubHTTPError as e:
        raise DownloadError(
            f"downloading {filename} of hub repo {repo_id} failed ({url}): {_first_line(e)}\n"
            f"{_offline_hint(repo_id)}"
        ) from e
    except _transport_errors() as e:  # interrupted transfers, size checks, a full disk
        raise DownloadError(
            f"downloading {filename} of hub repo {repo_id} failed ({url}): {_first_line(e)}. "
            f"Nothing was left in the cache; run again to retry.\n{_offline_hint(repo_id)}"
        ) from e


def _transport_errors() -> tuple[type[BaseException], ...]:
    """OSError, and the HTTP client's transfer errors (httpx2 in huggingface_hub 1.x/2.x,
    httpx before; requests' are OSErrors), which huggingface_hub lets through after its
    own retries."""
    import importlib

    errors: list[type[BaseException]] = [OSError]
    for name in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(name).HTTPError)
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _evict(path: Path) -> None:
    """Removes a cached file: the snapshot's link and the blob it points to."""
    blob = path.resolve()
    for p in {path, blob}:
        try:
            p.unlink()
        except FileNotFoundError:
            pass


def download(weights: str) -> tuple[Path, Path | None]:
    """A hub repo's weights file and config.json, from the hub cache or the hub.

    Args:
        weights: ``hf-hub:ORG/NAME`` (optionally ``@REVISION``).

    Returns:
        (path of ``model.safetensors`` or ``pytorch_model.bin``, path of config.json or
        None when the repo has none), both inside the hub cache.

    Raises:
        DownloadError: offline without a cached copy, an unknown repo or revision, a repo
            without a weights file, or a failed transfer.
    """
    repo_id, revision = parse_hub_name(weights)
    config = _fetch(repo_id, timm_port.CONFIG_FILE, revision)
    return _weights_file(repo_id, revision), config


def _weights_file(repo_id: str, revision: str | None) -> Path:
    for filename in timm_port.WEIGHT_FILES:
        path = _fetch(repo_id, filename, revision)
        if path is not None:
            return path
    raise DownloadError(
        f"hub repo {repo_id} has no weights file: neither "
        f"{' nor '.join(_url(repo_id, f, revision) for f in timm_port.WEIGHT_FILES)} exists. "
        "jtransfer loads timm checkpoints (model.safetensors or pytorch_model.bin with a "
        "config.json); pick a timm repo such as hf-hub:timm/resnet50.a1_in1k."
    )


def _locate(
    weights: str | os.PathLike, arch: str | None
) -> tuple[Path, dict[str, Any] | None, str, str]:
    """(weights file, config.json's contents, source, arch), the arch checked before a
    hub repo's weights are downloaded."""
    if is_hub_name(weights):
        repo_id, revision = parse_hub_name(str(weights))
        config_path = _fetch(repo_id, timm_port.CONFIG_FILE, revision)
        config = timm_port.read_config(config_path) if config_path is not None else None
        arch = timm_port.resolve_arch(arch, config, str(weights))
        return _weights_file(repo_id, revision), config, str(weights), arch
    path, config_path = timm_port.find_local(weights)
    config = timm_port.read_config(config_path) if config_path is not None else None
    return path, config, str(path), timm_port.resolve_arch(arch, config, str(path))


def load_timm(
    weights: str | os.PathLike,
    arch: str | None = None,
    *,
    num_classes: int | None = None,
    seed: int = 0,
) -> tuple[str, dict[str, Any], dict[str, Any] | None]:
    """timm weights (hub name, file or directory) as jtransfer variables.

    Args:
        weights: ``hf-hub:ORG/NAME``, a weights file (config.json beside it is read when
            present), or a directory holding both.
        arch: the architecture, or None to take config.json's ``architecture``.
        num_classes: as in `porting.from_torchvision`.
        seed: PRNG seed of a re-initialised head.

    Returns:
        (arch, {"params", "batch_stats"}, config.json's contents or None).

    Raises:
        DownloadError: see `download`.
        PortingError: architectures disagree or are unsupported, the file is truncated (a
            cached one is then removed from the cache), or the keys do not fit `arch`.
    """
    from porting.torchvision import from_torchvision

    path, config, source, arch = _locate(weights, arch)
    try:
        sd = io.read_state_dict(path)
    except PortingError as e:
        if is_hub_name(weights):
            _evict(path)
            raise PortingError(
                f"the weights downloaded from {source} are unreadable, so they were removed "
                f"from the hub cache; run again to download them afresh. ({e})"
            ) from e
        raise
    sd = timm_port.timm_to_torchvision(sd, arch)
    try:
        variables = from_torchvision(sd, arch, num_classes=num_classes, seed=seed)
    except PortingError as e:
        raise PortingError(timm_port.not_torchvision_message(arch, source, e)) from e
    return arch, variables, config


def preprocessing(weights: str | os.PathLike, image_size: int | None = None) -> Any:
    """The `jtransfer.preprocess.Preprocessing` of timm weights (config.json's).

    Args:
        weights: ``hf-hub:ORG/NAME``, a weights file or a directory, as in `load_timm`.
        image_size: crop size; None takes the config's ``input_size``.

    Returns:
        The weights' view, or None when there is no config.json (the caller's default
        applies).
    """
    from jtransfer.preprocess import Preprocessing

    if is_hub_name(weights):
        repo_id, revision = parse_hub_name(str(weights))
        config_path = _fetch(repo_id, timm_port.CONFIG_FILE, revision)
    else:
        _, config_path = timm_port.find_local(weights)
    if config_path is None:
        return None
    config = timm_port.read_config(config_path)
    if "pretrained_cfg" not in config:
        return None
    return Preprocessing.from_pretrained_cfg(config, image_size)


def config_arch(weights: str | os.PathLike) -> str | None:
    """config.json's architecture of timm weights (hub or local), or None without one."""
    if is_hub_name(weights):
        repo_id, revision = parse_hub_name(str(weights))
        config_path = _fetch(repo_id, timm_port.CONFIG_FILE, revision)
    else:
        _, config_path = timm_port.find_local(weights)
    if config_path is None:
        return None
    config = timm_port.read_config(config_path)
    if config.get("architecture") is None:
        return None
    return timm_port.resolve_arch(None, config, str(weights))


def is_timm_source(weights: Any) -> bool:
    """Whether `load_pretrained` reads `weights` as timm's: a hub name, a directory, or a
    file named as timm saves it (``model.safetensors``, ``pytorch_model.bin``) or with a
    config.json beside it. Other files are torchvision state_dicts."""
    if is_hub_name(weights):
        return True
    if not isinstance(weights, (str, os.PathLike)):
        return False
    path = Path(weights).expanduser()
    if path.is_dir():
        return True
    return path.is_file() and (
        path.name in timm_port.WEIGHT_FILES or (path.parent / timm_port.CONFIG_FILE).is_file()
    )
