"""The V-JEPA 2.1 recipe end to end on Ray Train + DeepSpeed, on a tiny 2.1 model and in-memory synthetic clips:
pretraining from a file in the release's layout on 2 workers, one image rank and one video rank, a worker killed
and the run resumed, then the cooldown started from its run folder on 1 worker at more frames, videos only."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_train_e2e import run_in_background, tiny_config, train_worker_pids, wait_for_checkpoint
from test_train_v2_e2e import adam_steps

from vjepa_ray.config import Config
from vjepa_ray.models.pretrained import official_checkpoint
from vjepa_ray.recipe.masks import MaskCollator
from vjepa_ray.recipe.optimizer import adamw
from vjepa_ray.recipe.step import JepaStep, MicroBatch, image_collator, init_networks
from vjepa_ray.train import driver
from vjepa_ray.train.curves import read_scalars
from vjepa_ray.train.elastic import plan_mixed_batch, rank_data
from vjepa_ray.train.synthetic_stream import SyntheticClipStream, synthetic_clips
from vjepa_ray.train.weights import read_initial_weights, read_model_weights

pytestmark = pytest.mark.slow

# A tiny 2.1 model: videos of 4 frames at 32 px, images at 48 px (3 x 3 patches), 4 of each a step; lambda from 0
# to its full weight over the first 2 steps, 0.5 on videos and 0.25 on images.
TINY_2_1 = ("model.family=vjepa2_1", "model.pred_embed_dim=48", "model.pred_num_heads=4", "data.frames_per_clip=4",
            "data.crop_size=32", "optimization.global_batch_size=4", "optimization.schedule=constant",
            "deepspeed.zero_stage=1", "loss.context_warmup=[0,2]", "images.crop_size=48", "images.batch_size=4",
            "images.context_weight=0.25")
IMAGE_PATH = ("encoder.patch_embed_img.proj.weight", "encoder.patch_embed_img.proj.bias", "encoder.img_mod_embed",
              "predictor.img_mod_embed")


def release_file(path: Path, cfg: Config) -> dict[str, dict[str, torch.Tensor]]:
    """Another seed's random 2.1 weights in the release's layout (``module.backbone.`` keys, the EMA encoder under
    ``ema_encoder``, as Meta's published 2.1 files keep it), its EMA apart from its encoder; returns them in ours."""
    module, _ = init_networks(cfg)
    ours = {"encoder": module.encoder.state_dict(), "predictor": module.predictor.state_dict(),
            "target_encoder": {k: v + 0.01 for k, v in module.encoder.state_dict().items()}}
    release = official_checkpoint(**ours)
    release["ema_encoder"] = release.pop("target_encoder")
    torch.save(release, path)
    return ours


def replay(cfg: Config, steps: int) -> JepaStep:
    """The run recomputed in this process from ``model.init_from``'s weights: every step the image rank's and the
    video rank's micro batches of the same synthetic streams, with their loss weights, through one ``JepaStep``."""
    module, target = init_networks(cfg, read_initial_weights(cfg))
    train_step = JepaStep(module, target, adamw(module.named_parameters(), cfg.optimization),
                          MaskCollator(cfg.mask, module.encoder.grid), cfg.optimization, cfg.meta.seed,
                          clip_lengths=cfg.data.clip_lengths(), image_collator=image_collator(cfg))
    plan = plan_mixed_batch(cfg, 2)
    streams = [rank_data(cfg, plan, rank) for rank in range(2)]
    for step in range(steps):
        train_step([MicroBatch(synthetic_clips(s.data, cfg.meta.seed, s.rank, step * plan.grad_accum + micro)[:size],
                               rank, micro, weight)
                    for rank, s in enumerate(streams)
                    for micro, (size, weight) in enumerate(plan.weighted_micro_batches(rank))], step)
    return train_step


def test_2_1_image_and_video_ranks_killed_and_resumed_match_the_replay_then_cool_down(ray_local, tmp_path,
                                                                                      one_thread):
    images = tmp_path / "images"
    images.mkdir()
    for k in range(2):  # the driver lists images.paths before the run (the synthetic stream makes the pixels)
        Image.fromarray(np.full((48, 48, 3), 40 * k, np.uint8)).save(images / f"{k}.png")
    initial = release_file(tmp_path / "vjepa2_1_release.pt", tiny_config(tmp_path, "export", *TINY_2_1,
                                                                          "meta.seed=11"))
    name = "v2_1"
    cfg = tiny_config(tmp_path, name, *TINY_2_1, f"images.paths=[{images}]", "optimization.total_steps=12",
                      f"model.init_from={tmp_path / 'vjepa2_1_release.pt'}", "optimization.ema=[0.9,0.9]")
    thread, out = run_in_background(cfg)
    wait_for_checkpoint(tmp_path / name, "step_00000004", thread)
    pids = train_worker_pids()
    assert len(pids) == 2
    os.kill(pids[-1], signal.SIGKILL)
    thread.join(timeout=600)
    summary = out[0]

    assert summary["status"] == "finished" and summary["steps"] == 12 and summary["restarts"] == 1
    assert summary["world_sizes"] == [2, 2] and summary["starts"][1]["step"] in (4, 8)
    metrics = json.loads((tmp_path / name / "summary.json").read_text())["metrics"]
    # 1 image rank of 4 images and 1 video rank of 4 clips, one micro step each.
    assert (metrics["global_batch"], metrics["micro_batch"], metrics["grad_accum"]) == (8, 4, 1)
    assert summary["global_batch"] == 8
    series = read_scalars(Path(summary["tensorboard"]))
    assert {"loss_mask_0", "loss_mask_1", "loss_image_mask_0"} <= series.keys()
    assert all(value > 0 for _, value in series["loss_image_mask_0"])
    # Each modality's stream stood at its 12th batch, the image rank's and the video rank's apart.
    positions = json.loads(Path(summary["checkpoint"], "data_position.json").read_text())
    assert positions == [{"epoch": 0, "chunk": 12, "world_size": 1}] * 2

    # Resumed exactly: weights, predictor and EMA bit for bit the one-process replay's, which takes every step's
    # image and video micro batch through the recipe's step (½ image loss + ½ video loss).
    reference = replay(cfg, 12)
    saved = read_model_weights(summary["checkpoint"])
    want = {"encoder": reference.module.encoder, "predictor": reference.module.predictor,
            "target_encoder": reference.target_encoder}
    for key, model in want.items():
        for param, value in model.named_parameters():
            assert torch.equal(saved[key][param], value), f"{key}.{param}"
    # The image path trained, from the release file's values.
    start = {f"{key}.{k}": v for key in ("encoder", "predictor") for k, v in initial[key].items()}
    final = {f"{key}.{k}": v for key in ("encoder", "predictor") for k, v in saved[key].items()}
    assert all(not torch.equal(final[k], start[k]) for k in IMAGE_PATH)

    # The cooldown: a new run from the pretraining folder on 1 worker, videos only, 8 frames instead of 4.
    cooldown = tiny_config(tmp_path, "cooldown", *TINY_2_1, "images.paths=[]", "ray.num_workers=1",
                           "optimization.schedule=cooldown", "optimization.warmup_steps=0",
                           "optimization.total_steps=4", "optimization.schedule_scale=1.0", "optimization.lr=1e-3",
                           "optimization.final_lr=1e-5", "data.frames_per_clip=8",
                           f"checkpoint.start_from={tmp_path / name}", "checkpoint.every_steps=4",
                           "logging.every_steps=1")
    second = driver.run(cooldown, stream_factory=SyntheticClipStream)
    assert second["status"] == "finished" and second["steps"] == 4 and second["starts"] == [{"world_size": 1,
                                                                                             "step": 0}]
    series = read_scalars(Path(second["tensorboard"]))
    assert [lr for _, lr in series["lr"]] == pytest.approx([1e-3 - (1e-3 - 1e-5) * s / 4 for s in range(1, 5)],
                                                           rel=1e-6)
    assert "loss_image_mask_0" not in series
    # Adam's state came along (2 workers' ZeRO-2 partitions resharded for 1): its step counts go on from 12.
    assert adam_steps(summary["checkpoint"]) == {12} and adam_steps(second["checkpoint"]) == {16}
    cooled = read_model_weights(second["checkpoint"])
    cooled = {f"{key}.{k}": v for key in ("encoder", "predictor") for k, v in cooled[key].items()}
    # Videos only: the image path is frozen at pretraining's values while the clip path moves on.
    assert all(torch.equal(cooled[k], final[k]) for k in IMAGE_PATH)
    assert not torch.equal(cooled["encoder.patch_embed.proj.weight"], final["encoder.patch_embed.proj.weight"])
