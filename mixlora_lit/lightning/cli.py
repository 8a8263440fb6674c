"""`mixlora-lit fit|validate|test|predict`: LightningCLI over MixLoraLitModule and MultiTaskDataModule."""

from __future__ import annotations

import os
import pickle
import sys
import tempfile
from pathlib import Path

import yaml
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.cli import LightningCLI

from .. import runs
from ..errors import MissingFileError, StoppedBySignal, UserError, one_line
from ..sweep.spec import TRIAL_ENV
from .callbacks import TokenThroughput
from .datamodule import MultiTaskDataModule
from .module import MixLoraLitModule
from .records import RunRecorder, run_dir
from .resume import AtomicCheckpointIO, ResumableCSVLogger, SigtermCheckpoint, StepCheckpoint, checkpoint_step

SUBCOMMANDS = ("fit", "validate", "test", "predict")
LIGHTNING_CKPT_WORDS = ("best", "hpc", "registry")  # --ckpt_path values Lightning resolves itself


def _check_writable(root: Path) -> None:
    """The run directory can be created and written, before any model is loaded."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=root):
            pass
    except OSError as err:
        raise UserError(f"run directory {root} (trainer.default_root_dir or runs/<run_name>) is not writable: "
                        f"{err.strerror or err}") from None


class MixLoraCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--validate_at_start", type=bool, default=False,
                            help="fit: run a full validation pass before the first step (the base model's score)")
        parser.add_argument("--test_after_fit", type=bool, default=False,
                            help="fit: run the test split after fitting, in the same process on the same model")
        parser.add_argument("--run_name", type=str | None, default=None,
                            help="runs go to runs/<run_name>/version_N unless trainer.default_root_dir is set")
        parser.link_arguments("model.base", "data.tokenizer")
        parser.add_lightning_class_args(StepCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.save_top_k": 0,
                             "checkpoint.every_n_train_steps": 50,
                             "checkpoint.save_on_train_epoch_end": False})  # after the epoch's validation
        parser.add_lightning_class_args(TokenThroughput, "throughput")
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.set_defaults({"lr_monitor.logging_interval": "step"})

    def _prepare_subcommand_parser(self, klass, subcommand: str, **kwargs):
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        # Checkpoints are loaded as data only (tensors, numbers, strings, containers), so a checkpoint
        # from elsewhere cannot run code; ours need nothing more. `--weights_only false` for others.
        parser.set_defaults({"weights_only": True})
        return parser

    def _subconfig(self):
        return self.config[self.subcommand] if self.subcommand else self.config  # run=False: no subcommand

    def _run_root(self) -> Path:
        """Where this run's version folders go: trainer.default_root_dir, else runs/<run_name or default>."""
        cfg = self._subconfig()
        return Path(cfg.trainer.get("default_root_dir") or f"runs/{cfg.get('run_name') or 'default'}")

    def before_instantiate_classes(self) -> None:
        """Checks that need no model: the run directory is writable, `--ckpt_path` exists. `--ckpt_path last`
        is the newest `version_N/checkpoints/last.ckpt` under the run root; a fit continues in that folder."""
        cfg = self._subconfig()
        root = self._run_root()
        _check_writable(root)
        self._resume: tuple[Path, int, int] | None = None
        ckpt = cfg.get("ckpt_path")
        if ckpt == "last":
            found = runs.latest_checkpoint(root)
            if found is None:
                raise MissingFileError(f"--ckpt_path last: no checkpoint to resume under {root} (looked for "
                                       f"version_*/{runs.CHECKPOINTS_DIR}/{runs.LAST_CHECKPOINT}); run without "
                                       f"--ckpt_path to start, or give the checkpoint file")
            cfg.ckpt_path = str(found)
            version = found.parent.parent.name.removeprefix("version_")
            if self.subcommand == "fit" and version.isdigit() and found.parent.parent.parent == root:
                self._resume = (found, int(version), checkpoint_step(found))
        elif ckpt and ckpt not in LIGHTNING_CKPT_WORDS and not Path(ckpt).is_file():
            raise MissingFileError(f"--ckpt_path {ckpt}: no such checkpoint file")

    def instantiate_trainer(self, **kwargs):
        # Default loggers: TensorBoard and CSV side by side in <default_root_dir>/version_N (the resumed
        # version for `fit --ckpt_path last`).
        trainer_config = self._get(self.config_init, "trainer", default={})
        if trainer_config.get("logger") in (None, True) and "logger" not in kwargs:
            from lightning.pytorch.loggers import TensorBoardLogger

            root = self._run_root()
            _, version, step = getattr(self, "_resume", None) or (None, None, None)
            csv = ResumableCSVLogger(root, name="", version=version, resume_step=step)
            kwargs["logger"] = [csv, TensorBoardLogger(root, name="", version=csv.version)]
        if trainer_config.get("plugins") is None and "plugins" not in kwargs:
            kwargs["plugins"] = [AtomicCheckpointIO()]
        trainer = super().instantiate_trainer(**kwargs)
        # Not configurable callbacks: every run directory gets its records (mixlora_lit.runs), and a fit
        # stopped by SIGTERM leaves a checkpoint to resume from.
        trainer.callbacks.append(RunRecorder(run_name=self._get(self.config_init, "run_name", default=None)))
        trainer.callbacks.append(SigtermCheckpoint())
        if os.environ.get(TRIAL_ENV):  # inside a sweep trial whose study prunes (needs optuna)
            from ..sweep.pruning import StepPruning

            trainer.callbacks.append(StepPruning.from_env())
        return trainer

    def before_fit(self) -> None:
        cfg = self.config[self.subcommand]
        if cfg.get("validate_at_start") and not cfg.get("ckpt_path"):
            self.trainer.validate(self.model, datamodule=self.datamodule)

    def after_fit(self) -> None:
        stopper = next((cb for cb in self.trainer.callbacks if isinstance(cb, SigtermCheckpoint)), None)
        if stopper is not None and stopper.pending:  # SIGTERM after the last step: the fit is complete
            self._summarise()
            raise StoppedBySignal(f"after the fit ended (step {self.trainer.global_step}, adapter saved); "
                                  f"the test stage did not run")
        if self.config[self.subcommand].get("test_after_fit"):
            self.trainer.test(self.model, datamodule=self.datamodule)
        self._summarise()

    def after_validate(self) -> None:
        self._summarise()

    def after_test(self) -> None:
        self._summarise()

    def _summarise(self) -> None:
        """Print the first and last evaluation passes (and the test pass) and where the record is."""
        directory = run_dir(self.trainer)  # collective: all ranks
        if self.trainer.global_rank != 0:
            return
        history = [h for h in self.model.eval_history if h.get("acc")]
        if not history:
            return
        val = [h for h in history if h["stage"] == "val"]
        shown = ([val[0]] if len(val) > 1 else []) + val[-1:] + [h for h in history if h["stage"] == "test"][-1:]
        rows = [f"{'task':<15}" + "".join(f"{h['stage']}@{h['step']}".rjust(14) for h in shown)]
        for task in self.model.task_names + ["avg"]:
            vals = [h["acc"].get(task) if task != "avg" else h.get("avg_acc") for h in shown]
            rows.append(f"{task:<15}" + "".join(f"{v:14.4f}" if v is not None else " " * 14 for v in vals))
        print("\nlabel-token accuracy (the paper's protocol):\n" + "\n".join(rows))
        print(f"run record: {directory / runs.RUN_RECORD}")


def _option_values(args: list[str], option: str) -> list[str]:
    """The values given to `option` (as `--opt value` or `--opt=value`)."""
    values = []
    for i, arg in enumerate(args):
        if arg == option and i + 1 < len(args):
            values.append(args[i + 1])
        elif arg.startswith(option + "="):
            values.append(arg.split("=", 1)[1])
    return values


def _check_config_files(args: list[str]) -> None:
    """A missing or malformed `--config` file is named with its line, before jsonargparse folds it away."""
    for name in _option_values(args, "--config"):
        path = Path(name)
        if not path.is_file():
            raise MissingFileError(f"--config {name}: no such file")
        try:
            yaml.safe_load(path.read_text(encoding="utf8"))
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f"{name}:{mark.line + 1}:{mark.column + 1}" if mark is not None else name
            problem = getattr(err, "problem", None) or str(err)
            raise UserError(f"{where}: not valid YAML: {one_line(problem)}") from None


def run(args: list[str] | None = None) -> MixLoraCLI:
    """The LightningCLI. Parse errors and bad values raise UserError (one line through `mixlora-lit`)."""
    from jsonargparse import ArgumentError

    _check_config_files(sys.argv[1:] if args is None else args)
    try:
        return MixLoraCLI(
            MixLoraLitModule, MultiTaskDataModule,
            args=args,
            save_config_kwargs={"overwrite": True, "config_filename": runs.CONFIG},
            trainer_defaults={"use_distributed_sampler": False},  # the data module shards batches per rank itself
            parser_kwargs={"default_env": False, "allow_abbrev": False, "exit_on_error": False},
        )
    except ArgumentError as err:
        raise UserError(one_line(str(err))) from None
    except pickle.UnpicklingError as err:  # a checkpoint that weights_only=True refuses
        given = _option_values(sys.argv[1:] if args is None else args, "--ckpt_path")
        raise UserError(f"--ckpt_path {given[-1] if given else ''}: refused to load: it holds Python objects other "
                        f"than tensors and plain data (loaded with weights_only=True, so it cannot run code); "
                        f"pass --weights_only false only for a checkpoint from a source you trust") from err
