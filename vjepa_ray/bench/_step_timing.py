"""Training-step throughput: the full V-JEPA step on one device, in clips per second.

The step is the recipe's (``vjepa_ray.recipe.step.JepaStep``, the one training runs) on one micro batch
of rank 0: masks for every config, uint8 -> normalised clips, the target encoder's pass on the full clips,
one encoder + predictor pass per mask config, the L1 loss, backward, gradient clipping, an AdamW step with
the scheduled LR/WD, and the EMA update of the target encoder. Each timed step is split into phases
(seconds, mean over the timed steps).

Baseline, measured in the same run between the steps: one no-grad forward of the encoder over the
full clips (what the target pass costs). ``step_over_forward`` = step time / that forward, a
machine-independent figure of the step's overhead (about 1 + 3 x the masked passes' share).

Where the time goes (``time_shares``, ``gemm``; CPU only): one more step runs under the profiler, which
also counts the matrix multiplications' FLOPs from their shapes. Its wall time splits into matrix
multiplications, attention and everything else, and the multiplications' arithmetic rate is set against
one large square fp32 matmul timed in the same run, about the best rate this device's GEMMs reach. A step
whose multiplications already run near that rate can only be made faster by doing less arithmetic or by
shrinking the other shares.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import statistics
import sys
import time
from typing import Iterator

import torch

from vjepa_ray.config import CLIP_GRAD_RULES, load_config
from vjepa_ray.models import MODEL_SPECS
from vjepa_ray.models.families import DEFAULT_FAMILY, pretrainable_families
from vjepa_ray.recipe.objective import ClipGroup, JepaOutput, normalize_clips, target_features
from vjepa_ray.recipe.step import JepaStep, MicroBatch

log = logging.getLogger(__name__)

PHASES = ("masks", "normalize", "forward", "backward", "optimizer", "ema")
GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")
REFERENCE_GEMM_SIZE = 2048


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="vit_small", choices=MODEL_SPECS)
    parser.add_argument("--family", default=DEFAULT_FAMILY.name, choices=pretrainable_families(),
                        help="model.family (vjepa_ray.models.families)")
    parser.add_argument("--clip-rule", default="family", choices=CLIP_GRAD_RULES,
                        help="optimization.clip_grad_rule, clipping from step 0 for per_module and global")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--crop", type=int, default=128)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                        help="bf16 = autocast over the forward passes, fp32 weights and optimizer")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        choices=("cpu", "cuda"))
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", type=int, default=0, metavar="ROWS",
                        help="after timing, profile one more step and print its top ROWS ops to stderr")


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


class Trainer:
    """The benchmark's step, its clips, and ``step()``: one full training step."""

    def __init__(self, args: argparse.Namespace):
        self.device = torch.device(args.device)
        self.cfg = load_config(None, [f"model.name={args.model}", f"model.family={args.family}",
                                      f"optimization.clip_grad_rule={args.clip_rule}",
                                      f"data.frames_per_clip={args.frames}",
                                      f"data.crop_size={args.crop}", f"data.batch_size={args.batch}",
                                      f"meta.seed={args.seed}"])
        self.bf16 = args.precision == "bf16"
        step_class = _Bf16AutocastStep if self.bf16 else JepaStep
        self.train_step = step_class.from_config(self.cfg, self.device, fused=True)
        gen = torch.Generator().manual_seed(args.seed)
        self.clips = torch.randint(0, 256, (args.batch, args.frames, args.crop, args.crop, 3), generator=gen,
                                   dtype=torch.uint8).to(self.device)
        self.step_index = 0

    def step(self, timer: StepTimer) -> float:
        out = self.train_step([MicroBatch(self.clips)], self.step_index, timer)
        self.step_index += 1
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


def run(args: argparse.Namespace) -> dict:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    if args.threads:
        torch.set_num_threads(args.threads)
    trainer = Trainer(args)
    for _ in range(args.warmup):
        trainer.step(StepTimer(trainer.device))
        trainer.target_forward(StepTimer(trainer.device))
    step_s, forward_s, losses = [], [], []
    phases = {name: 0.0 for name in PHASES}
    for i in range(args.steps):
        timer = StepTimer(trainer.device)
        losses.append(trainer.step(timer))
        step_s.append(sum(timer.seconds.values()))
        for name in PHASES:
            phases[name] += timer.seconds[name] / args.steps
        baseline = StepTimer(trainer.device)
        trainer.target_forward(baseline)
        forward_s.append(baseline.seconds["target_forward"])
        log.info("step %d: %.3f s, loss %.4f; full-clip forward %.3f s", i, step_s[-1], losses[-1], forward_s[-1])
    breakdown = where_time_goes(trainer) if trainer.device.type == "cpu" else {}
    if args.profile:
        _print_profile(trainer, args.profile)
    mean_step = statistics.fmean(step_s)
    mean_forward = statistics.fmean(forward_s)
    return {
        "figure": "step",
        "clips_per_s": args.batch / mean_step,
        "step_s": mean_step,
        "step_s_min": min(step_s),
        "phases_s": phases,
        "baseline": "one no-grad full-clip forward of the encoder, timed between the steps",
        "baseline_forward_s": mean_forward,
        "step_over_forward": mean_step / mean_forward,
        "loss_first_last": [losses[0], losses[-1]],
        **breakdown,
        "settings": {"model": args.model, "family": args.family, "clip_rule": args.clip_rule, "frames": args.frames,
                     "crop": args.crop, "batch": args.batch, "precision": args.precision, "device": args.device,
                     "steps": args.steps,
                     "warmup": args.warmup, "threads": torch.get_num_threads(), "torch": torch.__version__},
    }


def _print_profile(trainer: Trainer, rows: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if trainer.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        trainer.step(StepTimer(trainer.device))
    sort = "self_cuda_time_total" if trainer.device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=rows), file=sys.stderr)
    phases = [e for e in prof.key_averages() if e.key.startswith(("step/", "jepa/"))]
    for e in sorted(phases, key=lambda e: e.key):
        print(f"{e.key:32s} {e.cpu_time_total / 1e3:10.1f} ms", file=sys.stderr)
