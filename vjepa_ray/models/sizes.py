"""The encoder sizes by name, as in the reference's ``vit_*`` constructors."""

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
