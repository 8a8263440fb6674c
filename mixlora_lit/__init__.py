"""mixlora-lit: MixLoRA (sparse mixture of LoRA experts in the FFN of a frozen LLM).

The model layer (this package's top-level modules) is pure PyTorch + transformers and imports
nothing from Lightning. The public names below load on first use, so that torch-free parts
(`mixlora_lit.runs`, the report generator) import without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "MixLoraConfig": "config",
    "MixLoraModel": "model",
    "get_mixlora_model": "model",
    "MixLoraMoeFFN": "moe",
    "set_execution_path": "moe",
    "LoraAdapter": "lora",
    "LoraLinear": "lora",
    "TopKRouter": "routers",
    "SwitchRouter": "routers",
    "load_balance_loss": "losses",
    "router_z_loss": "losses",
}

__all__ = list(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
