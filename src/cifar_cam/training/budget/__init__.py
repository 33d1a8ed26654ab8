"""The time budget (trainer.time_budget / trainer.plan): the planner, its revisable LR schedules, and the probe
that times the run's own steps. Part of training: imports training, data, config and the leaves."""
