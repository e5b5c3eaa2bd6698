"""``python -m vjepa_ray.evaluate``: encoders from checkpoints, image and video manifests, fine-tuning."""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from vjepa_ray import evaluate, runs
from vjepa_ray.config import ConfigError, load_config
from vjepa_ray.eval import driver, loop
from vjepa_ray.eval.features import encode_views
from vjepa_ray.models import build_models
from vjepa_ray.models.pretrained import official_checkpoint
from vjepa_ray.models.vit import build_encoder
from vjepa_ray.recipe.objective import normalize_clips
from vjepa_ray.video.labelled_synthetic import make_labelled_motion_videos
from vjepa_ray.video.synthetic import moving_pattern, write_video

FRAMES, CROP = 4, 32


def tiny_overrides(tmp_path: Path, checkpoint: Path, train: Path, val: Path, *extra: str) -> list[str]:
    return ["model.name=vit_tiny", "model.patch_size=16", "model.pred_depth=1", "model.pred_embed_dim=48",
            f"data.frames_per_clip={FRAMES}", "data.frame_step=1", f"data.crop_size={CROP}",
            "data.random_resize_scale=[0.8,1.0]", f"probe.checkpoint={checkpoint}",
            f"probe.train_manifest={train}", f"probe.val_manifest={val}", "probe.num_segments=1",
            "probe.num_views=1", "probe.batch_size=4", "meta.name=probe_test",
            f"ray.storage_path={tmp_path / 'runs'}", "ray.num_workers=1", *extra]


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    """A random vit_tiny in Meta's released checkpoint layout."""
    cfg = load_config(None, ["model.name=vit_tiny", "model.pred_depth=1", "model.pred_embed_dim=48",
                             f"data.frames_per_clip={FRAMES}", f"data.crop_size={CROP}"])
    torch.manual_seed(0)
    encoder, predictor = build_models(cfg)
    path = tmp_path / "vitt.pth.tar"
    torch.save(official_checkpoint(encoder.state_dict(), predictor.state_dict(), encoder.state_dict()), path)
    return path


def write_image(path: Path, rgb: np.ndarray) -> None:
    with av.open(str(path), "w", format="image2") as container:
        stream = container.add_stream("png")
        stream.width, stream.height, stream.pix_fmt = rgb.shape[1], rgb.shape[0], "rgb24"
        for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
            container.mux(packet)


@pytest.fixture
def image_manifests(tmp_path: Path) -> tuple[Path, Path]:
    """Two classes of PNG images (reddish vs bluish noise), 8 train and 4 val per class."""
    rng = np.random.default_rng(0)
    manifests = []
    for split, per_class in (("train", 8), ("val", 4)):
        lines = []
        for label in (0, 1):
            for i in range(per_class):
                image = rng.integers(0, 120, (40, 48, 3), dtype=np.uint8)
                image[..., 0 if label == 0 else 2] += 120
                path = tmp_path / f"{split}_{label}_{i}.png"
                write_image(path, image)
                lines.append(f"{path} {label}")
        manifests.append(tmp_path / f"{split}.txt")
        manifests[-1].write_text("\n".join(lines) + "\n")
    return manifests[0], manifests[1]


def test_image_manifest_evaluates_end_to_end(tmp_path, checkpoint, image_manifests):
    cfg = load_config(None, tiny_overrides(tmp_path, checkpoint, *image_manifests, "probe.epochs=4",
                                           "probe.lr=[3e-3,1e-4]", "probe.weight_decay=[0.01]", "probe.num_inits=2"))
    before = {k: v.clone() for k, v in loop.load_encoder(cfg).state_dict().items()}
    outcome = loop.evaluate(cfg)
    results = outcome.results
    assert results["num_classes"] == 2 and results["val_examples"] == 8 and results["train_examples"] == 16
    # Two grid points, each the mean of two probes with their own initialisations.
    assert len(outcome.bank.probes) == 4
    seed = cfg.meta.seed
    points = [(p["lr"], p["seeds"]) for p in results["probes"]]
    assert points == [(3e-3, [seed, seed + 2]), (1e-4, [seed + 1, seed + 3])]
    for point in results["probes"]:
        assert point["top1"] == pytest.approx(sum(point["top1_inits"]) / 2, abs=1e-3)
    assert results["top1"] == max(p["top1"] for p in results["probes"])
    # Colour is all it takes: the better probe separates the classes.
    assert results["top1"] >= 87.5
    # Frozen probing leaves the encoder exactly as loaded.
    after = outcome.encoder.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_finetuning_changes_the_encoder(tmp_path, checkpoint, image_manifests):
    cfg = load_config(None, tiny_overrides(tmp_path, checkpoint, *image_manifests, "probe.epochs=1",
                                           "probe.finetune=true", "probe.lr=[1e-3]"))
    before = {k: v.clone() for k, v in loop.load_encoder(cfg).state_dict().items()}
    after = loop.evaluate(cfg).encoder.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert "blocks.0.attn.qkv.weight" in changed and "norm.weight" in changed
    assert "pos_embed" not in changed  # the fixed table is no parameter


def test_layer_decay_scales_lower_blocks_down(checkpoint, tmp_path):
    cfg = load_config(None, ["model.name=vit_tiny", f"data.frames_per_clip={FRAMES}", f"data.crop_size={CROP}",
                             f"probe.checkpoint={checkpoint}"])
    encoder = loop.load_encoder(cfg)
    groups = loop.layer_decay_groups(encoder, 1e-4, 0.05, layer_decay=0.5)
    scale_of = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    depth = len(encoder.blocks)
    assert scale_of[id(encoder.norm.weight)] == 1.0
    assert scale_of[id(encoder.blocks[depth - 1].mlp.fc1.weight)] == 0.5
    assert scale_of[id(encoder.patch_embed.proj.weight)] == 0.5 ** (depth + 1)
    assert all(g["weight_decay"] == 0.0 for g in groups for p in g["params"] if p.dim() == 1)


def test_label_fraction_trains_on_a_stratified_subset(tmp_path, checkpoint, image_manifests):
    cfg = load_config(None, tiny_overrides(tmp_path, checkpoint, *image_manifests, "probe.epochs=1",
                                           "probe.label_fraction=0.25"))
    results = loop.evaluate(cfg).results
    assert results["train_examples"] == 4 and results["train_examples_full"] == 16


def test_entries_over_the_data_limits_are_skipped_and_counted(tmp_path, checkpoint):
    """data.max_pixels holds in evaluation too, for images as for videos: the 40x48 images load, the
    64x64 image and video are skipped, each time one is met (two in the training epoch, one in validation)."""
    small = [tmp_path / f"small_{i}.png" for i in range(3)]
    for i, path in enumerate(small):
        write_image(path, np.full((40, 48, 3), 60 * i, dtype=np.uint8))
    big_image, big_video = tmp_path / "big.png", tmp_path / "big.mp4"
    write_image(big_image, np.zeros((64, 64, 3), dtype=np.uint8))
    write_video(big_video, moving_pattern(8, 64, 64, np.random.default_rng(0)), codec="mpeg4")
    train, val = tmp_path / "train.txt", tmp_path / "val.txt"
    train.write_text(f"{small[0]} 0\n{small[1]} 1\n{big_image} 0\n{big_video} 1\n")
    val.write_text(f"{small[2]} 0\n{big_video} 1\n")
    cfg = load_config(None, tiny_overrides(tmp_path, checkpoint, train, val, "probe.epochs=1",
                                           f"data.max_pixels={40 * 48}"))
    results = loop.evaluate(cfg).results
    assert results["skipped"] == {"too_large_pixels": 3}
    assert results["train_examples"] == 4 and results["val_examples"] == 1


def test_cached_features_train_the_same_probes_as_encoding_every_epoch(tmp_path, checkpoint, one_thread):
    """Fixed training examples (one crop, one clip start per video) are the same clip every epoch, so their
    tokens, computed once, train exactly the probes that encoding them every epoch trains."""
    videos = make_labelled_motion_videos(tmp_path / "videos", 4, 2, frames=12, size=CROP,
                                         classes=["right_fast", "left_fast", "up"])
    broken = tmp_path / "videos" / "broken.mp4"
    broken.write_bytes(b"not a video")
    videos.train_manifest.write_text(videos.train_manifest.read_text() + f"{broken} 1\n")
    cfg = load_config(None, tiny_overrides(tmp_path, checkpoint, videos.train_manifest, videos.val_manifest,
                                           "probe.epochs=2", "probe.lr=[3e-3,1e-4]", "probe.num_inits=2",
                                           "probe.train_augmentation=false", "probe.num_segments=2"))
    # The videos are longer than a clip: a fixed example's start is drawn, once, from its position.
    examples = loop._Examples(loop.sample_spec(cfg), cfg.meta.seed)
    refs = loop.labelled_refs(cfg.probe.train_manifest, "probe.train_manifest")
    first, labels, kept = examples.fixed_batch(refs, [0, 1, 12])
    assert first.shape == (2, 1, 2, FRAMES, CROP, CROP, 3) and kept == [0, 1]
    assert torch.equal(examples.fixed_batch(refs, [1, 0])[0], first.flip(0)) and labels.tolist() == [0, 0]

    encoded = loop.evaluate(cfg)
    cfg.probe.cache_features = True
    cached = loop.evaluate(cfg)
    assert cached.results["probes"] == encoded.results["probes"]  # every initialisation's top-1
    assert cached.results["final_train_loss"] == pytest.approx(encoded.results["final_train_loss"], rel=1e-5)
    for mine, theirs in zip(cached.bank.probes, encoded.bank.probes):
        for (name, a), b in zip(mine.state_dict().items(), theirs.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
    # Encoded every epoch, the broken file fails every epoch; cached, once.
    assert encoded.results["skipped"] == {"not_video": 2} and cached.results["skipped"] == {"not_video": 1}


def test_cached_features_need_fixed_training_examples(tmp_path, checkpoint, image_manifests, capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(tiny_overrides(tmp_path, checkpoint, *image_manifests, "probe.cache_features=true"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m vjepa_ray.evaluate: config error: probe.cache_features: needs fixed training "
                          "examples: set probe.train_augmentation=false") and err.count("\n") == 1
    with pytest.raises(ConfigError, match="^probe.cache_features: cannot be combined with probe.finetune"):
        load_config(None, tiny_overrides(tmp_path, checkpoint, *image_manifests, "probe.cache_features=true",
                                         "probe.train_augmentation=false", "probe.finetune=true"))


def test_config_mistakes_name_the_key(tmp_path, checkpoint, image_manifests, capsys):
    cfg = load_config(None, tiny_overrides(tmp_path, tmp_path / "missing.pt", *image_manifests))
    with pytest.raises(ConfigError, match="^probe.checkpoint"):
        driver.run(cfg)
    cfg = load_config(None, tiny_overrides(tmp_path, checkpoint, *image_manifests, "probe.finetune=true",
                                           "probe.lr=[1e-3,1e-4]"))
    with pytest.raises(ConfigError, match="^probe.finetune"):
        loop.check_runnable(cfg)
    cfg.probe.lr, cfg.probe.num_inits = [1e-3], 2
    with pytest.raises(ConfigError, match="^probe.finetune: .*probe.num_inits 1"):
        loop.check_runnable(cfg)
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(tiny_overrides(tmp_path, checkpoint, image_manifests[0], tmp_path / "none.txt"))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("python -m vjepa_ray.evaluate: config error: probe.val_manifest")


@pytest.mark.slow
def test_cli_on_ray_train_with_two_workers_on_motion_videos(tmp_path, checkpoint, ray_local, capsys):
    videos = make_labelled_motion_videos(tmp_path / "videos", 3, 2, frames=8, size=CROP,
                                         classes=["right_fast", "left_fast"])
    broken = tmp_path / "videos" / "broken.mp4"
    broken.write_bytes(b"not a video")
    videos.val_manifest.write_text(videos.val_manifest.read_text() + f"{broken} 0\n")
    argv = tiny_overrides(tmp_path, checkpoint, videos.train_manifest, videos.val_manifest, "probe.epochs=1",
                          "ray.num_workers=2", "probe.num_segments=2", "probe.num_views=2",
                          "probe.lr=[1e-3,1e-4]")
    assert evaluate.main(argv) == 0
    written = json.loads((tmp_path / "runs" / "probe_test" / runs.PROBE_RESULTS_FILE).read_text())
    assert written["world_size"] == 2 and len(written["probes"]) == 2
    assert written["val_examples"] == 4 and sum(written["skipped"].values()) == 1
    assert "best top-1" in capsys.readouterr().out


def test_probe_reads_the_last_level_by_default_and_every_level_on_request():
    torch.manual_seed(0)
    encoder = build_encoder("vit_tiny", FRAMES, CROP, family="vjepa2_1").eval()
    clips = torch.randint(0, 256, (2, 1, 3, FRAMES, CROP, CROP, 3), dtype=torch.uint8)  # 2 videos, 3 segments
    x = normalize_clips(clips.flatten(0, 2))
    with torch.no_grad():
        plain, levels = encoder(x), encoder(x, all_levels=True)  # [6, N, D], [6, N, 4 D]
        last, every = encode_views(encoder, clips), encode_views(encoder, clips, all_levels=True)
    n, d = plain.shape[1:]

    # By default the features: the encoder's plain forward, which is its last level.
    assert last.shape == (2, 1, 3 * n, d) and torch.equal(last, plain.reshape(2, 1, 3 * n, d))
    assert torch.equal(plain, levels[..., -d:])
    # Every level: the four D-wide levels of all_levels' output, each a block of N tokens, segment by segment.
    assert every.shape == (2, 1, 3 * 4 * n, d)
    assert torch.equal(every.reshape(6, 4, n, d), levels.reshape(6, n, 4, d).transpose(1, 2))


def test_encoder_levels_config_mistakes_name_the_key():
    with pytest.raises(ConfigError, match="^probe.encoder_levels: expected one of last, all, got 'every'$"):
        load_config(None, ["probe.encoder_levels=every"])
    with pytest.raises(ConfigError, match="^probe.encoder_levels: all reads the levels of a family with several "
                                          r"\(model.family=vjepa2_1\); model.family vjepa2's encoder has one$"):
        load_config(None, ["probe.encoder_levels=all", "model.family=vjepa2"])
    assert load_config(None, ["probe.encoder_levels=all", "model.family=vjepa2_1"]).probe.encoder_levels == "all"


def test_every_level_of_a_v2_1_encoder_trains_the_probe_and_its_cache_holds_what_the_probe_reads(tmp_path, one_thread):
    """Cached or encoded every epoch, the probes read the same tokens: every level's, at the encoder's width."""
    cfg = load_config(None, ["model.name=vit_tiny", "model.family=vjepa2_1", "model.pred_depth=1",
                             "model.pred_embed_dim=48", f"data.frames_per_clip={FRAMES}", f"data.crop_size={CROP}"])
    torch.manual_seed(0)
    encoder, predictor = build_models(cfg)
    checkpoint = tmp_path / "vitt_v2_1.pth.tar"
    torch.save(official_checkpoint(encoder.state_dict(), predictor.state_dict(), encoder.state_dict()), checkpoint)
    videos = make_labelled_motion_videos(tmp_path / "videos", 3, 2, frames=8, size=CROP,
                                         classes=["right_fast", "left_fast"])
    cfg = load_config(None, tiny_overrides(tmp_path, checkpoint, videos.train_manifest, videos.val_manifest,
                                           "model.family=vjepa2_1", "probe.encoder_levels=all", "probe.epochs=2",
                                           "probe.train_augmentation=false", "probe.num_segments=2"))
    encoded = loop.evaluate(cfg)
    cfg.probe.cache_features = True
    cached = loop.evaluate(cfg)

    assert encoded.results["encoder_levels"] == "all"
    assert cached.bank.probes[0].linear.in_features == encoder.embed_dim
    assert cached.results["probes"] == encoded.results["probes"]
    assert cached.results["final_train_loss"] == pytest.approx(encoded.results["final_train_loss"], rel=1e-5)
    for mine, theirs in zip(cached.bank.probes, encoded.bank.probes):
        for (name, a), b in zip(mine.state_dict().items(), theirs.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
    # Trained on the last level alone, the same probes end elsewhere: training read every level.
    cfg.probe.encoder_levels = "last"
    last = loop.evaluate(cfg)
    assert not torch.allclose(last.bank.probes[0].linear.weight, cached.bank.probes[0].linear.weight)
