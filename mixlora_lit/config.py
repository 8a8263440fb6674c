"""`MixLoraConfig`: the adapter's hyperparameters, stored with the reference key names.

The JSON written by `to_dict()` is the `adapter_config.json` of a saved adapter. Key names
follow the reference MixLoRA package so the two can exchange files; the few keys the
reference does not know (`expert_capacity`, `router_z_loss_coef`) only matter for
`mixlora-switch` and are dropped on export to the reference format.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any
from .errors import UserError, MissingFileError

ROUTING_STRATEGIES = ("mixlora", "mixlora-switch")
ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
FFN_TARGETS = ("gate_proj", "up_proj", "down_proj")
ALL_TARGETS = ATTENTION_TARGETS + FFN_TARGETS
CONFIG_NAME = "adapter_config.json"


@dataclass
class ExpertLoraConfig:
    """Optional separate LoRA hyperparameters for the FFN experts (reference key `expert_lora`)."""

    r: int
    lora_alpha: float
    lora_dropout: float = 0.05


# Router defaults per routing strategy (the reference code's): top-k routers start near uniform
# with no jitter; switch routers start from a wide init with input jitter.
ROUTER_DEFAULTS = {
    "mixlora": {"top_k": 2, "router_init_range": 0.02, "jitter_noise": 0.0},
    "mixlora-switch": {"top_k": 1, "router_init_range": 1.0, "jitter_noise": 0.01},
}


@dataclass
class MixLoraConfig:
    """MixLoRA's hyperparameters; every default lives here.

    Args:
        r, lora_alpha, lora_dropout: LoRA rank (the paper's 16), alpha (32) (scaling alpha/r, or alpha/sqrt(r) with
            `use_rslora`) and input dropout, for the attention LoRAs and (unless `expert_lora`) the experts.
        target_modules: projections that get adapters: attention `q/k/v/o_proj` (one LoRA each) and
            FFN `gate/up/down_proj` (one LoRA per expert); at least one FFN projection.
        routing_strategy: `mixlora` (top-k softmax router) or `mixlora-switch` (top-1 with capacity).
        num_experts: experts per FFN.
        top_k: experts per token; None gives the strategy's default (2 for `mixlora`, 1 for switch).
        router_aux_loss_coef: weight of the load-balance loss (the reference code's 0.001; the
            paper's Table 9 finds 1e-3 best).
        router_init_range: std of the router's normal init; None gives 0.02 (`mixlora`) or 1.0 (switch).
        jitter_noise: multiply the router input by U(1-eps, 1+eps) in training; None gives 0.0
            (`mixlora`) or 0.01 (switch).
        use_dora, use_rslora: DoRA adapters (MixDoRA experts) and rank-stabilised scaling.
        expert_capacity: switch routing only: tokens an expert takes per sequence; the rest use the frozen FFN.
        router_z_loss_coef: switch routing only: weight of the router z-loss.
        expert_lora: separate r/alpha/dropout for the experts (reference key `expert_lora`).
        act_fn: FFN activation name, filled from the base model when None.
        base_model_name_or_path: filled from the base model when None.
    """

    r: int = 16
    lora_alpha: float = 32
    lora_dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(ALL_TARGETS))
    routing_strategy: str = "mixlora"
    num_experts: int = 8
    top_k: int | None = None
    router_aux_loss_coef: float = 0.001
    router_init_range: float | None = None
    jitter_noise: float | None = None
    use_dora: bool = False
    use_rslora: bool = False
    expert_capacity: int = 32
    router_z_loss_coef: float = 0.001
    expert_lora: ExpertLoraConfig | None = None
    act_fn: str | None = None
    base_model_name_or_path: str | None = None
    peft_type: str = "MIXLORA"
    task_type: str = "CAUSAL_LM"
    bias: str = "none"

    def __post_init__(self) -> None:
        if isinstance(self.expert_lora, dict):
            self.expert_lora = ExpertLoraConfig(**self.expert_lora)
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
        self.target_modules = list(self.target_modules)
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        def bad(name: str, value: Any, allowed: str) -> UserError:
            return UserError(f"MixLoraConfig.{name}={value!r} is invalid: expected {allowed}")

        _check_int(self.r, "r", 1, bad)
        if not self.lora_alpha > 0:
            raise bad("lora_alpha", self.lora_alpha, "a number > 0")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise bad("lora_dropout", self.lora_dropout, "a probability in [0, 1)")
        if self.routing_strategy not in ROUTING_STRATEGIES:
            raise bad("routing_strategy", self.routing_strategy, f"one of {list(ROUTING_STRATEGIES)}")
        _check_int(self.num_experts, "num_experts", 1, bad)
        for name, default in ROUTER_DEFAULTS[self.routing_strategy].items():
            if getattr(self, name) is None:
                setattr(self, name, default)
        _check_int(self.top_k, "top_k", 1, bad)
        if self.routing_strategy == "mixlora-switch":
            if self.top_k != 1:
                raise bad("top_k", self.top_k, "1 for routing_strategy 'mixlora-switch' (switch routing is top-1)")
            _check_int(self.expert_capacity, "expert_capacity", 1, bad)
        if self.top_k > self.num_experts:
            raise bad("top_k", self.top_k, f"an integer in [1, num_experts={self.num_experts}]")
        for name in ("router_aux_loss_coef", "router_z_loss_coef", "router_init_range", "jitter_noise"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value >= 0):
                raise bad(name, value, "a number >= 0")
        if not 0.0 <= self.jitter_noise < 1.0:
            raise bad("jitter_noise", self.jitter_noise, "a number in [0, 1)")
        unknown = [t for t in self.target_modules if t not in ALL_TARGETS]
        if unknown or not self.target_modules:
            raise bad("target_modules", self.target_modules, f"a non-empty subset of {list(ALL_TARGETS)}")
        if not any(t in FFN_TARGETS for t in self.target_modules):
            raise bad("target_modules", self.target_modules,
                      f"at least one FFN module of {list(FFN_TARGETS)} (the experts live there)")
        if self.expert_lora is not None:
            _check_int(self.expert_lora.r, "expert_lora.r", 1, bad)
            if not self.expert_lora.lora_alpha > 0:
                raise bad("expert_lora.lora_alpha", self.expert_lora.lora_alpha, "a number > 0")
            if not 0.0 <= self.expert_lora.lora_dropout < 1.0:
                raise bad("expert_lora.lora_dropout", self.expert_lora.lora_dropout, "a probability in [0, 1)")
        if self.peft_type != "MIXLORA":
            raise bad("peft_type", self.peft_type, "'MIXLORA'")
        if self.bias != "none":
            raise bad("bias", self.bias, "'none' (bias adapters are not supported)")

    # ------------------------------------------------------------------ derived values
    @property
    def attention_targets(self) -> list[str]:
        return [t for t in ATTENTION_TARGETS if t in self.target_modules]

    @property
    def ffn_targets(self) -> list[str]:
        return [t for t in FFN_TARGETS if t in self.target_modules]

    def expert_hparams(self) -> tuple[int, float, float]:
        """(r, alpha, dropout) of the expert LoRAs."""
        if self.expert_lora is not None:
            return self.expert_lora.r, self.expert_lora.lora_alpha, self.expert_lora.lora_dropout
        return self.r, self.lora_alpha, self.lora_dropout

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if self.expert_lora is None:
            out.pop("expert_lora")
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "MixLoraConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        # Keys the reference writes that carry no meaning here.
        ignored = {"router_loss", "lora_init", "auto_mapping", "revision", "inference_mode"}
        unknown = sorted(set(data) - known - ignored)
        if unknown:
            raise UserError(
                f"{source}: unknown MixLoRA config key(s) {unknown}; known keys: {sorted(known)}"
            )
        target_modules = data.get("target_modules")
        if isinstance(target_modules, dict):  # the reference also accepts {name: bool}
            data = dict(data, target_modules=[k for k, v in target_modules.items() if v])
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, CONFIG_NAME), "w", encoding="utf8") as fh:
            fh.write(self.to_json_string())

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "MixLoraConfig":
        path = os.path.join(directory, CONFIG_NAME)
        if not os.path.isfile(path):
            raise MissingFileError(f"no {CONFIG_NAME} in adapter directory {directory}")
        with open(path, encoding="utf8") as fh:
            try:
                data = json.load(fh)
            except json.JSONDecodeError as err:
                raise UserError(f"{path} is not valid JSON: {err}") from err
        return cls.from_dict(data, source=path)


def _check_int(value: Any, name: str, minimum: int, bad) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise bad(name, value, f"an integer >= {minimum}")
