"""fastadapters: the LLM-Adapters family (LoRA, bottleneck, prefix, prompt) as drop-in layers for transformers."""

from ._layout import ensure_kernels_package

ensure_kernels_package(__name__)

from . import ops  # noqa: E402 (after the kernels folder is mapped)
from .backend import get_backend, use_backend
from .config import AdapterConfig, BottleneckConfig, LoraConfig, PrefixTuningConfig, PromptTuningConfig
from .model import AdapterModel, get_adapter_model

__version__ = "0.1.0"

__all__ = [
    "AdapterConfig", "AdapterModel", "BottleneckConfig", "LoraConfig", "PrefixTuningConfig", "PromptTuningConfig",
    "get_adapter_model", "get_backend", "ops", "use_backend",
]
