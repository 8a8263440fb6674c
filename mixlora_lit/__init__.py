"""mixlora-lit: MixLoRA (sparse mixture of LoRA experts in the FFN of a frozen LLM).

The model layer (this package's top-level modules) is pure PyTorch + transformers and imports
nothing from Lightning.
"""

from .config import MixLoraConfig
from .losses import load_balance_loss, router_z_loss
from .lora import LoraAdapter, LoraLinear
from .model import MixLoraModel, get_mixlora_model
from .moe import MixLoraMoeFFN, set_execution_path
from .routers import SwitchRouter, TopKRouter

__all__ = [
    "MixLoraConfig",
    "MixLoraModel",
    "MixLoraMoeFFN",
    "LoraAdapter",
    "LoraLinear",
    "TopKRouter",
    "SwitchRouter",
    "get_mixlora_model",
    "load_balance_loss",
    "router_z_loss",
    "set_execution_path",
]
__version__ = "0.1.0"
