"""Modules the methods add on top of the dual encoder.

Shapes: B batch, L text tokens, T image tokens, E joint width, V vocabulary, C classes.
Attention is written with plain Linear layers (not nn.MultiheadAttention, which reads its
out_proj weight without calling the module, so ZeRO-3 would never gather it).
"""
from __future__ import annotations

import torch
from torch import nn

from tbps.trainer.model.encoder import attention


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = (nn.Linear(width, width) for _ in range(3))
        self.out = nn.Linear(width, width)

    def forward(self, x_BLE, ctx_BTE, pad_BT: torch.Tensor | None = None):
        B, L, E = x_BLE.shape
        T = ctx_BTE.shape[1]
        q = self.q(x_BLE).view(B, L, self.heads, -1).transpose(1, 2)
        k = self.k(ctx_BTE).view(B, T, self.heads, -1).transpose(1, 2)
        v = self.v(ctx_BTE).view(B, T, self.heads, -1).transpose(1, 2)
        mask = None if pad_BT is None else ~pad_BT[:, None, None, :]     # True = attend
        out = attention(q, k, v, keep_mask=mask)
        return self.out(out.transpose(1, 2).reshape(B, L, E))


class Block(nn.Module):
    """Pre-LN transformer block (CLIP's residual attention block)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), QuickGELU(),
                                 nn.Linear(4 * width, width))

    def forward(self, x_BLE, pad_BL=None):
        h = self.ln_1(x_BLE)
        x_BLE = x_BLE + self.attn(h, h, pad_BL)
        return x_BLE + self.mlp(self.ln_2(x_BLE))


class CrossModalEncoder(nn.Module):
    """IRRA's: text tokens cross-attend all image tokens (no residual), then a transformer;
    with `residual` the words are kept and the cross-attention added (recipe.cross.residual).

    Used for masked language modelling (IRRA's IRR, AGA's MLM); `hidden` is what an ITM head
    reads (its first token).
    """

    def __init__(self, width: int, heads: int, layers: int, residual: bool = False,
                 attention_init: str = "clip"):
        super().__init__()
        self.residual = residual
        self.ln_text, self.ln_image = nn.LayerNorm(width), nn.LayerNorm(width)
        self.cross = Attention(width, heads)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.ln_post = nn.LayerNorm(width)
        _init_like_clip(self, width, layers)
        if attention_init == "identity":       # after the random draws: the rest is unchanged
            with torch.no_grad():
                for lin in (self.cross.q, self.cross.k, self.cross.v, self.cross.out):
                    lin.weight.copy_(torch.eye(width))
                    lin.bias.zero_()
        elif attention_init != "clip":
            raise ValueError(f"attention_init {attention_init!r}: use clip or identity")

    def forward(self, text_BLE, image_BTE, text_pad_BL=None):
        image = self.ln_image(image_BTE)
        x = self.cross(self.ln_text(text_BLE), image)
        if self.residual:
            x = text_BLE + x
        for block in self.blocks:
            x = block(x, text_pad_BL)
        return self.ln_post(x)


class MLMHead(nn.Module):
    def __init__(self, width: int, vocab_size: int):
        super().__init__()
        self.dense, self.act, self.ln = nn.Linear(width, width), QuickGELU(), nn.LayerNorm(width)
        self.decoder = nn.Linear(width, vocab_size)
        nn.init.normal_(self.dense.weight, std=width ** -0.5)
        nn.init.normal_(self.decoder.weight, std=width ** -0.5)

    def forward(self, x_BLE):
        return self.decoder(self.ln(self.act(self.dense(x_BLE))))


def identity_classifier(width: int, num_classes: int) -> nn.Linear:
    """Shared by both modalities; IRRA initialises it with std 0.001."""
    head = nn.Linear(width, num_classes)
    nn.init.normal_(head.weight, std=0.001)
    nn.init.zeros_(head.bias)
    return head


def _init_like_clip(module: nn.Module, width: int, layers: int) -> None:
    attn_std = width ** -0.5
    proj_std = attn_std * (2 * max(layers, 1)) ** -0.5
    fc_std = (2 * width) ** -0.5
    for name, p in module.named_parameters():
        if p.dim() < 2:
            continue
        if name.endswith("mlp.0.weight"):
            nn.init.normal_(p, std=fc_std)
        elif name.endswith(("out.weight", "mlp.2.weight")):
            nn.init.normal_(p, std=proj_std)
        else:
            nn.init.normal_(p, std=attn_std)
    for m in module.modules():
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
