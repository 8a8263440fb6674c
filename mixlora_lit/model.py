"""Model surgery and the PEFT-style wrapper.

`get_mixlora_model(base, config)` freezes a transformers causal LM, puts a `LoraLinear` on the
targeted attention projections and replaces every decoder MLP by a `MixLoraMoeFFN`, in place,
and returns a `MixLoraModel`. The wrapper forwards to the base model (so `.logits`, `generate()`
and lm-eval's `HFLM` work as with any causal LM) and adds the router's auxiliary loss.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import MoeCausalLMOutputWithPast

from . import adapter_io
from .base_models import fold_lm_head_inputs
from .config import FFN_TARGETS, MixLoraConfig
from .lora import LoraLinear
from .losses import load_balance_loss, router_z_loss
from .moe import MixLoraMoeFFN, set_execution_path, set_recompute_experts, set_sync_free
from .errors import UserError

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "gemma", "gemma2", "gemma3", "gemma3_text")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder blocks of a transformers causal LM."""
    candidates = []
    get_decoder = getattr(model, "get_decoder", None)
    if callable(get_decoder):
        try:
            candidates.append(get_decoder())
        except Exception:  # noqa: BLE001 - some models do not implement it
            pass
    candidates += [getattr(model, "model", None), getattr(getattr(model, "model", None), "language_model", None)]
    for candidate in candidates:
        layers = getattr(candidate, "layers", None)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return layers
    raise UserError(f"{type(model).__name__}: cannot find its decoder layers (expected model.layers)")


def _model_type(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", type(model).__name__)


def _activation_name(model: nn.Module) -> str | None:
    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text_config, "hidden_activation", None) or getattr(text_config, "hidden_act", None)


def _check_structure(model: nn.Module, config: MixLoraConfig, layers: nn.ModuleList) -> None:
    model_type = _model_type(model)
    first = layers[0]
    attn, mlp = getattr(first, "self_attn", None), getattr(first, "mlp", None)
    if attn is None or mlp is None:
        raise UserError(f"model type {model_type!r} is not supported: decoder layers need `self_attn` and `mlp`; "
                        f"supported types: {list(SUPPORTED_MODEL_TYPES)}")
    if isinstance(mlp, MixLoraMoeFFN):
        raise ValueError("this model already has MixLoRA adapters injected")
    present = [n for n in config.attention_targets if isinstance(getattr(attn, n, None), nn.Linear)]
    present += [n for n in FFN_TARGETS if isinstance(getattr(mlp, n, None), nn.Linear)]
    missing = [t for t in config.target_modules if t not in present]
    if missing:
        raise UserError(f"MixLoraConfig.target_modules={config.target_modules} is invalid for model type "
                        f"{model_type!r}: {missing} not found as nn.Linear in its decoder layers; "
                        f"allowed here: {present}")
    if not all(isinstance(getattr(mlp, n, None), nn.Linear) for n in FFN_TARGETS):
        raise UserError(f"model type {model_type!r} has no gated gate/up/down MLP; "
                        f"supported types: {list(SUPPORTED_MODEL_TYPES)}")
    if model_type not in SUPPORTED_MODEL_TYPES:
        log.warning("model type %r is not in the tested list %s; its MLP has the gated shape, proceeding",
                    model_type, SUPPORTED_MODEL_TYPES)


def get_mixlora_model(base_model: nn.Module, config: MixLoraConfig,
                      adapter_dtype: torch.dtype = torch.float32) -> "MixLoraModel":
    """Freeze `base_model` and inject MixLoRA adapters in place (PEFT's `get_peft_model`)."""
    layers = decoder_layers(base_model)
    _check_structure(base_model, config, layers)
    if config.act_fn is None:
        config.act_fn = _activation_name(base_model)
    if config.base_model_name_or_path is None:
        config.base_model_name_or_path = getattr(base_model.config, "_name_or_path", None) or None
    for param in base_model.parameters():
        param.requires_grad_(False)
    fold_lm_head_inputs(base_model)  # a frozen head would copy its weight in generation's first step
    for layer in layers:
        attn = layer.self_attn
        for name in config.attention_targets:
            setattr(attn, name, LoraLinear(getattr(attn, name), config.r, config.lora_alpha, config.lora_dropout,
                                           config.use_rslora, config.use_dora, adapter_dtype))
        layer.mlp = MixLoraMoeFFN(layer.mlp, config, adapter_dtype)
    model = MixLoraModel(base_model, config)
    model.train(base_model.training)  # new modules start in training mode; follow the base's mode
    return model


class MixLoraModel(nn.Module):
    """A causal LM with MixLoRA adapters: forward adds the router auxiliary loss to the LM loss."""

    def __init__(self, base_model: nn.Module, config: MixLoraConfig) -> None:
        super().__init__()
        self.base_model = base_model
        self.mixlora_config = config
        self._moe_layers = [m for m in base_model.modules() if isinstance(m, MixLoraMoeFFN)]

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    # ------------------------------------------------------------------ structure
    def moe_layers(self) -> list[MixLoraMoeFFN]:
        return list(self._moe_layers)

    def set_execution_path(self, path: str) -> None:
        """'fused' (default) or 'reference' (each expert runs its whole FFN, the paper's formula)."""
        set_execution_path(self.base_model, path)

    def set_recompute_experts(self, enabled: bool = True) -> None:
        """Keep fewer activations: recompute each layer's experts during backward (training only)."""
        set_recompute_experts(self.base_model, enabled)

    def set_sync_free(self, enabled: bool = True, bucket: int = 1) -> None:
        """For GPUs: routing layouts built without reading the device back (see `moe.set_sync_free`)."""
        set_sync_free(self.base_model, enabled, bucket)

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **kwargs: Any) -> MoeCausalLMOutputWithPast:
        out = self.base_model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
        aux = self.aux_loss(attention_mask)
        loss = out.loss + aux if out.loss is not None else None
        routings = [m.last_routing for m in self.moe_layers()]
        return MoeCausalLMOutputWithPast(
            loss=loss, aux_loss=aux, logits=out.logits, past_key_values=out.past_key_values,
            hidden_states=out.hidden_states, attentions=out.attentions,
            router_logits=tuple(r.logits for r in routings if r is not None),
        )

    def generate(self, *args: Any, **kwargs: Any):
        return self.base_model.generate(*args, **kwargs)

    def _token_mask(self, attention_mask: torch.Tensor | None, num_tokens: int) -> torch.Tensor | None:
        """The attention mask restricted to the tokens of the last forward (drops cached positions)."""
        if attention_mask is None:
            return None
        mask = attention_mask
        if mask.dim() == 2 and mask.numel() != num_tokens:
            mask = mask[:, -(num_tokens // mask.shape[0]):]
        return mask if mask.numel() == num_tokens else None

    def aux_loss(self, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """coef * load-balance loss (+ z-loss for switch routing) over all layers of the last forward."""
        routings = [m.last_routing for m in self.moe_layers()]
        if not routings or any(r is None for r in routings):
            raise RuntimeError("aux_loss() needs a forward pass first")
        logits = [r.logits for r in routings]
        mask = self._token_mask(attention_mask, logits[0].shape[0])
        cfg = self.mixlora_config
        loss = cfg.router_aux_loss_coef * load_balance_loss(logits, cfg.top_k, mask)
        if cfg.routing_strategy == "mixlora-switch" and cfg.router_z_loss_coef > 0:
            loss = loss + cfg.router_z_loss_coef * router_z_loss(logits, mask)
        return loss

    # ------------------------------------------------------------------ statistics
    @torch.no_grad()
    def routing_statistics(self, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens per expert per layer in the last forward, shape [layers, experts] (int64).

        Pass that forward's `attention_mask` to leave padding tokens out; without it every token
        counts. Tokens a switch router sent past an expert's capacity to the frozen FFN are not
        counted: each counted token contributes `top_k` counts.
        """
        layers = self.moe_layers()
        if any(m.last_routing is None for m in layers):
            raise RuntimeError("routing_statistics() needs a forward pass first")
        num_tokens = layers[0].last_routing.experts.shape[0]
        mask = self._token_mask(attention_mask, num_tokens)
        if attention_mask is not None and mask is None:
            raise ValueError(f"routing_statistics: attention_mask of shape {tuple(attention_mask.shape)} does not "
                             f"match the last forward's {num_tokens} tokens")
        rows = []
        for module in layers:
            experts = module.last_routing.experts
            chosen = (experts if mask is None else experts[mask.reshape(-1).bool()]).reshape(-1)
            counts = torch.bincount(chosen, minlength=module.num_experts + 1)[: module.num_experts]
            rows.append(counts)
        return torch.stack(rows).cpu()

    # ------------------------------------------------------------------ parameters
    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Adapter tensors under the reference key names (`mixlora.layers.{l}....`)."""
        return adapter_io.adapter_state_dict(self.base_model)

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / total:.4f}")

    # ------------------------------------------------------------------ merging
    def merge_adapter(self) -> None:
        for module in self.base_model.modules():
            if isinstance(module, LoraLinear):
                module.merge()

    def unmerge_adapter(self) -> None:
        for module in self.base_model.modules():
            if isinstance(module, LoraLinear):
                module.unmerge()

    def merge_and_unload(self) -> nn.Module:
        """Merge the attention LoRAs into their base weights and return the base model.

        The MoE FFNs stay (there is no single dense FFN to merge sparse experts into).
        """
        for parent in list(self.base_model.modules()):
            for child_name, child in list(parent.named_children()):
                if isinstance(child, LoraLinear):
                    child.merge()
                    setattr(parent, child_name, child.base_layer)
        return self.base_model

    # ------------------------------------------------------------------ files
    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """`adapter_config.json` + `adapter_model.safetensors` (PEFT's layout, the reference key names)."""
        adapter_io.save_adapter(self.adapter_state_dict(), self.mixlora_config, directory)

    def export_reference(self, directory: str | os.PathLike) -> None:
        """`adapter_config.json` + `adapter_model.bin` for the reference `mixlora` package."""
        adapter_io.export_reference(self.adapter_state_dict(), self.mixlora_config, directory)

    @classmethod
    def from_pretrained(cls, base_model: nn.Module, directory: str | os.PathLike,
                        adapter_dtype: torch.dtype = torch.float32, is_trainable: bool = False) -> "MixLoraModel":
        """Inject the saved adapter's config into `base_model` and load its weights (safetensors or the
        reference `.bin`). Frozen and in eval mode unless `is_trainable`."""
        config = MixLoraConfig.from_pretrained(directory)
        weights, path = adapter_io.read_adapter_weights(directory)
        model = get_mixlora_model(base_model, config, adapter_dtype=adapter_dtype)
        adapter_io.copy_adapter_weights(model.adapter_state_dict(), weights, path, config.base_model_name_or_path)
        if not is_trainable:
            for param in model.parameters():
                param.requires_grad_(False)
            model.eval()
        return model
