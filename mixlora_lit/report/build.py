"""`mixlora-lit report`: run records and Optuna studies -> report.md, report.html, figures/*.png, report.json.

Every number the documents show is in report.json. Accuracies are fractions of examples; the
documents print them as percentages (x100) and differences in points.
"""

from __future__ import annotations

import base64
import datetime
import json
import math
from pathlib import Path
from typing import Any

from .. import runs
from . import plots, stats
from .collect import SINGLE_TASK, Collected, Group, collect_runs, collect_study
from .published import published_rows

UNITS = ("accuracy as a fraction of examples (0-1); diff = a - b in the same units (x100 = points); "
         "avg = unweighted mean of the per-task accuracies")


def _pct(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{100 * value:.{digits}f}"


def _group_slug(index: int, group: Group) -> str:
    return f"g{index}"


def summarise_group(group: Group, split: str, baseline: str, n_resamples: int, seed: int) -> dict[str, Any]:
    methods: dict[str, Any] = {}
    notes: list[str] = []
    for label, m in group.methods.items():
        per_seed = [runs.accuracy_by_task(rows) for rows in m.seed_predictions(split)]
        complete = [s for s in per_seed if all(t in s for t in group.tasks)]
        avg_values = [sum(s[t] for t in group.tasks) / len(group.tasks) for s in complete]
        if len(complete) < len(per_seed):
            notes.append(f"{label}: {len(per_seed) - len(complete)} seed(s) lack some of the group's tasks; "
                         f"the average uses the {len(complete)} complete seed(s)")
        records = [run.record for run in m.runs]
        trainable = sorted({r.trainable_params for r in records if r.trainable_params is not None})
        total = records[0].total_params
        methods[label] = {
            "method": m.method, "n_seeds": len(per_seed), "seeds": m.seeds,
            "per_task": {t: stats.mean_std([s.get(t) for s in per_seed]) for t in group.tasks},
            "avg": stats.mean_std(avg_values),
            "trainable_params": trainable[0] if len(trainable) == 1 else trainable,
            "total_params": total,
            "trainable_pct_of_base": (100 * trainable[0] / (total - trainable[0])
                                      if len(trainable) == 1 and total else None),
            "global_step": sorted({r.global_step for r in records}),
            "runs": [_display(run.path) for run in m.runs],
            "cost": _cost(m.runs),
        }
    comparisons = []
    base_labels = [label for label, m in methods.items() if m["method"] == baseline]
    if not base_labels:
        notes.append(f"no {baseline!r} run in this group: no comparisons against the baseline")
    pairs: list[tuple[str, str]] = [(a, b) for b in base_labels for a in methods if methods[a]["method"] != baseline]
    for b in (label for label, m in methods.items() if m["method"] == "dora" and baseline != "dora"):
        pairs += [(a, b) for a, m in methods.items() if m["method"].startswith("mixlora")]
    seen: set[frozenset] = set()
    for a, b in pairs:
        if frozenset((a, b)) in seen:
            continue
        seen.add(frozenset((a, b)))
        paired = stats.align(group.methods[a].seed_predictions(split), group.methods[b].seed_predictions(split))
        if paired.n_examples == 0:
            notes.append(f"{a} vs {b}: no test example scored by both; not compared")
            continue
        result = stats.compare(paired, n_resamples=n_resamples, seed=seed)
        missing = [t for t in group.tasks if t not in paired.tasks]
        if missing:
            notes.append(f"{a} vs {b}: no shared examples for {missing}; the difference averages {paired.tasks} only")
        comparisons.append({"a": a, "b": b, "metric": "avg", "missing_tasks": missing, **result})
    return {"series": group.series, "base": group.base, "protocol": group.protocol, "tasks": group.tasks,
            "kind": group.kind, "split": split,
            "methods": methods, "comparisons": comparisons, "baseline": base_labels[0] if base_labels else None,
            "baselines": base_labels, "notes": notes, "published": published_rows(group.tasks, group.protocol, single_task=group.kind == SINGLE_TASK)}


def _cost(method_runs: list[runs.Run]) -> dict[str, Any]:
    """Training cost from the records: median tokens/s and examples/s while training, seconds per optimizer
    step (examples per step / examples per second) and wall time per run (training and evaluation)."""
    tokens, examples, steps, walls = [], [], [], []
    for run in method_runs:
        record = run.record
        if record.tokens_per_s:
            tokens.append(record.tokens_per_s)
        if record.wall_time_s:
            walls.append(record.wall_time_s)
        rate = runs.median(float(r["train/examples_per_sec"]) for r in runs.read_metrics(run.path)
                           if r.get("train/examples_per_sec") not in (None, ""))
        if rate:
            examples.append(rate)
            trainer, data = run.config.get("trainer") or {}, run.config.get("data") or {}
            per_step = (data.get("batch_size") or 0) * (trainer.get("accumulate_grad_batches") or 1)
            if per_step:
                steps.append(per_step / rate)
    return {"tokens_per_s": runs.median(tokens), "examples_per_s": runs.median(examples),
            "s_per_step": runs.median(steps), "wall_time_s": runs.median(walls), "n_runs": len(method_runs)}


VERDICTS = {"gain": "MixLoRA is better at this scale", "loss": "MixLoRA is worse at this scale",
            "none": "no difference detectable at this scale (the 95% CI covers 0)"}


def findings(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """MixLoRA against LoRA and DoRA in every group, with a verdict read off the 95% CI and the paper's
    published gap for the same pair (Table 2, LLaMA-2 7B) where the group is the paper's 5-task mix."""
    from .published import PAPER5, TABLE2

    out = []
    for g in groups:
        for c in g["comparisons"]:
            a, b = g["methods"][c["a"]]["method"], g["methods"][c["b"]]["method"]
            if not (a.startswith("mixlora") and b in ("lora", "dora")):
                continue
            verdict = "gain" if c["ci_low"] > 0 else "loss" if c["ci_high"] < 0 else "none"
            gap = None
            if g["kind"] != SINGLE_TASK and sorted(g["tasks"]) == sorted(PAPER5) and a in TABLE2 and b in TABLE2:
                gap = TABLE2[a]["avg"] - TABLE2[b]["avg"]
            out.append({"series": g["series"], "base": g["base"], "protocol": g["protocol"], "a": c["a"], "b": c["b"],
                        "diff": c["diff"], "ci_low": c["ci_low"], "ci_high": c["ci_high"], "p_value": c["p_value"],
                        "n_examples": c["n_examples"], "n_seeds": c["n_seeds"], "verdict": verdict,
                        "per_task": {t: e["diff"] for t, e in c["per_task"].items()}, "published_gap": gap,
                        "published_gap_in_ci": None if gap is None else c["ci_low"] <= gap <= c["ci_high"]})
    return out


def study_finding(study: dict[str, Any]) -> str | None:
    """One line per study: how many trials finished, the best and the worst objective with their settings."""
    complete = [t for t in study["trials"] if t["state"] == "COMPLETE" and t["values"]]
    if not complete or len(study["directions"]) != 1:
        return None
    sign = 1 if study["directions"][0] == "maximize" else -1
    ranked = sorted(complete, key=lambda t: sign * t["values"][0], reverse=True)

    def shown(t: dict[str, Any]) -> str:
        settings = ", ".join(f"{k.rsplit('.', 1)[-1]}={v:.3g}" if isinstance(v, float) else f"{k.rsplit('.', 1)[-1]}={v}"
                             for k, v in t["params"].items())
        return f"{t['values'][0]:.4g} (trial {t['number']}: {settings})"

    metric = (study.get("objectives") or ["objective"])[0]
    text = f"study `{study['name']}`: {len(complete)} complete trial(s); {metric} best {shown(ranked[0])}"
    if len(ranked) > 1:
        text += f", worst {shown(ranked[-1])}"
    text += " (dev split, one seed per setting)." if str(metric).startswith("val/") else "."
    return " ".join(x for x in (text, setting_means(complete), objective_noise(complete, metric)) if x)


def setting_means(complete: list[dict[str, Any]]) -> str | None:
    """The mean objective per value of each searched setting that takes few discrete values (expert count,
    rank, top-k), with the number of trials behind each mean; continuous settings (learning rate) are left
    to the figures. Outside a grid the other settings vary too, so these are marginal means, not effects."""
    parts = []
    names = sorted({k for t in complete for k in t["params"]}, key=lambda k: k.rsplit(".", 1)[-1])
    for name in names:
        values = [t["params"].get(name) for t in complete]
        if any(v is None or isinstance(v, float) for v in values) or len(set(values)) < 2:
            continue
        by_value: dict[Any, list[float]] = {}
        for t, v in zip(complete, values):
            by_value.setdefault(v, []).append(t["values"][0])
        cells = ", ".join(f"{v}: {sum(ys) / len(ys):.3g} ({len(ys)})"
                          for v, ys in sorted(by_value.items(), key=lambda item: (type(item[0]).__name__, item[0])))
        parts.append(f"{name.rsplit('.', 1)[-1]} {cells}")
    return f"Mean objective per setting (trials): {'; '.join(parts)}." if parts else None


def objective_noise(complete: list[dict[str, Any]], metric: str) -> str | None:
    """How far apart two trials must be before the dev pass itself cannot explain it: the binomial standard
    error of a task-averaged accuracy over the trials' dev caps, at the mean objective. Only for accuracy
    objectives whose trials all had the same caps."""
    caps = [t.get("dev_cap_per_task") for t in complete]
    if "acc" not in str(metric) or not caps or caps[0] is None or any(c != caps[0] for c in caps):
        return None
    p = sum(t["values"][0] for t in complete) / len(complete)
    if not 0 <= p <= 1:
        return None
    counts = list(caps[0].values())
    se = math.sqrt(sum(p * (1 - p) / n for n in counts)) / len(counts)
    per_task = f"{counts[0]} per task" if len(set(counts)) == 1 else f"{min(counts)}-{max(counts)} per task"
    return (f"Noise: one dev pass of at most {sum(counts)} examples ({per_task}) has a sampling standard error of "
            f"about {100 * se:.1f} points at the mean objective ({p:.3g}), so two single trials less than "
            f"{100 * 2 * math.sqrt(2) * se:.1f} points apart (2 x sqrt(2) x SE, about a 95% bound) are within "
            f"that noise.")


def not_included_text(incomplete: list[dict[str, Any]]) -> str | None:
    """One line for the top of the report: how many listed runs the findings leave out, by label and
    status (a study still under way shows here, not only at the bottom)."""
    if not incomplete:
        return None
    counts: dict[str, dict[str, int]] = {}
    for item in incomplete:
        by_status = counts.setdefault(item.get("series") or "runs", {})
        by_status[item["status"]] = by_status.get(item["status"], 0) + 1
    parts = "; ".join(f"{label}: " + ", ".join(f"{n} {status}" for status, n in by_status.items())
                      for label, by_status in counts.items())
    return (f"Not in these findings: {len(incomplete)} listed run path(s) ({parts}); "
            f"see 'Runs not included' below.")


def finding_text(f: dict[str, Any]) -> str:
    where = " · ".join(x for x in (f["series"], f["base"], f"protocol {f['protocol']}") if x)
    losses = [f"{t} {100 * d:+.1f}" for t, d in f["per_task"].items() if d < 0]
    text = (f"{where}: {f['a']} − {f['b']} = {100 * f['diff']:+.1f} points, 95% CI [{100 * f['ci_low']:+.1f}, "
            f"{100 * f['ci_high']:+.1f}], p={f['p_value']:.2g} ({f['n_seeds'][0]} / {f['n_seeds'][1]} seeds, "
            f"{f['n_examples']} paired test examples): {VERDICTS[f['verdict']]}.")
    if losses:
        text += f" Tasks where {f['a']} scores lower: {', '.join(losses)}."
    if f["published_gap"] is not None:
        text += (f" The paper reports {100 * f['published_gap']:+.1f} (LLaMA-2 7B, Table 2), "
                 f"{'inside' if f['published_gap_in_ci'] else 'outside'} this interval"
                 f"{'' if f['protocol'] == 'paper' else ' (measured with its own label-token protocol)'}.")
    return text


def _cost_rows(summary: dict[str, Any]) -> list[list[str]]:
    def fmt(value, digits=1):
        return "-" if value is None else f"{value:,.{digits}f}"

    rows = []
    for label, m in summary["methods"].items():
        c = m["cost"]
        params = m["trainable_params"]
        rows.append([label, f"{params:,}" if isinstance(params, int) else str(params), fmt(c["tokens_per_s"]),
                     fmt(c["examples_per_s"], 2), fmt(c["s_per_step"], 2), fmt(c["wall_time_s"], 0), str(c["n_runs"])])
    return rows


COST_HEADER = ["method", "trainable params", "tokens/s (training)", "examples/s", "s per optimizer step",
               "wall time per run (s)", "runs"]


STUDY_HEADER = ["trial", "state", "objective", "settings", "trainable params", "load entropy", "dead experts",
                "largest expert share", "seconds"]


def _study_rows(study: dict[str, Any]) -> list[list[str]]:
    """One row per trial: its settings, objective value, trainable parameters and (MixLoRA) routing health
    on its last dev pass."""
    rows = []
    for t in study["trials"]:
        attrs, routing = t["user_attrs"], t["user_attrs"].get("routing") or {}
        settings = ", ".join(f"{k.rsplit('.', 1)[-1]}={v:.3g}" if isinstance(v, float) else
                             f"{k.rsplit('.', 1)[-1]}={v}" for k, v in t["params"].items())
        value = "-" if not t["values"] else ", ".join(f"{v:.4g}" for v in t["values"])
        params = attrs.get("trainable_params")

        def share(key: str) -> str:
            return "-" if routing.get(key) is None else f"{routing[key]:.3f}"

        rows.append([str(t["number"]), t["state"].lower(), value, settings,
                     f"{params:,}" if isinstance(params, int) else "-", share("load_entropy"),
                     share("dead_expert_frac"), share("max_load_share"),
                     "-" if t["duration_s"] is None else f"{t['duration_s']:.0f}"])
    return rows


def _methods_section(group: Group) -> dict[str, Any]:
    """Base, tasks, caps, protocol, seeds, steps, hardware, wall time, versions and commands, from the records."""
    all_runs = [run for m in group.methods.values() for run in m.runs]
    data = [run.config.get("data") or {} for run in all_runs]
    caps = sorted({json.dumps({k: d.get(k) for k in ("train_cap", "dev_cap", "test_cap", "cutoff_len",
                                                      "batch_size")}) for d in data})
    hardware = sorted({json.dumps({k: run.record.hardware.get(k) for k in ("cpu", "gpu", "threads", "devices")
                                   if run.record.hardware.get(k) is not None}) for run in all_runs})
    versions = sorted({json.dumps(run.record.versions, sort_keys=True) for run in all_runs})
    return {"base": group.base, "tasks": group.tasks, "protocol": group.protocol,
            "caps": [json.loads(c) for c in caps], "hardware": [json.loads(h) for h in hardware],
            "versions": [json.loads(v) for v in versions],
            "runs": [{"path": _display(run.path), "run_name": run.record.run_name, "method": run.record.method,
                      "seed": run.record.seed,
                      "global_step": run.record.global_step, "wall_time_s": run.record.wall_time_s,
                      "tokens_per_s": run.record.tokens_per_s, "git_commit": run.record.git_commit,
                      "command": run.record.command} for run in all_runs]}


def _figures(index: int, group: Group, summary: dict[str, Any], figures: Path) -> list[dict[str, str]]:
    out = []
    slug = _group_slug(index, group)
    path = plots.accuracy_bars(group.tasks, summary["methods"], figures / f"{slug}_accuracy.png",
                               f"{group.key}: {summary['split']} accuracy, mean +- std over seeds")
    out.append({"file": path.name, "caption": "Per-task accuracy and the average per method (error bars: std over seeds)."})
    for n, (label, m) in enumerate(group.methods.items()):
        history = [h for h in m.runs[0].eval_history if h.get("routing_counts")]
        chosen = [h for h in history if h["stage"] == summary["split"]] or history
        if chosen:
            path = plots.routing(chosen[-1]["routing_counts"], figures / f"{slug}_routing_{n}.png",
                                 f"{label}: expert load on {chosen[-1]['stage']} at step {chosen[-1]['step']} "
                                 f"(seed {m.runs[0].record.seed})")
            out.append({"file": path.name, "caption": f"{label}: share of tokens per expert per layer, and load "
                                                      f"entropy per layer."})
    curves = {}
    for label, m in group.methods.items():
        for run in m.runs:
            rows = runs.read_metrics(run.path)
            if rows:
                curves[f"{label} s{run.record.seed}"] = rows
    if curves:
        path = plots.training_curves(curves, figures / f"{slug}_curves.png", f"{group.key}: training")
        out.append({"file": path.name, "caption": "Training LM loss, router aux loss and dev accuracy per run."})
    return out


def build_report(run_paths: list[str], studies: list[str], out: str | Path, title: str = "MixLoRA comparison",
                 baseline: str = "lora", split: str = "test", n_resamples: int = 10_000, seed: int = 0,
                 command: str | None = None) -> dict:
    out = Path(out)
    figures = out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    for old in figures.glob("*.png"):  # figures of an earlier report into the same folder
        old.unlink()
    collected: Collected = collect_runs(run_paths, split) if run_paths else Collected([], [])
    report: dict[str, Any] = {"title": title, "created": datetime.datetime.now().isoformat(timespec="seconds"),
                              "units": UNITS, "split": split, "baseline": baseline,
                              "statistics": stats.__doc__.strip(), "n_resamples": n_resamples,
                              "command": command,
                              "groups": [], "incomplete_runs": collected.incomplete, "studies": []}
    for index, group in enumerate(collected.groups):
        summary = summarise_group(group, split, baseline, n_resamples, seed)
        summary["methods_section"] = _methods_section(group)
        summary["figures"] = _figures(index, group, summary, figures)
        report["groups"].append(summary)
    report["findings"] = findings(report["groups"])
    for spec in studies:
        study = collect_study(spec)
        study["figures"] = []
        slug = f"study_{len(report['studies'])}"
        if any(t["state"] in ("COMPLETE", "PRUNED") for t in study["trials"]):
            study["figures"].append({"file": plots.study_history(study, figures / f"{slug}_history.png").name,
                                     "caption": "Objective per trial and the best so far."})
            study["figures"].append({"file": plots.study_parallel(study, figures / f"{slug}_parallel.png").name,
                                     "caption": "Searched parameters against the objective."})
            settings = plots.study_settings(study, figures / f"{slug}_settings.png")
            if settings is not None:
                study["figures"].append({"file": settings.name, "caption": "The objective and (MixLoRA) the dev "
                                         "load entropy against each searched setting and the trainable parameters."})
        if study["importances"]:
            study["figures"].append({"file": plots.study_importances(study, figures / f"{slug}_importance.png").name,
                                     "caption": "Parameter importances (Optuna's fANOVA)."})
        report["studies"].append(study)
    (out / "report.json").write_text(json.dumps(_finite(report), indent=1, default=str, allow_nan=False) + "\n")
    (out / "report.md").write_text(render_markdown(report))
    (out / "report.html").write_text(render_html(report, figures))
    return report


def _display(path: Path) -> str:
    """A run path as the reader typed it: relative to the working directory when it lies below it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _finite(value: Any) -> Any:
    """NaN and infinities become None (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _pm(entry: dict) -> str:
    if entry["mean"] is None:
        return "-"
    return _pct(entry["mean"]) + (f" ± {_pct(entry['std'])}" if entry["std"] is not None else " (1 seed)")


# ---------------------------------------------------------------------- documents
def _table_rows(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    tasks = summary["tasks"]
    header = ["method", "seeds", *tasks, "avg", "trainable params", "% of base", "avg - baseline (95% CI)"]
    by_label = {(c["a"], c["b"]): c for c in summary["comparisons"]}
    rows = []
    for label, m in summary["methods"].items():
        cells = [label, str(m["n_seeds"])]
        for t in tasks:
            cells.append(_pm(m["per_task"][t]))
        cells.append(_pm(m["avg"]))
        params = m["trainable_params"]
        cells.append(f"{params:,}" if isinstance(params, int) else str(params))
        cells.append(f"{m['trainable_pct_of_base']:.2f}" if m["trainable_pct_of_base"] is not None else "-")
        c = by_label.get((label, summary["baseline"]))
        cells.append(f"{100 * c['diff']:+.1f} [{100 * c['ci_low']:+.1f}, {100 * c['ci_high']:+.1f}] p={c['p_value']:.3g}"
                     if c else ("baseline" if label in summary["baselines"] else "-"))
        rows.append(cells)
    published = summary.get("published")
    if published:
        for method, values in published["methods"].items():
            cells = [f"paper: {method} (LLaMA-2 7B)", "-"]
            cells += [_pct(values["per_task"].get(t)) for t in tasks]
            cells += [_pct(values["avg"]), "-", "-", "-"]
            rows.append(cells)
    return header, rows


def _comparison_rows(summary: dict[str, Any]) -> list[list[str]]:
    rows = []
    for c in summary["comparisons"]:
        per_task = "; ".join(f"{t} {100 * e['diff']:+.1f}" + (f" (McNemar p={e['p_mcnemar']:.3g})" if "p_mcnemar" in e
                                                             else "") for t, e in c["per_task"].items())
        rows.append([f"{c['a']} - {c['b']}", f"{100 * c['diff']:+.2f}",
                     f"[{100 * c['ci_low']:+.2f}, {100 * c['ci_high']:+.2f}]", f"{c['p_value']:.4g}",
                     str(c["n_examples"]), f"{c['n_seeds'][0]} / {c['n_seeds'][1]}", per_task])
    return rows


COMPARISON_HEADER = ["a - b", "diff (points)", "95% CI", "p (permutation)", "examples", "seeds a / b", "per task"]


def _our_scale(g: dict[str, Any]) -> str:
    ms = g["methods_section"]
    totals = sorted({round(m["total_params"] / 1e6) for m in g["methods"].values() if m["total_params"]})
    steps = sorted({s for m in g["methods"].values() for s in m["global_step"]})
    return (f"{g['base']} ({', '.join(f'{t} M' for t in totals) or '?'} parameters with adapters), "
            f"data caps {json.dumps(ms['caps'])}, {', '.join(map(str, steps))} steps")


def _md(text: Any) -> str:
    """A string from configs or data, safe inside a Markdown table cell (no raw HTML, no cell breaks)."""
    return (str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")
            .replace("\n", " "))


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    esc = _md

    lines = ["| " + " | ".join(esc(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _baseline_name(report: dict[str, Any], g: dict[str, Any], code: bool = True) -> str:
    if g["baseline"]:
        return f"`{g['baseline']}`" if code else g["baseline"]
    return f"{report['baseline']} (no such run in this group yet)"


def render_markdown(report: dict[str, Any]) -> str:
    out = [f"# {report['title']}", "", f"Generated {report['created']} by `{report['command']}`. Units: {report['units']}.",
           ""]
    sweeps = [line for line in (study_finding(s) for s in report["studies"]) if line]
    left_out = not_included_text(report["incomplete_runs"])
    if report.get("findings") or sweeps or left_out:
        out += ["## Findings", "", "MixLoRA against LoRA and DoRA, test accuracy averaged over the tasks "
                "(verdicts from the paired 95% CI; details, per-task tables and the methods of each group below):", ""]
        out += [f"- {_md(finding_text(f))}" for f in report["findings"]] + [""]
        if sweeps:
            out += ["Sweeps:", ""] + [f"- {_md(line)}" for line in sweeps] + [""]
        if left_out:
            out += [_md(left_out), ""]
    for i, g in enumerate(report["groups"]):
        series = f"{_md(g['series'])} · " if g.get("series") else ""
        out += [f"## {series}{_md(g['base'])} · protocol {_md(g['protocol'])} · {g['kind']} · {_md(', '.join(g['tasks']))}", "",
                f"{g['split']} accuracy (%), mean ± std over seeds; the last column is the difference of the "
                f"average to the baseline {_baseline_name(report, g)} with its paired bootstrap 95% CI and "
                f"permutation p-value.",
                "", _md_table(*_table_rows(g)), ""]
        if g.get("published"):
            out += [f"Paper rows: {g['published']['source']}, {g['published']['scale']}. Ours: {_our_scale(g)}. "
                    f"Not the same scale: compare directions, not values.", ""]
        out += [f"- note: {_md(n)}" for n in g["notes"]] + ([""] if g["notes"] else [])
        if g["comparisons"]:
            out += ["### Paired comparisons", "", _md_table(COMPARISON_HEADER, _comparison_rows(g)), ""]
        out += ["### Cost", "", "Medians over each method's runs, from their records (training throughput "
                "from metrics.csv; wall time includes evaluation).", "", _md_table(COST_HEADER, _cost_rows(g)), ""]
        for fig in g["figures"]:
            out += [f"![{fig['caption']}](figures/{fig['file']})", "", fig["caption"], ""]
        ms = g["methods_section"]
        out += ["### Methods", "", f"- base `{ms['base']}`, tasks {', '.join(ms['tasks'])}, protocol `{ms['protocol']}`",
                f"- data caps and batch: {json.dumps(ms['caps'])}", f"- hardware: {json.dumps(ms['hardware'])}",
                f"- versions: {json.dumps(ms['versions'])}", "", "| run | method | seed | steps | wall time (s) | "
                "tokens/s | commit | command |", "|---|---|---|---|---|---|---|---|"]
        for r in ms["runs"]:
            out.append(f"| {_md(r['path'])} ({_md(r['run_name'] or '-')}) | {_md(r['method'])} | {r['seed']} | "
                       f"{r['global_step']} | {r['wall_time_s']} | "
                       f"{'-' if r['tokens_per_s'] is None else round(r['tokens_per_s'], 1)} | {_md(r['git_commit'])} | "
                       f"{_md(r['command'] or '-')} |")
        out.append("")
    if report["incomplete_runs"]:
        out += ["## Runs not included", "", _md_table(["path", "status", "reason"],
                                                      [[r["path"], r["status"], r.get("reason", "")]
                                                       for r in report["incomplete_runs"]]), ""]
    for s in report["studies"]:
        counts: dict[str, int] = {}
        for t in s["trials"]:
            counts[t["state"]] = counts.get(t["state"], 0) + 1
        out += [f"## Study `{s['name']}`", "", f"Storage `{s['storage']}`, objectives {s['objectives']} "
                f"({', '.join(s['directions'])}); trials: {json.dumps(counts)}; best trial: {s['best']}; "
                f"Pareto front: {s['pareto'] or '-'}.", "", _md_table(STUDY_HEADER, _study_rows(s)), "",
                "Load entropy is normalised to 1 for a uniform load; dead experts is the fraction of (layer, expert) "
                "pairs that received no dev token.", ""]
        for fig in s["figures"]:
            out += [f"![{fig['caption']}](figures/{fig['file']})", "", fig["caption"], ""]
    out += ["## Statistics", "", report["statistics"], ""]
    return "\n".join(out)


_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{{ report.title }}</title>
<style>
body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:14px}
td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
td:first-child,th:first-child{text-align:left}
img{max-width:100%;border:1px solid #eee}
code{background:#f4f4f4;padding:1px 3px}
</style></head><body>
<h1>{{ report.title }}</h1>
<p>Generated {{ report.created }} by <code>{{ report.command }}</code>. Units: {{ report.units }}.</p>
{% if findings or sweep_findings or left_out %}<h2>Findings</h2><p>MixLoRA against LoRA and DoRA, test accuracy averaged over the
tasks (verdicts from the paired 95% CI; details below):</p><ul>{% for f in findings %}<li>{{ f }}</li>{% endfor %}</ul>
{% if sweep_findings %}<p>Sweeps:</p><ul>{% for f in sweep_findings %}<li>{{ f }}</li>{% endfor %}</ul>{% endif %}
{% if left_out %}<p>{{ left_out }}</p>{% endif %}{% endif %}
{% for g in report.groups %}
<h2>{% if g.series %}{{ g.series }} · {% endif %}{{ g.base }} · protocol <code>{{ g.protocol }}</code> · {{ g.kind }} · {{ g.tasks | join(", ") }}</h2>
<p>{{ g.split }} accuracy (%), mean ± std over seeds; the last column is the difference of the average to the
baseline {{ g.baseline_name }} with its paired bootstrap 95% CI and permutation p-value.</p>
<table class="main"><tr>{% for h in g.table[0] %}<th>{{ h }}</th>{% endfor %}</tr>
{% for row in g.table[1] %}<tr>{% for c in row %}<td>{{ c }}</td>{% endfor %}</tr>{% endfor %}</table>
{% if g.published %}<p>Paper rows: {{ g.published.source }}, {{ g.published.scale }}. Ours: {{ g.our_scale }}.
Not the same scale: compare directions, not values.</p>{% endif %}
{% if g.notes %}<ul>{% for n in g.notes %}<li>note: {{ n }}</li>{% endfor %}</ul>{% endif %}
{% if g.comparison_rows %}<h3>Paired comparisons</h3>
<table><tr>{% for h in comparison_header %}<th>{{ h }}</th>{% endfor %}</tr>
{% for row in g.comparison_rows %}<tr>{% for c in row %}<td>{{ c }}</td>{% endfor %}</tr>{% endfor %}</table>{% endif %}
<h3>Cost</h3><p>Medians over each method's runs, from their records (wall time includes evaluation).</p>
<table><tr>{% for h in cost_header %}<th>{{ h }}</th>{% endfor %}</tr>
{% for row in g.cost_rows %}<tr>{% for c in row %}<td>{{ c }}</td>{% endfor %}</tr>{% endfor %}</table>
{% for fig in g.figures %}<figure><img alt="{{ fig.caption }}" src="{{ images[fig.file] }}">
<figcaption>{{ fig.caption }}</figcaption></figure>{% endfor %}
<h3>Methods</h3>
<ul><li>base <code>{{ g.methods_section.base }}</code>, protocol <code>{{ g.methods_section.protocol }}</code></li>
<li>data caps and batch: {{ g.methods_section.caps | tojson }}</li><li>hardware: {{ g.methods_section.hardware | tojson }}</li>
<li>versions: {{ g.methods_section.versions | tojson }}</li></ul>
<table><tr><th>run</th><th>method</th><th>seed</th><th>steps</th><th>wall time (s)</th><th>commit</th><th>command</th></tr>
{% for r in g.methods_section.runs %}<tr><td><code>{{ r.path }}</code> {{ r.run_name or "" }}</td><td>{{ r.method }}</td><td>{{ r.seed }}</td>
<td>{{ r.global_step }}</td><td>{{ r.wall_time_s }}</td><td>{{ r.git_commit }}</td><td><code>{{ r.command }}</code></td></tr>{% endfor %}
</table>
{% endfor %}
{% if report.incomplete_runs %}<h2>Runs not included</h2><table><tr><th>path</th><th>status</th><th>reason</th></tr>
{% for r in report.incomplete_runs %}<tr><td><code>{{ r.path }}</code></td><td>{{ r.status }}</td><td>{{ r.reason }}</td></tr>{% endfor %}
</table>{% endif %}
{% for s in report.studies %}<h2>Study <code>{{ s.name }}</code></h2>
<p>Storage <code>{{ s.storage }}</code>, objectives {{ s.objectives }} ({{ s.directions | join(", ") }});
{{ s.trials | length }} trials; best trial {{ s.best }}; Pareto front {{ s.pareto }}.</p>
<table><tr>{% for h in study_header %}<th>{{ h }}</th>{% endfor %}</tr>
{% for row in s.rows %}<tr>{% for c in row %}<td>{{ c }}</td>{% endfor %}</tr>{% endfor %}</table>
{% for fig in s.figures %}<figure><img alt="{{ fig.caption }}" src="{{ images[fig.file] }}">
<figcaption>{{ fig.caption }}</figcaption></figure>{% endfor %}{% endfor %}
<h2>Statistics</h2><pre>{{ report.statistics }}</pre>
</body></html>
"""


def render_html(report: dict[str, Any], figures: Path) -> str:
    """One self-contained file: figures as data URIs, every string escaped by Jinja2's autoescape."""
    import jinja2

    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    images = {}
    for item in [f for g in report["groups"] for f in g["figures"]] + [f for s in report["studies"]
                                                                        for f in s["figures"]]:
        data = (figures / item["file"]).read_bytes()
        images[item["file"]] = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
    groups = [dict(g, table=_table_rows(g), comparison_rows=_comparison_rows(g), our_scale=_our_scale(g),
                   cost_rows=_cost_rows(g), baseline_name=_baseline_name(report, g, code=False))
              for g in report["groups"]]
    studies = [dict(s, rows=_study_rows(s)) for s in report["studies"]]
    return env.from_string(_HTML).render(report=dict(report, groups=groups, studies=studies), images=images,
                                         study_header=STUDY_HEADER,
                                         comparison_header=COMPARISON_HEADER, cost_header=COST_HEADER,
                                         findings=[finding_text(f) for f in report.get("findings", [])],
                                         sweep_findings=[x for x in (study_finding(s) for s in report["studies"]) if x],
                                         left_out=not_included_text(report["incomplete_runs"]))
