"""Does pretraining learn motion? Probe accuracy of a JEPA-pretrained encoder vs random init vs one frame.

Pre-trains a small encoder with the V-JEPA objective on unlabelled synthetic videos (one process, the
recipe's training step, as ``pretrain`` runs it on one rank), then trains attentive probes on the frozen
features of a labelled synthetic set whose classes only motion separates
(``vjepa_ray.video.labelled_synthetic``). Two baselines are measured in the same run: the same
architecture at its random initialisation, and the pretrained encoder shown one frame repeated (motion
invisible, so it should sit at chance). Reported top-1 is the best point of the probe grid on the val
set, each point the mean over ``--probe-seeds`` probe initialisations, for each of the three, so the
three are compared alike.
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from vjepa_ray.config import MaskConfig, OptimizationConfig
from vjepa_ray.models.families import DEFAULT_FAMILY, get_family, pretrainable_families

# numpy, torch, the models, the recipe and the video decoder are imported by the functions that use them:
# ``bench learning --help`` reads the options without them.
if TYPE_CHECKING:
    import torch

    from vjepa_ray.models.vit import VisionTransformer
    from vjepa_ray.video.decode import ClipSpec

log = logging.getLogger(__name__)

# The predictor's width (3 heads either way): 48 with a position table, 96 with rotary positions. A rotary
# head turns each axis at axis_dim / 2 frequencies (vjepa_ray.models.rope); 48 wide gives 16-channel heads
# and two frequencies, 1 and 1/100 rad per token, which cannot tell the 8 positions of this grid apart, so the
# predictor barely knows where its targets are. 96 wide gives the 32-channel heads of the release's predictor
# (384 wide, 12 heads); README ("Evaluation", bench learning) compares the two.
TABLE_PREDICTOR_WIDTH, ROTARY_PREDICTOR_WIDTH = 48, 96


class _SettingsFile(argparse.Action):
    """``--config FILE``: a YAML mapping of this figure's options (``steps: 2000``); later flags win."""

    def __call__(self, parser, namespace, path, option_string=None):
        settings = yaml.safe_load(Path(path).expanduser().read_text()) or {}
        known = {action.dest for action in parser._actions}
        for key, value in settings.items():
            dest = key.replace("-", "_")
            if dest not in known or dest == "config":
                parser.error(f"{path}: unknown setting {key!r}")
            setattr(namespace, dest, value)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--config", action=_SettingsFile, metavar="FILE",
      help="YAML of these options (e.g. jobs/learning_large.yaml); flags after it override it")
    a("--workdir", default="", help="where the videos go (default: a temporary folder, removed after)")
    a("--seed", type=int, default=0)
    a("--device", default="cpu", help="cpu or cuda")
    a("--threads", type=int, default=0,
      help="torch CPU threads (0 = torch's default); 1 is much faster on a machine others load too")
    # Data: videos of --video-frames frames, clips of --frames frames every --frame-step.
    a("--size", type=int, default=32, help="video side in pixels (also the crop: no resizing)")
    a("--video-frames", type=int, default=16)
    a("--frames", type=int, default=8)
    a("--frame-step", type=int, default=2)
    a("--pretrain-videos", type=int, default=2000, help="unlabelled videos for pretraining")
    a("--train-per-class", type=int, default=60)
    a("--val-per-class", type=int, default=50)
    # Encoder and predictor. 4-px patches (an 8x8 grid at 32 px): an 8-px patch swallows most of the disc's
    # motion between frames, and then neither pretraining nor supervised training separates the classes well.
    a("--patch", type=int, default=4)
    a("--tubelet", type=int, default=2)
    a("--embed-dim", type=int, default=96)
    a("--depth", type=int, default=4)
    a("--heads", type=int, default=3)
    a("--pred-dim", type=int, help="predictor width (default: 48 for a position table, 96 for rotary positions)")
    a("--pred-depth", type=int, default=2)
    a("--family", default=DEFAULT_FAMILY.name, choices=pretrainable_families(),
      help="model.family (vjepa_ray.models.families)")
    # Pretraining.
    a("--schedule", choices=("cosine", "constant"),
      help="optimization.schedule (default: the family's recipe, Family.schedule); the JSON's settings say which")
    a("--steps", type=int, default=600)
    a("--batch", type=int, default=32)
    # A larger learning rate can collapse the target's features onto a few directions (the JSON's
    # feature_effective_rank shows it) and leave probes below random init; this one keeps the rank growing.
    a("--lr", type=float, default=1.5e-4)
    a("--ema", type=float, nargs=2, default=[0.998, 1.0],
      help="the EMA momentum, start and end (the constant schedule holds the start)")
    # Probes: the grid of learning rates x weight decays, all trained in one pass. On these small
    # feature sets the attentive probe's query learns slowly, hence the high learning rates and many epochs.
    a("--probe-epochs", type=int, default=60)
    a("--probe-batch", type=int, default=32)
    a("--probe-lr", type=float, nargs="+", default=[1e-2, 3e-3])
    a("--probe-wd", type=float, nargs="+", default=[0.01])
    # A probe's top-1 here moves by 5-25 points with its initialisation alone (most on random-init features,
    # whose probes sometimes leave the plateau and sometimes not), so each grid point is the mean of several.
    a("--probe-seeds", type=int, default=3, help="initialisations per grid point; their top-1 is averaged")


def _decode_manifest(manifest: Path, spec: ClipSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Every video of a manifest as uint8 clips [N, T, H, W, 3] and labels [N]."""
    import numpy as np
    import torch

    from vjepa_ray.data.sources import list_videos
    from vjepa_ray.video.decode import VideoSkip, decode_clips

    clips, labels = [], []
    rng = np.random.default_rng(0)
    for ref in list_videos([str(manifest)]):
        try:
            clips.append(decode_clips(ref.uri, spec, rng).clips[0])
        except VideoSkip as skip:
            log.warning("skipping %s: %s", ref.uri, skip.reason)
            continue
        labels.append(int(ref.label))
    return torch.from_numpy(np.stack(clips)), torch.tensor(labels)


def _build_encoder(args: argparse.Namespace) -> VisionTransformer:
    from vjepa_ray.models.vit import VisionTransformer

    return VisionTransformer(args.size, args.frames, args.patch, args.tubelet, embed_dim=args.embed_dim,
                             depth=args.depth, num_heads=args.heads, family=args.family)


def pretrain_optimization(args: argparse.Namespace) -> OptimizationConfig:
    """The pretraining schedules: ``--schedule``, or the family's own (``Family.schedule``).

    A short run: schedules end with training (no 1.25x stretch) and weight decay stays at the start value.
    """
    return OptimizationConfig(schedule=args.schedule or get_family(args.family).schedule, total_steps=args.steps,
                              warmup_steps=max(1, args.steps // 10), schedule_scale=1.0, start_lr=args.lr / 10,
                              lr=args.lr, final_lr=args.lr / 100, weight_decay=0.04, final_weight_decay=0.04,
                              ema=list(args.ema))


def predictor_width(args: argparse.Namespace) -> int:
    if args.pred_dim:
        return args.pred_dim
    return TABLE_PREDICTOR_WIDTH if get_family(args.family).positions.has_table else ROTARY_PREDICTOR_WIDTH


def _pretrain(args: argparse.Namespace, clips: torch.Tensor, encoder: VisionTransformer) -> tuple[
        VisionTransformer, list[float]]:
    """V-JEPA pretraining in this process; returns the target (EMA) encoder and the loss curve."""
    import numpy as np
    import torch

    from vjepa_ray.models.predictor import Predictor
    from vjepa_ray.recipe.masks import MaskCollator
    from vjepa_ray.recipe.objective import JepaModule
    from vjepa_ray.recipe.optimizer import adamw
    from vjepa_ray.recipe.step import JepaStep, MicroBatch

    masks = [MaskConfig(num_blocks=8, spatial_scale=[0.15, 0.15]),  # the recipe's short- and long-range masks
             MaskConfig(num_blocks=2, spatial_scale=[0.7, 0.7])]
    predictor = Predictor(encoder.grid, args.embed_dim, predictor_width(args), args.pred_depth, num_heads=args.heads,
                          num_mask_tokens=len(masks), family=args.family).to(args.device)
    target = copy.deepcopy(encoder).requires_grad_(False)
    opt_cfg = pretrain_optimization(args)
    module = JepaModule(encoder, predictor)
    train_step = JepaStep(module, target, adamw(module.named_parameters(), opt_cfg),
                          MaskCollator(masks, encoder.grid), opt_cfg, args.seed, args.device)
    rng = np.random.default_rng(args.seed)
    losses = []
    for step in range(args.steps):
        batch = torch.from_numpy(rng.choice(len(clips), args.batch, replace=False))
        out = train_step([MicroBatch(clips[batch])], step)
        losses.append(out.loss)
        if step % 50 == 0 or step == args.steps - 1:
            log.info("pretrain step %d loss %.4f target std %.3f", step, out.loss,
                     out.outputs[0].target_features_std.item())
    return target, losses


def _features(encoder: VisionTransformer, clips: torch.Tensor, frame_only: bool, chunk: int = 64) -> torch.Tensor:
    """Frozen tokens [N, 1 view, tokens, D]; frame_only shows the middle frame repeated."""
    import torch

    from vjepa_ray.recipe.objective import normalize_clips

    encoder.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(clips), chunk):
            x = clips[start:start + chunk]
            if frame_only:
                x = x[:, x.shape[1] // 2:x.shape[1] // 2 + 1].expand_as(x)
            out.append(encoder(normalize_clips(x.to(next(encoder.parameters()).device))))
    return torch.cat(out).unsqueeze(1)


def _effective_rank(tokens: torch.Tensor) -> float:
    """How many directions the features vary in from clip to clip: exp of the entropy of their variance
    spectrum. tokens [N, 1, tokens, D], layer-normed as the probe sees them, minus each position's mean
    over clips. Near 1 when the features have collapsed onto one direction."""
    import torch
    import torch.nn.functional as F

    x = F.layer_norm(tokens[:, 0].float(), tokens.shape[-1:])
    x = (x - x.mean(dim=0)).flatten(0, 1)
    variance = torch.linalg.svdvals(x) ** 2
    p = variance / variance.sum()
    return math.exp(-(p * p.clamp_min(1e-12).log()).sum().item())


def _probe_top1(args: argparse.Namespace, train: tuple[torch.Tensor, torch.Tensor],
                val: tuple[torch.Tensor, torch.Tensor], num_classes: int) -> dict[str, list[float]]:
    """Trains the probe grid, ``args.probe_seeds`` initialisations of each point, on cached features;
    returns each grid point's val top-1 (percent) per initialisation."""
    import torch

    from vjepa_ray.eval.probes import ProbeBank, grid_specs
    from vjepa_ray.models.probe import AttentiveClassifier

    (x_train, y_train), (x_val, y_val) = train, val
    steps_per_epoch = math.ceil(len(x_train) / args.probe_batch)
    specs = grid_specs(args.probe_lr, args.probe_wd, args.seed, args.probe_seeds)
    bank = ProbeBank(lambda g: AttentiveClassifier(args.embed_dim, args.heads, num_classes, generator=g),
                     specs, args.probe_epochs * steps_per_epoch, args.device)
    y_train, y_val = y_train.to(args.device), y_val.to(args.device)
    order = torch.Generator().manual_seed(args.seed)
    for _ in range(args.probe_epochs):
        perm = torch.randperm(len(x_train), generator=order)
        for start in range(0, len(x_train), args.probe_batch):
            idx = perm[start:start + args.probe_batch]
            bank.train_step(x_train[idx], y_train[idx])
    correct = (bank.predict(x_val).argmax(-1) == y_val).float().mean(-1) * 100
    top1: dict[str, list[float]] = {}
    for spec, c in zip(bank.specs, correct):
        top1.setdefault(spec.name, []).append(round(c.item(), 2))
    return top1


def run(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch

    from vjepa_ray.video.decode import ClipSpec
    from vjepa_ray.video.labelled_synthetic import MOTION_CLASSES, make_labelled_motion_videos

    start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory(prefix="vjepa_learning_") as tmp:
        root = Path(args.workdir or tmp)
        spec = ClipSpec(frames_per_clip=args.frames, frame_step=args.frame_step)
        labelled = make_labelled_motion_videos(root / "labelled", args.train_per_class, args.val_per_class,
                                               args.video_frames, args.size, seed=args.seed)
        # The pretraining videos come from their own seed; their labels are never read.
        unlabelled = make_labelled_motion_videos(root / "unlabelled", math.ceil(args.pretrain_videos / len(
            MOTION_CLASSES)), 0, args.video_frames, args.size, seed=args.seed + 1)
        pretrain_clips, _ = _decode_manifest(unlabelled.train_manifest, spec)
        train = _decode_manifest(labelled.train_manifest, spec)
        val = _decode_manifest(labelled.val_manifest, spec)
    data_s = time.perf_counter() - start

    encoder = _build_encoder(args).to(args.device)
    random_init = copy.deepcopy(encoder)
    t0 = time.perf_counter()
    pretrained, losses = _pretrain(args, pretrain_clips, encoder)
    pretrain_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    results, seeds, ranks = {}, {}, {}
    for name, model, frame_only in (("pretrained", pretrained, False), ("random_init", random_init, False),
                                    ("frame_only", pretrained, True)):
        val_tokens = _features(model, val[0], frame_only)
        per_seed = _probe_top1(args, (_features(model, train[0], frame_only), train[1]), (val_tokens, val[1]),
                               len(labelled.classes))
        seeds[name] = per_seed
        results[name] = {point: round(float(np.mean(top1)), 2) for point, top1 in per_seed.items()}
        ranks[name] = round(_effective_rank(val_tokens), 1)
        log.info("%s probes: %s; feature effective rank %.1f", name, per_seed, ranks[name])
    probe_s = time.perf_counter() - t0

    settings = {k: v for k, v in vars(args).items() if k not in ("figure", "workdir", "config")}
    settings["schedule"] = pretrain_optimization(args).schedule
    settings["pred_dim"] = predictor_width(args)
    return {
        "pretrained_top1": max(results["pretrained"].values()),
        "random_init_top1": max(results["random_init"].values()),
        "frame_only_top1": max(results["frame_only"].values()),
        "chance": round(100 / len(labelled.classes), 2),
        "per_probe_top1": results,
        "per_probe_seed_top1": seeds,
        "feature_effective_rank": ranks,
        "pretrain_loss_first_last": [round(np.mean(losses[:10]), 4), round(np.mean(losses[-10:]), 4)],
        "seconds": {"data": round(data_s, 1), "pretrain": round(pretrain_s, 1), "probes": round(probe_s, 1),
                    "total": round(time.perf_counter() - start, 1)},
        "torch_threads": torch.get_num_threads(),
        "settings": settings,
    }
