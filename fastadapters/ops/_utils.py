"""Argument checks and dropout masks shared by the functional ops. Messages name the tensor, what it is and
what was expected, so a wrong call can be fixed from the error alone."""

from __future__ import annotations

import numbers

import torch


def fmt_shape(shape: tuple[int, ...] | torch.Size) -> str:
    """(16, 4095) style, also for 1-d shapes: (8,)."""
    return str(tuple(shape))


def check_tensor(name: str, t: object, ndim: int | None = None, *, min_ndim: int | None = None) -> torch.Tensor:
    """`t` is a floating-point tensor of `ndim` dims (or at least `min_ndim`)."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} has shape {fmt_shape(t.shape)} ({t.dim()}-d) but must be {ndim}-d")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{name} has shape {fmt_shape(t.shape)} but must have at least {min_ndim} dim(s)")
    if not t.is_floating_point():
        raise ValueError(f"{name} has dtype {t.dtype} but must be floating point (float16, bfloat16, float32, float64)")
    return t


def check_same(ref_name: str, ref: torch.Tensor, others: dict[str, torch.Tensor | None], *,
               dtype: bool = True, device: bool = True) -> None:
    """Every non-None tensor in `others` has ref's device (and dtype, when asked)."""
    for name, t in others.items():
        if t is None:
            continue
        if device and t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}: move them to one device")
        if dtype and t.dtype != ref.dtype:
            raise ValueError(
                f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}: cast them to one dtype"
            )


def check_dropout(dropout_p: object, training: object, seed: object) -> None:
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real) or not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"dropout_p={dropout_p!r} is outside [0, 1): use a probability such as 0.05, or 0.0")
    if not isinstance(training, bool):
        raise ValueError(f"training={training!r} must be a bool")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
        raise ValueError(f"seed={seed!r} must be an int (or None to draw from torch's global RNG)")


def dropout_mask(
    shape: tuple[int, ...] | torch.Size,
    p: float,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int | None = None,
) -> torch.Tensor:
    """Inverted-dropout mask of `shape`: each element is 1/(1-p) with probability 1-p, else 0.

    Drawn from torch's RNG for `device`, or from a torch.Generator seeded with `seed` (same seed, same mask).
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout p={p!r} is outside [0, 1)")
    generator = None
    if seed is not None:
        generator = torch.Generator(device=torch.device(device) if device is not None else "cpu")
        generator.manual_seed(int(seed))
    mask = torch.empty(shape, dtype=dtype, device=device)
    mask.bernoulli_(1.0 - p, generator=generator)
    return mask.div_(1.0 - p)


def maybe_dropout_mask(x: torch.Tensor, dropout_p: float, training: bool, seed: int | None,
                       dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
    """The mask for x (same shape) when dropout is on (p > 0 and training), else None."""
    if dropout_p == 0 or not training:
        return None
    return dropout_mask(x.shape, float(dropout_p), device=x.device, dtype=dtype, seed=seed)


def check_scalar(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name}={value!r} must be a real number")
    return float(value)
