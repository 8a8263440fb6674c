"""`mixlora-lit report`: tables, paired statistics, plots and documents, against independent computations."""

from __future__ import annotations

import base64
import io
import itertools
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy import stats as scipy_stats

from mixlora_lit import runs
from mixlora_lit.cli import main
from mixlora_lit.report import stats

ROOT = Path(__file__).resolve().parents[1]
TASKS = ["arc_easy", "boolq"]


def make_run(root: Path, name: str, method: str, seed: int, correct: dict[str, list[bool]], base: str = "tiny",
             status: str = "finished", protocol: str = "paper", trainable: int = 1000, run_name: str | None = None,
             routing: bool = False) -> Path:
    """A run directory as `fit --test_after_fit true` leaves it, with chosen per-example outcomes."""
    run_dir = root / name / "version_0"
    rows = [{"task": task, "id": f"{task}-{i}", "label": 0, "prediction": 0 if ok else 1, "correct": ok,
             "protocol": protocol} for task, outcomes in correct.items() for i, ok in enumerate(outcomes)
            if ok is not None]  # None: this run did not score that example
    np.random.default_rng(seed + len(name)).shuffle(rows)  # pairing must go by (task, id), not position
    record = runs.RunRecord(method=method, base=base, protocol=protocol, tasks=list(correct), seed=seed,
                            trainable_params=trainable, total_params=100_000 + trainable, global_step=10,
                            wall_time_s=1.5, tokens_per_s=100.0, status=status, run_name=run_name,
                            command=f"mixlora-lit fit --seed_everything={seed}",
                            test=runs.accuracy_by_task(rows), adapter={"r": 4})
    record.write(run_dir)
    if status == "finished":
        runs.write_predictions(run_dir, "test", rows)
    history = [{"stage": "test", "step": 10, "acc": {}}]
    if routing:
        history[0]["routing_counts"] = [[5, 1, 0, 2], [2, 2, 2, 2]]
    runs.write_eval_history(run_dir, history)
    (run_dir / runs.METRICS).write_text("epoch,step,train/lm_loss,train/aux_loss,val/avg_acc\n0,0,2.0,0.01,\n"
                                        "0,5,1.5,0.01,0.4\n")
    (run_dir / runs.CONFIG).write_text(yaml.safe_dump({"data": {"train_cap": 10, "test_cap": 5},
                                                       "model": {"optimizer": {"lr": 1e-3}}}))
    return run_dir


def paired(a: list[list[bool]], b: list[list[bool]], task_index: list[int], tasks: list[str]) -> stats.Paired:
    return stats.Paired(tasks, np.array(a, float), np.array(b, float), np.array(task_index))


# ---------------------------------------------------------------------- statistics
def test_bootstrap_ci_matches_scipy_on_one_task_and_one_seed():
    rng = np.random.default_rng(3)
    a = rng.random(300) < 0.6
    b = rng.random(300) < 0.5
    p = paired([a], [b], [0] * 300, ["t"])
    low, high = stats.bootstrap_ci(p, n_resamples=20_000, seed=1)
    ref = scipy_stats.bootstrap((a.astype(float), b.astype(float)), lambda x, y, axis: x.mean(axis) - y.mean(axis),
                                paired=True, vectorized=True, n_resamples=20_000, method="percentile",
                                random_state=np.random.default_rng(2)).confidence_interval
    assert low == pytest.approx(ref.low, abs=0.006) and high == pytest.approx(ref.high, abs=0.006)
    assert stats.difference(p) == pytest.approx(a.mean() - b.mean())


def _loop_bootstrap(a_seeds, b_seeds, task_of, n_tasks, reps, rng):
    """An independent, plain-loop version of the hierarchical paired bootstrap."""
    out = []
    members = [[i for i, t in enumerate(task_of) if t == k] for k in range(n_tasks)]
    for _ in range(reps):
        sa = [a_seeds[rng.integers(len(a_seeds))] for _ in a_seeds]
        sb = [b_seeds[rng.integers(len(b_seeds))] for _ in b_seeds]
        per_task = []
        for idx in members:
            pick = [idx[rng.integers(len(idx))] for _ in idx]
            per_task.append(np.mean([np.mean([s[i] for s in sa]) - np.mean([s[i] for s in sb]) for i in pick]))
        out.append(np.mean(per_task))
    return np.percentile(out, [2.5, 97.5])


def test_hierarchical_bootstrap_matches_an_independent_loop_over_tasks_and_seeds():
    rng = np.random.default_rng(5)
    task_of = [0] * 40 + [1] * 25
    a = [(rng.random(65) < 0.7).tolist() for _ in range(3)]
    b = [(rng.random(65) < 0.5).tolist() for _ in range(2)]
    p = paired(a, b, task_of, ["x", "y"])
    low, high = stats.bootstrap_ci(p, n_resamples=8000, seed=0)
    ref_low, ref_high = _loop_bootstrap(a, b, task_of, 2, 3000, np.random.default_rng(9))
    assert low == pytest.approx(ref_low, abs=0.02) and high == pytest.approx(ref_high, abs=0.02)
    # the average over tasks is unweighted: 40 and 25 examples count the same
    expected = np.mean([np.mean(np.mean(a, 0)[:40]) - np.mean(np.mean(b, 0)[:40]),
                        np.mean(np.mean(a, 0)[40:]) - np.mean(np.mean(b, 0)[40:])])
    assert stats.difference(p) == pytest.approx(expected)


def test_seed_resampling_widens_the_interval_when_seeds_disagree():
    """Two seeds of a that disagree completely (all right / all wrong): the interval must span the seed
    spread, which resampling examples alone cannot show."""
    n = 200
    a = [[1] * n, [0] * n]
    b = [[1, 0] * (n // 2)]
    p = paired(a, b, [0] * n, ["t"])
    low, high = stats.bootstrap_ci(p, n_resamples=4000, seed=0)
    assert stats.difference(p) == pytest.approx(0.0)
    assert low < -0.4 and high > 0.4  # seeds resampled: sometimes both seeds are the all-wrong one
    single = paired([[0.5] * n], b, [0] * n, ["t"])  # the same example means without seed variation
    s_low, s_high = stats.bootstrap_ci(single, n_resamples=4000, seed=0)
    assert s_high - s_low < 0.2


def test_permutation_p_value_equals_the_exact_enumeration():
    a = [1, 1, 1, 0, 1, 1, 0, 1, 1, 1, 0, 1]
    b = [0, 1, 0, 0, 0, 1, 1, 0, 1, 0, 0, 0]
    d = np.array(a, float) - np.array(b, float)
    observed = abs(d.mean())
    flips = [abs((np.array(signs) * d).mean()) for signs in itertools.product([-1, 1], repeat=len(d))]
    exact = np.mean([f >= observed - 1e-12 for f in flips])  # 2 * 2^-6 with 6 discordant pairs, 5 of one sign
    p = stats.permutation_p_value(paired([a], [b], [0] * len(a), ["t"]), n_resamples=40_000, seed=4)
    assert p == pytest.approx(exact, abs=0.01)
    assert stats.permutation_p_value(paired([a], [a], [0] * len(a), ["t"])) == 1.0


def test_mcnemar_is_the_exact_binomial_on_discordant_pairs():
    a = [1, 1, 1, 1, 1, 1, 0, 1, 0, 0]  # 7 discordant pairs: 6 right only for a, 1 only for b; 3 agree
    b = [0, 0, 0, 0, 0, 0, 1, 1, 0, 0]
    assert stats.mcnemar_p_value(np.array(a), np.array(b)) == pytest.approx(2 * (1 + 7) / 2**7)
    assert stats.mcnemar_p_value(np.array(a), np.array(a)) == 1.0


# ---------------------------------------------------------------------- the report from fabricated runs
def _fabricate(root: Path) -> dict:
    lora = [{"arc_easy": [1, 0, 1, 0, 1, 0, 0, 0], "boolq": [1, 1, 0, 0, 1, 0]},
            {"arc_easy": [1, 1, 1, 0, 1, 0, 0, None], "boolq": [1, 0, 0, 0, 1, 0]}]  # one example not scored
    mix = [{"arc_easy": [1, 1, 1, 1, 1, 0, 1, 0], "boolq": [1, 1, 1, 0, 1, 0]},
           {"arc_easy": [1, 1, 1, 1, 1, 1, 1, 0], "boolq": [1, 1, 1, 1, 1, 0]}]

    def outcome(o):
        return {k: [None if x is None else bool(x) for x in v] for k, v in o.items()}

    for seed, o in enumerate(lora):
        make_run(root, f"lora-s{seed}", "lora", seed, outcome(o), trainable=5000)
    # an older run of the same configuration and seed: a duplicate, listed and not counted
    old = make_run(root, "lora-s0-old", "lora", 0, outcome(lora[1]), trainable=5000)
    record = json.loads((old / runs.RUN_RECORD).read_text())
    (old / runs.RUN_RECORD).write_text(json.dumps(dict(record, updated_at="2020-01-01T00:00:00+0000")))
    for seed, o in enumerate(mix):
        make_run(root, f"mix-s{seed}", "mixlora", seed, outcome(o), trainable=5200, routing=True,
                 run_name="<script>alert('x')</script>" if seed == 0 else None)
    make_run(root, "other-base", "lora", 0, {"arc_easy": [True, False], "boolq": [True]}, base="other-model")
    for method, task, outcomes in (("lora", "piqa", [1, 0, 0, 1]), ("lora", "boolq", [1, 1, 0]),
                                   ("mixlora", "piqa", [1, 1, 0, 1]), ("mixlora", "boolq", [1, 1, 1])):
        make_run(root, f"single-{method}-{task}", method, 0, {task: [bool(x) for x in outcomes]}, base="tiny")
    make_run(root, "killed", "mixlora", 5, {"arc_easy": [True]}, status="running")
    make_run(root, "diverged", "dora", 0, {"arc_easy": [True]}, status="failed")
    (root / "norecord" / "version_0").mkdir(parents=True)
    (root / "norecord" / "version_0" / runs.CONFIG).write_text("model: {}\n")
    return {"lora": lora, "mix": mix}


def _seed_matrix(outcomes: list[dict], keys: list[tuple[str, int]]) -> np.ndarray:
    return np.array([[o[t][i] for t, i in keys] for o in outcomes], dtype=float)


def test_report_tables_groups_statistics_and_incomplete_runs(tmp_path, capsys):
    outcomes = _fabricate(tmp_path / "runs")
    out = tmp_path / "report"
    assert main(["report", "--runs", str(tmp_path / "runs"), str(tmp_path / "nowhere"), "--out", str(out),
                 "--n-resamples", "4000"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert "fraction" in report["units"] and report["command"].startswith("mixlora-lit report --runs")
    groups = {(g["base"], g["kind"]): g for g in report["groups"]}
    # another base is its own group; single-task runs form one Table-1 group; never averaged together
    assert set(groups) == {("tiny", "multi-task"), ("tiny", "single-task"), ("other-model", "multi-task")}
    g = groups[("tiny", "multi-task")]
    assert g["tasks"] == TASKS and g["protocol"] == "paper" and set(g["methods"]) == {"lora", "mixlora"}
    for label, key in (("lora", "lora"), ("mixlora", "mix")):
        m = g["methods"][label]
        per_seed = {t: [np.mean([x for x in o[t] if x is not None]) for o in outcomes[key]] for t in TASKS}
        for t in TASKS:
            assert m["per_task"][t]["mean"] == pytest.approx(np.mean(per_seed[t]))
            assert m["per_task"][t]["std"] == pytest.approx(np.std(per_seed[t], ddof=1))
        avgs = [np.mean([per_seed[t][i] for t in TASKS]) for i in range(2)]
        assert m["avg"]["mean"] == pytest.approx(np.mean(avgs)) and m["avg"]["std"] == pytest.approx(np.std(avgs, ddof=1))
        assert m["n_seeds"] == 2  # the duplicate of lora seed 0 is not a third seed
    assert g["methods"]["lora"]["trainable_params"] == 5000
    assert g["methods"]["lora"]["trainable_pct_of_base"] == pytest.approx(5.0)
    (comparison,) = g["comparisons"]
    assert (comparison["a"], comparison["b"], comparison["metric"]) == ("mixlora", "lora", "avg")
    # independent computation on the examples every seed of both scored (arc_easy-7 is missing in one)
    keys = [("arc_easy", i) for i in range(7)] + [("boolq", i) for i in range(6)]
    a, b = _seed_matrix(outcomes["mix"], keys), _seed_matrix(outcomes["lora"], keys)
    tasks_of = [0] * 7 + [1] * 6
    d = a.mean(0) - b.mean(0)
    diff = np.mean([d[:7].mean(), d[7:].mean()])
    assert comparison["n_examples"] == 13 and comparison["diff"] == pytest.approx(diff)
    flips = np.array(list(itertools.product([-1, 1], repeat=13)))
    stat = lambda x: np.abs((x[:, :7].mean(1) + x[:, 7:].mean(1)) / 2)  # noqa: E731
    exact_p = np.mean(stat(flips * d) >= stat(d[None]) - 1e-12)
    assert comparison["p_value"] == pytest.approx(exact_p, abs=0.015)
    ref_low, ref_high = _loop_bootstrap(a.tolist(), b.tolist(), tasks_of, 2, 3000, np.random.default_rng(1))
    assert comparison["ci_low"] == pytest.approx(ref_low, abs=0.03)
    assert comparison["ci_high"] == pytest.approx(ref_high, abs=0.03)
    single = groups[("tiny", "single-task")]
    assert single["tasks"] == ["boolq", "piqa"] and single["published"]["source"].startswith("MixLoRA paper, Table 1")
    assert single["methods"]["lora"]["per_task"]["piqa"]["mean"] == pytest.approx(0.5)
    assert single["methods"]["mixlora"]["avg"]["mean"] == pytest.approx((1 + 0.75) / 2)
    assert single["comparisons"][0]["n_examples"] == 7
    one_seed = groups[("other-model", "multi-task")]["methods"]["lora"]
    assert one_seed["n_seeds"] == 1 and one_seed["avg"]["std"] is None  # one seed: no spread claimed
    assert groups[("tiny", "multi-task")]["published"] is None  # no paper cell for this task set
    listed = {Path(r["path"]).parent.name if r["status"] != "missing" else "missing": r["status"]
              for r in report["incomplete_runs"]}
    assert listed == {"killed": "running", "diverged": "failed", "missing": "missing", "norecord": "no record",
                      "lora-s0-old": "duplicate"}
    md = (out / "report.md").read_text()
    assert "Runs not included" in md and "killed" in md and "| mixlora |" in md and "(1 seed)" in md
    assert f"{100 * comparison['diff']:+.1f}" in md
    # the top of the report says that runs are left out, before the first group's section
    top = md[md.index("## Findings"):md.index("\n## ", md.index("## Findings") + 1)]
    (line,) = [x for x in top.splitlines() if x.startswith("Not in these findings:")]
    assert line.startswith("Not in these findings: 5 listed run path(s) (runs: ")
    assert all(f"1 {status}" in line for status in listed.values())
    html = (out / "report.html").read_text()
    assert html.index("Not in these findings: 5") < html.index("<h2>Runs not included</h2>")
    printed = capsys.readouterr().out
    assert "mixlora - lora" in printed and "5 run(s) not included" in printed


def test_html_is_self_contained_escaped_and_its_figures_are_pngs(tmp_path):
    import matplotlib.image

    _fabricate(tmp_path / "runs")
    out = tmp_path / "report"
    assert main(["report", "--runs", str(tmp_path / "runs"), "--out", str(out), "--n-resamples", "500"]) == 0
    html = (out / "report.html").read_text()
    assert "http://" not in html and "https://" not in html
    assert "<script" not in html and "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in html
    report = json.loads((out / "report.json").read_text())
    files = [f["file"] for g in report["groups"] for f in g["figures"]]
    assert any("routing" in f for f in files) and any("accuracy" in f for f in files)
    uris = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    assert len(uris) == len(files) and not re.findall(r'src="(?!data:)', html)
    for uri in uris:
        data = base64.b64decode(uri)
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        image = matplotlib.image.imread(io.BytesIO(data), format="png")
        assert image.shape[0] > 100 and image.std() > 0.01  # a real, non-blank picture
    assert all((out / "figures" / f).is_file() for f in files)


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_html_renders_in_headless_chromium(tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("Chromium is not installed (apt-get install chromium); .ci/run installs it")
    _fabricate(tmp_path / "runs")
    out = tmp_path / "report"
    assert main(["report", "--runs", str(tmp_path / "runs"), "--out", str(out), "--n-resamples", "200"]) == 0
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]
    shot = tmp_path / "page.png"
    page = (out / "report.html").resolve().as_uri()
    subprocess.run([browser, *flags, f"--screenshot={shot}", "--window-size=1280,1600", page], check=True,
                   capture_output=True, timeout=120)
    dom = subprocess.run([browser, *flags, "--dump-dom", page], check=True, capture_output=True, text=True,
                         timeout=120).stdout
    assert "<table" in dom and "mixlora" in dom and "<img" in dom
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[:2] == (1600, 1280) and pixels[..., :3].std() > 0.02  # not a blank page


# ---------------------------------------------------------------------- end to end
def test_report_end_to_end_on_real_runs_and_a_study(tiny_model_dir, prepared_data, tmp_path):
    from mixlora_lit.lightning.cli import run

    data_dir, _ = prepared_data
    common = [f"--model.base={tiny_model_dir}", "--model.base_dtype=fp32", "--model.adapter.r=4",
              "--model.adapter.lora_alpha=8", "--model.adapter.num_experts=4", f"--data.data_dir={data_dir}",
              "--data.train_cap=24", "--data.dev_cap=6", "--data.test_cap=8", "--data.batch_size=4",
              "--trainer.max_steps=2", "--trainer.val_check_interval=2", "--trainer.num_sanity_val_steps=0",
              "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--seed_everything=3",
              "--test_after_fit=true"]
    for method in ("lora", "mixlora"):
        run(["fit", *common, f"--model.adapter.method={method}", f"--trainer.default_root_dir={tmp_path / 'runs' / method}"])
    sys.path.insert(0, str(ROOT / "tests"))
    from test_sweep import write_sweep

    fit_yaml = tmp_path / "fit.yaml"
    fit_yaml.write_text(yaml.safe_dump({"model": {"base": str(tiny_model_dir), "base_dtype": "fp32",
                                                  "adapter": {"r": 4, "lora_alpha": 8, "num_experts": 4}},
                                        "data": {"data_dir": str(data_dir), "train_cap": 24, "dev_cap": 6,
                                                 "batch_size": 4},
                                        "trainer": {"max_steps": 2, "val_check_interval": 2,
                                                    "num_sanity_val_steps": 0, "enable_progress_bar": False}}))
    sweep = write_sweep(tmp_path, fit_yaml, name="study", n_trials=2)  # a study of two trials has every plot
    assert main(["sweep", "run", "--config", str(sweep)]) == 0
    out = tmp_path / "report"
    assert main(["report", "--runs", str(tmp_path / "runs"), "--study", f"sqlite:///{tmp_path}/study.db:study",
                 "--out", str(out), "--n-resamples", "1000", "--title", "end to end"]) == 0
    report = json.loads((out / "report.json").read_text())
    (group,) = report["groups"]
    assert set(group["methods"]) == {"lora", "mixlora"} and group["comparisons"][0]["n_examples"] == 5 * 8
    assert group["published"]["source"] == "MixLoRA paper, Table 2 (multi-task)"
    (study,) = report["studies"]
    assert len([t for t in study["trials"] if t["state"] == "COMPLETE"]) == 2 and study["best"] is not None
    figures = {f["file"] for f in study["figures"]} | {f["file"] for f in group["figures"]}
    assert {"study_0_history.png", "study_0_parallel.png", "g0_curves.png", "g0_accuracy.png"} <= figures
    assert all((out / "figures" / f).is_file() for f in figures)
    md = (out / "report.md").read_text()
    assert "paper: mixlora (LLaMA-2 7B)" in md and "## Study `study`" in md
    best = study["trials"][study["best"]]
    assert f"- study `study`: 2 complete trial(s); val/avg_acc best {best['values'][0]:.4g} (trial {best['number']}" in md
    assert "one dev pass of at most 30 examples (6 per task)" in md  # the caps read from the trials' configs
    assert (out / "report.html").is_file() and any(f.startswith("g0_routing_") for f in figures)
    # The report command needs neither torch nor Lightning, studies included.
    code = ("import runpy, sys; sys.argv = ['mixlora-lit'] + sys.argv[1:]; "
            "from mixlora_lit.cli import main; code = main(sys.argv[1:]); "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'lightning')]; "
            "assert not bad, bad[:3]; sys.exit(code)")
    subprocess.run([sys.executable, "-c", code, "report", "--runs", str(tmp_path / "runs"), "--study",
                    f"sqlite:///{tmp_path}/study.db:study", "--out", str(tmp_path / "again"), "--n-resamples", "200"],
                   check=True, cwd=ROOT)
    assert json.loads((tmp_path / "again" / "report.json").read_text())["studies"][0]["name"] == "study"


def test_sweep_finding_gives_means_per_setting_and_the_dev_pass_noise():
    """The study line: per-value means of the discrete settings (a 2 x 2 grid, computed here by hand) and the
    sampling standard error of a task-averaged accuracy, checked against scipy's binomial variance."""
    from mixlora_lit.report.build import study_finding

    caps = {"arc_easy": 50, "boolq": 50, "piqa": 40}
    grid = [(4, 1, 0.30), (4, 2, 0.34), (8, 1, 0.26), (8, 2, 0.38)]
    trials = [{"number": i, "state": "COMPLETE", "values": [v], "dev_cap_per_task": caps,
               "params": {"model.adapter.num_experts": e, "model.adapter.top_k": k, "model.optimizer.lr": 1e-4 * (i + 1)}}
              for i, (e, k, v) in enumerate(grid)]
    trials.append({"number": 4, "state": "FAIL", "values": None, "dev_cap_per_task": caps,
                   "params": {"model.adapter.num_experts": 16, "model.adapter.top_k": 1}})
    line = study_finding({"name": "g", "directions": ["maximize"], "objectives": ["val/avg_acc"], "trials": trials})
    assert "Mean objective per setting (trials): num_experts 4: 0.32 (2), 8: 0.32 (2); top_k 1: 0.28 (2), 2: 0.36 (2)." in line
    assert "lr" not in line.split("Mean objective")[1]  # continuous settings are left to the figures
    p = np.mean([v for *_, v in grid])
    se = np.sqrt(sum(scipy_stats.binom(n, p).var() / n**2 for n in caps.values())) / len(caps)
    assert f"at most 140 examples (40-50 per task) has a sampling standard error of about {100 * se:.1f} points" in line
    assert f"less than {100 * 2 * np.sqrt(2) * se:.1f} points apart" in line
    # Trials with different caps (or a loss objective) get no noise statement rather than a wrong one.
    trials[0]["dev_cap_per_task"] = {"arc_easy": 10, "boolq": 10, "piqa": 10}
    assert "Noise" not in study_finding({"name": "g", "directions": ["maximize"], "objectives": ["val/avg_acc"],
                                         "trials": trials})
    assert "Noise" not in study_finding({"name": "g", "directions": ["minimize"], "objectives": ["val/loss"],
                                         "trials": trials[1:]})


def test_findings_state_the_verdict_per_series_with_the_papers_gap_and_the_cost(tmp_path, capsys):
    """Two series (like the study's "paper settings" and "tuned"), each compared only within itself, a base
    row shared by both. Outcomes are built so the verdicts are known: a sure gain over LoRA, no difference
    from DoRA (identical answers), and in the other series a sure loss."""
    paper5 = ["arc_easy", "arc_challenge", "boolq", "openbookqa", "piqa"]
    n = 30

    def answers(pattern):  # the same outcome for every example of every task
        return {t: [pattern] * n for t in paper5}

    rng = np.random.default_rng(0)
    mixed = {t: [bool(x) for x in rng.integers(0, 2, n)] for t in paper5}
    a, b, base = tmp_path / "a", tmp_path / "b", tmp_path / "base"
    make_run(base, "base", "base", 0, answers(False), trainable=0)
    for seed in (1, 2):
        make_run(a, f"mix{seed}", "mixlora", seed, answers(True))
        make_run(a, f"lora{seed}", "lora", seed, answers(False))
        make_run(a, f"dora{seed}", "dora", seed, answers(True))
        make_run(b, f"mix{seed}", "mixlora", seed, mixed)
        make_run(b, f"lora{seed}", "lora", seed, {t: [True] * n for t in paper5})
    # training throughput in metrics.csv: examples/s 2, 4 and 8 -> median 4; 8 x 2 examples per step -> 4 s
    for run_dir in (a / "mix1" / "version_0", a / "mix2" / "version_0"):
        (run_dir / runs.METRICS).write_text("epoch,step,train/lm_loss,train/examples_per_sec\n0,10,2.0,2.0\n"
                                            "0,20,1.9,8.0\n0,30,1.8,4.0\n")
        (run_dir / runs.CONFIG).write_text(yaml.safe_dump({"data": {"batch_size": 8},
                                                           "trainer": {"accumulate_grad_batches": 2}}))
    out = tmp_path / "report"
    assert main(["report", "--runs", f"settings A={a}", f"settings A={base}", f"tuned={b}", f"tuned={base}",
                 "--out", str(out), "--n-resamples", "2000"]) == 0
    report = json.loads((out / "report.json").read_text())
    groups = {g["series"]: g for g in report["groups"]}
    assert set(groups) == {"settings A", "tuned"}
    assert set(groups["settings A"]["methods"]) == {"base", "mixlora", "lora", "dora"}
    assert set(groups["tuned"]["methods"]) == {"base", "mixlora", "lora"}  # compared only within the series
    found = {(f["series"], f["a"], f["b"]): f for f in report["findings"]}
    assert set(found) == {("settings A", "mixlora", "lora"), ("settings A", "mixlora", "dora"),
                          ("tuned", "mixlora", "lora")}
    gain, same, loss = (found[("settings A", "mixlora", "lora")], found[("settings A", "mixlora", "dora")],
                        found[("tuned", "mixlora", "lora")])
    assert gain["diff"] == pytest.approx(1.0) and gain["verdict"] == "gain" and gain["ci_low"] > 0
    assert same["diff"] == 0 and same["verdict"] == "none" and same["ci_low"] == same["ci_high"] == 0
    expected_loss = np.mean([np.mean(mixed[t]) for t in paper5]) - 1.0
    assert loss["diff"] == pytest.approx(expected_loss) and loss["verdict"] == "loss" and loss["ci_high"] < 0
    assert set(loss["per_task"]) == set(paper5) and all(d < 0 for d in loss["per_task"].values())
    assert gain["published_gap"] == pytest.approx(0.753 - 0.655) and gain["published_gap_in_ci"] is False
    assert same["published_gap"] == pytest.approx(0.753 - 0.663) and same["published_gap_in_ci"] is False
    cost = groups["settings A"]["methods"]["mixlora"]["cost"]
    assert cost["examples_per_s"] == pytest.approx(4.0) and cost["s_per_step"] == pytest.approx(4.0)
    assert cost["tokens_per_s"] == pytest.approx(100.0) and cost["n_runs"] == 2
    assert groups["settings A"]["methods"]["lora"]["cost"]["s_per_step"] is None  # no throughput logged
    md = (out / "report.md").read_text()
    assert md.index("## Findings") < md.index("## settings A · tiny")
    assert "settings A · tiny · protocol paper: mixlora − lora = +100.0 points" in md
    assert "MixLoRA is better at this scale" in md and "MixLoRA is worse at this scale" in md
    assert "The paper reports +9.8 (LLaMA-2 7B, Table 2), outside this interval" in md
    assert "| mixlora | 1,000 | 100.0 | 4.00 | 4.00 | 2 | 2 |" in md  # the cost table
    html = (out / "report.html").read_text()
    assert "<h2>Findings</h2>" in html and "MixLoRA is worse at this scale" in html
