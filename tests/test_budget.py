"""trainer.time_budget: durations, the epoch planner and re-planner on stubbed step times, plan.json, and the
revisable LR schedules against torch's OneCycleLR / CosineAnnealingLR.

Nothing here trains or sleeps: times are stubbed, and a simulated clock runs the margin checks.
"""

from __future__ import annotations

import io
import json
import math
import re
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch.optim.lr_scheduler import CosineAnnealingLR, OneCycleLR

from cifar_cam.config.durations import format_duration, parse_duration, time_budget_seconds
from cifar_cam.errors import ConfigError
from cifar_cam.training.budget.lr_schedules import BudgetCosineLR, BudgetOneCycleLR
from cifar_cam.training.budget.planner import (
    RESERVE_MIN_SECONDS,
    BudgetTooSmall,
    Overhead,
    Plan,
    RunFacts,
    epoch_counts,
    epoch_sizes,
    overrun_bound,
    plan_epochs,
    replan,
    reserve_seconds,
    template_from,
)

REPO = Path(__file__).resolve().parents[1]
CPU_QUICK = [12, 12, 16, 16, 16, 24, 24, 24, 24]
TEMPLATE = template_from(CPU_QUICK, 14, 32)
STEP = {12: 0.02, 16: 0.035, 24: 0.08, 32: 0.14}   # stubbed seconds a step: epochs of 8, 14, 32, 56 s + overhead
SPE = 400
OVERHEAD = Overhead(epoch_seconds=2.0, final_seconds=10.0)
FACTS = RunFacts(train_images=50_000, batch_size=125, steps_per_epoch=SPE, model="resnet18", width=16,
                 image_size=32, world_size=1)


# --- durations ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("value", "seconds"), [
    (90, 90.0), (2.5, 2.5), ("90", 90.0), ("90s", 90.0), ("15min", 900.0), ("15m", 900.0), ("1h", 3600.0),
    ("1h30min", 5400.0), ("2.5min", 150.0), (" 1h 30min ", 5400.0), ("1min15s", 75.0), ("1.5h", 5400.0),
    ("45 sec", 45.0), ("2 hours", 7200.0), ("15MIN", 900.0),
])
def test_parse_duration_reads_seconds_and_units(value: object, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", ["abc", "", "15 apples", "30min1h", "1h1h", "min", "1h30", "nan", "inf", True,
                                   None, [90], float("nan"), float("inf")])
def test_parse_duration_refuses_what_is_not_a_duration_naming_the_forms(value: object) -> None:
    with pytest.raises(ValueError, match=r"is not a duration: give seconds \(900, 90s\), minutes \(15min"):
        parse_duration(value)


@pytest.mark.parametrize("value", [0, 0.0, -5, "0", "-5min", "0s", "-1h30min"])
def test_parse_duration_refuses_zero_and_negative(value: object) -> None:
    with pytest.raises(ValueError, match=r"must be > 0: give seconds"):
        parse_duration(value)


def test_time_budget_is_off_when_null_and_one_line_exit_2_when_bad() -> None:
    assert time_budget_seconds(None) is None
    assert time_budget_seconds("15min") == 900.0
    with pytest.raises(ConfigError) as info:
        time_budget_seconds("fifteen minutes")
    assert str(info.value).startswith("trainer.time_budget=fifteen minutes: ") and "\n" not in str(info.value)
    assert info.value.exit_code == 2


@pytest.mark.parametrize("seconds", [1, 59, 60, 75, 3600, 5400, 5461, 86.2])
def test_format_duration_is_read_back_by_parse_duration(seconds: float) -> None:
    assert parse_duration(format_duration(seconds)) == math.ceil(seconds)
    assert format_duration(5400) == "1h30min" and format_duration(75) == "1min15s"


def test_budget_module_does_not_import_torch() -> None:
    code = "import sys, cifar_cam.training.budget.planner; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


# --- the template ------------------------------------------------------------------------------------------------

def test_template_of_cpu_budget_reproduces_its_schedule_at_14_epochs() -> None:
    cfg = OmegaConf.load(REPO / "conf" / "experiment" / "cpu_budget.yaml")
    template = template_from(list(cfg.trainer.progressive_resize), cfg.trainer.epochs, 32)
    assert template == [(12, 2), (16, 3), (24, 4), (32, 5)]
    assert epoch_sizes(template, 14, 32) == [12, 12, 16, 16, 16, 24, 24, 24, 24, 32, 32, 32, 32, 32]


@pytest.mark.parametrize("epochs", range(1, 40))
def test_template_rounding_sums_ascends_and_ends_at_full_size(epochs: int) -> None:
    sizes = epoch_sizes(TEMPLATE, epochs, 32)
    assert len(sizes) == epochs and sizes == sorted(sizes) and sizes[-1] == 32
    for size, count in epoch_counts(TEMPLATE, epochs, 32):  # each share within one epoch of its exact value
        exact = epochs * dict(TEMPLATE)[size] / 14
        assert abs(count - exact) < 1 or (size == 32 and count == 1)


def test_template_without_full_size_still_gets_one_full_size_epoch() -> None:
    template = template_from([16] * 10, 10, 32)
    assert template == [(16, 10)]
    assert epoch_sizes(template, 10, 32) == [16] * 9 + [32]
    assert epoch_sizes(template_from(None, 3, 32), 5, 32) == [32] * 5
    with pytest.raises(ConfigError, match="progressive_resize has 40 px"):
        template_from([40], 3, 32)


# --- the planner ---------------------------------------------------------------------------------------------------

def plan_cost(sizes: list[int] | tuple[int, ...], speed: float = 1.0) -> float:
    return sum(SPE * STEP[s] * speed + OVERHEAD.epoch_seconds * speed for s in sizes) + OVERHEAD.final_seconds * speed


def test_more_budget_never_plans_fewer_epochs_and_no_plan_exceeds_its_budget() -> None:
    last = 0
    for budget in range(90, 2000, 7):
        found = plan_epochs(budget, 8.0, STEP, SPE, TEMPLATE, 32, OVERHEAD)
        assert found.epochs >= last
        last = found.epochs
        assert found.available_seconds == budget - 8.0 - reserve_seconds(budget)
        assert found.predicted_seconds == pytest.approx(plan_cost(found.sizes))
        assert found.predicted_seconds <= found.available_seconds + 1e-6
        assert list(found.sizes) == epoch_sizes(TEMPLATE, found.epochs, 32)
        for more in range(found.epochs + 1, found.epochs + 6):  # and it is the most that fits
            assert plan_cost(epoch_sizes(TEMPLATE, more, 32)) > found.available_seconds
    assert last > 30


def test_reserve_is_two_percent_or_ten_seconds() -> None:
    assert reserve_seconds(100) == RESERVE_MIN_SECONDS == 10.0
    assert reserve_seconds(900) == 18.0


def test_budget_too_small_for_one_epoch_says_the_minimum() -> None:
    with pytest.raises(BudgetTooSmall) as info:
        plan_epochs(60, 8.0, STEP, SPE, TEMPLATE, 32, OVERHEAD)
    e = info.value
    # 8 s gone + one 32 px epoch (56 + 2 s) + the final test (10 s) + the 10 s reserve = 86 s
    assert e.minimum_seconds == 86.0 and isinstance(e, ConfigError) and e.exit_code == 2
    assert str(e) == ("trainer.time_budget=1min is too small: after 8s of startup, data loading and probe, one epoch "
                      "at 32 px (~58s), the final test (~10s) and a 10s reserve need trainer.time_budget >= 1min26s")
    assert plan_epochs(86, 8.0, STEP, SPE, TEMPLATE, 32, OVERHEAD).sizes == (32,)
    with pytest.raises(BudgetTooSmall):
        plan_epochs(85.9, 8.0, STEP, SPE, TEMPLATE, 32, OVERHEAD)
    with pytest.raises(BudgetTooSmall) as info:  # past 500 s the 2% reserve sets the minimum
        plan_epochs(60, 0.0, {32: 10.0}, SPE, [(32, 1)], 32)
    need = info.value.minimum_seconds
    assert need == pytest.approx(4000 / 0.98)
    assert plan_epochs(need * (1 + 1e-9), 0.0, {32: 10.0}, SPE, [(32, 1)], 32).epochs == 1


def test_max_epochs_caps_the_plan() -> None:
    assert plan_epochs(3600, 8.0, STEP, SPE, TEMPLATE, 32, OVERHEAD, max_epochs=14).epochs == 14


# --- re-planning ---------------------------------------------------------------------------------------------------

def first_plan(budget: float = 900.0, elapsed: float = 8.0) -> Plan:
    return Plan.create(FACTS, budget, elapsed, STEP, TEMPLATE, OVERHEAD)


def spent(plan: Plan, epochs: int, speed: float = 1.0, elapsed: float = 8.0) -> float:
    """The clock after `epochs` epochs of `plan` at `speed` (x the probe's step time)."""
    return elapsed + plan_cost(plan.sizes[:epochs], speed) - OVERHEAD.final_seconds * speed


def test_replan_at_the_predicted_speed_keeps_the_plan() -> None:
    plan = first_plan()
    assert replan(plan, 5, spent(plan, 5), {plan.sizes[4]: STEP[plan.sizes[4]]}) is plan
    assert replan(plan, plan.epochs, 10_000.0, {32: 1.0}) is plan  # the last epoch done: nothing to re-plan
    with pytest.raises(ValueError, match="a replay"):
        replan(replace(plan, budget_seconds=None), 5, 100.0, {})


@pytest.mark.parametrize(("speed", "grows"), [(0.8, True), (1.3, False)])
def test_replan_grows_when_faster_shrinks_when_slower(speed: float, grows: bool) -> None:
    plan = first_plan()
    done, size = 5, plan.sizes[4]
    elapsed = spent(plan, done, speed)
    new = replan(plan, done, elapsed, {size: STEP[size] * speed})
    assert (new.epochs > plan.epochs) if grows else (new.epochs < plan.epochs)
    assert new.sizes[:done] == plan.sizes[:done] and new.sizes == sorted(new.sizes) and new.sizes[-1] == 32
    assert len(new.sizes) == new.epochs and new.total_steps == new.epochs * SPE
    assert new.revisions == [[0, plan.total_steps], [done * SPE, new.epochs * SPE]]
    entry = new.replans[-1]
    assert (entry["epoch"], entry["old_epochs"], entry["new_epochs"]) == (done, plan.epochs, new.epochs)
    assert entry["speed_factor"] == pytest.approx(speed)
    rest = plan_cost(new.sizes[done:], speed)  # what it committed to fits the budget at the measured speed
    assert elapsed + rest <= 900.0 - reserve_seconds(900.0)
    one_more = replace(new, sizes=new.sizes + [32])  # and one epoch more would not
    assert elapsed + plan_cost(one_more.sizes[done:], speed) > 900.0 - reserve_seconds(900.0)


def test_replan_ends_now_when_one_more_epoch_does_not_fit() -> None:
    plan = first_plan()
    done = 10
    new = replan(plan, done, 900.0 - 18.0 - 10.0 - 50.0, {32: STEP[32]})  # 50 s left: a 32 px epoch takes 58
    assert new.epochs == done and new.sizes == plan.sizes[:done] and new.total_steps == done * SPE
    assert new.revisions[-1] == [done * SPE, done * SPE]
    assert new.replans[-1]["reason"].startswith("end now: one more epoch (~58s) and the final test (~10s)")


def test_replan_never_goes_back_to_a_smaller_size() -> None:
    plan = first_plan(budget=200.0)
    assert plan.sizes == [12, 16, 24, 32]
    new = replan(plan, 3, spent(plan, 3, 0.25), {24: STEP[24] * 0.25})  # 4x faster: many more epochs
    assert new.epochs > 8 and new.sizes[:3] == [12, 16, 24]
    assert min(new.sizes[3:]) == 24 and new.sizes == sorted(new.sizes) and new.sizes[-1] == 32


def test_replan_is_monotone_in_the_time_left() -> None:
    plan = first_plan()
    last = 0
    for elapsed in range(700, 100, -9):  # less time spent: never fewer epochs
        new = replan(plan, 5, float(elapsed), {plan.sizes[4]: STEP[plan.sizes[4]] * 1.2})
        assert new.epochs >= last
        last = new.epochs


def simulate(budget: float, speed, startup: float = 5.0, probe_steps: int = 20) -> tuple[float, Plan, list[float]]:
    """A budgeted run on a simulated clock: (its end, its last plan, each epoch's start); `speed(t)` is the
    machine's step time at t over its fastest (>= 1)."""
    t = startup
    probe = {}
    for size in STEP:
        probe[size] = STEP[size] * speed(t)
        t += probe_steps * probe[size]
    plan = Plan.create(FACTS, budget, t, probe, TEMPLATE, OVERHEAD.scaled(speed(t)))
    starts: list[float] = []
    while len(starts) < plan.epochs:
        size = plan.sizes[len(starts)]
        starts.append(t)
        for _ in range(SPE // 10):
            t += 10 * STEP[size] * speed(t)
        observed = (t - starts[-1]) / SPE
        t += OVERHEAD.epoch_seconds * speed(t)
        plan = replan(plan, len(starts), t, {size: observed})
    return t + OVERHEAD.final_seconds * speed(t), plan, starts


def test_a_steady_machine_ends_before_the_budget_less_the_reserve_and_uses_it() -> None:
    for budget in (150.0, 900.0, 1800.0):
        end, plan, _ = simulate(budget, lambda t: 1.0)
        assert budget - reserve_seconds(budget) - 58.0 < end <= budget - reserve_seconds(budget) + 1e-6
        assert not plan.replans


def test_a_slowdown_of_1_5x_overruns_by_at_most_the_stated_bound() -> None:
    bound = overrun_bound(epoch_s=58.0, final_s=10.0, reserve_s=18.0)  # 900 s: 0.5 x (58 + 10) - 18
    assert bound == 16.0 == first_plan().overrun_bound()
    for onset in range(0, 900, 15):  # 1x until `onset`, then 1.5x for good
        end, _, _ = simulate(900.0, lambda t, onset=onset: 1.0 if t < onset else 1.5)
        assert end - 900.0 <= bound
    for period in (50.0, 200.0, 700.0):  # drifting back and forth between 1x and 1.5x
        end, _, _ = simulate(900.0, lambda t, p=period: 1.25 + 0.25 * math.sin(2 * math.pi * t / p))
        assert end - 900.0 <= bound
    # The worst case, reached: a budget the steady run fills to the reserve, slowed to 1.5x as its last epoch starts
    steady_end, _, starts = simulate(900.0, lambda t: 1.0)
    budget = (steady_end + 1e-3) / (1 - 0.02)
    end, plan, _ = simulate(budget, lambda t: 1.0 if t < starts[-1] else 1.5)
    worst = overrun_bound(58.0, 10.0, reserve_seconds(budget))  # its reserve: 2% of 849 s, 17 s
    assert plan.epochs == len(starts) and worst - 0.01 < end - budget <= worst


def test_a_machine_that_speeds_up_grows_the_plan_and_still_keeps_the_reserve() -> None:
    budget = 900.0
    end, plan, _ = simulate(budget, lambda t: 1.5 if t < 150 else 1.0)
    assert plan.replans and plan.epochs > plan.replans[0]["old_epochs"]
    assert end <= budget - reserve_seconds(budget) + 1e-6


# --- plan.json -----------------------------------------------------------------------------------------------------

PLAN_KEYS = {"format", "run", "epochs", "sizes", "total_steps", "revisions", "template", "budget_seconds",
             "reserve_seconds", "step_seconds", "overhead", "predicted_seconds", "replans"}


def test_plan_json_round_trip(tmp_path: Path) -> None:
    plan = first_plan()
    plan = replan(plan, 5, spent(plan, 5, 1.3), {plan.sizes[4]: STEP[plan.sizes[4]] * 1.3})
    assert Plan.from_dict(plan.to_dict()) == plan
    assert Plan.from_json(plan.to_json()) == plan
    path = plan.save(tmp_path / "run" / "plan.json")
    data = json.loads(path.read_text())
    assert set(data) == PLAN_KEYS and data["run"] == asdict(FACTS) and data["step_seconds"]["32"] == 0.14
    assert data["template"] == [[12, 2], [16, 3], [24, 4], [32, 5]]
    loaded = Plan.load(path)
    assert loaded == plan and loaded.source == str(path)
    assert not list(path.parent.glob(".*tmp*"))  # written through a temp file, renamed


def test_plan_load_refuses_missing_corrupt_and_damaged_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"trainer.plan=.*nope.json: no such file"):
        Plan.load(tmp_path / "nope.json")
    bad = tmp_path / "plan.json"
    bad.write_text('{"format": 1, "run"')
    with pytest.raises(ConfigError, match=r"is not JSON"):
        Plan.load(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(ConfigError, match=r"is not a plan.json of format 1"):
        Plan.load(bad)
    data = first_plan().to_dict()
    bad.write_text(json.dumps({**data, "sizes": data["sizes"][:-1]}))
    with pytest.raises(ConfigError, match=rf"is damaged: {data['epochs'] - 1} sizes for {data['epochs']} epochs"):
        Plan.load(bad)
    bad.write_text(json.dumps({k: v for k, v in data.items() if k != "revisions"}))
    with pytest.raises(ConfigError, match=r"is damaged: KeyError"):
        Plan.load(bad)


def test_plan_check_matches_names_the_first_mismatch(tmp_path: Path) -> None:
    plan = Plan.load(first_plan().save(tmp_path / "plan.json"))
    plan.check_matches(FACTS)
    plan.check_matches({"batch_size": 125, "model": "resnet18"})
    with pytest.raises(ConfigError) as info:
        plan.check_matches({**asdict(FACTS), "batch_size": 256, "width": 32})
    assert str(info.value) == (f"trainer.plan={tmp_path / 'plan.json'} was made for batch size 125, this run has "
                               "256; set data.batch_size=125, or drop trainer.plan to plan anew")
    assert info.value.exit_code == 2
    for key, value, words in [("train_images", 45_000, "training images 50000, this run has 45000"),
                              ("model", "resnet34", "model resnet18, this run has resnet34; set model.name=resnet18"),
                              ("width", 64, "model width 16, this run has 64; set model.width=16"),
                              ("image_size", 64, "image size 32, this run has 64"),
                              ("world_size", 2, "world size (processes) 1, this run has 2")]:
        with pytest.raises(ConfigError, match=re.escape(words)):
            plan.check_matches(replace(FACTS, **{key: value}))


# --- the revisable LR schedules ------------------------------------------------------------------------------------

def optimizer(kind: str = "sgd") -> torch.optim.Optimizer:
    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))]
    groups = [{"params": [params[0]]}, {"params": [params[1]]}]
    if kind == "adam":
        return torch.optim.Adam(groups, lr=0.01)
    return torch.optim.SGD(groups, lr=0.1, momentum=0.9)


def first_group_lrs(sched, opt: torch.optim.Optimizer, steps: int) -> list[float]:
    return [entries[0][0][0] for entries in run_steps([sched], [opt], steps)]


def momenta(opt: torch.optim.Optimizer) -> list[float]:
    return [g["betas"][0] if "betas" in g else g["momentum"] for g in opt.param_groups]


def run_steps(schedulers, optimizers, steps: int):
    """Steps each scheduler `steps` times; yields the LRs and momenta of each step, for every scheduler."""
    for _ in range(steps):
        yield [(s.get_last_lr(), momenta(o)) for s, o in zip(schedulers, optimizers, strict=True)]
        for s, o in zip(schedulers, optimizers, strict=True):
            o.step()
            s.step()


@pytest.mark.parametrize(("kind", "kwargs"), [
    ("sgd", dict(max_lr=[0.1, 0.4], pct_start=0.25, anneal_strategy="linear", div_factor=25.0,
                 final_div_factor=1e3)),   # conf/scheduler/onecycle.yaml's shape
    ("sgd", dict(max_lr=0.05, pct_start=0.3, anneal_strategy="cos")),
    ("sgd", dict(max_lr=0.05, pct_start=0.3, anneal_strategy="cos", cycle_momentum=False)),
    ("adam", dict(max_lr=[0.01, 0.003], pct_start=0.2, anneal_strategy="cos", base_momentum=0.8,
                  max_momentum=0.9)),
])
@pytest.mark.parametrize("total", [1000, 401])
def test_one_revision_is_torchs_onecycle_on_every_step(kind: str, kwargs: dict, total: int) -> None:
    ours, theirs = optimizer(kind), optimizer(kind)
    a = BudgetOneCycleLR(ours, total_steps=total, **kwargs)
    b = OneCycleLR(theirs, total_steps=total, **kwargs)
    for (lr_a, m_a), (lr_b, m_b) in run_steps([a, b], [ours, theirs], total):
        assert lr_a == pytest.approx(lr_b, rel=1e-9, abs=0) and m_a == pytest.approx(m_b, rel=1e-9, abs=0)
    assert a.lr_at(total - 1)[0] == pytest.approx(ours.param_groups[0]["min_lr"], rel=1e-9)
    for key in ("initial_lr", "max_lr", "min_lr"):  # the group keys rescale_lr (a resume's optimizer.lr) rewrites
        assert [g[key] for g in ours.param_groups] == [g[key] for g in theirs.param_groups]


def test_one_revision_with_muon_is_torchs_onecycle() -> None:
    from cifar_cam.training.optim import Muon

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    ours, theirs = Muon(model.parameters(), lr=0.04), Muon(model.parameters(), lr=0.04)
    kwargs = dict(max_lr=0.04, total_steps=300, pct_start=0.25, anneal_strategy="linear", final_div_factor=1e3)
    a, b = BudgetOneCycleLR(ours, **kwargs), OneCycleLR(theirs, **kwargs)
    for (lr_a, m_a), (lr_b, m_b) in run_steps([a, b], [ours, theirs], 300):
        assert lr_a == lr_b and m_a == m_b
    assert [g["lr_scale"] for g in ours.param_groups] == [1.0, 4.0]  # Muon's own ratio, applied in its step


def test_cosine_is_cosine_annealing() -> None:
    ours, theirs = optimizer(), optimizer()
    a, b = BudgetCosineLR(ours, T_max=500, eta_min=0.001), CosineAnnealingLR(theirs, T_max=500, eta_min=0.001)
    for (lr_a, _), (lr_b, _) in run_steps([a, b], [ours, theirs], 500):
        assert lr_a == pytest.approx(lr_b, rel=1e-9)
    ours.step()
    a.step()
    assert a.get_last_lr() == [0.001, 0.001]  # eta_min at total_steps, as CosineAnnealingLR


@pytest.mark.parametrize(("at", "new_total"), [(400, 1600), (400, 600), (100, 1300), (100, 250), (950, 1000)])
def test_a_revision_keeps_the_lr_continuous_and_ends_at_the_floor(at: int, new_total: int) -> None:
    opt = optimizer()
    sched = BudgetOneCycleLR(opt, max_lr=0.1, total_steps=1000, pct_start=0.25, anneal_strategy="cos")
    before = [sched.lr_at(s)[0] for s in range(at + 1)]
    lrs = first_group_lrs(sched, opt, at)
    sched.revise(at, new_total)
    assert [sched.lr_at(s)[0] for s in range(at + 1)] == before  # the steps taken keep their LR
    lrs += first_group_lrs(sched, opt, new_total - at)
    assert len(lrs) == new_total and lrs[:at + 1] == before
    # no jump: a step moves the LR no more than the shape's steepest slope (a cosine's pi/2 x its range over its
    # shortest phase, 249 steps) times the steps of the first schedule each new step covers (the stretch)
    stretch = max(1.0, (999 - sched.virtual_step(at)) / (new_total - 1 - at))
    biggest_move = max(abs(b - a) for a, b in zip(lrs, lrs[1:], strict=False))
    assert biggest_move <= math.pi / 2 * (0.1 - 0.1 / 25) / 249 * stretch * (1 + 1e-9)
    floor = 0.1 / 25 / 1e4
    assert lrs[-1] == pytest.approx(floor, rel=1e-9) and momenta(opt)[0] == pytest.approx(0.95)
    progress = [sched.progress(s) for s in range(new_total)]
    assert progress == sorted(progress) and progress[-1] == 1.0


def test_revisions_replay_exactly_and_end_now_holds_the_floor() -> None:
    live_opt, replay_opt = optimizer(), optimizer()
    live = BudgetOneCycleLR(live_opt, max_lr=0.1, total_steps=1000)
    lrs = first_group_lrs(live, live_opt, 300)
    live.revise(300, 1400)
    lrs += first_group_lrs(live, live_opt, 500)
    live.revise(800, 800)  # end now: no step left
    replay = BudgetOneCycleLR(replay_opt, max_lr=0.1, revisions=[[0, 1000], [300, 1400], [800, 800]])
    assert first_group_lrs(replay, replay_opt, 800) == lrs
    assert replay.revisions == live.revisions and replay.total_steps == 800
    assert replay.lr_at(801) == replay.lr_at(5000) == [0.1 / 25 / 1e4] * 2  # past the end: the floor
    with pytest.raises(ValueError, match="800 steps were already taken"):
        replay.revise(700, 900)


def test_state_dict_mid_run_resumes_with_identical_lrs() -> None:
    opt = optimizer("adam")
    sched = BudgetOneCycleLR(opt, max_lr=0.01, total_steps=1000, anneal_strategy="linear")
    list(run_steps([sched], [opt], 200))
    sched.revise(200, 1500)
    list(run_steps([sched], [opt], 450))
    opt_state, sched_state = opt.state_dict(), sched.state_dict()
    assert sched_state["revisions"] == [[0, 1000], [200, 1500]] and "_segments" not in sched_state
    buffer = io.BytesIO()  # checkpoints load with weights_only=True: plain values only
    torch.save(sched_state, buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True)["revisions"] == sched_state["revisions"]
    fresh_opt = optimizer("adam")
    fresh = BudgetOneCycleLR(fresh_opt, max_lr=0.01, total_steps=1000, anneal_strategy="linear")  # as built anew
    fresh_opt.load_state_dict(opt_state)
    fresh.load_state_dict(sched_state)
    sched.revise(650, 1200)  # a later revision of the live one leaves the saved state as it was
    assert sched_state["revisions"] == [[0, 1000], [200, 1500]]
    fresh.revise(650, 1200)
    for (lr_a, m_a), (lr_b, m_b) in run_steps([sched, fresh], [opt, fresh_opt], 550):
        assert lr_a == lr_b and m_a == m_b


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="three_phase"):
        BudgetOneCycleLR(optimizer(), max_lr=0.1, total_steps=100, three_phase=True)
    with pytest.raises(ValueError, match="start at step 0"):
        BudgetOneCycleLR(optimizer(), max_lr=0.1, revisions=[[5, 100]])
    with pytest.raises(ValueError, match="differs from the last revision"):
        BudgetOneCycleLR(optimizer(), max_lr=0.1, total_steps=100, revisions=[[0, 100], [10, 50]])
    with pytest.raises(ValueError, match="max_lr has 3 values for 2 param groups"):
        BudgetOneCycleLR(optimizer(), max_lr=[0.1, 0.1, 0.1], total_steps=100)


def test_a_plans_revisions_drive_the_schedule() -> None:
    plan = first_plan()
    plan = replan(plan, 5, spent(plan, 5, 1.3), {plan.sizes[4]: STEP[plan.sizes[4]] * 1.3})
    sched = BudgetOneCycleLR(optimizer(), max_lr=0.1, total_steps=plan.total_steps, revisions=plan.revisions)
    assert sched.lr_at(plan.total_steps - 1) == [0.1 / 25 / 1e4] * 2
    assert sched.progress(5 * SPE) == pytest.approx(5 * SPE / (first_plan().total_steps - 1))
