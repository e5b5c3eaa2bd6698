"""The evaluation loop: attentive probes trained on a frozen (or fine-tuned) encoder, on one worker.

``evaluate`` is one worker's share (all of it in one process); ``train_func`` runs it on every Ray Train
worker and hands rank 0's results back through a one-file checkpoint (``vjepa_ray.eval.driver`` starts
them). Every (probe.lr, probe.weight_decay) pair is a grid point of ``probe.num_inits`` probes, each from its
own initialisation, whose top-1s are averaged; all probes train in the same pass, fed by one encoder
forward per batch. Training uses one random crop of all ``probe.num_segments`` segments and a random clip
start, drawn afresh every epoch; with ``probe.train_augmentation`` false, the center crop and one start per
video instead, the same every epoch, whose tokens ``probe.cache_features`` computes once. Validation averages
each probe's softmax over ``probe.num_views`` spatial views; its tokens are computed once, in one pass that
feeds every probe. Workers split the examples and average gradients.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from vjepa_ray import runs
from vjepa_ray.config import Config, ConfigError, from_dict
from vjepa_ray.data.sources import VideoRef, list_videos
from vjepa_ray.eval.features import encode_views
from vjepa_ray.eval.labels import stratified_subset
from vjepa_ray.eval.probes import ProbeBank, cosine_lr, grid_specs, mean_per_point
from vjepa_ray.eval.samples import SampleSpec, load_example, sample_spec
from vjepa_ray.models.pretrained import encoder_from_state, read_checkpoint, state_from_checkpoint
from vjepa_ray.models.probe import AttentiveClassifier
from vjepa_ray.models.vit import VisionTransformer
from vjepa_ray.recipe.optimizer import decays
from vjepa_ray.train.weights import read_model_weights
from vjepa_ray.video.decode import VideoSkip
from vjepa_ray.worker_env import configure_worker_logging

log = logging.getLogger(__name__)


def check_runnable(cfg: Config) -> None:
    """What evaluation needs beyond the schema's own checks; raises ConfigError naming the key."""
    p = cfg.probe
    for key in ("checkpoint", "train_manifest", "val_manifest"):
        if not getattr(p, key):
            raise ConfigError(f"probe.{key}", "is empty")
    if p.finetune and len(p.lr) * len(p.weight_decay) * p.num_inits != 1:
        raise ConfigError("probe.finetune", "fine-tuning trains the encoder, so it takes one probe: give one "
                          f"probe.lr, one probe.weight_decay and probe.num_inits 1 (got {len(p.lr)}, "
                          f"{len(p.weight_decay)} and {p.num_inits})")


def encoder_state(cfg: Config) -> tuple[dict[str, torch.Tensor], str]:
    """The encoder weights ``probe.checkpoint`` names (under ``probe.checkpoint_key``) and where they are
    from: a weights file in Meta's layout or our export, or a run folder / training checkpoint of ours
    (a local folder or a URI)."""
    path, key = cfg.probe.checkpoint, cfg.probe.checkpoint_key
    local = Path(path).expanduser()
    try:
        if runs.is_uri(path) or local.is_dir():
            folder = runs.find_checkpoint(path)
            with runs.local_copy(folder) as files:
                return read_model_weights(files)[key], f"{folder}[{key}]"
        if not local.is_file():
            raise ConfigError("probe.checkpoint", f"{path} does not exist")
        return state_from_checkpoint(read_checkpoint(local), key, path), f"{path}[{key}]"
    except (FileNotFoundError, KeyError, ValueError) as err:
        raise ConfigError("probe.checkpoint", str(err).splitlines()[0]) from None


def load_encoder(cfg: Config) -> VisionTransformer:
    m = cfg.model
    state, source = encoder_state(cfg)
    try:
        return encoder_from_state(state, source, m.name, cfg.data.frames_per_clip, cfg.data.crop_size,
                                  patch_size=m.patch_size, tubelet_size=m.tubelet_size,
                                  uniform_power=m.uniform_power, family=m.family)
    except ValueError as err:
        raise ConfigError("probe.checkpoint", str(err).splitlines()[0]) from None


def labelled_refs(manifest: str, key: str) -> list[VideoRef]:
    """The entries of a labelled manifest; every entry needs an integer label."""
    try:
        refs = list_videos([manifest])
    except ConfigError as err:
        raise ConfigError(key, str(err).split(": ", 1)[-1]) from None
    unlabelled = [str(r) for r in refs if not isinstance(r.label, int)]
    if unlabelled:
        raise ConfigError(key, f"{len(unlabelled)} entries have no integer label, e.g. {unlabelled[0]}")
    return refs


def layer_decay_groups(encoder: VisionTransformer, base_lr: float, weight_decay: float,
                       layer_decay: float) -> list[dict[str, Any]]:
    """AdamW groups for fine-tuning: block i's LR is ``base_lr * layer_decay ** (depth - i)``.

    The patch embeddings sit below block 0 and the final norm (2.1: its level norms) above the last block;
    no weight decay on biases and 1-D parameters. Each group records ``lr_scale`` for the schedule.
    """
    depth = len(encoder.blocks)
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, param in encoder.named_parameters():
        if not param.requires_grad:
            continue
        if name.startswith("blocks."):
            layer = int(name.split(".")[1]) + 1
        elif name.startswith(("patch_embed", "img_mod_embed", "video_mod_embed")):  # 2.1's input side too
            layer = 0
        else:
            layer = depth + 1
        decay = decays(name, param)
        group = groups.setdefault((layer, decay), {
            "params": [], "weight_decay": weight_decay if decay else 0.0,
            "lr_scale": layer_decay ** (depth + 1 - layer), "lr": base_lr})
        group["params"].append(param)
    return list(groups.values())


class _Examples:
    """Loads batches of examples; a bad file is a counted, logged skip.

    Augmented training examples and validation examples draw from one generator per batch (``key``); a
    fixed training example (``probe.train_augmentation`` false) from its own, seeded by its position in the
    training set, so it is the same clip in every epoch.
    """

    def __init__(self, spec: SampleSpec, seed: int):
        self.spec = spec
        # Fixed training examples are validation's single view: the center crop of every segment.
        self.fixed_spec = dataclasses.replace(spec, num_views=1)
        self.seed = seed
        self.skipped: dict[str, int] = {}

    def batch(self, refs: Sequence[VideoRef], train: bool, key: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, *key])
        loaded = [(self._load(ref, self.spec, train, rng), ref.label) for ref in refs]
        return self._stack(loaded, 1 if train else self.spec.num_views)

    def fixed_batch(self, refs: Sequence[VideoRef], indices: Sequence[int]
                    ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """The fixed training examples at ``indices`` of ``refs``: clips, labels and the indices that loaded."""
        loaded = [(self._load(refs[i], self.fixed_spec, False, np.random.default_rng([self.seed, int(i)])), i)
                  for i in indices]
        kept = [i for clip, i in loaded if clip is not None]
        clips, _ = self._stack(loaded, 1)
        return clips, torch.tensor([refs[i].label for i in kept], dtype=torch.long), kept

    def _load(self, ref: VideoRef, spec: SampleSpec, train: bool, rng: np.random.Generator) -> np.ndarray | None:
        try:
            return load_example(ref, spec, train, rng)
        except VideoSkip as skip:
            self.skipped[skip.reason] = self.skipped.get(skip.reason, 0) + 1
            log.warning("skipping %s: %s %s", ref, skip.reason, skip.detail)
            return None

    def _stack(self, loaded: Sequence[tuple[np.ndarray | None, int]], views: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """The clips that loaded, stacked, and their tags (labels or positions)."""
        kept = [(clip, tag) for clip, tag in loaded if clip is not None]
        if not kept:
            shape = (0, views, self.spec.clip.clips_per_video, self.spec.clip.frames_per_clip, self.spec.crop_size,
                     self.spec.crop_size, 3)
            return torch.zeros(shape, dtype=torch.uint8), torch.zeros(0, dtype=torch.long)
        return torch.from_numpy(np.stack([clip for clip, _ in kept])), torch.tensor([tag for _, tag in kept])


class _TrainingTokens:
    """The encoder tokens and labels of a training batch, given the batch's positions in the training set.

    Augmented examples are drawn and encoded afresh every epoch. Fixed ones are the same every epoch: with
    ``cache``, each is encoded once, in the batch that first holds it, and its tokens are kept (a file that
    failed to load is not tried again).
    """

    def __init__(self, examples: _Examples, refs: Sequence[VideoRef], encoder: VisionTransformer,
                 device: torch.device, augment: bool, cache: bool, all_levels: bool = False):
        self.examples, self.refs, self.encoder, self.device = examples, refs, encoder, device
        self.augment, self.all_levels = augment, all_levels
        self.cache: dict[int, tuple[torch.Tensor, int] | None] | None = {} if cache else None

    def __call__(self, indices: Sequence[int], key: Sequence[int], grad: bool) -> tuple[torch.Tensor | None,
                                                                                        torch.Tensor]:
        """(tokens [B, 1, S * N, D] or None when no example loaded, labels [B])."""
        if self.augment:
            clips, labels = self.examples.batch([self.refs[i] for i in indices], True, key)
            return self._encode(clips, grad), labels
        if self.cache is None:
            clips, labels, _ = self.examples.fixed_batch(self.refs, indices)
            return self._encode(clips, grad), labels
        missing = [i for i in dict.fromkeys(int(i) for i in indices) if i not in self.cache]
        if missing:
            clips, labels, kept = self.examples.fixed_batch(self.refs, missing)
            self.cache.update(dict.fromkeys(missing))
            tokens = self._encode(clips, grad)
            for row, index in enumerate(kept):
                self.cache[index] = (tokens[row], int(labels[row]))
        hits = [self.cache[int(i)] for i in indices if self.cache[int(i)] is not None]
        if not hits:
            return None, torch.zeros(0, dtype=torch.long)
        return torch.stack([tokens for tokens, _ in hits]), torch.tensor([label for _, label in hits])

    def cached_bytes(self) -> int:
        return sum(entry[0].nbytes for entry in (self.cache or {}).values() if entry is not None)

    def _encode(self, clips: torch.Tensor, grad: bool) -> torch.Tensor | None:
        if not len(clips):
            return None
        with torch.set_grad_enabled(grad):
            return encode_views(self.encoder, clips.to(self.device), all_levels=self.all_levels)


def _shard(count: int, rank: int, world: int) -> np.ndarray:
    """Rank's positions among ``count`` items, padded by wrapping so every rank gets ceil(count/world)."""
    per_rank = math.ceil(count / world)
    return np.arange(rank * per_rank, (rank + 1) * per_rank) % max(1, count)


@dataclass
class ProbeRun:
    results: dict[str, Any]
    encoder: VisionTransformer
    bank: ProbeBank


def evaluate(cfg: Config, rank: int = 0, world_size: int = 1) -> ProbeRun:
    """Trains the probes and measures them; one worker's share when world_size > 1 (process group set up)."""
    check_runnable(cfg)
    p = cfg.probe
    device = torch.device("cuda" if cfg.ray.use_gpu and torch.cuda.is_available() else "cpu")
    train_refs = labelled_refs(p.train_manifest, "probe.train_manifest")
    val_refs = labelled_refs(p.val_manifest, "probe.val_manifest")
    num_classes = p.num_classes or 1 + max(r.label for r in (*train_refs, *val_refs))
    full_train = len(train_refs)
    if p.label_fraction < 1.0:
        keep = stratified_subset([r.label for r in train_refs], p.label_fraction, cfg.meta.seed)
        train_refs = [train_refs[i] for i in keep]

    encoder = load_encoder(cfg).to(device)
    encoder.requires_grad_(p.finetune)
    spec = sample_spec(cfg)
    examples = _Examples(spec, cfg.meta.seed)
    positions = _shard(len(train_refs), rank, world_size)
    steps_per_epoch = math.ceil(len(positions) / p.batch_size)
    total_steps = p.epochs * steps_per_epoch
    heads = p.num_heads or encoder.num_heads
    bank = ProbeBank(lambda g: AttentiveClassifier(encoder.embed_dim, heads, num_classes, p.num_blocks, generator=g),
                     grid_specs(p.lr, p.weight_decay, cfg.meta.seed, p.num_inits), total_steps, device)
    all_levels = p.encoder_levels == "all"
    training_tokens = _TrainingTokens(examples, train_refs, encoder, device, p.train_augmentation, p.cache_features,
                                      all_levels)
    encoder_opt = None
    if p.finetune:
        encoder_opt = torch.optim.AdamW(layer_decay_groups(encoder, p.lr[0] * p.finetune_lr_scale,
                                                           p.weight_decay[0], p.layer_decay))

    losses = []
    for epoch in range(p.epochs):
        started = time.perf_counter()
        # Every rank draws the same permutation and takes its own slice of it.
        order = np.random.default_rng([cfg.meta.seed, epoch]).permutation(len(train_refs))[positions]
        encoder.train(p.finetune)
        for step in range(steps_per_epoch):
            tokens, labels = training_tokens(order[step * p.batch_size:(step + 1) * p.batch_size],
                                             (epoch, step, rank), grad=p.finetune)
            if encoder_opt is not None:
                encoder_opt.zero_grad(set_to_none=True)
                for group in encoder_opt.param_groups:
                    group["lr"] = group["lr_scale"] * cosine_lr(p.lr[0] * p.finetune_lr_scale, bank.step,
                                                                 total_steps)
            step_losses = bank.train_step(tokens, labels.to(device),
                                          extra_params=list(encoder.parameters()) if p.finetune else ())
            if encoder_opt is not None:
                encoder_opt.step()
            losses.append(step_losses)
        log.info("epoch %d/%d (%.1f s): mean train loss per probe %s", epoch + 1, p.epochs,
                 time.perf_counter() - started, np.round(np.mean(losses[-steps_per_epoch:], axis=0), 4).tolist())
        if epoch == 0 and p.cache_features:
            log.info("cached the tokens of %d training examples: %.1f MiB", len(training_tokens.cache),
                     training_tokens.cached_bytes() / 2**20)

    encoder.eval()
    correct = torch.zeros(len(bank.specs), dtype=torch.float64)
    counted = torch.zeros(1, dtype=torch.float64)
    val_positions = _shard(len(val_refs), rank, world_size)
    # Wrapped (padded) positions would count some examples twice: each rank keeps only its real ones.
    val_positions = val_positions[np.arange(len(val_positions)) + rank * len(val_positions) < len(val_refs)]
    for start in range(0, len(val_positions), p.batch_size):
        batch_refs = [val_refs[i] for i in val_positions[start:start + p.batch_size]]
        clips, labels = examples.batch(batch_refs, False, (p.epochs, start, rank))
        if not len(labels):
            continue
        with torch.no_grad():
            probs = bank.predict(encode_views(encoder, clips.to(device), all_levels=all_levels))
        correct += (probs.argmax(-1).cpu() == labels).sum(-1).double()
        counted += len(labels)
    skipped = Counter(examples.skipped)
    if world_size > 1:
        totals = torch.cat([correct, counted])
        dist.all_reduce(totals)
        correct, counted = totals[:-1], totals[-1:]
        # Each rank skipped the bad files of its own share.
        per_rank: list[dict[str, int] | None] = [None] * world_size
        dist.all_gather_object(per_rank, examples.skipped)
        skipped = sum((Counter(counts) for counts in per_rank), Counter())
    top1 = (100.0 * correct / counted.clamp(min=1)).tolist()
    probes = mean_per_point(bank.specs, top1)
    best = max(probes, key=lambda r: r["top1"])
    results = {"top1": best["top1"], "best": best, "probes": probes, "num_classes": num_classes,
            "train_examples": len(train_refs), "train_examples_full": full_train, "val_examples": int(counted.item()),
            "label_fraction": p.label_fraction, "finetune": p.finetune, "encoder_levels": p.encoder_levels,
            "num_segments": p.num_segments,
            "num_views": p.num_views, "epochs": p.epochs, "world_size": world_size,
            "final_train_loss": [round(x, 4) for x in np.mean(losses[-steps_per_epoch:], axis=0).tolist()],
            "skipped": dict(skipped), "checkpoint": cfg.probe.checkpoint}
    return ProbeRun(results, encoder, bank)


def train_func(config: dict) -> None:
    """The Ray Train worker: every rank evaluates its share; rank 0's report carries the results."""
    import ray.train

    configure_worker_logging(config["cfg"]["logging"]["verbose"])
    ctx = ray.train.get_context()
    outcome = evaluate(from_dict(config["cfg"]), ctx.get_world_rank(), ctx.get_world_size())
    # Train V2's Result.metrics are those of the latest checkpoint (a report without one leaves them None),
    # so rank 0 attaches the results as a one-file checkpoint.
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = None
        if ctx.get_world_rank() == 0:
            Path(folder, runs.PROBE_RESULTS_FILE).write_text(json.dumps(outcome.results))
            checkpoint = ray.train.Checkpoint.from_directory(folder)
        ray.train.report({"results": json.dumps(outcome.results)}, checkpoint=checkpoint)
