"""EMA of the target encoder: matches its closed form, in place, for whole params and mixed dtypes."""

from __future__ import annotations

import pytest
import torch

from vjepa_ray.recipe.ema import ema_update_


def test_constant_online_weights_follow_the_closed_form():
    target = [torch.full((3, 2), 5.0), torch.tensor([-1.0, 2.0])]
    online = [torch.full((3, 2), 1.0), torch.tensor([3.0, 2.0])]
    start = [t.clone() for t in target]
    ids = [t.data_ptr() for t in target]
    m, k = 0.9, 7
    for _ in range(k):
        ema_update_(target, online, m)
    for t, t0, o in zip(target, start, online):
        torch.testing.assert_close(t, m**k * t0 + (1 - m**k) * o)
    assert [t.data_ptr() for t in target] == ids  # updated in place


def test_changing_momentum_and_online_weights():
    target, online = [torch.tensor([0.0])], [torch.tensor([0.0])]
    expected = 0.0
    for step, m in enumerate([0.5, 0.9, 0.99]):
        online[0].fill_(float(step + 1))
        ema_update_(target, online, m)
        expected = m * expected + (1 - m) * (step + 1)
    assert target[0].item() == pytest.approx(expected)


def test_bf16_online_into_fp32_target():
    target, online = [torch.zeros(4)], [torch.ones(4, dtype=torch.bfloat16)]
    ema_update_(target, online, 0.999)
    assert target[0].dtype == torch.float32
    torch.testing.assert_close(target[0], torch.full((4,), 0.001))


def test_module_parameters_and_extreme_momenta():
    online = torch.nn.Linear(4, 2)
    target = torch.nn.Linear(4, 2).requires_grad_(False)
    before = [p.clone() for p in target.parameters()]
    ema_update_(list(target.parameters()), list(online.parameters()), 1.0)
    assert all(torch.equal(a, b) for a, b in zip(target.parameters(), before))
    ema_update_(list(target.parameters()), list(online.parameters()), 0.0)
    assert all(torch.equal(a, b) for a, b in zip(target.parameters(), online.parameters()))


def test_mismatched_inputs_raise_value_error():
    with pytest.raises(ValueError, match="as many"):
        ema_update_([torch.zeros(2)], [], 0.9)
    with pytest.raises(ValueError, match=r"expected the online shape to equal the target's \[2\], got \[3\]"):
        ema_update_([torch.zeros(2)], [torch.zeros(3)], 0.9)
    with pytest.raises(ValueError, match="momentum"):
        ema_update_([torch.zeros(2)], [torch.zeros(2)], 1.5)
