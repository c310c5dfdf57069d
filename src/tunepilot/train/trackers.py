"""Experiment trackers: TensorBoard by default; Weights & Biases or MLflow when asked for.

Each tracker receives the same numeric records that go to metrics.jsonl. A tracker that is asked
for but not installed is a config error (exit 2), found before training starts.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from tunepilot.errors import UserError

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def check_available(names: list[str]) -> None:
    missing = [n for n in names if importlib.util.find_spec(PACKAGES[n]) is None]
    if missing:
        raise UserError(
            f"train.log_to: {', '.join(missing)} requested but not installed; "
            f"pip install {' '.join(PACKAGES[n] for n in missing)} or remove it"
        )


class Trackers:
    def __init__(self, names: list[str], run_dir: Path, config: dict[str, Any]) -> None:
        self.writers: list[Any] = []
        self.names = names
        if "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        if "wandb" in names:
            import wandb

            self.wandb = wandb.init(
                project="tunepilot",
                name=run_dir.name,
                dir=str(run_dir),
                config=config,
                resume="allow",
            )
        if "mlflow" in names:
            import mlflow

            mlflow.start_run(run_name=run_dir.name)
            mlflow.log_params({k: str(v)[:250] for k, v in config.items()})

    def log(self, record: dict[str, Any]) -> None:
        step = int(record.get("step", 0))
        prefix = "eval" if "eval_loss" in record else "train"
        scalars = {
            f"{prefix}/{k.removeprefix('eval_')}": float(v)
            for k, v in record.items()
            if k not in ("step", "time", "epoch")
            and isinstance(v, int | float)
            and not isinstance(v, bool)
        }
        if "tensorboard" in self.names:
            for key, value in scalars.items():
                self.tb.add_scalar(key, value, step)
        if "wandb" in self.names:
            self.wandb.log(scalars, step=step)
        if "mlflow" in self.names:
            import mlflow

            mlflow.log_metrics({k.replace("/", "_"): v for k, v in scalars.items()}, step=step)

    def close(self) -> None:
        if "tensorboard" in self.names:
            self.tb.close()
        if "wandb" in self.names:
            self.wandb.finish()
        if "mlflow" in self.names:
            import mlflow

            mlflow.end_run()
