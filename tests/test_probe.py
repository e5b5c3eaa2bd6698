"""The attentive probe, probe banks, view averaging and label fractions (one process, no Ray)."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vjepa_ray.eval.labels import stratified_subset
from vjepa_ray.eval.probes import ProbeBank, ProbeSpec, grid_specs, mean_per_point
from vjepa_ray.models.probe import AttentiveClassifier, load_official_probe

D, HEADS, CLASSES = 32, 4, 5


def make_probe(generator: torch.Generator, num_blocks: int = 1) -> AttentiveClassifier:
    return AttentiveClassifier(D, HEADS, CLASSES, num_blocks=num_blocks, generator=generator)


@pytest.mark.parametrize("num_blocks", [1, 3])
def test_output_shape_and_bad_input(num_blocks):
    probe = make_probe(torch.Generator().manual_seed(0), num_blocks)
    assert probe(torch.randn(3, 17, D)).shape == (3, CLASSES)
    assert len(probe.pooler.blocks) == num_blocks - 1
    with pytest.raises(ValueError, match=r"expected tokens \[B, N, 32\]"):
        probe(torch.randn(3, 17, D + 1))


def test_forward_is_the_official_math():
    """Query not normalised, no output projection: written out by hand here."""
    probe = make_probe(torch.Generator().manual_seed(1)).eval()
    x = torch.randn(2, 9, D)
    block = probe.pooler.cross_attention_block
    q = probe.pooler.query_tokens.expand(2, -1, -1)
    xn = block.norm1(x)
    k, v = block.xattn.kv(xn).chunk(2, dim=-1)
    heads = lambda t: t.view(2, -1, HEADS, D // HEADS).transpose(1, 2)  # noqa: E731
    attn = (heads(block.xattn.q(q)) @ heads(k).transpose(-1, -2) / (D // HEADS) ** 0.5).softmax(-1)
    q = q + (attn @ heads(v)).transpose(1, 2).reshape(2, 1, D)
    q = q + block.mlp(block.norm2(q))
    expected = probe.linear(q.squeeze(1))
    torch.testing.assert_close(probe(x), expected, rtol=1e-5, atol=1e-6)
    assert not any(".proj." in k for k in probe.state_dict())


def official_layout_state(rng: torch.Generator) -> dict[str, torch.Tensor]:
    """A released V-JEPA probe's state dict, built from its key names (DDP prefix, unused xattn.proj)."""
    shapes = {"pooler.query_tokens": (1, 1, D)}
    for norm in ("norm1", "norm2"):
        shapes.update({f"pooler.cross_attention_block.{norm}.weight": (D,),
                       f"pooler.cross_attention_block.{norm}.bias": (D,)})
    for name, (out, inp) in {"xattn.q": (D, D), "xattn.kv": (2 * D, D), "xattn.proj": (D, D),
                             "mlp.fc1": (4 * D, D), "mlp.fc2": (D, 4 * D)}.items():
        shapes[f"pooler.cross_attention_block.{name}.weight"] = (out, inp)
        shapes[f"pooler.cross_attention_block.{name}.bias"] = (out,)
    shapes.update({"linear.weight": (CLASSES, D), "linear.bias": (CLASSES,)})
    return {f"module.{k}": torch.randn(shape, generator=rng) for k, shape in shapes.items()}


def test_meta_probe_layout_loads():
    official = official_layout_state(torch.Generator().manual_seed(2))
    probe = make_probe(torch.Generator().manual_seed(3))
    load_official_probe(probe, {"classifier": official, "epoch": 20})
    own = probe.state_dict()
    for key, value in official.items():
        key = key.removeprefix("module.")
        if ".xattn.proj." not in key:
            assert torch.equal(own[key], value), key
    assert len(own) == len(official) - 2  # everything but the unused projection's weight and bias


def test_meta_probe_layout_mismatch_names_the_keys():
    official = official_layout_state(torch.Generator().manual_seed(2))
    official["module.pooler.cross_attention_block.xattn.qkv.weight"] = official.pop(
        "module.pooler.cross_attention_block.xattn.q.weight")
    with pytest.raises(ValueError, match=r"xattn\.q\.weight"):
        load_official_probe(make_probe(torch.Generator().manual_seed(0)), official)


def v2_release_probe_state(rng: torch.Generator, num_blocks: int = 4) -> dict[str, torch.Tensor]:
    """A V-JEPA 2 release probe's state dict (evals/video_classification_frozen: DDP around
    AttentiveClassifier with ``depth=num_probe_blocks``): self-attention blocks, then the cross-attention
    block (no ``xattn.proj`` in 2.0), then the linear head. Norms near 1, the rest at a probe's scale."""
    shapes = {"pooler.query_tokens": (1, 1, D)}
    layers = {f"pooler.blocks.{i}.{name}": shape for i in range(num_blocks - 1) for name, shape in
              {"attn.qkv": (3 * D, D), "attn.proj": (D, D), "mlp.fc1": (4 * D, D), "mlp.fc2": (D, 4 * D)}.items()}
    layers.update({f"pooler.cross_attention_block.{name}": shape for name, shape in
                   {"xattn.q": (D, D), "xattn.kv": (2 * D, D), "mlp.fc1": (4 * D, D), "mlp.fc2": (D, 4 * D)}.items()})
    layers["linear"] = (CLASSES, D)
    for name, (out, inp) in layers.items():
        shapes.update({f"{name}.weight": (out, inp), f"{name}.bias": (out,)})
    norms = [f"pooler.blocks.{i}.{n}" for i in range(num_blocks - 1) for n in ("norm1", "norm2")]
    norms += ["pooler.cross_attention_block.norm1", "pooler.cross_attention_block.norm2"]
    state = {k: 0.2 * torch.randn(shape, generator=rng) for k, shape in shapes.items()}
    for norm in norms:
        state[f"{norm}.weight"] = 1 + 0.1 * torch.randn(D, generator=rng)
        state[f"{norm}.bias"] = 0.1 * torch.randn(D, generator=rng)
    return {f"module.{k}": v for k, v in state.items()}


def reference_v2_logits(state: dict[str, torch.Tensor], x: torch.Tensor, num_blocks: int = 4) -> torch.Tensor:
    """The release's probe written out with plain tensor ops from its state dict (nn.LayerNorm's eps 1e-5)."""
    w = {k.removeprefix("module."): v for k, v in state.items()}

    def linear(t, name):
        return t @ w[f"{name}.weight"].T + w[f"{name}.bias"]

    def norm(t, name):
        mean, var = t.mean(-1, keepdim=True), t.var(-1, unbiased=False, keepdim=True)
        return (t - mean) / torch.sqrt(var + 1e-5) * w[f"{name}.weight"] + w[f"{name}.bias"]

    def heads(t):  # [B, N, D] -> [B, H, N, D / H]
        return t.view(t.shape[0], t.shape[1], HEADS, D // HEADS).transpose(1, 2)

    def attend(q, k, v):
        weights = (heads(q) @ heads(k).transpose(-1, -2) / math.sqrt(D // HEADS)).softmax(-1)
        return (weights @ heads(v)).transpose(1, 2).reshape(q.shape[0], q.shape[1], D)

    def mlp(t, name):
        return linear(F.gelu(linear(t, f"{name}.fc1")), f"{name}.fc2")

    for i in range(num_blocks - 1):
        block = f"pooler.blocks.{i}"
        q, k, v = linear(norm(x, f"{block}.norm1"), f"{block}.attn.qkv").chunk(3, dim=-1)
        x = x + linear(attend(q, k, v), f"{block}.attn.proj")
        x = x + mlp(norm(x, f"{block}.norm2"), f"{block}.mlp")
    cross = "pooler.cross_attention_block"
    query = w["pooler.query_tokens"].expand(x.shape[0], -1, -1)
    k, v = linear(norm(x, f"{cross}.norm1"), f"{cross}.xattn.kv").chunk(2, dim=-1)
    query = query + attend(linear(query, f"{cross}.xattn.q"), k, v)
    query = query + mlp(norm(query, f"{cross}.norm2"), f"{cross}.mlp")
    return linear(query.squeeze(1), "linear")


def test_v2_release_probe_with_4_blocks_loads_and_gives_the_reference_logits(tmp_path):
    rng = torch.Generator().manual_seed(5)
    heads = [v2_release_probe_state(rng) for _ in range(3)]  # one per (lr, wd) of the evaluation's grid
    torch.save({"classifiers": heads, "opt": [{"state": {}, "param_groups": []}] * 3, "epoch": 20,
                "batch_size": 4, "world_size": 64}, tmp_path / "probe.pt")
    probe = make_probe(torch.Generator().manual_seed(0), num_blocks=4).eval()
    load_official_probe(probe, tmp_path / "probe.pt", index=1)
    x = 3 * torch.randn(2, 9, D, generator=rng) + 1
    with torch.no_grad():
        got = probe(x)
        torch.testing.assert_close(got, reference_v2_logits(heads[1], x), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(got, reference_v2_logits(heads[0], x), atol=1e-3)  # index picks the head
    assert got.abs().max() > 0.1  # logits of real size, not a degenerate agreement near zero
    with pytest.raises(ValueError, match="probe index 3: the checkpoint holds 3 classifiers"):
        load_official_probe(probe, tmp_path / "probe.pt", index=3)
    with pytest.raises(ValueError, match=r"unexpected \['pooler\.blocks\.0\.attn\.qkv\.weight"):
        load_official_probe(make_probe(torch.Generator().manual_seed(0), num_blocks=1), tmp_path / "probe.pt")


def test_prediction_is_the_mean_of_per_view_softmaxes():
    bank = ProbeBank(make_probe, grid_specs([1e-3], [0.0], seed=0), total_steps=1)
    tokens = torch.randn(4, 3, 6, D, generator=torch.Generator().manual_seed(3))  # [B, views, N, D]
    probe = bank.probes[0].eval()
    with torch.no_grad():
        # Logits of a freshly initialised head are ~1e-3, where both averages agree to float precision;
        # confident views are where they differ.
        probe.linear.weight.mul_(300.0)
    per_view = torch.stack([F.softmax(probe(tokens[:, v]), dim=-1) for v in range(3)])
    torch.testing.assert_close(bank.predict(tokens)[0], per_view.mean(0))
    # Not the softmax of the mean logits (which a wrong implementation would give).
    assert not torch.allclose(bank.predict(tokens)[0], F.softmax(
        torch.stack([probe(tokens[:, v]) for v in range(3)]).mean(0), dim=-1))


def _train(bank: ProbeBank, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    for tokens, labels in batches:
        bank.train_step(tokens, labels)


def test_bank_probes_equal_each_trained_alone():
    data = torch.Generator().manual_seed(4)
    batches = [(torch.randn(6, 1, 5, D, generator=data), torch.randint(0, CLASSES, (6,), generator=data))
               for _ in range(4)]
    specs = grid_specs([1e-2, 1e-3], [0.0, 0.1], seed=10)
    assert len(specs) == 4 and len({s.seed for s in specs}) == 4
    bank = ProbeBank(make_probe, specs, total_steps=4)
    _train(bank, batches)
    tokens = torch.randn(3, 2, 5, D, generator=data)
    together = bank.predict(tokens)
    for i, spec in enumerate(specs):
        alone = ProbeBank(make_probe, [spec], total_steps=4)
        _train(alone, batches)
        for (key, a), b in zip(alone.probes[0].state_dict().items(), bank.probes[i].state_dict().values()):
            assert torch.equal(a, b), (spec, key)
        assert torch.equal(alone.predict(tokens)[0], together[i])
    for i in range(len(specs)):
        for j in range(i):
            assert not torch.allclose(together[i], together[j])


def test_grid_points_average_their_initialisations():
    specs = grid_specs([1e-2, 1e-3], [0.0], seed=10, inits=3)
    # One initialisation is the plain grid; further ones continue its seeds, never reusing one.
    assert specs[:2] == grid_specs([1e-2, 1e-3], [0.0], seed=10)
    assert sorted(s.seed for s in specs) == list(range(10, 16))
    points = mean_per_point(specs, [50.0, 20.0, 60.0, 30.0, 70.0, 10.0])
    assert [(p["lr"], p["seeds"], p["top1_inits"], p["top1"]) for p in points] == [
        (1e-2, [10, 12, 14], [50.0, 60.0, 70.0], 60.0), (1e-3, [11, 13, 15], [20.0, 30.0, 10.0], 20.0)]


def test_bank_training_lowers_the_loss():
    data = torch.Generator().manual_seed(5)
    labels = torch.arange(CLASSES).repeat(4)
    # Each class is a distinct token pattern (plus noise), so a probe can learn it.
    patterns = torch.randn(CLASSES, 1, 4, D, generator=data)
    tokens = patterns[labels] + 0.1 * torch.randn(len(labels), 1, 4, D, generator=data)
    bank = ProbeBank(make_probe, [ProbeSpec(3e-3, 0.01, 0)], total_steps=60)
    first = bank.train_step(tokens, labels)[0]
    for _ in range(59):
        last = bank.train_step(tokens, labels)[0]
    assert last < 0.2 * first
    assert (bank.predict(tokens)[0].argmax(-1) == labels).all()


def test_empty_batch_joins_with_zero_gradients():
    bank = ProbeBank(make_probe, [ProbeSpec(1e-3, 0.0, 0)], total_steps=2)
    before = [p.detach().clone() for p in bank.probes.parameters()]
    losses = bank.train_step(None, torch.zeros(0, dtype=torch.long))
    assert np.isnan(losses[0])
    # Zero gradients and no weight decay: Adam's first step moves nothing.
    assert all(torch.equal(a, b) for a, b in zip(before, bank.probes.parameters()))


def test_stratified_fraction_is_exact_per_class():
    labels = [0] * 10 + [1] * 20 + [2] * 5 + [3] * 1
    keep = stratified_subset(labels, 0.2, seed=0)
    assert Counter(labels[i] for i in keep) == {0: 2, 1: 4, 2: 1, 3: 1}  # round(), at least one per class
    assert list(keep) == sorted(set(keep.tolist()))
    assert np.array_equal(keep, stratified_subset(labels, 0.2, seed=0))
    assert not np.array_equal(keep, stratified_subset(labels, 0.2, seed=1))
    assert len(stratified_subset(labels, 1.0, seed=0)) == len(labels)
    with pytest.raises(ValueError):
        stratified_subset(labels, 0.0, seed=0)
