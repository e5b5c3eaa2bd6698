"""Model families: what differs between V-JEPA 1, 2.0 and 2.1, each one object in one registry.

A family says how its models place tokens (``positions``), how they start (``depth_scaled_init``), how many
mask tokens its predictor holds and which one each mask config uses, what its release files hold, and its
recipe's defaults (schedule, gradient clipping, 2.1's context loss). Models, loaders, masks, the objective and
the training step ask the family object; the config stores its name (``model.family``), checked against
``FAMILIES``. A new family is one ``register(Family(...))``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from vjepa_ray.models.positions import FIXED_TABLES, PositionScheme, RotaryPositions, SinCosTable

# (number of mask configs, index of the clip length among the run's lengths) -> the predictor's mask token
# for each mask config.
MaskTokenRule = Callable[[int, int], list[int]]
# (number of mask configs, number of data sources, number of distinct clip lengths) -> how many mask tokens
# the predictor holds.
MaskTokenCount = Callable[[int, int, int], int]


def token_per_mask_config(num_masks: int, length_index: int) -> list[int]:
    """V-JEPA 1: one token per mask config, for runs of one clip length."""
    if length_index:
        raise ValueError(f"length_index: one token per mask config trains one clip length, got length {length_index}")
    return list(range(num_masks))


def token_per_clip_length(num_masks: int, length_index: int) -> list[int]:
    """The 2.0 release: the token of the clip length, the same for every mask config.

    Its ``PredictorMultiSeqWrapper`` passes the length group's index, while it allocates one token per mask
    config and length; its recipes have one length (every ``dataset_fpcs`` entry 16), so they train token 0
    only. The release counts a length by its place among the lengths present in the batch; here it is its
    place among the run's lengths, which is the same whenever every length is in the batch, and does not
    move a length to another token when one is absent.
    """
    return [length_index] * num_masks


def tokens_per_mask_and_length(num_masks: int, num_sources: int, num_lengths: int) -> int:
    """One token per mask config and distinct clip length: as many as ``token_per_clip_length`` can pick."""
    return num_masks * num_lengths


def tokens_per_mask_and_source(num_masks: int, num_sources: int, num_lengths: int) -> int:
    """The 2.1 release's count, ``len(cfgs_mask) * len(dataset_fpcs)``: one token per mask config and data
    source, even where sources share a clip length. Its recipes list three sources of 16 frames, so its files
    hold 6 tokens (``mask_tokens.0`` to ``.5``) of which training only ever picks token 0."""
    return num_masks * num_sources


@dataclass(frozen=True)
class ContextLoss:
    """V-JEPA 2.1's dense context loss, at its release values: the predictor also predicts the target
    features of the context tokens, and that error, weighted by ``weight`` (lambda), joins the loss.

    ``weight``: the release's ``lambda_value_vid`` (and ``lambda_value_img`` for images), 0.5.
    ``warmup``: lambda is 0 before the first step, rises linearly to ``weight`` at the second and holds
    (``Lambda_LinearWarmupHold`` with its defaults, which the release never overrides; on as its
    ``lambda_progressive`` default).
    ``distance_weighted``: each context token's error is divided by the square root of its distance to the
    nearest target token (``weight_distance_loss``: true in the pretraining recipe, false in the cooldown).
    """

    weight: float = 0.5
    warmup: tuple[int, int] = (15_000, 30_000)
    distance_weighted: bool = True


@dataclass(frozen=True)
class ClipRule:
    """A release's gradient clipping: the encoder's and the predictor's norms separately (``per_module``) or
    one norm over both, from step ``warmup_steps + after_warmup`` on (None: from step 0)."""

    per_module: bool
    after_warmup: int | None = None


@dataclass(frozen=True)
class Family:
    """One model family. Encoder architecture beyond the shared pre-norm ViT is opt-in:
    ``hierarchical_norms`` (2.1's LayerNorm at four depths in place of the final norm; its models train on
    the four levels: the encoder outputs them concatenated, the predictor reads and predicts all four) and
    ``image_inputs`` (2.1's tubelet-1 patch embedding for single frames and its modality embeddings, in
    the encoder and the predictor).

    ``pretrainable`` says whether the configured pretraining run (config, trainer, checkpoints) trains the
    family; its models and objective may run in one process without it (``recipe.step.JepaStep``)."""

    name: str
    positions: PositionScheme
    # Blocks' output projections start scaled down with depth (``vit.rescale_by_depth_``).
    depth_scaled_init: bool
    mask_tokens: MaskTokenRule
    # Whether a pretraining run (``python -m vjepa_ray.pretrain``) trains it.
    pretrainable: bool
    # The optimizer schedule of its pretraining recipe (``optimization.schedule``).
    schedule: str
    # Its release's gradient clipping (``optimization.clip_grad_rule=family``); None: it never clips.
    clipping: ClipRule | None = None
    hierarchical_norms: bool = False
    image_inputs: bool = False
    # How many mask tokens its predictor holds by default (``model.pred_num_mask_tokens``).
    mask_token_count: MaskTokenCount = tokens_per_mask_and_length
    # Its dense context loss (its predictor then also predicts the context tokens); None: it has none.
    context_loss: ContextLoss | None = None
    # Where its files keep the encoder that is evaluated, in order of preference (the first present).
    encoder_keys: tuple[str, ...] = ("target_encoder",)
    # Keys its release files carry that its models do not use; loading drops exactly these.
    ignored_keys: tuple[str, ...] = ()
    # Encoder keys (or key prefixes) that a file of this family has: loading names the family whose
    # marks a file that does not fit has.
    encoder_marks: tuple[str, ...] = ("norm.weight",)
    # The release predictor's heads, which its files do not record (None: the encoder's).
    predictor_heads: int | None = None
    # Hugging Face's ``model_type`` for this family's models, where transformers has them.
    hf_model_type: str | None = None

    def marks(self, state_keys) -> bool:
        """Whether a state dict's keys have this family's encoder marks."""
        return any(key.startswith(self.encoder_marks) for key in state_keys)


# V-JEPA 1 clips the encoder's and the predictor's gradient norms separately once ``epoch > warmup``
# (jepa app/vjepa/train.py, ``train_step``): its epochs count from 0 and are 300 steps (``ipe``), so the
# first clipped step is one epoch past the warmup's end.
VJEPA1 = Family(name="vjepa1", positions=SinCosTable(), depth_scaled_init=False, mask_tokens=token_per_mask_config,
                pretrainable=True, schedule="cosine", clipping=ClipRule(per_module=True, after_warmup=300))
# The 2.0 release never clips gradients (vjepa2 app/vjepa/train.py, ``train_step``). Its files still carry
# sin-cos tables that its rotary models do not use (Meta's own loader says so); its predictor has 12 heads
# (src/hub/backbones.py).
VJEPA2 = Family(name="vjepa2", positions=RotaryPositions(), depth_scaled_init=True, mask_tokens=token_per_clip_length,
                pretrainable=True, schedule="constant", ignored_keys=FIXED_TABLES, predictor_heads=12,
                hf_model_type="vjepa2")
# 2.1's models and objective train in one process; the distributed trainer does not train them yet (its
# image ranks, a loss regulation every rank decides alike, its checkpoints), so it is not pretrainable.
# Like 2.0, the release never clips gradients.
VJEPA2_1 = Family(name="vjepa2_1", positions=RotaryPositions(interleaved=True, interpolate_to_pixels=256),
                  depth_scaled_init=True, mask_tokens=token_per_clip_length, pretrainable=False, schedule="constant",
                  hierarchical_norms=True, image_inputs=True, mask_token_count=tokens_per_mask_and_source,
                  context_loss=ContextLoss(), encoder_keys=("ema_encoder", "target_encoder"),
                  ignored_keys=FIXED_TABLES,
                  encoder_marks=("norms_block.", "patch_embed_img.", "img_mod_embed", "video_mod_embed"))

DEFAULT_FAMILY = VJEPA1
FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Adds ``family`` to the registry under its name; ValueError if the name is taken."""
    if family.name in FAMILIES:
        raise ValueError(f"family: {family.name!r} is registered already")
    FAMILIES[family.name] = family
    return family


for _family in (VJEPA1, VJEPA2, VJEPA2_1):
    register(_family)


def get_family(family: Family | str) -> Family:
    """The registered family of that name (a Family is returned as it is); ValueError naming the choices."""
    if isinstance(family, Family):
        return family
    if family not in FAMILIES:
        raise ValueError(f"family: expected one of {', '.join(FAMILIES)}, got {family!r}")
    return FAMILIES[family]


def pretrainable_families() -> list[str]:
    return [name for name, family in FAMILIES.items() if family.pretrainable]

