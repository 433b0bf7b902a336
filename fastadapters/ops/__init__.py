"""Functional ops: validated entry points that run the reference or a fused kernel, per fastadapters.backend.

    lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p=0.0)          x: (..., K) -> (..., N)
    bottleneck_adapter(h, down_weight, up_weight, activation="tanh", scaling=1.0, residual=None)
    prefix_attention(q, k, v, prefix_k, prefix_v, causal=True, scale=None, key_padding_mask=None)
    multi_lora_delta(x, lora_A_stack, lora_B_stack, scalings, token_adapter_idx)   one adapter per token (serving)

Kernels register per op and backend in fastadapters.ops._registry.
"""

from ._registry import KernelUnavailableError, register_kernel, registered_backends
from ._utils import dropout_mask
from .bottleneck import bottleneck_adapter
from .lora import lora_linear
from .multi_lora import multi_lora_delta
from .prefix_attention import prefix_attention

__all__ = [
    "KernelUnavailableError",
    "bottleneck_adapter",
    "dropout_mask",
    "lora_linear",
    "multi_lora_delta",
    "prefix_attention",
    "register_kernel",
    "registered_backends",
]
