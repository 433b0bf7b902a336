"""Adapter checkpoints in PEFT's on-disk layout, written atomically (temp file + fsync + rename)."""

from __future__ import annotations

import os
import tempfile

import torch

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` so that a crash leaves either the old file or the new one, never half of one."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_weights(tensors: dict[str, torch.Tensor], directory: str | os.PathLike) -> None:
    """Save `tensors` as adapter_model.safetensors in `directory` (atomically)."""
    from safetensors.torch import save

    data = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write_bytes(os.path.join(directory, WEIGHTS_NAME), save(data, metadata={"format": "pt"}))


def load_weights(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read the adapter tensors of a checkpoint folder (safetensors, or PEFT's legacy adapter_model.bin)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = os.path.join(directory, WEIGHTS_NAME)
    if os.path.isfile(path):
        try:
            return load_file(path)
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(
                f"{path} cannot be read ({e}): the file is truncated or corrupt; save the adapter again"
            ) from e
    legacy = os.path.join(directory, LEGACY_WEIGHTS_NAME)
    if os.path.isfile(legacy):
        try:
            return torch.load(legacy, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling failure means the same thing to the user
            raise ValueError(f"{legacy} cannot be read ({e}): the file is truncated or corrupt") from e
    raise FileNotFoundError(
        f"no {WEIGHTS_NAME} (or {LEGACY_WEIGHTS_NAME}) in {os.fspath(directory)}: is this an adapter checkpoint folder?"
    )


def strip_adapter_name(key: str, name: str) -> str:
    """PEFT's saved key: the module path with the adapter-name component removed."""
    parts = key.split(".")
    return ".".join(p for p in parts if p != name)
