"""Model families: what differs between V-JEPA 1, 2.0 and 2.1, each one object in one registry.

A family says how its models place tokens (``positions``), how they start (``depth_scaled_init``), which
of the predictor's mask tokens each mask config uses, what its release files hold, and its recipe's
defaults (schedule, gradient clipping). Models, loaders, masks and the training step ask the family
object; the config stores its name (``model.family``), checked against ``FAMILIES``. A new family is one
``register(Family(...))``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from vjepa_ray.models.positions import FIXED_TABLES, PositionScheme, RotaryPositions, SinCosTable

# (number of mask configs, index of the clip length among the run's lengths) -> the predictor's mask token
# for each mask config.
MaskTokenRule = Callable[[int, int], list[int]]


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


@dataclass(frozen=True)
class ClipRule:
    """A release's gradient clipping: the encoder's and the predictor's norms separately (``per_module``) or
    one norm over both, from step ``warmup_steps + after_warmup`` on (None: from step 0)."""

    per_module: bool
    after_warmup: int | None = None


@dataclass(frozen=True)
class Family:
    """One model family. Encoder architecture beyond the shared pre-norm ViT is opt-in:
    ``hierarchical_norms`` (2.1's LayerNorm at four depths in place of the final norm) and
    ``image_inputs`` (2.1's tubelet-1 patch embedding for single frames and its modality embeddings)."""

    name: str
    positions: PositionScheme
    # Blocks' output projections start scaled down with depth (``vit.rescale_by_depth_``).
    depth_scaled_init: bool
    mask_tokens: MaskTokenRule
    # Whether its predictor is built here, so that it can be pretrained.
    pretrainable: bool
    # The optimizer schedule of its pretraining recipe (``optimization.schedule``).
    schedule: str
    # Its release's gradient clipping (``optimization.clip_grad_rule=family``); None: it never clips.
    clipping: ClipRule | None = None
    hierarchical_norms: bool = False
    image_inputs: bool = False
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
# 2.1's encoder loads and runs; its multi-level predictor is not built, so it is not pretrained here.
VJEPA2_1 = Family(name="vjepa2_1", positions=RotaryPositions(interleaved=True, interpolate_to_pixels=256),
                  depth_scaled_init=True, mask_tokens=token_per_clip_length, pretrainable=False, schedule="constant",
                  hierarchical_norms=True, image_inputs=True, encoder_keys=("ema_encoder", "target_encoder"),
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

