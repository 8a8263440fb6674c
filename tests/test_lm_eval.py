"""lm-eval-harness: local task YAMLs, scores on the real SmolLM2, the callback, `mixlora-lit eval`."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from mixlora_lit.evaluation.harness import LOCAL_TASKS_DIR, LM_EVAL_TASKS, run_lm_eval, task_manager


def test_local_task_yamls_load_and_match_the_prepared_test_split(prepared_data):
    from lm_eval.tasks import get_task_dict

    data_dir, manifest = prepared_data
    assert sorted(p.stem for p in LOCAL_TASKS_DIR.glob("*.yaml")) == sorted(LM_EVAL_TASKS)
    tasks = get_task_dict(list(LM_EVAL_TASKS), task_manager("local", data_dir))
    for name in LM_EVAL_TASKS:
        task = tasks[name]
        docs = list(task.test_docs())
        assert len(docs) == manifest["tasks"][name]["splits"]["test"]["count"], name
        doc = docs[0]
        choices = task.doc_to_choice(doc)
        target = task.doc_to_target(doc)
        assert isinstance(choices, list) and len(choices) >= 2
        if name != "winogrande":
            assert isinstance(target, int) and 0 <= target < len(choices)


def test_unknown_task_lists_the_available_ones():
    from mixlora_lit.evaluation.harness import check_lm_eval_tasks

    with pytest.raises(ValueError, match=r"unknown task 'mmlu'.*known tasks are"):
        check_lm_eval_tasks(["mmlu"])


@pytest.mark.slow
def test_smollm2_arc_easy_above_chance_and_loglikelihoods_match_a_hand_computation(smollm2_fp32, prepared_data):
    data_dir, _ = prepared_data
    model, tokenizer = smollm2_fp32
    results = run_lm_eval(model, tokenizer, ["arc_easy"], limit=100, data_dir=data_dir, log_samples=True,
                          batch_size=32)
    acc = results["results"]["arc_easy"]["acc,none"]
    assert results["n-samples"]["arc_easy"]["effective"] == 100
    assert acc > 0.4, acc  # chance is 0.25
    samples = sorted(results["samples"]["arc_easy"], key=lambda s: s["doc_id"])[:4]
    for sample in samples:
        ours = []
        for context, continuation in sample["arguments"]:
            ctx = tokenizer(context)["input_ids"]
            whole = tokenizer(context + continuation)["input_ids"]
            with torch.no_grad():
                logprobs = torch.log_softmax(model(input_ids=torch.tensor([whole])).logits[0].float(), -1)
            ours.append(sum(logprobs[i - 1, whole[i]].item() for i in range(len(ctx), len(whole))))
        theirs = [resp[0] for resp in sample["filtered_resps"]]
        assert ours == pytest.approx(theirs, abs=2e-3)
        assert max(range(len(ours)), key=ours.__getitem__) == max(range(len(theirs)), key=theirs.__getitem__)
        assert sample["acc"] == float(max(range(len(ours)), key=ours.__getitem__) == sample["target"])


def test_callback_logs_metrics_writes_json_and_leaves_training_mode(tiny_model_dir, prepared_data, tmp_path):
    from mixlora_lit.lightning.cli import run

    data_dir, _ = prepared_data
    callback = json.dumps([{"class_path": "mixlora_lit.lightning.callbacks.LmEvalCallback",
                            "init_args": {"tasks": ["arc_easy", "boolq"], "limit": 5, "every_n_val_epochs": 1}}])
    cli = run(["fit", f"--model.base={tiny_model_dir}", "--model.base_dtype=fp32", "--model.adapter.r=4",
               "--model.adapter.num_experts=4", f"--data.data_dir={data_dir}", "--data.train_cap=16",
               "--data.dev_cap=4", "--data.batch_size=4", "--trainer.max_steps=2", "--trainer.val_check_interval=1",
               "--trainer.num_sanity_val_steps=0", "--trainer.enable_progress_bar=false",
               f"--trainer.default_root_dir={tmp_path}", f"--trainer.callbacks={callback}"])
    run_dir = Path(cli.trainer.log_dir)
    files = sorted(p.name for p in (run_dir / "lm_eval").iterdir())
    assert files == ["step_1.json", "step_2.json"]
    saved = json.loads((run_dir / "lm_eval" / "step_2.json").read_text())
    assert saved["n-samples"]["boolq"]["effective"] == 5 and saved["mixlora_lit"]["source"] == "local"
    metrics = list(csv.DictReader(open(run_dir / "metrics.csv")))
    logged = {k: float(r[k]) for r in metrics for k in r if k.startswith(("lm_eval/", "label_token/")) and r[k]
              and int(r["step"]) == 2}
    assert logged["lm_eval/arc_easy/acc"] == saved["results"]["arc_easy"]["acc,none"]
    assert logged["label_token/boolq/acc"] == saved["label_token"]["results"]["boolq"]["acc"]
    assert {"lm_eval/arc_easy/acc_norm", "lm_eval/boolq/acc"} <= set(logged)

    # The callback's own effect, outside Lightning's loop (which restores the mode after validation
    # anyway): it evaluates in eval mode and hands the model back in training mode.
    callback = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "LmEvalCallback")
    model = cli.model.model
    model.train()
    modes = []
    hook = model.register_forward_pre_hook(lambda module, args: modes.append(module.training))
    try:
        callback.run(cli.trainer, cli.model)
    finally:
        hook.remove()
    assert modes and not any(modes), "lm-eval ran with dropout on"
    assert model.training and all(m.training for m in model.modules())
    # ... and what it wrote is what lm-eval computes on the same weights.
    again = run_lm_eval(model, cli.model.tokenizer, ["arc_easy"], 5, "local", data_dir, 16)
    assert again["results"]["arc_easy"]["acc,none"] == saved["results"]["arc_easy"]["acc,none"]


def test_eval_command_on_a_saved_adapter_and_bad_input(tiny_model_dir, prepared_data, tmp_path, capsys):
    from mixlora_lit.cli import main
    from mixlora_lit.lightning.cli import run

    data_dir, _ = prepared_data
    fit = run(["fit", f"--model.base={tiny_model_dir}", "--model.base_dtype=fp32", "--model.adapter.r=4",
               "--model.adapter.num_experts=4", f"--data.data_dir={data_dir}", "--data.train_cap=8",
               "--data.dev_cap=2", "--data.batch_size=4", "--trainer.max_steps=1", "--trainer.enable_progress_bar=false",
               "--trainer.num_sanity_val_steps=0", f"--trainer.default_root_dir={tmp_path / 'fit'}"])
    adapter = Path(fit.trainer.log_dir) / "adapter"
    out = tmp_path / "eval.json"
    assert main(["eval", "--base", str(tiny_model_dir), "--adapter", str(adapter), "--tasks", "arc_easy", "piqa",
                 "--limit", "6", "--data-dir", str(data_dir), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["lm_eval"]["scores"]) == {"arc_easy", "piqa"}
    assert report["label_token"]["scores"]["piqa"]["n"] == 6
    assert "label-token acc (paper)" in capsys.readouterr().out and "lm_eval" in report["protocols"]
    # Unknown task: refused, listing the available ones.
    assert main(["eval", "--base", str(tiny_model_dir), "--tasks", "mmlu", "--data-dir", str(data_dir)]) == 2
    assert "known tasks are" in capsys.readouterr().err
    # An adapter trained on another base is refused before any evaluation.
    assert main(["eval", "--base", "smollm2-135m", "--adapter", str(adapter), "--tasks", "arc_easy",
                 "--data-dir", str(data_dir), "--out", str(tmp_path / "x.json")]) == 2
    assert "refusing to evaluate" in capsys.readouterr().err and not (tmp_path / "x.json").exists()
    assert main(["eval", "--base", "smollm2-135m", "--adapter", str(adapter), "--tasks", "arc_easy",
                 "--allow-base-mismatch", "--data-dir", str(data_dir), "--out", str(tmp_path / "x.json")]) == 2
    assert "has shape" in capsys.readouterr().err and not (tmp_path / "x.json").exists()


@pytest.mark.slow
def test_label_token_accuracy_matches_predictions_from_full_logits(smollm2_fp32, smollm2_tokenizer, prepared_data):
    """Projecting only the needed positions (logits_to_keep) picks what the full logits pick."""
    import torch

    from mixlora_lit.data.encoding import collate_eval, encode_records, label_token_predictions, logits_at
    from mixlora_lit.data.prepare import read_split
    from mixlora_lit.evaluation.harness import label_token_accuracy

    model, _ = smollm2_fp32
    data_dir, _ = prepared_data
    tasks = ["arc_easy", "boolq"]
    scores = label_token_accuracy(model, smollm2_tokenizer, tasks, limit=12, data_dir=data_dir, batch_size=5)
    for index, task in enumerate(tasks):
        records = read_split(task, "test", data_dir)[:12]
        examples = encode_records(records, smollm2_tokenizer, "paper", {t: i for i, t in enumerate(tasks)}, 512,
                                  train=False)
        batch = collate_eval(examples, smollm2_tokenizer.pad_token_id)  # one batch, all positions projected
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        preds = label_token_predictions(logits, batch["last_index"], batch["choice_ids"])
        expected = (preds == batch["label"]).float().mean().item()
        with torch.no_grad():
            picked = logits_at(model, batch["input_ids"], batch["attention_mask"], batch["last_index"])
        assert len(set(batch["last_index"].tolist())) > 1  # rows of different lengths
        full = logits[torch.arange(len(examples)), batch["last_index"]]
        assert (picked - full).abs().max().item() < 1e-3
        assert scores[task]["n"] == 12 and abs(scores[task]["acc"] - expected) < 1e-9


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_eval_loads_peft_lora_and_dora_adapters(method, tiny_model_dir, prepared_data, tmp_path):
    """A PEFT LoRA/DoRA adapter saved by `fit` goes through `mixlora-lit eval`, and the model eval loads
    computes the trained model's logits (which differ from the bare base's)."""
    from mixlora_lit.cli import main
    from mixlora_lit.evaluation.standalone import load_with_adapter
    from mixlora_lit.lightning.cli import run

    data_dir, _ = prepared_data
    fit = run(["fit", f"--model.base={tiny_model_dir}", "--model.base_dtype=fp32", f"--model.adapter.method={method}",
               "--model.adapter.r=4", "--model.optimizer.lr=1e-2", f"--data.data_dir={data_dir}",
               "--data.train_cap=8", "--data.dev_cap=2", "--data.batch_size=4", "--trainer.max_steps=2",
               "--trainer.enable_progress_bar=false", "--trainer.num_sanity_val_steps=0",
               f"--trainer.default_root_dir={tmp_path / 'fit'}"])
    adapter = Path(fit.trainer.log_dir) / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["use_dora"] == (method == "dora")
    out = tmp_path / "eval.json"
    assert main(["eval", "--base", str(tiny_model_dir), "--adapter", str(adapter), "--tasks", "arc_easy", "--limit",
                 "4", "--data-dir", str(data_dir), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["label_token"]["scores"]["arc_easy"]["n"] == 4 and "arc_easy" in report["lm_eval"]["scores"]

    ids = torch.randint(10, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    loaded, _ = load_with_adapter(str(tiny_model_dir), str(adapter), dtype="fp32")
    bare, _ = load_with_adapter(str(tiny_model_dir), None, dtype="fp32")
    trained = fit.model.model.eval()
    with torch.no_grad():
        want, got, base = (m(input_ids=ids).logits for m in (trained, loaded, bare))
    assert torch.allclose(got, want, atol=1e-5) and not torch.allclose(base, want, atol=1e-3)
