"""Position schemes: how a model's tokens learn where they are in the clip.

A scheme gives a model (the encoder or the predictor) an additive position table, a rotation of queries
and keys in every attention block, or both. The model registers the table as a buffer under the
reference's name (``pos_embed``, ``predictor_pos_embed``) and asks the rotation for its tables once per
forward. A family (``vjepa_ray.models.families``) names the scheme both of its models use.

A scheme itself is a plain description: the families' registry is read without torch (command lines list the
families), and the table and rotation modules are imported where a model asks for them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    import torch

    from vjepa_ray.models.pos_embed import Grid
    from vjepa_ray.models.rope import Rotary3D

# The reference's names of the encoder's and the predictor's position tables (state-dict keys).
FIXED_TABLES = ("pos_embed", "predictor_pos_embed")


class PositionScheme:
    """No positions at all; subclasses add a table (``table``), a rotation (``rotary``), or both."""

    # Whether ``table`` gives a table: a model with one is tied to the grid it was built for (the
    # predictor's table takes no other grid, so such a family trains one clip length).
    has_table: ClassVar[bool] = False

    def table(self, width: int, grid: Grid, uniform_power: bool) -> torch.Tensor | None:
        """An additive table [1, N, width] for the tokens of ``grid`` in (t, h, w) order, or None."""
        return None

    def rotary(self, head_dim: int, patch_size: int | None = None) -> Rotary3D | None:
        """The rotation of heads ``head_dim`` wide over tokens of ``patch_size`` pixels, or None."""
        return None


@dataclass(frozen=True)
class SinCosTable(PositionScheme):
    """V-JEPA 1: a fixed 3D sin-cos table added to the tokens (``pos_embed.sincos_3d``)."""

    has_table: ClassVar[bool] = True

    def table(self, width: int, grid: Grid, uniform_power: bool) -> torch.Tensor:
        from vjepa_ray.models.pos_embed import sincos_3d

        return sincos_3d(width, *grid, uniform_power).unsqueeze(0)


@dataclass(frozen=True)
class RotaryPositions(PositionScheme):
    """3D rotary embeddings in every block: 2.0's frequency layout, or 2.1's interleaved one with row and
    column positions rescaled to span the grid of an ``interpolate_to_pixels`` crop (``rope.Rotary3D``)."""

    interleaved: bool = False
    interpolate_to_pixels: int | None = None

    def rotary(self, head_dim: int, patch_size: int | None = None) -> Rotary3D:
        from vjepa_ray.models.rope import Rotary3D

        interpolate_to = None
        if self.interpolate_to_pixels is not None:
            if patch_size is None:
                raise ValueError("patch_size: rotary positions rescaled to a crop need the model's patch size")
            interpolate_to = self.interpolate_to_pixels // patch_size
        return Rotary3D(head_dim, self.interleaved, interpolate_to)
