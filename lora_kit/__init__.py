"""lora_kit: small, fast, exact and safe LoRA adapters for Hugging Face transformers models.

Quick start::

    import lora_kit as lk
    lm = lk.inject(model, lk.LoraConfig(r=8, alpha=16))   # surgery in place
    lm.save_adapter("adapters/sst")                       # PEFT-format directory
    lm = lk.LoraModel.from_pretrained(fresh_model, "adapters/sst")
"""

from ._version import __version__
from .adapter_io import AdapterFiles, read_adapter
from .config import LoraConfig
from .errors import (
    AdapterFormatError,
    AdapterMismatchError,
    AdapterNameError,
    ConfigError,
    LoraKitError,
    MergedStateError,  # merging and stacking (issue 5)
    NonFiniteError,
    NoTargetsError,
    UnsupportedModuleError,
)
from .layers import LoraAdapter, LoRALinear
from .merge import MergeReport  # merging and stacking (issue 5)
from .model import AdapterRecord, LoraModel, ParameterSummary, inject
from .routing import Selection
from .stack import StackReport, stack  # merging and stacking (issue 5)
from .targets import presets

__all__ = [
    "AdapterFiles",
    "AdapterFormatError",
    "AdapterMismatchError",
    "AdapterNameError",
    "AdapterRecord",
    "ConfigError",
    "LoRALinear",
    "LoraAdapter",
    "LoraConfig",
    "LoraKitError",
    "LoraModel",
    "NoTargetsError",
    "NonFiniteError",
    "ParameterSummary",
    "Selection",
    "UnsupportedModuleError",
    "__version__",
    "inject",
    "presets",
    "read_adapter",
]
__all__ += ["MergeReport", "MergedStateError", "StackReport", "stack"]  # issue 5
