"""The machinery of ``bench step`` (``vjepa_ray.bench.step``): the recipe's training step under a clock per
phase, its FLOPs per clip, one large matmul for the device's best GEMM rate, and the profiler's account of where
a step's time goes.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from typing import Iterator, Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode

from vjepa_ray.config import Config, load_config
from vjepa_ray.models.families import get_family
from vjepa_ray.recipe.objective import ClipGroup, JepaOutput, normalize_clips, target_features
from vjepa_ray.recipe.step import JepaStep, MicroBatch

GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")
REFERENCE_GEMM_SIZE = 2048


class StepTimer:
    """Wall-clock seconds per phase; waits for the device at each boundary so phases are not smeared."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = {}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self._sync()
        start = time.perf_counter()
        with torch.profiler.record_function(f"step/{name}"):
            yield
        self._sync()
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


class _Bf16AutocastStep(JepaStep):
    """``--precision bf16``: the forward passes under bf16 autocast, fp32 weights and optimizer."""

    def forward(self, groups: list[ClipGroup]) -> JepaOutput:
        with torch.autocast(self.device.type, dtype=torch.bfloat16):
            return super().forward(groups)


def bench_config(args: argparse.Namespace) -> Config:
    """The run config of the benchmark's step. A family with a context loss (2.1) carries it at its full weight
    from step 0 (``loss.context_warmup=[0,0]``): the release's lambda once warmed up, what most of its steps pay."""
    overrides = [f"model.name={args.model}", f"model.family={args.family}", f"model.pred_depth={args.pred_depth}",
                 f"optimization.clip_grad_rule={args.clip_rule}", f"data.frames_per_clip={args.frames}",
                 f"data.crop_size={args.crop}", f"data.batch_size={args.batch}", f"meta.seed={args.seed}"]
    if get_family(args.family).context_loss is not None:
        overrides.append("loss.context_warmup=[0,0]")
    return load_config(None, overrides)


def flops_per_clip(cfg: Config, steps: Sequence[int]) -> float:
    """FLOPs per clip of the step's passes at ``cfg``'s sizes, as torch's FLOP counter counts them: the matrix
    multiplications, attention and patch convolutions of the target pass and of each mask config's encoder and
    predictor passes, forward and backward (2.1: the context tokens' predictions and ``predictor_proj_context``
    too); the mean over the masks that steps ``steps`` draw on rank 0.

    The models run on the meta device: the shapes are the step's and no arithmetic is done, so any size counts in
    seconds. There attention runs torch's reference math, whose matmuls the counter sees (it has no formula for
    the CPU's fused attention kernel).
    """
    with torch.device("meta"):
        step = JepaStep.from_config(cfg, "meta", fused=False)
    d = cfg.data
    clips = normalize_clips(torch.empty(d.batch_size, d.frames_per_clip, d.crop_size, d.crop_size, 3,
                                        dtype=torch.uint8, device="meta"))
    counts = []
    for index in steps:
        group = step.group(clips, (cfg.meta.seed, index, 0), 0, step.module.objective.context_weight(index))
        with FlopCounterMode(display=False) as counter:
            step.backward(step.forward([group]).loss, 1)
        counts.append(counter.get_total_flops() / d.batch_size)
    return statistics.fmean(counts)


class Trainer:
    """The benchmark's step, its clips, and ``step()``: one full training step."""

    def __init__(self, args: argparse.Namespace):
        self.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.cfg = bench_config(args)
        self.bf16 = args.precision == "bf16"
        step_class = _Bf16AutocastStep if self.bf16 else JepaStep
        self.train_step = step_class.from_config(self.cfg, self.device, fused=True)
        gen = torch.Generator().manual_seed(args.seed)
        self.clips = torch.randint(0, 256, (args.batch, args.frames, args.crop, args.crop, 3), generator=gen,
                                   dtype=torch.uint8).to(self.device)
        self.step_index = 0
        self.context_weight = 0.0

    def step(self, timer: StepTimer) -> float:
        out = self.train_step([MicroBatch(self.clips)], self.step_index, timer)
        self.step_index += 1
        self.context_weight = out.context_weight
        return out.loss

    def target_forward(self, timer: StepTimer) -> None:
        x = normalize_clips(self.clips)
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()
        with timer.phase("target_forward"), autocast:
            target_features(self.train_step.target_encoder, x)


def reference_gemm_gflop_per_s(device: torch.device, size: int = REFERENCE_GEMM_SIZE, reps: int = 5) -> float:
    """The best fp32 GFLOP/s of a [size, size] @ [size, size] matmul over ``reps`` tries."""
    a, b = (torch.randn(size, size, device=device) for _ in range(2))
    timer = StepTimer(device)
    best = float("inf")
    for _ in range(reps + 1):  # the first one warms up
        timer.seconds.clear()
        with timer.phase("gemm"):
            a @ b
        best = min(best, timer.seconds["gemm"])
    return 2 * size**3 / best / 1e9


def where_time_goes(trainer: Trainer) -> dict:
    """One step under the profiler (CPU only: there, every op runs on the profiled thread).

    Shares are of the step's wall time; ``gemm.of_reference`` is the step's matmul rate over
    ``reference_gemm_gflop_per_s``. The profiler counts the multiplications' FLOPs from their shapes.
    """
    from torch.profiler import ProfilerActivity, profile

    # Timed on both sides of the step: these machines' speed drifts over seconds to minutes.
    before = reference_gemm_gflop_per_s(trainer.device)
    timer = StepTimer(trainer.device)
    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        trainer.step(timer)
    step_s = sum(timer.seconds.values())
    events = prof.key_averages()
    gemms = [e for e in events if e.key in GEMM_OPS]
    gemm_s = sum(e.self_cpu_time_total for e in gemms) / 1e6
    gemm_gflop = sum(e.flops for e in gemms) / 1e9
    attention_s = sum(e.self_cpu_time_total for e in events if "scaled_dot_product" in e.key) / 1e6
    reference = max(before, reference_gemm_gflop_per_s(trainer.device))
    return {
        "time_shares": {"gemm": gemm_s / step_s, "attention": attention_s / step_s,
                        "other": 1 - (gemm_s + attention_s) / step_s},
        "gemm": {"gflop_per_step": gemm_gflop, "gflop_per_s": gemm_gflop / gemm_s,
                 "reference_gflop_per_s": reference, "of_reference": gemm_gflop / gemm_s / reference,
                 "reference": f"fp32 [{REFERENCE_GEMM_SIZE}]^2 matmul, best of 5 before and 5 after the step"},
    }


def print_profile(trainer: Trainer, rows: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if trainer.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        trainer.step(StepTimer(trainer.device))
    sort = "self_cuda_time_total" if trainer.device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=rows), file=sys.stderr)
    phases = [e for e in prof.key_averages() if e.key.startswith(("step/", "jepa/"))]
    for e in sorted(phases, key=lambda e: e.key):
        print(f"{e.key:32s} {e.cpu_time_total / 1e3:10.1f} ms", file=sys.stderr)
