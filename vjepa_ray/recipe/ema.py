"""The exponential moving average that makes the target encoder: target <- m * target + (1 - m) * online."""

from __future__ import annotations

from typing import Sequence

import torch


@torch.no_grad()
def ema_update_(target_params: Sequence[torch.Tensor], online_params: Sequence[torch.Tensor],
                momentum: float) -> None:
    """Moves each target tensor toward its online twin, in place, with fused multi-tensor kernels.

    Works on any two aligned lists of tensors (whole parameters, or ZeRO-3 partitions). When the
    dtypes agree it is one ``lerp`` per tensor; an online tensor in another dtype (bf16 weights
    averaged into an fp32 master) is promoted by a multiply-add instead.
    """
    target_params, online_params = list(target_params), list(online_params)
    if len(target_params) != len(online_params):
        raise ValueError(f"expected as many online tensors as target tensors, got {len(online_params)} "
                         f"for {len(target_params)}")
    for i, (t, o) in enumerate(zip(target_params, online_params)):
        if t.shape != o.shape:
            raise ValueError(f"tensor {i}: expected the online shape to equal the target's {list(t.shape)}, "
                             f"got {list(o.shape)}")
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum: expected a value in [0, 1], got {momentum}")
    if not target_params:
        return
    if all(t.dtype == o.dtype for t, o in zip(target_params, online_params)):
        torch._foreach_lerp_(target_params, online_params, 1.0 - momentum)
    else:
        torch._foreach_mul_(target_params, momentum)
        torch._foreach_add_(target_params, online_params, alpha=1.0 - momentum)
