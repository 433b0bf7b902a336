"""fastadapters: the LLM-Adapters family (LoRA, bottleneck, prefix, prompt) as drop-in layers for transformers."""

from ._layout import ensure_kernels_package

ensure_kernels_package(__name__)

# the package's modules import fastadapters.kernels: after the folder is mapped (E402 on purpose)
from . import ops  # noqa: E402
from .backend import get_backend, use_backend  # noqa: E402
from .config import AdapterConfig, BottleneckConfig, LoraConfig, PrefixTuningConfig, PromptTuningConfig  # noqa: E402
from .model import AdapterModel, get_adapter_model  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "AdapterConfig", "AdapterModel", "BottleneckConfig", "LoraConfig", "PrefixTuningConfig", "PromptTuningConfig",
    "get_adapter_model", "get_backend", "ops", "use_backend",
]
