"""`mixlora-lit fit|validate|test|predict`: LightningCLI over MixLoraLitModule and MultiTaskDataModule."""

from __future__ import annotations

import os

from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from .. import runs
from ..sweep.spec import TRIAL_ENV
from .callbacks import TokenThroughput
from .datamodule import MultiTaskDataModule
from .module import MixLoraLitModule
from .records import RunRecorder, run_dir

SUBCOMMANDS = ("fit", "validate", "test", "predict")


class MixLoraCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--validate_at_start", type=bool, default=False,
                            help="fit: run a full validation pass before the first step (the base model's score)")
        parser.add_argument("--test_after_fit", type=bool, default=False,
                            help="fit: run the test split after fitting, in the same process on the same model")
        parser.add_argument("--run_name", type=str | None, default=None,
                            help="runs go to runs/<run_name>/version_N unless trainer.default_root_dir is set")
        parser.link_arguments("model.base", "data.tokenizer")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.save_top_k": 0,
                             "checkpoint.every_n_train_steps": 50})
        parser.add_lightning_class_args(TokenThroughput, "throughput")
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.set_defaults({"lr_monitor.logging_interval": "step"})

    def instantiate_trainer(self, **kwargs):
        # Default loggers: TensorBoard and CSV side by side in <default_root_dir>/version_N.
        trainer_config = self._get(self.config_init, "trainer", default={})
        if trainer_config.get("logger") in (None, True) and "logger" not in kwargs:
            from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

            run_name = self._get(self.config_init, "run_name", default=None)
            root = trainer_config.get("default_root_dir") or f"runs/{run_name or 'default'}"
            csv = CSVLogger(root, name="")
            kwargs["logger"] = [csv, TensorBoardLogger(root, name="", version=csv.version)]
        trainer = super().instantiate_trainer(**kwargs)
        # Not a configurable callback: every run directory gets its records (mixlora_lit.runs).
        trainer.callbacks.append(RunRecorder(run_name=self._get(self.config_init, "run_name", default=None)))
        if os.environ.get(TRIAL_ENV):  # inside a sweep trial whose study prunes (needs optuna)
            from ..sweep.pruning import StepPruning

            trainer.callbacks.append(StepPruning.from_env())
        return trainer

    def before_fit(self) -> None:
        cfg = self.config[self.subcommand]
        if cfg.get("validate_at_start") and not cfg.get("ckpt_path"):
            self.trainer.validate(self.model, datamodule=self.datamodule)

    def after_fit(self) -> None:
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


def run(args: list[str] | None = None) -> MixLoraCLI:
    return MixLoraCLI(
        MixLoraLitModule, MultiTaskDataModule,
        args=args,
        save_config_kwargs={"overwrite": True, "config_filename": runs.CONFIG},
        trainer_defaults={"use_distributed_sampler": False},  # the data module shards batches per rank itself
        parser_kwargs={"default_env": False, "allow_abbrev": False},
    )
