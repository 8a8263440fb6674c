"""Adapter files: PEFT-style safetensors, the reference `adapter_model.bin`, and the export to it.

Everything about adapter files lives here, the reference key names included; `model.py` calls
these functions and this module never imports the model. A saved adapter is
`adapter_config.json` + `adapter_model.safetensors` with the reference weight key names
(`mixlora.layers.{l}.self_attn.q_proj.lora_A.weight`, ...). Loading also reads the reference
`adapter_model.bin` (with `weights_only=True`, so no code runs). `export_reference` is the only
function in the project that writes pickle. Saved adapters are written atomically with a
`checksums.sha256`, which loading checks: a truncated or modified weights file is refused by name.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config import CONFIG_NAME, MixLoraConfig
from .errors import MissingFileError, UserError
from .files import sha256_file

log = logging.getLogger(__name__)

SAFETENSORS_NAME = "adapter_model.safetensors"
REFERENCE_WEIGHTS_NAME = "adapter_model.bin"
CHECKSUMS_NAME = "checksums.sha256"  # `sha256sum -c checksums.sha256` checks it too
# The reference package's config keys (mixlora 0.2.3 / moe-peft 2.0.2).
_REFERENCE_KEYS = ("bias", "peft_type", "task_type", "base_model_name_or_path", "r", "lora_alpha", "lora_dropout",
                   "target_modules", "routing_strategy", "num_experts", "top_k", "router_aux_loss_coef",
                   "router_init_range", "jitter_noise", "act_fn", "use_dora", "use_rslora")


_LAYER_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.(.+)$")
_ADAPTER_PARAM = re.compile(r"\.(lora_A|lora_B|lora_magnitude|moe_gate)\b")


def reference_key(name: str) -> str:
    """`model.layers.3.mlp.gate_proj.experts.0.lora_A.weight` -> `mixlora.layers.3.mlp....`"""
    match = _LAYER_KEY.search(name)
    if match is None:
        raise ValueError(f"adapter parameter {name!r} is not inside a decoder layer")
    return f"mixlora.layers.{match.group(1)}.{match.group(2)}"


def adapter_state_dict(base_model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors of an injected model, under the reference key names."""
    return {reference_key(name): tensor for name, tensor in base_model.state_dict().items()
            if _ADAPTER_PARAM.search(name)}


def _cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


def save_adapter(tensors: dict[str, torch.Tensor], config: MixLoraConfig, directory: str | os.PathLike) -> None:
    """`adapter_config.json` + `adapter_model.safetensors` (+ `checksums.sha256`), written atomically."""
    save_adapter_atomically(directory, lambda folder: write_adapter_files(tensors, config, folder))


def write_adapter_files(tensors: dict[str, torch.Tensor], config: MixLoraConfig, folder: Path) -> None:
    """The two adapter files, written plainly into `folder` (`save_adapter` makes it atomic)."""
    config.save_pretrained(folder)
    save_file(_cpu(tensors), str(folder / SAFETENSORS_NAME), metadata={"format": "pt", "peft_type": "MIXLORA"})


def save_adapter_atomically(directory: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Run `write(folder)` on a temporary folder beside `directory`, add `checksums.sha256` (sha256sum's
    format) for the files written, fsync them and move them into `directory` one rename each. A kill at
    any point leaves every file whole (old or new); the checksums are removed first and written last, so
    a file never sits beside a checksum that is not its own."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
    try:
        write(tmp)
        files = sorted(f.name for f in tmp.iterdir() if f.is_file())
        (tmp / CHECKSUMS_NAME).write_text("".join(f"{sha256_file(tmp / name)}  {name}\n" for name in files))
        for name in files + [CHECKSUMS_NAME]:
            with open(tmp / name, "rb") as fh:
                os.fsync(fh.fileno())
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CHECKSUMS_NAME).unlink(missing_ok=True)
        for name in files + [CHECKSUMS_NAME]:
            os.replace(tmp / name, directory / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def verify_checksums(directory: str | os.PathLike) -> None:
    """Check the files listed in `checksums.sha256` (when the adapter has one): a file changed or damaged
    after it was saved is refused with its name."""
    directory = Path(directory)
    listing = directory / CHECKSUMS_NAME
    if not listing.is_file():
        return
    for number, line in enumerate(listing.read_text().splitlines(), 1):
        if not line.strip():
            continue
        digest, _, name = line.partition("  ")
        path = directory / name
        if not path.is_file():
            raise MissingFileError(f"{path} is missing (listed in {listing} line {number})")
        if sha256_file(path) != digest:
            raise UserError(f"{path} does not match its sha256 in {listing}: it was changed, truncated or damaged "
                            f"after it was saved")


def read_adapter_weights(directory: str | os.PathLike) -> tuple[dict[str, torch.Tensor], Path]:
    directory = Path(directory)
    verify_checksums(directory)
    st, pt = directory / SAFETENSORS_NAME, directory / REFERENCE_WEIGHTS_NAME
    if st.is_file():
        try:
            return load_file(str(st)), st
        except Exception as err:  # safetensors raises its own error types
            raise UserError(f"cannot read adapter weights {st}: {err}") from err
    if pt.is_file():
        try:
            return torch.load(pt, map_location="cpu", weights_only=True), pt
        except Exception as err:
            raise UserError(f"cannot read adapter weights {pt} (loaded with weights_only=True): {err}") from err
    raise MissingFileError(f"no {SAFETENSORS_NAME} or {REFERENCE_WEIGHTS_NAME} in adapter directory {directory}")


def copy_adapter_weights(targets: dict[str, torch.Tensor], weights: dict[str, torch.Tensor], path: Path,
                         base_name: str | None = None) -> None:
    """Copy saved `weights` into a model's adapter tensors (`targets`, by reference key), after checking
    that both hold the same keys and shapes (else the adapter belongs to another base or shape)."""
    for key, target in targets.items():
        if key not in weights:
            raise UserError(f"{path} lacks adapter tensor {key!r} that this base model needs "
                            f"(the adapter was saved for a different base or configuration)")
        if tuple(weights[key].shape) != tuple(target.shape):
            raise UserError(f"adapter tensor {key!r} in {path} has shape {tuple(weights[key].shape)} but the base "
                            f"model expects {tuple(target.shape)}: this adapter was trained on a different base "
                            f"model (config says {base_name!r})")
    unexpected = sorted(set(weights) - set(targets))
    if unexpected:
        raise UserError(f"{path} has {len(unexpected)} tensor(s) this base model has no place for, first "
                        f"{unexpected[0]!r}: the adapter was saved for a different base (e.g. more layers)")
    with torch.no_grad():
        for key, target in targets.items():
            target.copy_(weights[key])


def export_reference(tensors: dict[str, torch.Tensor], config: MixLoraConfig, directory: str | os.PathLike) -> None:
    """Write `adapter_config.json` + `adapter_model.bin` readable by the reference `mixlora` package.

    Notes for users of the reference package: it refuses `lora_dropout == 0`, so a zero dropout is
    written as 1e-9 (numerically no dropout); it recomputes DoRA magnitudes from the weights
    instead of reading them; and its inference code only supports `routing_strategy: mixlora`.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg = config.to_dict()
    ref = {k: cfg[k] for k in _REFERENCE_KEYS}
    ref["lora_dropout"] = float(ref["lora_dropout"]) or 1e-9
    for key in ("router_aux_loss_coef", "router_init_range", "jitter_noise"):
        ref[key] = float(ref[key])
    if float(ref["lora_alpha"]).is_integer():
        ref["lora_alpha"] = int(ref["lora_alpha"])
    if config.expert_lora is not None:
        expert = dict(cfg["expert_lora"])
        expert["lora_dropout"] = float(expert["lora_dropout"]) or 1e-9
        ref["expert_lora"] = expert
    if config.routing_strategy == "mixlora-switch":
        ref["expert_capacity"] = cfg["expert_capacity"]
        ref["router_z_loss_coef"] = float(cfg["router_z_loss_coef"])
        log.warning("the reference inference package only loads routing_strategy 'mixlora'; moe-peft reads switch")
    if ref["base_model_name_or_path"] is None:
        ref["base_model_name_or_path"] = ""
    torch.save(_cpu(tensors), directory / REFERENCE_WEIGHTS_NAME)
    with open(directory / CONFIG_NAME, "w", encoding="utf8") as fh:
        json.dump(ref, fh, indent=2)
