"""LoRA and DoRA baselines through HF PEFT, and parameter-matched ranks.

The paper compares MixLoRA (r=16, 8 experts) with LoRA/DoRA at r=80: the rank whose trainable
parameter count matches. `matched_lora_rank` computes that rank from the base model's layer
shapes (a model built on the meta device is enough, no weights needed).
"""

from __future__ import annotations

from torch import nn

from .base_models import fold_lm_head_inputs
from .config import ALL_TARGETS, MixLoraConfig
from .model import decoder_layers


def _targeted_linears(base_model: nn.Module, targets) -> list[nn.Linear]:
    out = []
    for layer in decoder_layers(base_model):
        for parent in (layer.self_attn, layer.mlp):
            for name in targets:
                module = getattr(parent, name, None)
                module = getattr(module, "base_layer", module)
                if isinstance(module, nn.Linear):
                    out.append(module)
    return out


def lora_parameter_count(base_model: nn.Module, r: int, target_modules=ALL_TARGETS, use_dora: bool = False) -> int:
    """Trainable parameters of a plain LoRA (PEFT) with rank r on `target_modules` of every layer."""
    return sum(r * (m.in_features + m.out_features) + (m.out_features if use_dora else 0)
               for m in _targeted_linears(base_model, target_modules))


def mixlora_parameter_count(base_model: nn.Module, config: MixLoraConfig) -> int:
    """Trainable parameters MixLoRA adds: attention LoRAs, E expert LoRAs per FFN projection, routers."""
    attention = lora_parameter_count(base_model, config.r, config.attention_targets, config.use_dora)
    r_e = config.expert_hparams()[0]
    experts = config.num_experts * lora_parameter_count(base_model, r_e, config.ffn_targets, config.use_dora)
    layers = decoder_layers(base_model)
    hidden = layers[0].mlp.gate_proj
    hidden = getattr(hidden, "base_layer", hidden).in_features
    routers = len(layers) * config.num_experts * hidden
    return attention + experts + routers


def matched_lora_rank(base_model: nn.Module, config: MixLoraConfig, target_modules=None,
                      multiple_of: int = 1) -> int:
    """The LoRA rank (a multiple of `multiple_of`) whose parameter count is closest to MixLoRA's.

    For LLaMA-2-7B and r=16 x 8 experts this is 81 (80 with multiple_of=16, the paper's choice).
    """
    targets = tuple(target_modules or config.target_modules)
    goal = mixlora_parameter_count(base_model, config)
    per_rank = lora_parameter_count(base_model, 1, targets, config.use_dora) - (
        lora_parameter_count(base_model, 0, targets, config.use_dora))
    base = lora_parameter_count(base_model, 0, targets, config.use_dora)
    best = max(multiple_of, round((goal - base) / per_rank / multiple_of) * multiple_of)
    return int(best)


def get_lora_model(base_model: nn.Module, r: int, lora_alpha: float, lora_dropout: float = 0.05,
                   target_modules=ALL_TARGETS, use_dora: bool = False, use_rslora: bool = False):
    """A PEFT LoRA (or DoRA) model on the same projections MixLoRA targets."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=list(target_modules),
                        use_dora=use_dora, use_rslora=use_rslora, bias="none", task_type="CAUSAL_LM")
    return get_peft_model(fold_lm_head_inputs(base_model), config)  # as MixLoRA's (get_mixlora_model)
