"""`mixlora-lit eval`: evaluate a saved adapter (MixLoRA or PEFT) or the bare base model."""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..adapter_io import verify_checksums
from ..base_models import load_base_model
from ..errors import MissingFileError, UserError
from .harness import check_lm_eval_tasks, format_table, label_token_accuracy, lm_eval_scores, run_lm_eval


def load_with_adapter(base: str, adapter: str | None, dtype: str = "fp32", allow_base_mismatch: bool = False):
    """(model, tokenizer); the adapter is checked against the base before anything is evaluated."""
    model, tokenizer = load_base_model(base, dtype=dtype)
    if adapter is None:
        return model, tokenizer
    config_path = Path(adapter) / "adapter_config.json"
    if not config_path.is_file():
        raise MissingFileError(f"no adapter_config.json in adapter directory {adapter}")
    verify_checksums(adapter)  # a weights file changed or cut short after saving is refused by name
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{config_path}: not valid JSON ({err.msg}, line {err.lineno})") from None
    named = config.get("base_model_name_or_path")
    if named and named != base and Path(named).resolve() != Path(base).resolve() and not allow_base_mismatch:
        raise UserError(f"adapter {adapter} was trained on base {named!r}, not {base!r}: refusing to evaluate "
                        f"(pass --allow-base-mismatch if the two are the same model)")
    if config.get("peft_type") == "MIXLORA":
        from ..model import MixLoraModel

        return MixLoraModel.from_pretrained(model, adapter), tokenizer  # raises on shape mismatch
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, adapter).eval(), tokenizer
    except RuntimeError as err:  # torch's size-mismatch message
        raise UserError(f"adapter {adapter} does not fit base {base!r}: {err}") from err
    except Exception as err:  # safetensors' own error types for a damaged file
        if "safetensor" in type(err).__name__.lower():
            raise UserError(f"cannot read adapter weights in {adapter}: {err}") from err
        raise


def evaluate_saved(base: str, adapter: str | None, tasks, limit: int | None = None, source: str = "local",
                   data_dir: str | None = None, out: str | None = None, dtype: str = "fp32", batch_size: int = 16,
                   protocols=("lm_eval", "label_token"), allow_base_mismatch: bool = False) -> dict:
    names = check_lm_eval_tasks(tasks)  # an unknown task is refused before loading anything
    model, tokenizer = load_with_adapter(base, adapter, dtype, allow_base_mismatch)
    started = time.perf_counter()
    report: dict = {"base": base, "adapter": adapter, "tasks": names, "limit": limit, "source": source,
                    "protocols": {"lm_eval": "lm-eval multiple-choice log-likelihood of each answer text "
                                             "(acc; acc_norm per character)",
                                  "label_token": "the paper's: next-token logits after the letter/label prompt, "
                                                 "restricted to the label tokens, argmax"}}
    lm_scores = paper = None
    if "lm_eval" in protocols:
        results = run_lm_eval(model, tokenizer, names, limit, source, data_dir, batch_size)
        lm_scores = lm_eval_scores(results)
        report["lm_eval"] = {"scores": lm_scores, "results": results.get("results"), "configs": results.get("configs")}
    if "label_token" in protocols:
        paper = label_token_accuracy(model, tokenizer, names, limit, data_dir, batch_size=batch_size)
        report["label_token"] = {"scores": paper}
    report["seconds"] = round(time.perf_counter() - started, 1)
    table = format_table(lm_scores, paper)
    report["table"] = table
    if out is None:
        stem = Path(base).name + (f"-{Path(adapter).parent.name}-{Path(adapter).name}" if adapter else "")
        out = f"runs/eval/{stem}.json"
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(report, indent=1, default=str))
    print(table)
    print(f"results: {out}")
    return report
