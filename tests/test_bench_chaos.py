"""The chaos bench's accounting: starts told apart in a run's reports, and what each fault cost."""

from __future__ import annotations

from vjepa_ray.bench.chaos import ChaosRun, Fault, Report, attempts


def _reports() -> list[Report]:
    # Steps 1-5 (a checkpoint at 3), a worker killed after step 5 at t=5.5; the restart resumes from 3 at t=20
    # and reaches step 6 at t=23; then a preempted start resumes from 6 exactly where it stopped (t=40).
    first = [Report(float(s), s, 0, 2) for s in range(1, 6)]
    second = [Report(20.0 + s - 4, s, 3, 2) for s in range(4, 8)]
    third = [Report(40.0 + s - 8, s, 7, 2) for s in range(8, 10)]
    return first + second + third


def test_attempts_split_where_a_start_resumes_elsewhere_or_repeats_a_step():
    groups = attempts(_reports())
    assert [(g[0].step, g[-1].step, g[0].resumed_from) for g in groups] == [(1, 5, 0), (4, 7, 3), (8, 9, 7)]


def test_fault_costs_count_the_steps_done_twice_and_the_time_until_the_run_is_back_where_it_was(monkeypatch):
    run = ChaosRun(cfg=None, faults=[Fault("kill_worker", 5.5), Fault("preempt", 24.0, {"notice_step": 6})],
                   elapsed_s=50.0, summary={})
    monkeypatch.setattr(ChaosRun, "reports", lambda self: _reports())
    assert run.fault_costs() == [
        {"kind": "kill_worker", "step": 5, "resumed_from": 3, "steps_recomputed": 2, "wall_s_lost": 16.0},
        {"kind": "preempt", "step": 7, "resumed_from": 7, "steps_recomputed": 0, "wall_s_lost": 17.0,
         "notice_step": 6},
    ]
