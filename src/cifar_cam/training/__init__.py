"""Training: a run (run.py) and its loop (loop.py), the engine's epoch and evaluation, optimizers, schedulers and the
time budget, EMA, checkpoints and resume rules, DDP, trackers, supervision. Imports data, models, config, leaves."""
