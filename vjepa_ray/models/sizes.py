"""The encoder sizes by name, as in the reference's ``vit_*`` constructors, and the blocks whose outputs are
V-JEPA 2.1's hierarchical levels, by depth."""

from __future__ import annotations

# name -> (embed_dim, depth, num_heads, mlp_ratio). V-JEPA 1 ships vit_large/huge; 2.0
# vit_large/huge/giant_xformers; 2.1 vit_base/large/giant_xformers/gigantic_xformers.
MODEL_SPECS: dict[str, tuple[int, int, int, float]] = {
    # Not in the reference: a CPU-sized encoder for the demos (the demo sweep, bench learning's default size).
    "vit_micro": (96, 4, 3, 4.0),
    "vit_tiny": (192, 12, 3, 4.0),
    "vit_small": (384, 12, 6, 4.0),
    "vit_base": (768, 12, 12, 4.0),
    "vit_large": (1024, 24, 16, 4.0),
    "vit_huge": (1280, 32, 16, 4.0),
    "vit_giant": (1408, 40, 16, 48 / 11),
    # V-JEPA 2's released ViT-g: V-JEPA 1's giant with 22 heads.
    "vit_giant_xformers": (1408, 40, 22, 48 / 11),
    "vit_gigantic_xformers": (1664, 48, 26, 64 / 13),
}

# 2.1's depths at which a LayerNorm taps the residual stream (``norms_block``), by encoder depth; the
# release knows no others (vit_base, vit_large, vit_giant_xformers, vit_gigantic_xformers; vit_tiny and
# vit_small share vit_base's depth). 48's levels are not evenly spaced in the release either.
HIERARCHICAL_LAYERS: dict[int, tuple[int, ...]] = {
    12: (2, 5, 8, 11),
    24: (5, 11, 17, 23),
    40: (9, 19, 29, 39),
    48: (11, 23, 37, 47),
}
# Every depth taps four blocks: 2.1's models train on four levels.
HIERARCHICAL_LEVELS = 4
