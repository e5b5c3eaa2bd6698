"""Chaos on a ``ray.cluster_utils.Cluster`` (``vjepa_ray.bench.chaos``): real videos decoded by Ray Data, 2 CPU
workers under ZeRO-2, fp32, checkpoints every 3 steps in the middle of 4-step chunks.

One run (CI's subset of the bench's faults): a worker dies while writing a checkpoint, a training node is drained
for preemption and then removed, the driver is killed and the same command run again, and after the run its
last checkpoint is damaged and the command run once more. It must end with the weights of the undisturbed run,
bit for bit.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from vjepa_ray.bench._cluster import SimulatedCluster
from vjepa_ray.bench.chaos import RUN_OVERRIDES, Disturber, attempts, undisturbed, weights_equal
from vjepa_ray.train import manifest

pytestmark = pytest.mark.slow

STEPS, EVERY, STEPS_PER_CHUNK = 18, 3, 4
FAULTS = ["kill_in_save", "preempt", "kill_driver", "damage_checkpoint"]


@pytest.fixture(scope="module")
def chaos(tmp_path_factory):
    import ray

    if ray.is_initialized():  # the session's local cluster: memory for this one
        ray.shutdown()
    storage = tmp_path_factory.mktemp("chaos")
    overrides = [*RUN_OVERRIDES, f"data.paths=[{storage / 'videos'}]", f"optimization.total_steps={STEPS}"]
    cluster = SimulatedCluster(train_nodes=3)
    try:
        want, _ = undisturbed(cluster, storage, overrides)
        disturbed = Disturber(cluster, storage, "chaos", overrides, seed=0).run(FAULTS)
        yield want, disturbed, disturbed.fault_costs()
    finally:
        cluster.shutdown()


def test_killed_mid_save_preempted_driver_lost_and_damaged_ends_with_the_undisturbed_weights(chaos):
    want, disturbed, costs = chaos
    assert disturbed.summary["status"] == "finished" and disturbed.summary["steps"] == STEPS
    assert [c["kind"] for c in costs] == FAULTS
    assert len(attempts(disturbed.reports())) == 1 + len(FAULTS)
    for cost in costs:  # every restart resumed from a checkpoint at or before the step it had reached
        assert cost["resumed_from"] % EVERY == 0 or cost["kind"] == "preempt"
        assert 0 <= cost["steps_recomputed"] <= cost["step"]
    # The worker lost in its save cost the steps since the checkpoint before; one taken mid-chunk.
    in_save = costs[0]
    assert in_save["step"] - in_save["resumed_from"] < 2 * EVERY
    assert any(c["resumed_from"] % STEPS_PER_CHUNK for c in costs)
    assert weights_equal(want["checkpoint"], disturbed.summary["checkpoint"]) == {
        "encoder": True, "predictor": True, "target_encoder": True}


def test_a_preemption_notice_brings_a_checkpoint_forward_and_the_restart_loses_nothing_after_it(chaos):
    _, _, costs = chaos
    preempt = next(c for c in costs if c["kind"] == "preempt")
    # Checkpointed within two steps of the drain, and resumed from that checkpoint once the node was gone.
    assert 1 <= preempt["checkpoint_step"] - preempt["notice_step"] <= 2
    assert preempt["resumed_from"] == preempt["checkpoint_step"]


def test_a_damaged_last_checkpoint_resumes_from_the_intact_one_before(chaos):
    _, disturbed, costs = chaos
    damaged = costs[-1]
    assert damaged["damaged"] == f"step_{STEPS:08d}" and damaged["resumed_from"] == STEPS - EVERY
    # Step 12 saved again, whole, under a name of its own (Ray Train still holds the damaged one).
    final = Path(disturbed.summary["checkpoint"])
    assert final.name == f"step_{STEPS:08d}_1" and manifest.problems(final) == []
