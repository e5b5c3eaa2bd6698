"""Training-step throughput: the full V-JEPA step on one device, in clips per second.

The step is the recipe's (``vjepa_ray.recipe.step.JepaStep``, the one training runs) on one micro batch
of rank 0: masks for every config, uint8 -> normalised clips, the target encoder's pass on the full clips,
one encoder + predictor pass per mask config, the L1 loss, backward, gradient clipping, an AdamW step with
the scheduled LR/WD, and the EMA update of the target encoder. Each timed step is split into phases
(seconds, mean over the timed steps).

Its cost: ``flops_per_clip``, torch's FLOP counter over the step's passes (matmuls, attention, patch
convolutions, forward and backward; for 2.1 its dense context loss too, whose weight the timed steps hold at the
release's 0.5), counted on the meta device for the timed steps' masks; ``flop_per_s`` is what the timed steps
achieve. ``--flops-only`` counts without timing, at any size.

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
import logging
import statistics

from vjepa_ray.config import CLIP_GRAD_RULES, ModelConfig
from vjepa_ray.models.families import DEFAULT_FAMILY, FAMILIES
from vjepa_ray.models.sizes import MODEL_SPECS

# The step and its clocks (``vjepa_ray.bench._step_timing``) import torch, and so are imported by ``run``:
# ``bench step --help`` reads the options without them.

log = logging.getLogger(__name__)

PHASES = ("masks", "normalize", "forward", "backward", "optimizer", "ema")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="vit_small", choices=MODEL_SPECS)
    # Every family: the step is the recipe's (JepaStep), whether or not the distributed trainer pretrains it yet.
    parser.add_argument("--family", default=DEFAULT_FAMILY.name, choices=list(FAMILIES),
                        help="model.family (vjepa_ray.models.families)")
    parser.add_argument("--pred-depth", type=int, default=ModelConfig.pred_depth,
                        help="model.pred_depth (the 2.1 release's predictor has 24 blocks)")
    parser.add_argument("--clip-rule", default="family", choices=CLIP_GRAD_RULES,
                        help="optimization.clip_grad_rule, clipping from step 0 for per_module and global")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--crop", type=int, default=128)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                        help="bf16 = autocast over the forward passes, fp32 weights and optimizer")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda where torch sees a GPU, else cpu")
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", type=int, default=0, metavar="ROWS",
                        help="after timing, profile one more step and print its top ROWS ops to stderr")
    parser.add_argument("--flops-only", action="store_true",
                        help="report flops_per_clip alone: no model is built on the device and nothing is timed")


def run(args: argparse.Namespace) -> dict:
    import torch

    from vjepa_ray.bench._step_timing import (
        StepTimer,
        Trainer,
        bench_config,
        flops_per_clip,
        print_profile,
        where_time_goes,
    )

    settings = {"model": args.model, "family": args.family, "pred_depth": args.pred_depth,
                "clip_rule": args.clip_rule, "frames": args.frames, "crop": args.crop, "batch": args.batch,
                "precision": args.precision, "steps": args.steps, "warmup": args.warmup, "torch": torch.__version__}
    timed_steps = range(args.warmup, args.warmup + args.steps)
    if args.flops_only:
        return {"figure": "step", "flops_per_clip": flops_per_clip(bench_config(args), timed_steps),
                "settings": settings}
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
        print_profile(trainer, args.profile)
    mean_step = statistics.fmean(step_s)
    mean_forward = statistics.fmean(forward_s)
    flops = flops_per_clip(trainer.cfg, timed_steps)
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
        "context_weight": trainer.context_weight,
        "flops_per_clip": flops,
        "flop_per_s": flops * args.batch / mean_step,
        **breakdown,
        "settings": {**settings, "device": trainer.device.type, "threads": torch.get_num_threads()},
    }
