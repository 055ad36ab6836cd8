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


class MaskedBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d over the rows a mask selects (B x k x C input, B x k mask): statistics and
    running averages from those rows only, with masks rather than a boolean index, so nothing
    waits for the device to say how many rows there are. Same parameters and state as
    BatchNorm1d; called as a module, so ZeRO-3 gathers its parameters."""

    def forward(self, x_BkC: torch.Tensor, mask_Bk: torch.Tensor | None = None) -> torch.Tensor:
        if mask_Bk is None:                      # every row (N x C): plain BatchNorm1d
            return super().forward(x_BkC)
        use_batch = self.training or not self.track_running_stats
        if use_batch:
            m = mask_Bk.to(x_BkC.dtype)[..., None]
            n = m.sum(dim=(0, 1))
            mean = (x_BkC * m).sum(dim=(0, 1)) / n.clamp(min=1.0)
            var = (((x_BkC - mean) * m) ** 2).sum(dim=(0, 1)) / n.clamp(min=1.0)
            if self.training and self.track_running_stats:
                with torch.no_grad():
                    self.num_batches_tracked.add_(1)
                    unbiased = var * n / (n - 1).clamp(min=1.0)
                    self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), self.momentum)
                    self.running_var.lerp_(unbiased.detach().to(self.running_var.dtype), self.momentum)
        else:
            mean, var = self.running_mean, self.running_var
        y = (x_BkC - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            y = y * self.weight + self.bias
        return y


class TokenSelectionEmbedding(nn.Module):
    """RDE's TSE aggregation of already selected tokens (METHODS.md).

    Each valid selected token is L2-normalised, mapped by FC(E -> out) + MLP(E -> E, BatchNorm,
    ReLU, -> out), and the results are max-pooled over the valid tokens of the sample. Slots
    that are not valid (a caption shorter than k) take part in nothing, BatchNorm statistics
    included (a masked BatchNorm: no boolean indexing, so no host sync). `keep_bn_eval=True`
    reproduces the authors' released code, whose training ran with these BatchNorms in eval mode.
    """

    def __init__(self, in_dim: int, out_dim: int, *, keep_bn_eval: bool = False):
        super().__init__()
        self.fc = nn.Linear(in_dim, out_dim)
        self.mlp = nn.Sequential(nn.Linear(in_dim, in_dim), MaskedBatchNorm1d(in_dim), nn.ReLU(),
                                 nn.Linear(in_dim, out_dim))
        self.keep_bn_eval = keep_bn_eval

    def train(self, mode: bool = True):
        super().train(mode)
        if self.keep_bn_eval:
            self.mlp[1].eval()
        return self

    def forward(self, tokens_BkE: torch.Tensor, valid_Bk: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.normalize(tokens_BkE, dim=-1)
        h = self.mlp[2](self.mlp[1](self.mlp[0](x), valid_Bk))
        y = self.fc(x) + self.mlp[3](h)
        pooled = y.masked_fill(~valid_Bk[..., None], float("-inf")).max(dim=1).values
        return torch.where(valid_Bk.any(dim=1, keepdim=True), pooled, torch.zeros_like(pooled))
