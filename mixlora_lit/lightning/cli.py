"""`mixlora-lit fit|validate|test|predict`: LightningCLI over MixLoraLitModule and MultiTaskDataModule."""

from __future__ import annotations

import json
from pathlib import Path

from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from .callbacks import TokenThroughput
from .datamodule import MultiTaskDataModule
from .module import MixLoraLitModule

SUBCOMMANDS = ("fit", "validate", "test", "predict")


class MixLoraCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--validate_at_start", type=bool, default=False,
                            help="fit: run a full validation pass before the first step (the base model's score)")
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
        return super().instantiate_trainer(**kwargs)

    def before_fit(self) -> None:
        cfg = self.config[self.subcommand]
        if cfg.get("validate_at_start") and not cfg.get("ckpt_path"):
            self.trainer.validate(self.model, datamodule=self.datamodule)

    def after_fit(self) -> None:
        self._summarise()

    def after_validate(self) -> None:
        self._summarise()

    def after_test(self) -> None:
        self._summarise()

    def _summarise(self) -> None:
        run_dir = Path(self.trainer.log_dir or self.trainer.default_root_dir)  # collective: all ranks
        if self.trainer.global_rank != 0:
            return
        history = [h for h in self.model.eval_history if h.get("acc")]
        if not history:
            return
        tasks = self.model.task_names
        first, last = history[0], history[-1]
        rows = [f"{'task':<15}" + "".join(f"{h['stage']}@{h['step']:<6}".rjust(14) for h in (first, last))]
        for task in tasks + ["avg"]:
            vals = [h["acc"].get(task) if task != "avg" else h.get("avg_acc") for h in (first, last)]
            rows.append(f"{task:<15}" + "".join(f"{v:14.4f}" if v is not None else " " * 14 for v in vals))
        print("\nlabel-token accuracy (the paper's protocol):\n" + "\n".join(rows))
        run_dir.mkdir(parents=True, exist_ok=True)
        summary = {"first": first, "last": last, "tasks": tasks}
        (run_dir / "results.json").write_text(json.dumps(summary, indent=1))
        print(f"results: {run_dir / 'results.json'}")


def run(args: list[str] | None = None) -> MixLoraCLI:
    return MixLoraCLI(
        MixLoraLitModule, MultiTaskDataModule,
        args=args,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"use_distributed_sampler": False},  # the data module shards batches per rank itself
        parser_kwargs={"default_env": False, "allow_abbrev": False},
    )
