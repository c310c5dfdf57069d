"""tunepilot sweep on the tiny model with SQLite: trials, resume, crashed trials, pruning,
outputs, memory between trials, bad inputs; and the search space on its own."""

from __future__ import annotations

import json
import time
import warnings
import weakref
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from tests.conftest import write_run_config
from tunepilot import run
from tunepilot.cli import main
from tunepilot.config import load_config, validate
from tunepilot.errors import UserError
from tunepilot.report import list_runs
from tunepilot.sweep import outputs, storage, study
from tunepilot.sweep.space import apply_params, search_space

SEARCHED = {"learning_rate", "warmup_ratio", "weight_decay", "lora_r", "scheduler"}


def sweep_config(tmp_path: Path, model: Path) -> Path:
    """4 optimizer steps per trial with one intermediate evaluation (step 2) for the pruner."""
    return write_run_config(
        tmp_path,
        model,
        {
            "max_steps": 4,
            "global_batch_size": 8,
            "micro_batch_size": 8,
            "precision": "fp32",
            "gradient_checkpointing": False,
            "probe_seconds": 0,
            "eval_every": 2,
            "log_to": [],
        },
    )


@pytest.fixture
def config(tmp_path: Path, tiny_model_dir: Path) -> Path:
    return sweep_config(tmp_path, tiny_model_dir)


def load(out: Path, name: str = "sweep") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{out / 'sweep.db'}")


def test_sweep_runs_resumes_replaces_a_crashed_trial_and_writes_best_yaml(
    config: Path, tmp_path: Path, capsys, monkeypatch
):
    # relative paths, as typed: best.yaml in the output dir must still find the data
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "sweep"
    assert main(["sweep", "config.yaml", "--trials", "2", "--output-dir", "sweep"]) == 0
    assert [t.state for t in load(out).trials] == [TrialState.COMPLETE] * 2

    # a worker killed mid-trial: RUNNING, with a heartbeat that has gone stale
    monkeypatch.setattr(storage, "HEARTBEAT_S", 1)
    monkeypatch.setattr(storage, "GRACE_S", 1)
    rdb = optuna.storages.RDBStorage(
        f"sqlite:///{out / 'sweep.db'}", heartbeat_interval=1, grace_period=1
    )
    with warnings.catch_warnings():  # ask() outside optimize(), as a worker's trial never is
        warnings.simplefilter("ignore")
        crashed = optuna.load_study(study_name="sweep", storage=rdb).ask()
    rdb.record_heartbeat(crashed._trial_id)
    time.sleep(2.5)
    capsys.readouterr()

    # the same command with a larger budget: continues the study up to 3 counted trials
    assert main(["sweep", "config.yaml", "--trials", "3", "--output-dir", "sweep"]) == 0
    trials = load(out).trials
    assert [t.state for t in trials] == [
        TrialState.COMPLETE,
        TrialState.COMPLETE,
        TrialState.FAIL,  # the crashed one, failed by its stale heartbeat and replaced
        TrialState.COMPLETE,
    ]
    printed = capsys.readouterr().out
    assert "4 trials in study sweep (1 run by this process)" in printed
    assert "best: trial" in printed and "tunepilot train" in printed

    base = yaml.safe_load((out / "trials" / "trial-000" / "config.yaml").read_text())
    for t in (trials[0], trials[1], trials[3]):
        run_dir = out / "trials" / f"trial-{t.number:03d}"
        # a normal run dir, minus what a finished trial no longer needs
        assert {"plan.json", "config.yaml", "eval.json", "trial.json", "train.log"} <= {
            p.name for p in run_dir.iterdir()
        }
        assert not (run_dir / "checkpoints").exists() and not (run_dir / "model").exists()
        record = json.loads((run_dir / "trial.json").read_text())
        assert record["state"] == "complete" and record["params"] == t.params
        assert record["eval_loss"] == t.value
        assert json.loads((run_dir / "eval.json").read_text())["after"]["loss"] == t.value
        assert set(t.params) == SEARCHED and 2 in t.intermediate_values
        # each trial ran its own values on the same pinned setup
        resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert resolved["train"]["learning_rate"] == pytest.approx(t.params["learning_rate"])
        assert resolved["lora"] == {
            **base["lora"],
            "r": t.params["lora_r"],
            "alpha": 2 * t.params["lora_r"],
        }
        for key in ("seed", "global_batch_size", "micro_batch_size", "max_steps", "max_length"):
            assert resolved["train"][key] == base["train"][key]

    best = min((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: t.value)
    cfg = load_config(out / "best.yaml")
    assert cfg.train.learning_rate == pytest.approx(best.params["learning_rate"])
    assert cfg.train.warmup_ratio == pytest.approx(best.params["warmup_ratio"])
    assert cfg.train.weight_decay == pytest.approx(best.params["weight_decay"])
    assert cfg.train.scheduler == best.params["scheduler"]
    assert (cfg.lora.r, cfg.lora.alpha) == (best.params["lora_r"], 2 * best.params["lora_r"])
    assert cfg.train.max_steps == 4 and cfg.train.micro_batch_size == 8  # the user's config
    assert cfg.train.warmup_steps == "auto" and cfg.output_dir is None
    assert f"trial {best.number}" in (out / "best.yaml").read_text()

    for name in ("optimization_history", "param_importances", "intermediate_values"):
        assert (out / "plots" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    rows = (out / "results.csv").read_text().splitlines()
    assert len(rows) == 1 + 4 and rows[0].startswith("number,state,eval_loss,")
    assert rows[0].endswith(",seconds")
    assert json.loads((out / "sweep.json").read_text())["study"] == "sweep"


def test_pruned_trials_leave_sane_run_dirs_and_free_their_models(
    config: Path, tmp_path: Path, capsys, monkeypatch
):
    # a pruner that stops every trial at its first evaluation (step 2 of 4)
    monkeypatch.setattr(study, "make_pruner", lambda *a: optuna.pruners.ThresholdPruner(upper=0.0))
    models: list[weakref.ref] = []
    build = run.build_model

    def tracked_build(prep, device):
        gc_alive = [m for m in models if m() is not None]
        assert not gc_alive, "the previous trial's model is still in memory"
        model = build(prep, device)
        models.append(weakref.ref(model))
        return model

    monkeypatch.setattr(run, "build_model", tracked_build)
    out = tmp_path / "sweep"
    assert main(["sweep", str(config), "--trials", "2", "--output-dir", str(out)]) == 0
    assert len(models) == 2 and all(m() is None for m in models)
    trials = load(out).trials
    assert [t.state for t in trials] == [TrialState.PRUNED] * 2
    assert all(list(t.intermediate_values) == [2] for t in trials)
    printed = capsys.readouterr().out
    assert "pruned at step 2" in printed and "no best.yaml" in printed
    assert not (out / "best.yaml").exists()

    run_dir = out / "trials" / "trial-000"
    assert json.loads((run_dir / "trial.json").read_text())["state"] == "pruned"
    assert not (run_dir / "checkpoints").exists()
    assert "after" not in json.loads((run_dir / "eval.json").read_text())
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    assert [r["step"] for r in records if "eval_loss" in r] == [0, 2]
    listed = {r["name"]: r for r in list_runs(out / "trials")}
    assert listed["trial-000"]["finished"] is False  # an unfinished run, readable as such


def error_of(capsys, *argv: str) -> str:
    assert main(list(argv)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    return err


def test_bad_sweep_inputs_exit_2_naming_the_flag(config: Path, tmp_path: Path, capsys):
    out = str(tmp_path / "sweep")
    assert "--trials 0: must be at least 1" in error_of(
        capsys, "sweep", str(config), "--trials", "0", "--output-dir", out
    )
    assert "--storage notaurl: not a database URL" in error_of(
        capsys, "sweep", str(config), "--trials", "1", "--storage", "notaurl", "--output-dir", out
    )
    nowhere = "sqlite:////no/such/dir/s.db"
    err = error_of(
        capsys, "sweep", str(config), "--trials", "1", "--storage", nowhere, "--output-dir", out
    )
    assert f"--storage {nowhere}: cannot use it" in err
    assert err.rstrip().endswith("check that its folder exists and is writable")
    err = error_of(
        capsys,
        "sweep",
        str(config),
        "--trials",
        "1",
        "--storage",
        "postgresql://someone:secret@127.0.0.1:1/nothing",
        "--output-dir",
        str(tmp_path / "pg"),
    )
    # which URL the error shows depends on the PostgreSQL drivers installed here (see
    # test_postgresql_url_takes_the_driver_installed); in every case it names the flag and
    # hides the password
    assert "--storage postgresql" in err
    assert "://someone:***@127.0.0.1:1/nothing" in err
    assert "check that the server runs and the URL's host, port, user and password" in err
    assert "secret" not in err

    (tmp_path / "sweep" / "sweep.json").write_text(
        json.dumps({"study": "other", "storage": "default (sweep.db in the output dir)"})
    )
    assert "--study sweep: " in error_of(
        capsys, "sweep", str(config), "--trials", "1", "--output-dir", out
    )


@pytest.mark.parametrize(
    ("installed", "expected"),
    [
        ({"psycopg", "psycopg2"}, "postgresql://"),  # SQLAlchemy's default driver, psycopg 3
        ({"psycopg2"}, "postgresql+psycopg2://"),
        (set(), None),
    ],
)
def test_postgresql_url_takes_the_driver_installed(monkeypatch, installed, expected):
    real_find_spec = storage.importlib.util.find_spec

    def find_spec(name, *args):
        if name in ("psycopg", "psycopg2"):
            return object() if name in installed else None
        return real_find_spec(name, *args)

    monkeypatch.setattr(storage.importlib.util, "find_spec", find_spec)
    text = "postgresql://someone:secret@db-host/sweeps"
    if expected is None:
        with pytest.raises(
            UserError,
            match=r"^--storage postgresql://someone:\*\*\*@db-host/"
            r"sweeps: no PostgreSQL driver installed; pip install psycopg2-binary",
        ):
            storage.parse(text)
    else:
        url = storage.parse(text)
        assert storage.shown(url) == f"{expected}someone:***@db-host/sweeps"
    # an explicit driver is the user's choice and is never rewritten
    explicit = storage.parse("postgresql+pg8000://someone:secret@db-host/sweeps")
    assert explicit.drivername == "postgresql+pg8000"


def test_a_study_refuses_another_config(config: Path, tmp_path: Path, capsys):
    out = tmp_path / "sweep"
    out.mkdir()
    made = optuna.create_study(study_name="sweep", storage=f"sqlite:///{out / 'sweep.db'}")
    other = load_config(config, ["train.max_steps=50"])
    made.set_user_attr(study.CONFIG_ATTR, study.fingerprint(other))
    err = error_of(capsys, "sweep", str(config), "--trials", "1", "--output-dir", str(out))
    assert "--study sweep: started with a different config" in err and "train.max_steps" in err


def test_search_space_per_method():
    lora = search_space("lora", 2e-4)
    assert set(lora) == SEARCHED
    lr = lora["learning_rate"]
    assert (lr.low, lr.high, lr.log) == (2e-5, 2e-3, True)
    assert lora["lora_r"].choices == (8, 16, 32)
    assert set(lora["scheduler"].choices) == {"cosine", "linear", "constant_with_warmup"}
    assert set(search_space("full", 5e-5)) == {"learning_rate", "warmup_ratio", "weight_decay"}


def test_trial_values_make_a_valid_config(tmp_path: Path, tiny_model_dir: Path):
    base = load_config(sweep_config(tmp_path, tiny_model_dir)).to_dict()
    base["train"]["warmup_steps"] = 3  # a base that set warmup in steps
    params = {
        "learning_rate": 1e-3,
        "warmup_ratio": 0.05,
        "weight_decay": 0.01,
        "lora_r": 8,
        "scheduler": "linear",
    }
    cfg = validate(apply_params(base, params))
    assert (cfg.lora.r, cfg.lora.alpha) == (8, 16.0)
    assert (cfg.train.warmup_steps, cfg.train.warmup_ratio) == ("auto", 0.05)
    assert (cfg.train.learning_rate, cfg.train.scheduler) == (1e-3, "linear")
    assert base["train"]["warmup_steps"] == 3  # the base is not modified


def test_pruners_judge_on_eval_steps():
    assert isinstance(study.make_pruner("hyperband", 25, 100), optuna.pruners.HyperbandPruner)
    assert isinstance(study.make_pruner("median", 25, 100), optuna.pruners.MedianPruner)
    assert isinstance(study.make_pruner("none", 25, 100), optuna.pruners.NopPruner)
    assert study.pruning_note("median", 0).startswith("off")


def test_plots_leave_out_what_would_mislead(tmp_path: Path):
    def objective(trial: optuna.Trial) -> float:
        trial.report(2.0, 2)
        return trial.suggest_float("learning_rate", 1e-5, 1e-3, log=True)

    one = optuna.create_study()
    one.optimize(objective, n_trials=1)
    written, notes = outputs.write_plots(one, tmp_path)
    assert [p.name for p in written] == ["optimization_history.png", "intermediate_values.png"]
    # from a single trial every importance comes out equal: not worth a plot
    assert [n.split(":")[0] for n in notes] == ["param_importances"]


def test_sweep_under_torchrun_is_refused(config: Path, tmp_path: Path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert "single-process" in error_of(
        capsys, "sweep", str(config), "--trials", "1", "--output-dir", str(tmp_path / "s")
    )
