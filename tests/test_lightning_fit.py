"""`mixlora-lit fit|validate|test` end to end on a tiny model with the real data and tokenizer."""

from __future__ import annotations

import copy
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import fit_args
from mixlora_lit import kernels, runs
from mixlora_lit.data.prepare import read_split
from mixlora_lit.errors import UserError
from mixlora_lit.lightning.cli import run
from mixlora_lit.lightning.module import MixLoraLitModule

TASKS = ["arc_easy", "arc_challenge", "boolq", "openbookqa", "piqa"]


_args = fit_args


def _metrics(run_dir: Path) -> list[dict]:
    with open(run_dir / runs.METRICS) as fh:
        return list(csv.DictReader(fh))


def _logged(run_dir: Path, key: str) -> float:
    """The last value of `key` in metrics.csv."""
    values = [float(r[key]) for r in _metrics(run_dir) if r.get(key)]
    assert values, key
    return values[-1]


def _check_predictions_match_logged(run_dir: Path, split: str, data_dir: Path, per_task: int) -> list[dict]:
    """predictions/<split>.jsonl: each capped example exactly once, with its prepared record id and
    the gold label of that record; per-task accuracy equal to the logged `<split>/<task>/acc`."""
    rows = runs.read_jsonl(runs.predictions_path(run_dir, split))
    assert all(set(runs.PREDICTION_KEYS) <= set(r) for r in rows)
    assert len({(r["task"], r["id"]) for r in rows}) == len(rows) == per_task * len(TASKS)
    source = "dev" if split == "val" else "test"
    for task in TASKS:
        records = {r["id"]: r for r in read_split(task, source, data_dir)}
        mine = [r for r in rows if r["task"] == task]
        assert len(mine) == per_task and all(r["label"] == records[r["id"]]["label"] for r in mine)
        assert all(r["correct"] == (r["label"] == r["prediction"]) and r["protocol"] == "paper" for r in mine)
    from_file = runs.accuracy_by_task(rows)
    for task in TASKS:
        assert from_file[task] == pytest.approx(_logged(run_dir, f"{split}/{task}/acc"), abs=1e-6)
    assert from_file["avg"] == pytest.approx(_logged(run_dir, f"{split}/avg_acc"), abs=1e-6)
    return rows


RECORD_KEYS = ("method", "base", "protocol", "tasks", "seed", "trainable_params", "total_params", "global_step",
               "wall_time_s", "tokens_per_s", "val", "test", "status", "versions", "git_commit", "hardware")


def test_fit_with_test_after_fit_leaves_a_complete_run_record(tiny_model_dir, prepared_data, tmp_path):
    data_dir, _ = prepared_data
    cli = run(_args(tiny_model_dir, prepared_data, tmp_path, "--test_after_fit=true", "--run_name=records"))
    run_dir = Path(cli.trainer.log_dir)
    record = json.loads((run_dir / runs.RUN_RECORD).read_text())
    assert set(RECORD_KEYS) <= set(record)
    assert record["status"] == "finished" and record["stage"] == "test" and record["error"] is None
    assert (record["method"], record["base"], record["protocol"], record["tasks"], record["seed"]) == \
        ("mixlora", str(tiny_model_dir), "paper", TASKS, 7)
    trainable, total = cli.model.model.get_nb_trainable_parameters()
    assert (record["trainable_params"], record["total_params"]) == (trainable, total) and 0 < trainable < total
    assert record["global_step"] == 3 and record["wall_time_s"] > 0 and record["tokens_per_s"] > 0
    tokens_logged = sorted(float(r["train/tokens_per_sec"]) for r in _metrics(run_dir) if r.get("train/tokens_per_sec"))
    assert tokens_logged[0] <= record["tokens_per_s"] <= tokens_logged[-1]
    assert record["versions"]["torch"] == torch.__version__ and record["hardware"]["threads"] == torch.get_num_threads()
    assert record["hardware"]["base_dtype"] == "float32"  # --model.base_dtype=fp32, as loaded
    assert record["hardware"]["bf16_native"] == torch.ops.mkldnn._is_mkldnn_bf16_supported()
    # AdamW: torch's fused kernel, which it has for fp32 tensors on the CPU (torch >= 2.4), and the record says so
    assert cli.trainer.optimizers[0].defaults["fused"] is True and record["hardware"]["optimizer_kernel"] == "fused"
    assert record["run_name"] == "records" and record["adapter"]["num_experts"] == 4
    for split, per_task in (("val", 6), ("test", 6)):
        rows = _check_predictions_match_logged(run_dir, split, data_dir, per_task)
        assert record[split] == pytest.approx(runs.accuracy_by_task(rows))
        assert set(record[split]) == set(TASKS) | {"avg"}
    assert set(record["routing"]) == {"val", "test"}
    assert record["routing"]["test"]["load_entropy"] == pytest.approx(_logged(run_dir, "test/routing/load_entropy"))
    loaded = runs.read_run(run_dir)  # the reader sees the same
    assert loaded.status == "finished" and loaded.has_adapter and loaded.record.test == record["test"]
    assert [h["stage"] for h in loaded.eval_history] == ["val", "test"]


def test_a_killed_fit_leaves_a_whole_record_saying_running(tiny_model_dir, prepared_data, tmp_path):
    args = _args(tiny_model_dir, prepared_data, tmp_path, "--data.train_cap=200", "--checkpoint.every_n_train_steps=1",
                 "--trainer.val_check_interval=100", steps=500)
    child = subprocess.Popen([sys.executable, "-m", "mixlora_lit.cli", *args], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        deadline, checkpoint = time.time() + 240, None
        while time.time() < deadline and child.poll() is None:
            found = list(tmp_path.rglob(runs.LAST_CHECKPOINT))
            if found:
                checkpoint = found[0]
                break
            time.sleep(0.2)
        assert checkpoint is not None, "training never wrote a checkpoint"
        time.sleep(1.0)  # mid-training, with checkpoints and records being rewritten every step
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    run_dir = checkpoint.parent.parent
    record = json.loads((run_dir / runs.RUN_RECORD).read_text())
    assert record["status"] == "running" and record["stage"] == "fit" and record["global_step"] >= 1
    assert runs.read_run(run_dir).status == "running"


@pytest.mark.parametrize("method", ["mixlora", "mixlora-switch", "lora", "dora"])
def test_fit_every_method_logs_metrics_and_saves_a_loadable_adapter(method, tiny_model_dir, prepared_data, tmp_path):
    cli = run(_args(tiny_model_dir, prepared_data, tmp_path, method=method))
    metrics = cli.trainer.callback_metrics
    for task in TASKS:
        assert f"val/{task}/acc" in metrics
    assert "val/avg_acc" in metrics and "train/lm_loss" in metrics and "train/aux_loss" in metrics
    if method.startswith("mixlora"):
        assert metrics["train/aux_loss"] > 0 and "val/routing/load_entropy" in metrics
    run_dir = Path(cli.trainer.log_dir)
    adapter = run_dir / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file() and (run_dir / "config.yaml").is_file()
    trained = cli.model.model.eval()
    from mixlora_lit.base_models import load_base_model

    base, tok = load_base_model(str(tiny_model_dir), dtype="fp32")
    if method.startswith("mixlora"):
        from mixlora_lit import MixLoraModel

        loaded = MixLoraModel.from_pretrained(base, adapter)
    else:
        from peft import PeftModel

        loaded = PeftModel.from_pretrained(base, adapter).eval()
    ids = tok(["Question: what is 2+2?\nAnswer:"], return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(loaded(**ids).logits, trained(**ids).logits, atol=1e-5)


def test_matched_rank_baseline(tiny_model_dir, prepared_data, tmp_path):
    cli = run(_args(tiny_model_dir, prepared_data, tmp_path, "--model.adapter.match_rank=true", method="lora",
                    steps=1))
    from mixlora_lit import MixLoraConfig
    from mixlora_lit.baselines import lora_parameter_count, mixlora_parameter_count

    module = cli.model
    base = module.model.get_base_model()
    trainable = sum(p.numel() for p in module.model.parameters() if p.requires_grad)
    assert trainable == lora_parameter_count(base, module.lora_rank)
    # The rank whose LoRA count is closest to MixLoRA r=4 x 4 experts on the same shapes.
    budget = mixlora_parameter_count(base, MixLoraConfig(r=4, lora_alpha=8, num_experts=4))
    per_rank = lora_parameter_count(base, 1)
    assert module.lora_rank == round(budget / per_rank) and module.lora_rank > 4


def test_only_supervised_positions_reach_the_lm_head(tiny_model_dir, prepared_data, tmp_path):
    cli = run(_args(tiny_model_dir, prepared_data, tmp_path, steps=1))
    module = cli.model
    batch = next(iter(cli.datamodule.train_dataloader()))
    rows = []
    head = module.model.base_model.get_output_embeddings()
    hook = head.register_forward_hook(lambda m, inp, out: rows.append(inp[0].shape[0]))
    module.losses(batch)
    hook.remove()
    assert rows == [int((batch["labels"][:, 1:] != -100).sum())]
    assert rows[0] < batch["attention_mask"].sum() / 5  # answers only, not prompts


def test_checkpoint_holds_only_what_trains(tiny_model_dir, prepared_data, tmp_path):
    cli = run(_args(tiny_model_dir, prepared_data, tmp_path, "--checkpoint.every_n_train_steps=3"))
    ckpt = torch.load(Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    keys = set(ckpt["state_dict"])
    trainable = {f"model.{n}" for n, p in cli.model.model.named_parameters() if p.requires_grad}
    assert keys == trainable and all(("lora_" in k or "moe_gate" in k) for k in keys)
    assert ckpt["optimizer_states"] and ckpt["lr_schedulers"] and "rng_state" in ckpt


def test_resume_continues_exactly(tiny_model_dir, prepared_data, tmp_path):
    """Steps 4-6 of a run resumed from a step-3 checkpoint equal those of an uninterrupted run (dropout on)."""
    common = ("--model.adapter.lora_dropout=0.1", "--checkpoint.every_n_train_steps=3", "--data.train_cap=40",
              "--trainer.val_check_interval=3")  # the same schedule in all three; the step-3 checkpoint follows a pass
    full = run(_args(tiny_model_dir, prepared_data, tmp_path / "full", *common, steps=6))
    first = run(_args(tiny_model_dir, prepared_data, tmp_path / "part", *common, steps=3))
    ckpt = Path(first.trainer.log_dir) / "checkpoints" / "last.ckpt"
    resumed = run(_args(tiny_model_dir, prepared_data, tmp_path / "part", *common, f"--ckpt_path={ckpt}", steps=6))

    def losses(cli):
        rows = _metrics(Path(cli.trainer.log_dir))
        return {int(r["step"]): float(r["train/lm_loss"]) for r in rows if r.get("train/lm_loss")}

    a, b = losses(full), losses(resumed)
    assert sorted(b) == [3, 4, 5] and sorted(a) == [0, 1, 2, 3, 4, 5]
    for step in (3, 4, 5):
        assert a[step] == pytest.approx(b[step], abs=1e-6), (step, a[step], b[step])
    assert len({round(v, 4) for v in a.values()}) > 3  # the loss moves: the comparison means something


def test_validate_and_test_report_every_task(tiny_model_dir, prepared_data, tmp_path):
    fit = run(_args(tiny_model_dir, prepared_data, tmp_path))
    ckpt = Path(fit.trainer.log_dir) / "checkpoints" / "last.ckpt"
    for subcommand in ("validate", "test"):
        args = _args(tiny_model_dir, prepared_data, tmp_path / subcommand, f"--ckpt_path={ckpt}")
        args = [subcommand] + [a for a in args[1:] if not a.startswith(("--trainer.max_steps", "--trainer.val_check",
                                                                          "--trainer.log_every"))]
        cli = run(args)
        stage = "val" if subcommand == "validate" else "test"
        metrics = cli.trainer.callback_metrics
        assert all(f"{stage}/{t}/acc" in metrics for t in TASKS) and f"{stage}/avg_acc" in metrics
        expected = sum(metrics[f"{stage}/{t}/acc"] for t in TASKS) / 5
        assert metrics[f"{stage}/avg_acc"].item() == pytest.approx(expected.item(), abs=1e-6)
        if subcommand == "validate":  # the checkpoint was restored: same scores as at the end of fit
            for t in TASKS:
                assert metrics[f"val/{t}/acc"] == fit.trainer.callback_metrics[f"val/{t}/acc"]
        run_dir = Path(cli.trainer.log_dir)
        record = runs.read_record(run_dir)
        assert record.status == "finished" and record.stage == subcommand and record.global_step == 3
        assert record.resumed_from == str(ckpt)
        _check_predictions_match_logged(run_dir, stage, prepared_data[0], 6)


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tiny_model_dir, prepared_data, tmp_path):
    args = _args(tiny_model_dir, prepared_data, tmp_path, "--model.optimizer.lr=1e6", "--checkpoint.every_n_train_steps=1",
                 "--data.train_cap=60", steps=40)
    with pytest.raises(FloatingPointError, match=r"non-finite training loss or weights at global step (\d+)") as err:
        run(args)
    step = int(err.value.args[0].split("global step ")[1].split()[0])
    assert step >= 1
    ckpt = torch.load(next(tmp_path.rglob("last.ckpt")), map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == step
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())
    record = runs.read_record(next(tmp_path.rglob(runs.RUN_RECORD)).parent)
    assert record.status == "failed" and record.error.startswith("TrainingDiverged: non-finite")


@pytest.mark.parametrize("bad,message", [
    (["--model.adapter.num_expert=4"], "num_expert"),
    (["--model.adapter.method=moe"], "method"),
    (["--model.adapter.top_k=9"], "top_k"),
    (["--data.mixing=uniform"], "mixing"),
    (["--model.base=smollm3-360m"], "base='smollm3-360m' is invalid"),
    (["--data.tasks=[arc]"], "unknown task 'arc'"),
])
def test_bad_config_fails_before_loading_a_model(bad, message, tiny_model_dir, prepared_data, tmp_path, capsys):
    from mixlora_lit.lightning import module as module_file

    loads = []
    original = module_file.load_base_model
    module_file.load_base_model = lambda *a, **k: loads.append(1) or original(*a, **k)
    try:
        with pytest.raises((SystemExit, ValueError)) as err:
            run(_args(tiny_model_dir, prepared_data, tmp_path, *bad))
    finally:
        module_file.load_base_model = original
    text = str(err.value) + capsys.readouterr().err
    assert message in text
    assert not loads


def test_ddp_two_cpu_processes(tiny_model_dir, prepared_data, tmp_path):
    args = _args(tiny_model_dir, prepared_data, tmp_path, "--trainer.strategy=ddp", "--trainer.devices=2",
                 "--trainer.accelerator=cpu", "--test_after_fit=true", "--data.test_cap=7", steps=2)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "mixlora_lit.cli", *args], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    adapters = list(tmp_path.rglob("adapter_model.safetensors"))
    assert len(adapters) == 1
    from mixlora_lit import MixLoraModel
    from mixlora_lit.base_models import load_base_model

    base, _ = load_base_model(str(tiny_model_dir), dtype="fp32")
    model = MixLoraModel.from_pretrained(base, adapters[0].parent)
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)
    run_dir = adapters[0].parent.parent
    assert "val/avg_acc" in (run_dir / runs.METRICS).read_text()
    # Both ranks' predictions gathered, each example once (7 per task: the ranks got 4 and 3 of some tasks).
    _check_predictions_match_logged(run_dir, "test", prepared_data[0], 7)
    _check_predictions_match_logged(run_dir, "val", prepared_data[0], 6)
    record = runs.read_record(run_dir)
    assert record.status == "finished" and record.hardware["devices"] == 2
    assert record.command.startswith("mixlora-lit fit ") and "--test_after_fit=true" in record.command


def test_module_rejects_bad_settings_directly():
    with pytest.raises(ValueError, match=r"MixLoraConfig.top_k=3 is invalid"):
        MixLoraLitModule(base="smollm2-135m", adapter={"method": "mixlora", "num_experts": 2, "top_k": 3})


def test_fused_adamw_makes_the_for_loop_update_and_resumes_from_its_state(tiny_model_dir):
    """The default AdamW (`optimizer.fused: null`, fused where torch has it) over the real module's
    trainable tensors makes the update of torch's for-loop AdamW (the oracle) to rounding, also when a
    new one takes over that optimizer's saved state mid-way (a checkpoint written before this default),
    and stays fused through `load_state_dict`, which brings back the saved flags; the reverse too. With a
    loss scaler (16-mixed) null means not fused and true is refused, as is true where torch has no fused
    kernel: user errors naming the key."""
    from mixlora_lit.lightning.module import OptimizerSettings, build_adamw

    module = MixLoraLitModule(base=str(tiny_model_dir), adapter={"num_experts": 4, "top_k": 2, "r": 4})
    module.configure_model()
    params = [p for p in module.model.parameters() if p.requires_grad]
    copies = [p.detach().clone().requires_grad_(True) for p in params]
    settings = dict(lr=1e-2, weight_decay=0.1, betas=(0.8, 0.95))
    fused, kernel = build_adamw(params, OptimizerSettings(**settings))
    loop, loop_kernel = build_adamw(copies, OptimizerSettings(**settings, fused=False))
    assert (kernel, loop_kernel) == ("fused", "for-loop") and fused.defaults["fused"] and not loop.defaults["fused"]
    initial = [p.detach().clone() for p in params]
    gen = torch.Generator().manual_seed(0)
    for step in range(6):
        for p, c in zip(params, copies):
            c.grad = torch.randn(p.shape, generator=gen) * 10.0 ** -(step % 3)
            p.grad = c.grad.clone()
        fused.step()
        loop.step()
        if step == 2:  # a fresh fused optimizer resumes from the for-loop one's saved state, as from a checkpoint
            saved = copy.deepcopy(loop.state_dict())
            assert saved["param_groups"][0]["fused"] is None
            for state in saved["state"].values():  # as saved where torch's default dtype was fp64
                state["step"] = state["step"].double()
            fused = build_adamw(params, OptimizerSettings(**settings))[0]
            fused.load_state_dict(saved)
            assert all(g["fused"] for g in fused.param_groups)  # not the saved flag
            assert {fused.state[p]["step"].dtype for p in params} == {torch.float32}  # what the fused kernel takes
    assert min(float((p.detach() - p0).abs().max()) for p, p0 in zip(params, initial)) > 1e-2  # all moved
    for p, c in zip(params, copies):
        torch.testing.assert_close(p.detach(), c.detach(), rtol=1e-5, atol=1e-6)
    # the reverse: a for-loop optimizer resumes from a fused one's state and stays a for-loop one
    back = build_adamw(copies, OptimizerSettings(**settings, fused=False))[0]
    back.load_state_dict(copy.deepcopy(fused.state_dict()))
    assert all(not g["fused"] for g in back.param_groups)
    assert {back.state[c]["step"].device.type for c in copies} == {"cpu"}

    assert build_adamw(params, OptimizerSettings(), grad_scaler=True)[1] == "for-loop"
    with pytest.raises(UserError, match=r"model.optimizer.fused=true is invalid with trainer.precision=16-mixed"):
        build_adamw(params, OptimizerSettings(fused=True), grad_scaler=True)
    meta = [torch.nn.Parameter(torch.empty(3, device="meta"))]
    assert build_adamw(meta, OptimizerSettings())[1] == "for-loop"
    with pytest.raises(UserError, match=r"model.optimizer.fused=true is invalid here: .*\(meta float32\)"):
        build_adamw(meta, OptimizerSettings(fused=True))


def _dynamo_compiled(module) -> list[str]:
    """The functions and methods defined in `module` that torch.compile has compiled code for."""
    import inspect

    from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list

    functions = [f for _, f in inspect.getmembers(module, inspect.isfunction) if f.__module__ == module.__name__]
    for _, cls in inspect.getmembers(module, inspect.isclass):
        if cls.__module__ == module.__name__:
            functions += [f for _, f in inspect.getmembers(cls, inspect.isfunction)]
    return sorted(f.__qualname__ for f in map(inspect.unwrap, functions) if _debug_get_cache_entry_list(f.__code__))


def test_compiled_training_matches_eager(tiny_model_dir, prepared_data, tmp_path, monkeypatch):
    """`model.compile: true` (torch.compile of the decoder) trains to the same losses as eager, with the
    routed experts left out of the compiled graphs."""
    # Compile time is this test's cost: prompts cut to 32 tokens give every batch one shape (a second
    # shape recompiles the decoder with dynamic shapes), and no validation pass compiles the eval-mode
    # graph (cold inductor cache: 112 s -> 54 s).
    extra = ("--model.adapter.lora_dropout=0", "--data.cutoff_len=32", "--trainer.limit_val_batches=0",
             "--validate_at_start=false")
    # Whether each of the kernel's products ran under dynamo (traced inline, or as a compiled frame of its own).
    traced, block_mm = [], kernels.block_mm

    def watched_block_mm(*args, **kwargs):
        traced.append(torch.compiler.is_compiling())
        return block_mm(*args, **kwargs)

    monkeypatch.setattr(kernels, "block_mm", watched_block_mm)
    losses = {}
    for compiled in (False, True):
        traced.clear()
        cli = run(_args(tiny_model_dir, prepared_data, tmp_path / str(compiled), f"--model.compile={compiled}",
                        *extra, steps=2))
        rows = _metrics(Path(cli.trainer.log_dir))
        losses[compiled] = [float(r["train/lm_loss"]) for r in rows if r.get("train/lm_loss")]
        if compiled:
            decoder = cli.model.model.base_model.get_decoder()
            assert decoder._compiled_call_impl is not None  # really compiled
            # ... but not the routed experts: their layout depends on the routing, and dynamo would trace into
            # the kernel and recompile it at every new routing outcome until its recompile limit.
            assert _dynamo_compiled(kernels) == []
            assert traced and not any(traced)
    assert len(losses[False]) == 2
    assert losses[True] == pytest.approx(losses[False], abs=1e-4)


def test_fit_with_bf16_mixed_precision(tiny_model_dir, prepared_data, tmp_path):
    """Lightning's `precision: bf16-mixed` (autocast over an fp32 base) trains MixLoRA to finite losses."""
    cli = run(_args(tiny_model_dir, prepared_data, tmp_path, "--trainer.precision=bf16-mixed", steps=2))
    losses = [float(r["train/lm_loss"]) for r in _metrics(Path(cli.trainer.log_dir)) if r.get("train/lm_loss")]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert cli.trainer.precision == "bf16-mixed"


def test_python_and_cli_switch_configs_are_equal(tiny_model_dir, prepared_data, tmp_path):
    """`--model.adapter.method=mixlora-switch` builds the config `MixLoraConfig(routing_strategy=...)` builds,
    with the switch router's own defaults (init range 1.0, jitter 0.01) from MixLoraConfig."""
    from mixlora_lit import MixLoraConfig
    from mixlora_lit.lightning.cli import MixLoraCLI
    from mixlora_lit.lightning.datamodule import MultiTaskDataModule

    args = [a for a in _args(tiny_model_dir, prepared_data, tmp_path, method="mixlora-switch")[1:]
            if not a.startswith(("--model.adapter.r=", "--model.adapter.lora_alpha=", "--model.adapter.num_experts="))]
    cli = MixLoraCLI(MixLoraLitModule, MultiTaskDataModule, args=args, run=False)
    python = MixLoraConfig(routing_strategy="mixlora-switch", base_model_name_or_path=str(tiny_model_dir))
    assert cli.model.mixlora_config == python
    assert (python.top_k, python.router_init_range, python.jitter_noise) == (1, 1.0, 0.01)
    assert MixLoraConfig().router_init_range == 0.02 and MixLoraConfig().jitter_noise == 0.0


def test_method_base_scores_the_bare_base_model_and_refuses_to_fit(tiny_model_dir, prepared_data, tmp_path):
    """The zero-shot row: `test` with method base. Oracle: an untrained PEFT LoRA (B = 0 at init) computes the
    base model's function through another code path, so its test predictions must be the same."""
    def test_args(method: str) -> list[str]:
        args = _args(tiny_model_dir, prepared_data, tmp_path / method, method=method)
        return ["test"] + [a for a in args[1:] if not a.startswith(("--trainer.max_steps", "--trainer.val_check",
                                                                     "--trainer.log_every"))]

    base = run(test_args("base"))
    lora = run(test_args("lora"))
    base_record, lora_record = (runs.read_record(cli.trainer.log_dir) for cli in (base, lora))
    assert base_record.method == "base" and base_record.trainable_params == 0 and base_record.adapter == {
        "method": "base"}
    assert lora_record.trainable_params > 0
    base_rows, lora_rows = (runs.read_jsonl(Path(cli.trainer.log_dir) / "predictions" / "test.jsonl")
                            for cli in (base, lora))
    assert len(base_rows) == 30 and [(r["id"], r["prediction"]) for r in base_rows] == [
        (r["id"], r["prediction"]) for r in lora_rows]
    with pytest.raises(UserError, match="model.adapter.method=base has nothing to train"):
        run(_args(tiny_model_dir, prepared_data, tmp_path / "fit", method="base"))
