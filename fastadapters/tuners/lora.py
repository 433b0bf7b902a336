"""LoRA as a drop-in layer: y = x W^T + b + sum over active adapters of s * dropout(x) A^T B^T.

`LoraLayer` mirrors PEFT's module tree so parameter paths (and saved keys) match PEFT's:

    <target>.base_layer               the original nn.Linear / transformers Conv1D (frozen)
    <target>.lora_A[<adapter>]        nn.Linear(K, r, bias=False)   weight (r, K)
    <target>.lora_B[<adapter>]        nn.Linear(r, N, bias=False)   weight (N, r)
    <target>.lora_dropout[<adapter>]  nn.Dropout(p) or nn.Identity (no parameters)
    <target>.scaling[<adapter>]       lora_alpha / r  (lora_alpha / sqrt(r) with rsLoRA)

The first active, unmerged adapter runs through `fastadapters.ops.lora_linear` together with the base GEMM (so a
fused kernel covers the whole layer); further active adapters add their deltas in plain torch. When the input,
base weight and adapter do not share one dtype (a bf16 model with fp32 adapters, PEFT's default), the layer casts
the way PEFT does: base output in the input's dtype, the LoRA branch in the adapter's dtype, the sum cast back to
the base output's dtype.

Mixed batches (inference): `model(..., adapter_names=[...])` / `model.generate(..., adapter_names=[...])` give
each sequence its own adapter ("__base__": none), as PEFT does. LoraMethod checks the names and hands every
LoraLayer a `MixedBatch` for the call; each layer runs its base layer once plus one
`fastadapters.ops.multi_lora_delta` over the whole batch (per-token adapter indices into the layer's adapters
stacked and zero-padded to their largest rank: Triton / CUDA kernels on a GPU, the reference on the CPU).
The stacks are cached per layer and rebuilt when an adapter's weights change (tensor version counters);
they cost one extra copy of the adapter weights while cached. With grad enabled and adapter weights that
require grad, the stacks are built differentiably each call and the reference runs.

Merging is exact: the first merge keeps a copy of the original base weight; every merge recomputes
W = round(W_orig + sum of merged deltas, computed in fp32) and unmerge puts the copy back bit for bit. The copy
costs one extra weight per merged layer until unmerge / unload.

DoRA (`use_dora=True`, PEFT 0.21's semantics): the adapter also owns a trainable magnitude m (N,) at
`<target>.lora_magnitude_vector[<adapter>].weight` (saved as `<target>.lora_magnitude_vector`, PEFT's key), and
adds to the running result r (base output plus the adapters before it)

    (c - 1) * (r - b) + c * s * x A^T B^T,    c = m / ||W + s B A||  (row norms, detached)

so a lone DoRA adapter gives c * (x W^T + s x A^T B^T) + b. With dropout in training PEFT uses x_d = dropout(x)
and (c - 1) * x_d W^T instead of (c - 1) * (r - b); this layer does the same. The norm is computed without the
(N, K) delta (fastadapters.kernels.dora_ref.dora_norm_ref: one N x K x r GEMM W A^T plus r x r work), from
||W_i||^2 cached per frozen base weight; the norm itself is cached until W, A, B or the scaling change (tensor
versions), so inference and gradient-accumulation micro-steps compute it once. A merge folds the adapters in the
order PEFT does: W <- c * (W + s B A) with c from the unmerged base weight.
"""

from __future__ import annotations

import contextlib
import math
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from ..backend import backend_for
from ..config import LoraConfig
from ..kernels.dora_ref import dora_norm_ref, dora_weight_sq_ref
from ..ops.dora import dora_linear
from ..ops.multi_lora import multi_lora_delta, multi_lora_delta_
from ..targets import LORA_TARGETS, default_targets
from . import register
from .layers import PEFT_PREFIX, AdapterLayer, LayerMethod, is_conv1d

if TYPE_CHECKING:
    from ..config import AdapterConfig
    from ..model import AdapterModel


def _adapter_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """PEFT's default (autocast_adapter_dtype=True): fp16/bf16 bases get fp32 adapters, others their own dtype."""
    if base_dtype in (torch.float16, torch.bfloat16) or not base_dtype.is_floating_point:
        return torch.float32
    return base_dtype


BASE_ADAPTER = "__base__"  # in adapter_names: this sequence runs the base model alone
_DORA_RE = re.compile(r"\.lora_magnitude_vector\.weight$")


@dataclass
class MixedBatch:
    """One call's adapter per sequence, shared by every LoraLayer during the call.

    order: the model's LoRA adapter names, in stack-slot order; seq_idx: (B,) int64 slot per sequence on the
    model's device (-1 = "__base__"); names: the per-sequence names (after any beam expansion).
    """

    order: tuple[str, ...]
    seq_idx: torch.Tensor
    names: tuple[str, ...]
    all_base: bool
    _tokens: dict[tuple, torch.Tensor] = field(default_factory=dict)
    # id(layer) -> its stacks, looked up once per call (generate(): once for all steps) to keep the per-step
    # Python work of a layer to a dict lookup and one dispatch
    stacks: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def token_idx(self, batch: int, length: int, device: torch.device) -> torch.Tensor:
        """(batch * length,) slot per token for a layer input of `batch` sequences of `length` tokens.

        A batch that is a multiple of the names (generation strategies that expand sequences in place, with
        repeat_interleave as transformers does) repeats each name; any other size is an error.
        """
        key = (batch, length, device)
        tok = self._tokens.get(key)
        if tok is not None:
            return tok
        seq = self.seq_idx
        n = seq.shape[0]
        if batch != n:
            if n == 0 or batch % n:
                raise ValueError(
                    f"a LoRA layer got a batch of {batch} sequences but adapter_names has {n} names: pass one name "
                    "per sequence (with num_beams / num_return_sequences, one per input: they are repeated)"
                )
            seq = seq.repeat_interleave(batch // n)
        seq = seq.to(device)
        tok = seq if length == 1 else seq[:, None].expand(batch, length).reshape(-1)
        self._tokens[key] = tok
        return tok


def _kernel_path(x: torch.Tensor) -> bool:
    """Whether lora_linear would run a fused kernel on x: on CUDA unless backend "torch" is forced, or when a
    kernel backend is asked for explicitly (the interpreter on CPU)."""
    backend = backend_for("lora_linear")  # in a checkpoint recompute: the backend its forward ran on
    return backend in ("triton", "cuda") or (x.is_cuda and backend == "auto")


class DoraMagnitude(nn.Module):
    """DoRA's trainable magnitude of one adapter: `weight` (N,), one per output feature (PEFT's DoraLinearLayer)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)

    def __repr__(self) -> str:
        return f"lora.dora.DoraMagnitude({self.weight.shape[0]})"


def _tensor_key(t: torch.Tensor) -> tuple:
    """Identity of a tensor's current values: storage, in-place version, dtype, device, shape."""
    return (t.data_ptr(), t._version, t.dtype, t.device, tuple(t.shape))


class LoraLayer(AdapterLayer):
    """One frozen linear layer (nn.Linear or transformers Conv1D) with any number of named LoRA adapters.

    x: (..., K) -> (..., N) with N, K the base layer's out/in features. Conv1D layers (GPT-2) store their weight
    (K, N); the layer reads it as (N, K) and merges the transposed delta (PEFT's fan_in_fan_out).
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.training = base_layer.training  # a drop-in replacement keeps the train/eval mode of what it replaces
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ModuleDict()  # DoRA adapters only
        self.use_dora: dict[str, bool] = {}
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.use_rslora: dict[str, bool] = {}
        self.fan_in_fan_out = is_conv1d(base_layer)
        self._orig_weight: torch.Tensor | None = None  # the base weight before any merge (see module docstring)
        self._mixed: MixedBatch | None = None  # set by LoraMethod for the duration of a mixed-batch call
        self._stack_cache: tuple[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None
        self._dora_wsq: tuple[tuple, torch.Tensor] | None = None  # ||W_i||^2 of the current base weight
        self._dora_norms: dict[str, tuple[tuple, torch.Tensor]] = {}  # adapter -> ||W + s B A|| row norms

    # PEFT's tuner layers expose the base layer's tensors; some model code reads `module.weight`.
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def update_layer(self, name: str, config: AdapterConfig, module_name: str) -> None:
        """Create adapter `name`: A (r, K) kaiming-uniform(a=sqrt(5)), B (N, r) zero, so the output is unchanged.

        `init_lora_weights=False` leaves both at nn.Linear's random init (for tests); "gaussian" draws A ~ N(0, 1/r).
        """
        if not isinstance(config, LoraConfig):
            raise TypeError(f"LoraLayer needs a LoraConfig, got {type(config).__name__}")
        r = config.r
        if not isinstance(r, int) or r <= 0:
            raise ValueError(f"LoRA rank r={r!r} for {module_name!r} must be a positive integer")
        if not 0.0 <= config.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout={config.lora_dropout!r} is outside [0, 1)")
        init = config.init_lora_weights
        if not (isinstance(init, bool) or (isinstance(init, str) and init.lower() == "gaussian")):
            raise ValueError(
                f"init_lora_weights={init!r} is not supported by fastadapters: use True, False or "
                "'gaussian' (PiSSA/OLoRA/LoftQ-style inits change the base weights)"
            )
        weight = self.base_layer.weight
        factory = {"device": weight.device, "dtype": _adapter_dtype(weight.dtype)}
        lora_A = nn.Linear(self.in_features, r, bias=False, **factory)
        lora_B = nn.Linear(r, self.out_features, bias=False, **factory)
        if init is True:
            nn.init.kaiming_uniform_(lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(lora_B.weight)
        elif isinstance(init, str):
            nn.init.normal_(lora_A.weight, std=1 / r)
            nn.init.zeros_(lora_B.weight)
        self.lora_A[name] = lora_A.train(self.training)
        self.lora_B[name] = lora_B.train(self.training)
        self.lora_dropout[name] = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.lora_dropout[name].train(self.training)
        self.r[name] = r
        self.lora_alpha[name] = config.lora_alpha
        self.use_rslora[name] = config.use_rslora
        self.scaling[name] = config.lora_alpha / (math.sqrt(r) if config.use_rslora else r)
        self.use_dora[name] = bool(config.use_dora)
        self._dora_norms.pop(name, None)
        if config.use_dora:
            self.lora_magnitude_vector[name] = DoraMagnitude(self._dora_init_magnitude(name))
        elif name in self.lora_magnitude_vector:
            del self.lora_magnitude_vector[name]

    def _dora_init_magnitude(self, name: str) -> torch.Tensor:
        """m = ||W + s B A|| per output row, computed as PEFT does at init (adapters in the base weight's dtype,
        fp16 products in fp32), then kept in the adapter's dtype: the layer's output is unchanged at step 0."""
        W = self.base_weight()
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        with torch.no_grad():
            if W.dtype == torch.float16:
                lw = (B.float() @ A.float()).half()
            else:
                lw = B.to(W.dtype) @ A.to(W.dtype)
            norm = torch.linalg.norm(W + self.scaling[name] * lw, dim=1)
        return norm.to(A.dtype)

    # -- adapters
    def set_active(self, names: list[str]) -> None:
        """Make `names` the active adapters; a merged adapter that stops being active is unmerged."""
        super().set_active(names)
        if any(n not in self.active_adapters for n in self.merged_adapters):
            self._set_merged([n for n in self.merged_adapters if n in self.active_adapters])

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            self._set_merged([n for n in self.merged_adapters if n != name])
        super().delete_adapter(name)
        for d in (self.r, self.lora_alpha, self.scaling, self.use_rslora, self.use_dora, self._dora_norms):
            d.pop(name, None)
        self._stack_cache = None

    def _dropout_p(self, name: str) -> float:
        drop = self.lora_dropout[name]
        return float(drop.p) if isinstance(drop, nn.Dropout) else 0.0

    # -- forward
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """x: (..., K) -> (..., N): base output plus each active, unmerged adapter's s * dropout(x) A^T B^T.

        During a mixed-batch call (LoraMethod sets `_mixed`), each sequence gets its own adapter instead.
        """
        if self._mixed is not None:
            return self._mixed_forward(x, self._mixed, *args, **kwargs)
        names = [n for n in self.active_adapters if n not in self.merged_adapters and n in self.lora_A]
        if not names:
            return self.base_layer(x, *args, **kwargs)
        first = names[0]
        A, B = self.lora_A[first].weight, self.lora_B[first].weight
        weight, bias = self.base_weight(), self.base_layer.bias
        base_dtype = x.dtype == weight.dtype and (bias is None or bias.dtype == x.dtype)
        # Fused path for half-precision models with fp32 adapters (PEFT's default dtype): the kernel reads every
        # adapter in the activation dtype and accumulates in fp32; the fp32 master weights get the grads.
        cast = base_dtype and A.dtype != x.dtype and _kernel_path(x)
        if cast:
            A, B = A.to(x.dtype), B.to(x.dtype)
        if base_dtype and A.dtype == x.dtype and not args and not kwargs:
            # One op call for the base GEMM and the first adapter; further adapters add their delta.
            if first not in self.lora_magnitude_vector:
                result = ops.lora_linear(
                    x, weight, bias, A, B, self.scaling[first], dropout_p=self._dropout_p(first),
                    training=self.training
                )
            elif self._dora_dropout_active(first):  # PEFT's dropout form needs x_d W^T: not one fused GEMM
                result = self._dora_add(first, x, self.base_layer(x), x.dtype if cast else None).to(x.dtype)
            else:
                result = dora_linear(x, weight, bias, A, B, self.scaling[first],
                                     self.lora_magnitude_vector[first].weight, self.dora_weight_norm(first))
            for n in names[1:]:
                xn = x if cast else x.to(self.lora_A[n].weight.dtype)
                if n in self.lora_magnitude_vector:
                    result = self._dora_add(n, xn, result, x.dtype if cast else None).to(result.dtype)
                    continue
                delta = self._delta(n, x, x.dtype) if cast else self._delta(n, xn)
                result = result + delta.to(result.dtype)
            return result
        # PEFT's cast: base in x's dtype, each LoRA branch in its adapter's dtype, the sum back to the base dtype.
        result = self.base_layer(x, *args, **kwargs)
        out_dtype = result.dtype
        for n in names:
            xn = x.to(self.lora_A[n].weight.dtype)
            if n in self.lora_magnitude_vector:
                result = self._dora_add(n, xn, result)
            else:
                result = result + self._delta(n, xn)
        return result.to(out_dtype)

    # -- DoRA
    def _dora_dropout_active(self, name: str) -> bool:
        """PEFT reuses the base output for DoRA only when the adapter has no dropout or the layer is in eval."""
        return self.training and not isinstance(self.lora_dropout[name], nn.Identity)

    def dora_weight_norm(self, name: str) -> torch.Tensor:
        """||W_i + s (B A)_i|| of DoRA adapter `name` for the current base weight: (N,), fp32 (fp64 for fp64
        weights), no gradient. Computed without the (N, K) delta from the cached ||W_i||^2; cached until W, A, B or
        the scaling change."""
        w = self.base_layer.weight
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        s = self.scaling[name]
        if torch.compiler.is_compiling():  # tensor versions / data pointers cannot be traced: no cache in a graph
            with torch.no_grad():
                return dora_norm_ref(self.base_weight(), A, B, s)
        wkey = _tensor_key(w)
        key = (wkey, _tensor_key(A), _tensor_key(B), s)
        hit = self._dora_norms.get(name)
        # a norm made under inference_mode cannot be saved for backward later: recompute it outside
        if hit is not None and hit[0] == key and (torch.is_inference_mode_enabled() or not hit[1].is_inference()):
            return hit[1]
        dtype = torch.promote_types(torch.promote_types(torch.float32, w.dtype), torch.promote_types(A.dtype, B.dtype))
        with torch.no_grad():
            wsq = self._dora_wsq[1] if self._dora_wsq is not None and self._dora_wsq[0] == (wkey, dtype) else None
            if wsq is None:
                wsq = dora_weight_sq_ref(self.base_weight(), dtype)
                self._dora_wsq = ((wkey, dtype), wsq)
            norm = dora_norm_ref(self.base_weight(), A, B, s, wsq)
        self._dora_norms[name] = (key, norm)
        return norm

    def _dora_add(self, name: str, x: torch.Tensor, result: torch.Tensor,
                  dtype: torch.dtype | None = None) -> torch.Tensor:
        """result + DoRA adapter `name`'s term, PEFT's DoraLinearLayer.forward: (c - 1) * base + c * s * x A^T B^T
        with base = result - b (no dropout or eval), else base = x_d W^T on the dropped-out input x_d.

        x: (..., K) in the adapter's dtype, or in `dtype` (the adapter weights are then cast to it: kernel path).
        """
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        if dtype is not None:
            A, B = A.to(dtype), B.to(dtype)
        magnitude = self.lora_magnitude_vector[name].weight
        c = magnitude / self.dora_weight_norm(name).to(magnitude.dtype)
        if self._dora_dropout_active(name):
            x = self.lora_dropout[name](x)
            base = F.linear(x, self.base_weight().to(x.dtype))
        else:
            bias = self.base_layer.bias
            base = result - bias if bias is not None else result
        lora = F.linear(F.linear(x, A), B)
        return result + ((c - 1) * base + c * lora * self.scaling[name])

    def _delta(self, name: str, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """s * dropout(x) A^T B^T for adapter `name`; x: (..., K) -> (..., N). The weights are used in `dtype`
        (x's, on the kernel path), else x must be in the adapter's dtype."""
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        if dtype is not None:
            A, B = A.to(dtype), B.to(dtype)
        return F.linear(F.linear(self.lora_dropout[name](x), A), B) * self.scaling[name]

    # -- mixed batches
    def adapter_stacks(self, order: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(A_stack (n, R, K), B_stack (n, N, R), scalings (n,) fp32) of the adapters `order`, in that order.

        R is the largest rank among them (smaller ranks zero-padded); an adapter this layer does not carry gets
        zero weights and scaling 0. dtype: the adapters' (promoted) dtype. Cached until a weight changes; built
        differentiably (and not cached) when grad is enabled and an adapter weight requires grad.
        """
        present = [n for n in order if n in self.lora_A]
        weights = [(self.lora_A[n].weight, self.lora_B[n].weight) for n in present]
        grad = torch.is_grad_enabled() and any(a.requires_grad or b.requires_grad for a, b in weights)
        # storage, version (in-place writes), dtype and device of every weight: .to() / load / optimizer steps
        key = (tuple(order), tuple((n, a.data_ptr(), a._version, a.dtype, a.device, b.data_ptr(), b._version,
                                    b.dtype, self.scaling[n]) for n, (a, b) in zip(present, weights, strict=True)))
        if not grad and self._stack_cache is not None and self._stack_cache[0] == key:
            return self._stack_cache[1]
        ref = weights[0][0]
        dtype = ref.dtype
        for a, b in weights:
            dtype = torch.promote_types(torch.promote_types(dtype, a.dtype), b.dtype)
        R = max(a.shape[0] for a, _ in weights)
        K, N = self.in_features, self.out_features
        ctx = contextlib.nullcontext() if grad else torch.no_grad()
        with ctx:
            zA = torch.zeros((R, K), device=ref.device, dtype=dtype)
            zB = torch.zeros((N, R), device=ref.device, dtype=dtype)
            A_rows, B_rows, s = [], [], []
            for n in order:
                if n in self.lora_A:
                    a, b = self.lora_A[n].weight.to(dtype), self.lora_B[n].weight.to(dtype)
                    r = a.shape[0]
                    A_rows.append(F.pad(a, (0, 0, 0, R - r)) if r < R else a)
                    B_rows.append(F.pad(b, (0, R - r)) if r < R else b)
                    s.append(float(self.scaling[n]))
                else:
                    A_rows.append(zA)
                    B_rows.append(zB)
                    s.append(0.0)
            stacks = (torch.stack(A_rows).contiguous(), torch.stack(B_rows).contiguous(),
                      torch.tensor(s, dtype=torch.float32, device=ref.device))
        self._stack_cache = None if grad else (key, stacks)
        return stacks

    def _mixed_forward(self, x: torch.Tensor, mixed: MixedBatch, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Base output plus, for every token, its sequence's adapter (one multi_lora_delta for the batch)."""
        if self.merged_adapters:
            raise ValueError(
                f"adapters {self.merged_adapters} are merged into the base weights: a mixed batch (adapter_names) "
                "needs unmerged adapters; call model.unmerge_adapter() first"
            )
        result = self.base_layer(x, *args, **kwargs)
        if mixed.all_base or not any(n in self.lora_A for n in mixed.order):
            return result
        if x.dim() < 2:
            raise ValueError(f"a mixed batch needs layer inputs of shape (batch, ..., {self.in_features}), "
                             f"got {tuple(x.shape)}")
        batch = x.shape[0]
        if batch == 0 or x.numel() == 0:
            return result
        length = x[0].numel() // max(self.in_features, 1)
        idx = mixed.token_idx(batch, length, x.device)
        grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.lora_A.parameters()))
        stacks = None if grad else mixed.stacks.get(id(self))
        if stacks is None:
            stacks = self.adapter_stacks(mixed.order)
            if not grad:
                mixed.stacks[id(self)] = stacks
        A, B, s = stacks
        # PEFT's cast: the LoRA branch in the adapters' dtype, the sum back to the base output's dtype
        xl = x.to(A.dtype)
        if not grad and result.dtype == A.dtype and result.is_contiguous():  # in place, no checks (built here)
            multi_lora_delta_(xl.reshape(-1, self.in_features), A, B, s, idx, result.view(-1, self.out_features))
            return result
        idx = idx.view(x.shape[:-1])
        return (result + multi_lora_delta(xl, A, B, s, idx)).to(result.dtype)

    # -- merging
    def delta_weight(self, name: str) -> torch.Tensor:
        """s * B A in fp32, laid out like the stored base weight: (N, K), or (K, N) for Conv1D."""
        delta = (self.lora_B[name].weight.float() @ self.lora_A[name].weight.float()) * self.scaling[name]
        return delta.t() if self.fan_in_fan_out else delta

    def merge(self, names: list[str]) -> None:
        """Fold adapters `names` into the base weight (computed in fp32 from the original weight, then cast)."""
        new = [n for n in names if n not in self.merged_adapters]
        if new:
            self._set_merged(self.merged_adapters + new)

    def unmerge(self) -> None:
        """Restore the exact original base weight."""
        if self.merged_adapters:
            self._set_merged([])

    def _set_merged(self, names: list[str]) -> None:
        w = self.base_layer.weight
        with torch.no_grad():
            if not names:
                if self._orig_weight is not None:
                    w.copy_(self._orig_weight)
                self._orig_weight = None
            else:
                if self._orig_weight is None:
                    self._orig_weight = w.detach().clone()
                orig = self._orig_weight.float()
                total = orig
                for n in names:
                    delta = self.delta_weight(n).to(total.device)
                    if n in self.lora_magnitude_vector:
                        # PEFT: W <- c * (W + delta), c = m / ||W_orig + delta|| (rows of the (N, K) weight)
                        dim = 0 if self.fan_in_fan_out else 1
                        norm = torch.linalg.vector_norm(orig + delta, dim=dim, keepdim=True)
                        m = self.lora_magnitude_vector[n].weight.float().to(total.device)
                        total = (m.view_as(norm) / norm) * (total + delta)
                    else:
                        total = total + delta
                if not torch.isfinite(total).all():
                    raise ValueError(f"merging adapters {names} gives non-finite weights: an adapter holds NaN/inf")
                w.copy_(total.to(w.dtype))
        self.merged_adapters = list(names)


@register
class LoraMethod(LayerMethod):
    """LoRA on the linear layers named by `target_modules` (default: the family's attention projections)."""

    peft_type = "LORA"
    layer_cls = LoraLayer
    supports_mixed_batch = True  # AdapterModel routes adapter_names= here even inside disable_adapter()

    def default_targets(self, am: AdapterModel, config: AdapterConfig) -> list[str] | str:
        model_type = getattr(getattr(am.base_model, "config", None), "model_type", None)
        return default_targets(LORA_TARGETS, model_type, "LoRA")

    def add(self, am: AdapterModel, name: str, config: AdapterConfig) -> None:
        super().add(am, name, config)
        layers = [layer for _, layer in self.layers(am) if name in layer.adapter_names]
        conv = any(layer.fan_in_fan_out for layer in layers)
        if conv and not config.fan_in_fan_out:
            warnings.warn(
                "the LoRA targets include transformers Conv1D layers (weight stored (in, out)): "
                "setting fan_in_fan_out=True in the adapter config, as PEFT does",
                UserWarning,
                stacklevel=3,
            )
            config.fan_in_fan_out = True
        elif not conv and config.fan_in_fan_out:
            warnings.warn(
                "fan_in_fan_out=True but the LoRA targets are nn.Linear layers: setting it to False",
                UserWarning,
                stacklevel=3,
            )
            config.fan_in_fan_out = False

    # -- trainable biases (bias="all" | "lora_only"), as PEFT: they train and are saved with the adapter
    def _bias_params(self, am: AdapterModel, name: str) -> dict[str, nn.Parameter]:
        """model path -> base bias parameter that adapter `name`'s `bias` setting makes trainable."""
        bias = getattr(am.peft_config.get(name), "bias", "none")
        if bias == "all":
            return {n: p for n, p in am.base_model.named_parameters() if n == "bias" or n.endswith(".bias")}
        if bias == "lora_only":
            return {
                f"{path}.base_layer.bias": layer.base_layer.bias
                for path, layer in self.layers(am)
                if layer.base_layer.bias is not None
            }
        return {}

    def parameters(self, am: AdapterModel, name: str) -> Iterator[nn.Parameter]:
        """Adapter `name`'s lora_A / lora_B weights, plus the base biases its `bias` setting trains."""
        yield from super().parameters(am, name)
        yield from self._bias_params(am, name).values()

    def state_dict(self, am: AdapterModel, name: str) -> dict[str, torch.Tensor]:
        # PEFT saves DoRA's magnitude as `<target>.lora_magnitude_vector` (no ".weight": its pre-0.12 layout)
        out = {_DORA_RE.sub(".lora_magnitude_vector", k): v for k, v in super().state_dict(am, name).items()}
        for path, p in self._bias_params(am, name).items():
            out[PEFT_PREFIX + path] = p.detach()
        return out

    def load_state_dict(self, am: AdapterModel, name: str, state: dict[str, torch.Tensor]) -> None:
        state = {k + ".weight" if k.endswith(".lora_magnitude_vector") else k: v for k, v in state.items()}
        super().load_state_dict(am, name, state)

    def load_extra(self, am: AdapterModel, key: str, tensor: torch.Tensor) -> None:
        """Base biases saved with bias="all" / "lora_only" (by us or PEFT) are copied into the base model."""
        path = key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else None
        if path is None or not (path == "bias" or path.endswith(".bias")):
            super().load_extra(am, key, tensor)
            return
        try:
            p = am.base_model.get_parameter(path)
        except AttributeError:
            raise ValueError(
                f"the checkpoint has bias {key!r} but the model has no parameter {path!r}: "
                "was the adapter saved for another base model?"
            ) from None
        if p.shape != tensor.shape:
            raise ValueError(
                f"{key} has shape {tuple(tensor.shape)} in the checkpoint but the model expects "
                f"{tuple(p.shape)}: was the adapter saved for another base model?"
            )
        with torch.no_grad():
            p.copy_(tensor.to(dtype=p.dtype, device=p.device))

    def merge(self, am: AdapterModel, names: list[str]) -> None:
        inactive = [n for n in names if n not in am.active_adapters]
        if inactive:
            raise ValueError(
                f"adapters {inactive} are not active; only active adapters can be merged: "
                f"call set_adapter({names!r}) first"
            )
        super().merge(am, names)

    # -- mixed batches: adapter_names=[...] one per sequence ("__base__": no adapter), inference only
    def forward(self, am: AdapterModel, *args: Any, **kwargs: Any) -> Any:
        names = kwargs.pop("adapter_names", None)
        if names is None:
            return super().forward(am, *args, **kwargs)
        with self.mixed_batch(am, names, _batch_size(args, kwargs)):
            return am.base_model(*args, **kwargs)

    def generate(self, am: AdapterModel, *args: Any, **kwargs: Any) -> Any:
        names = kwargs.pop("adapter_names", None)
        if names is None:
            return super().generate(am, *args, **kwargs)
        gc = kwargs.get("generation_config") or getattr(am.base_model, "generation_config", None)
        beams = kwargs.get("num_beams", getattr(gc, "num_beams", 1)) or 1
        returns = kwargs.get("num_return_sequences", getattr(gc, "num_return_sequences", 1)) or 1
        with self.mixed_batch(am, names, _batch_size(args, kwargs), expand=max(int(beams), int(returns))):
            return am.base_model.generate(*args, **kwargs)

    @contextlib.contextmanager
    def mixed_batch(self, am: AdapterModel, adapter_names: Sequence[str], batch: int | None = None,
                    expand: int = 1) -> Iterator[MixedBatch]:
        """Inside the block every LoraLayer gives sequence b the adapter adapter_names[b] ("__base__": none).

        batch: the number of input sequences, checked against the names when known; expand: how many rows
        generate() makes of each input (num_beams / num_return_sequences): each name is repeated that often.
        Errors: training mode, a name that is not a string, an unknown adapter, a wrong number of names, a
        merged adapter.
        """
        if isinstance(adapter_names, str) or not isinstance(adapter_names, Sequence):
            raise TypeError(f"adapter_names must be a list of adapter names, one per sequence, got "
                            f"{type(adapter_names).__name__}")
        names = list(adapter_names)
        bad = [n for n in names if not isinstance(n, str)]
        if bad:
            raise TypeError(f"adapter_names holds {bad[0]!r} ({type(bad[0]).__name__}): use adapter names "
                            f"(strings), or {BASE_ADAPTER!r} for no adapter")
        if am.training:
            raise ValueError("adapter_names (a mixed-adapter batch) is for inference: call model.eval() first")
        order = tuple(n for n, c in am.peft_config.items() if c.peft_type == self.peft_type)
        unknown = sorted({n for n in names if n != BASE_ADAPTER and n not in order})
        if unknown:
            raise ValueError(f"unknown adapter(s) {unknown} in adapter_names: this model has LoRA adapters "
                             f"{list(order)}; use {BASE_ADAPTER!r} for no adapter")
        if batch is not None and len(names) != batch:
            raise ValueError(f"adapter_names has {len(names)} names but the batch has {batch} sequences: pass one "
                             f"name per sequence ({BASE_ADAPTER!r} for no adapter)")
        dora = sorted({n for n in names if n != BASE_ADAPTER and getattr(am.peft_config[n], "use_dora", False)})
        if dora:
            raise ValueError(f"adapter_names names DoRA adapter(s) {dora}: mixed-adapter batches do not support DoRA "
                             "(PEFT refuses them too); run DoRA adapters with set_adapter(...) instead")
        layers = [layer for _, layer in self.layers(am)]
        merged = sorted({n for layer in layers for n in layer.merged_adapters})
        if merged:
            raise ValueError(f"adapters {merged} are merged into the base weights: a mixed batch (adapter_names) "
                             "needs unmerged adapters; call model.unmerge_adapter() first")
        if not am.active_adapters:  # inside disable_adapter(): the base model for every sequence, as PEFT
            names = [BASE_ADAPTER] * len(names)
        expand = max(1, int(expand))
        names = [n for n in names for _ in range(expand)]
        slot = {n: i for i, n in enumerate(order)}
        device = next((p.device for p in am.base_model.parameters()), torch.device("cpu"))
        seq_idx = torch.tensor([slot.get(n, -1) for n in names], dtype=torch.long).to(device)
        mixed = MixedBatch(order, seq_idx, tuple(names), all(n == BASE_ADAPTER for n in names))
        saved = [layer._mixed for layer in layers]
        for layer in layers:
            layer._mixed = mixed
        try:
            yield mixed
        finally:
            for layer, old in zip(layers, saved, strict=True):
                layer._mixed = old


def _batch_size(args: tuple, kwargs: dict) -> int | None:
    """Number of sequences of a model call: from input_ids / inputs_embeds (keyword or first positional)."""
    for t in (kwargs.get("input_ids"), kwargs.get("inputs_embeds"), args[0] if args else None):
        if isinstance(t, torch.Tensor) and t.dim() >= 1:
            return int(t.shape[0]) if t.dim() >= 2 else 1
    return None
