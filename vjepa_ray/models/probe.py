"""The attentive probe: a learnable query cross-attends to frozen encoder tokens, then a linear head.

Module and parameter names follow the official V-JEPA code (``AttentiveClassifier``), so Meta's
released probe checkpoints load with :func:`load_official_probe`:
``pooler.query_tokens``, ``pooler.cross_attention_block.{norm1, xattn.q, xattn.kv, norm2, mlp.fc1,
mlp.fc2}``, ``linear.{weight, bias}``. Two details of the released probes are kept on purpose: the
query is not normalised (only the tokens go through ``norm1``), and the cross-attention has no output
projection (the official module defines ``xattn.proj`` but never applies it, and the released probes
were trained that way).

Extra blocks (``num_blocks > 1``) are self-attention blocks over the encoder tokens that run before
the cross-attention, as in V-JEPA 2's 4-block probes (``pooler.blocks.{i}.{norm1, attn.qkv, attn.proj, norm2,
mlp.fc1, mlp.fc2}``). V-JEPA 2 saves the heads one evaluation trains side by side (its lr x weight-decay
grid) as a list under ``classifiers``; V-JEPA 1 saves one under ``classifier``. Every LayerNorm of the
probe has torch's default eps (1e-5), as the released probes (the encoder's are 1e-6).
"""

from __future__ import annotations

import math
import os
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from vjepa_ray.models.pretrained import read_checkpoint
from vjepa_ray.models.vit import MLP, Block, rescale_by_depth_

_INIT_STD = 0.02
# nn.LayerNorm's default, which both releases' probes are built with.
PROBE_NORM_EPS = 1e-5


class CrossAttention(nn.Module):
    """Multi-head attention of queries over tokens, with no output projection (see the module doc)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"num_heads {num_heads} must divide the width {dim}")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)

    def forward(self, q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        b, nq, d = q.shape
        h = self.num_heads
        q = self.q(q).view(b, nq, h, d // h).transpose(1, 2)
        k, v = self.kv(x).view(b, x.shape[1], 2, h, d // h).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return out.transpose(1, 2).reshape(b, nq, d)


class CrossAttentionBlock(nn.Module):
    """``q + xattn(q, norm1(x))`` then ``+ mlp(norm2(q))``: the query itself is never normalised."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=PROBE_NORM_EPS)
        self.xattn = CrossAttention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=PROBE_NORM_EPS)
        self.mlp = MLP(dim, int(dim * mlp_ratio))

    def forward(self, q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        q = q + self.xattn(q, self.norm1(x))
        return q + self.mlp(self.norm2(q))


class AttentivePooler(nn.Module):
    """Learnable queries that pool a token sequence [B, N, D] into [B, num_queries, D]."""

    def __init__(self, embed_dim: int, num_heads: int, num_blocks: int = 1, num_queries: int = 1,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True):
        super().__init__()
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.query_tokens = nn.Parameter(torch.zeros(1, num_queries, embed_dim))
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias) for _ in range(num_blocks - 1))
        for block in self.blocks:
            block.norm1.eps = block.norm2.eps = PROBE_NORM_EPS  # the encoder's Block, with the probe's norms
        self.cross_attention_block = CrossAttentionBlock(embed_dim, num_heads, mlp_ratio, qkv_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        q = self.query_tokens.expand(x.shape[0], -1, -1)
        return self.cross_attention_block(q, x)


class AttentiveClassifier(nn.Module):
    """Attentive pooling to one vector, then ``linear`` to class logits: [B, N, D] -> [B, num_classes]."""

    def __init__(self, embed_dim: int, num_heads: int, num_classes: int, num_blocks: int = 1,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, generator: torch.Generator | None = None):
        super().__init__()
        self.embed_dim = embed_dim
        self.pooler = AttentivePooler(embed_dim, num_heads, num_blocks, 1, mlp_ratio, qkv_bias)
        self.linear = nn.Linear(embed_dim, num_classes)
        self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Truncated-normal(0.02) weights, zero biases, unit norms; residual outputs scaled down by depth.

        `generator` makes the initialisation reproducible on its own, independent of the global RNG.
        """
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=_INIT_STD, a=-2 * _INIT_STD, b=2 * _INIT_STD,
                                      generator=generator)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.trunc_normal_(self.pooler.query_tokens, std=_INIT_STD, a=-2 * _INIT_STD, b=2 * _INIT_STD,
                              generator=generator)
        # Keep the residual stream's variance from growing with depth (as the reference probes do).
        rescale_by_depth_(self.pooler.blocks)
        self.pooler.cross_attention_block.mlp.fc2.weight.div_(math.sqrt(2.0 * max(1, len(self.pooler.blocks))))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.dim() != 3 or tokens.shape[-1] != self.embed_dim:
            raise ValueError(f"expected tokens [B, N, {self.embed_dim}], got {tuple(tokens.shape)}")
        return self.linear(self.pooler(tokens).squeeze(1))


def official_probe_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Maps a released probe's state dict onto :class:`AttentiveClassifier` names.

    Strips DDP's ``module.`` prefix and drops ``xattn.proj`` (defined but never applied by the
    official module, so it carries no trained information).
    """
    out = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        if ".xattn.proj." in key:
            continue
        out[key] = value
    return out


def load_official_probe(model: AttentiveClassifier, checkpoint: Mapping | str | os.PathLike, index: int = 0) -> None:
    """Loads Meta's released probe weights into ``model``, strictly.

    ``checkpoint`` is a file or a dict: V-JEPA 2's (``classifiers``: a list of heads, of which ``index`` is
    loaded), V-JEPA 1's (``classifier``), or a bare state dict. A file is read with
    :func:`~vjepa_ray.models.pretrained.read_checkpoint`, which refuses (ValueError) a file holding anything
    but weights-file contents without running any of it. Raises ValueError naming the missing/unexpected
    keys when the layouts disagree (e.g. a 4-block probe into a 1-block model).
    """
    if not isinstance(checkpoint, Mapping):
        checkpoint = read_checkpoint(checkpoint)
    if "classifiers" in checkpoint:
        heads = checkpoint["classifiers"]
        if not 0 <= index < len(heads):
            raise ValueError(f"probe index {index}: the checkpoint holds {len(heads)} classifiers")
        state = heads[index]
    else:
        state = checkpoint.get("classifier", checkpoint)
    result = model.load_state_dict(official_probe_state_dict(state), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"probe checkpoint does not match: missing {result.missing_keys}, "
                         f"unexpected {result.unexpected_keys}")
