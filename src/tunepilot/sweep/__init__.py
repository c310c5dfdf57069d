"""Hyperparameter sweeps on Optuna: ``tunepilot sweep``.

space.py (what is searched, per method), storage.py (the study's database and the workers' lock),
trial.py (one trial = one short run), study.py (the study and the worker loop), outputs.py
(results table, plots, best.yaml).
"""

# here, not in study.py, so the CLI can show them without importing optuna and torch
PRUNERS = ("median", "hyperband", "none")
DEFAULT_PRUNER = "median"
DEFAULT_STUDY = "sweep"
