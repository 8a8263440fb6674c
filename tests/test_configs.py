"""The shipped configs parse, compose their shared parts, and the quickstart runs end to end (shortened)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mixlora_lit.lightning.cli import run

ROOT = Path(__file__).resolve().parents[1]
PAPER = sorted((ROOT / "configs" / "paper").glob("table*/*/*.yaml"))


def _resolved(config: Path, capsys) -> dict:
    with pytest.raises(SystemExit) as exit_info:
        run(["fit", f"--config={config}", "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def test_there_are_paper_configs_for_every_table_base_and_method():
    names = {(p.parent.parent.name, p.parent.name, p.stem) for p in PAPER}
    assert names == {(t, b, m) for t in ("table1", "table2") for b in ("smollm2-135m", "gemma3-270m", "llama2-7b")
                     for m in ("mixlora", "lora", "dora")}


@pytest.mark.parametrize("config", PAPER, ids=lambda p: "/".join(p.parts[-3:]))
def test_paper_config_resolves_to_the_paper_protocol(config, capsys):
    cfg = _resolved(config, capsys)
    table, base, method = config.parts[-3], config.parent.name, config.stem
    model, data, trainer = cfg["model"], cfg["data"], cfg["trainer"]
    assert model["adapter"]["method"] == method
    assert model["adapter"]["lora_dropout"] == 0.05
    assert model["optimizer"]["lr"] == 2e-4 and model["optimizer"]["scheduler"] == "constant"
    assert model["optimizer"]["weight_decay"] == 0.01 and trainer["max_epochs"] == 2
    assert data["cutoff_len"] == 512 and data["batch_size"] == 16 and data["seed"] == 42
    if method == "mixlora":
        a = model["adapter"]
        assert (a["r"], a["lora_alpha"], a["num_experts"], a["top_k"]) == (16, 32, 8, 2)
    else:  # rank matched to MixLoRA 16 x 8: r=80 on LLaMA-2-7B (tests/test_baselines.py)
        assert model["adapter"]["match_rank"] is True and model["adapter"]["num_experts"] == 8
    expected_tasks = ["arc_easy", "arc_challenge", "boolq", "openbookqa", "piqa"] if table == "table2" else ["arc_easy"]
    assert data["tasks"] == expected_tasks
    assert model["base"] == {"llama2-7b": "meta-llama/Llama-2-7b-hf"}.get(base, base)
    assert trainer["precision"] == ("bf16-mixed" if base == "llama2-7b" else "32-true")
    assert cfg["run_name"] == f"paper/{table}/{base}/{method}"


@pytest.mark.slow
def test_quickstart_shortened_on_the_real_model_and_data(prepared_data, tmp_path):
    data_dir, _ = prepared_data
    cli = run(["fit", f"--config={ROOT / 'configs' / 'quickstart.yaml'}", "--trainer.max_steps=4",
               "--trainer.val_check_interval=4", "--data.train_cap=16", "--data.dev_cap=8",
               "--data.test_cap=8", f"--data.data_dir={data_dir}", f"--trainer.default_root_dir={tmp_path}",
               "--trainer.enable_progress_bar=false", "--trainer.log_every_n_steps=1"])
    run_dir = Path(cli.trainer.log_dir)
    # The report side reads the run directory through mixlora_lit.runs, in an interpreter without torch.
    code = ("import json, sys; from mixlora_lit import runs; r = runs.read_run(sys.argv[1]); "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'lightning')]; assert not bad, bad[:3]; "
            "print(json.dumps({'record': r.record.to_dict(), 'history': r.eval_history, "
            "'n_val': len(r.predictions['val']), 'n_test': len(r.predictions['test']), 'adapter': r.has_adapter}))")
    read = json.loads(subprocess.run([sys.executable, "-c", code, str(run_dir)], check=True, capture_output=True,
                                     text=True).stdout)
    tasks = ["arc_easy", "arc_challenge", "boolq", "openbookqa", "piqa"]
    record, history = read["record"], read["history"]
    assert record["status"] == "finished" and record["global_step"] == 4 and record["base"] == "smollm2-135m"
    assert record["trainable_params"] == 26_311_680 and record["tokens_per_s"] > 0
    assert sorted(record["val"]) == sorted(tasks + ["avg"]) and read["n_val"] == 8 * 5 and read["adapter"]
    assert [(h["stage"], h["step"]) for h in history] == [("val", 0), ("val", 4), ("test", 4)]  # test_after_fit
    assert read["n_test"] == 8 * 5 and sorted(record["test"]) == sorted(tasks + ["avg"])
    assert all(len(h["routing_counts"]) == 30 for h in history)
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert (run_dir / "adapter" / "training_config.yaml").is_file()
    metrics = (run_dir / "metrics.csv").read_text()
    assert "train/tokens_per_sec" in metrics and "val/routing/load_entropy" in metrics
    assert cli.model.mixlora_config.num_experts == 8 and cli.model.model.get_nb_trainable_parameters()[0] == 26_311_680


@pytest.mark.parametrize("method", ["mixlora", "lora", "dora"])
def test_the_table2_study_config_is_the_paper_config_of_each_method(method, capsys):
    """The study trains every method from one config (the method set per trial): what it resolves to
    must be the shipped Table 2 paper config of that method, apart from the study's run name, the
    validation pass before training (the base row replaces it) and the keys only other methods read."""
    study = _resolved_with(ROOT / "configs" / "studies" / "table2_smollm2.yaml", capsys,
                           f"--model.adapter.method={method}")
    paper = _resolved(ROOT / "configs" / "paper" / "table2" / "smollm2-135m" / f"{method}.yaml", capsys)
    for cfg in (study, paper):
        cfg.pop("run_name"), cfg.pop("validate_at_start")
        cfg["model"]["adapter"].pop("top_k" if method != "mixlora" else "match_rank")  # the other kind's key
    assert study == paper


def _resolved_with(config: Path, capsys, *overrides: str) -> dict:
    with pytest.raises(SystemExit) as exit_info:
        run(["fit", f"--config={config}", *overrides, "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)
