"""RDE's token selection embedding (TSE): the model's second branch beside the global one.

From the last layer's attention row of the [CLS] (image) or [EOS] (text) token, the top
`ratio` of the tokens are selected (through tbps.kernels.topk_select) and aggregated by a small
network into one embedding per sample. Inference uses it as training does.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from tbps.kernels.topk_select import topk_select
from tbps.trainer.model.encoder import ImageFeatures, TextFeatures, padding_mask, word_positions


def token_counts(ratio: float, grid_hw: tuple[int, int], context_length: int) -> tuple[int, int]:
    """(image tokens, words) TSE selects: floor(ratio x patches), floor(ratio x (length - 2))."""
    return (max(1, math.floor(ratio * grid_hw[0] * grid_hw[1])),
            max(1, math.floor(ratio * (context_length - 2))))


def select_image(head: "TokenSelectionEmbedding", img: ImageFeatures, k: int) -> torch.Tensor:
    """TSE embedding of the images: the k patches the [CLS] row attends to most."""
    patches = img.tokens_BTE[:, 1:]
    valid = torch.ones(img.attn_BK.shape, dtype=torch.bool, device=patches.device)
    sel = topk_select(img.attn_BK.detach(), valid, min(k, patches.shape[1]), patches)
    return head(sel.features_BkD, sel.valid_Bk)


def select_text(head: "TokenSelectionEmbedding", txt: TextFeatures, k: int) -> torch.Tensor:
    """TSE embedding of the captions: the k words the [EOS] row attends to most.

    With `head.filler_in_bn_stats` (the authors' code), a caption of fewer than k words fills
    its other slots with the padding tokens after its EOS, nearest first (the authors' top-k
    takes padding, score 0, after every word; which padding is the implementation's choice
    among ties there): they count in the train-mode BatchNorm statistics, not in the pooling.
    There are only as many as the encoded length holds past the EOS."""
    k = min(k, txt.attn_BL.shape[1])
    words = word_positions(txt.input_ids_BL, txt.eos_B)
    if not head.filler_in_bn_stats:
        sel = topk_select(txt.attn_BL.detach(), words, k, txt.tokens_BLE)
        return head(sel.features_BkD, sel.valid_Bk)
    pad = padding_mask(txt.eos_B, txt.attn_BL.shape[1])
    scores = txt.attn_BL.detach().masked_fill(pad, float("-inf"))      # after every word
    sel = topk_select(scores, words | pad, k, txt.tokens_BLE)
    is_word = sel.valid_Bk & (sel.indices_Bk < txt.eos_B[:, None])
    return head(sel.features_BkD, is_word, stats_Bk=sel.valid_Bk)


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
    included (a masked BatchNorm: no boolean indexing, so no host sync), unless `stats_Bk` names
    the rows the statistics read. `keep_bn_eval=True` reproduces the authors' released code,
    whose training ran with these BatchNorms in eval mode; `filler_in_bn_stats=True` their
    statistics over filler slots too (`select_text`).
    """

    def __init__(self, in_dim: int, out_dim: int, *, keep_bn_eval: bool = False,
                 filler_in_bn_stats: bool = False):
        super().__init__()
        self.fc = nn.Linear(in_dim, out_dim)
        self.mlp = nn.Sequential(nn.Linear(in_dim, in_dim), MaskedBatchNorm1d(in_dim), nn.ReLU(),
                                 nn.Linear(in_dim, out_dim))
        self.keep_bn_eval = keep_bn_eval
        self.filler_in_bn_stats = filler_in_bn_stats

    def train(self, mode: bool = True):
        super().train(mode)
        if self.keep_bn_eval:
            self.mlp[1].eval()
        return self

    def forward(self, tokens_BkE: torch.Tensor, valid_Bk: torch.Tensor,
                stats_Bk: torch.Tensor | None = None) -> torch.Tensor:
        """valid_Bk: the slots pooled; stats_Bk: the rows of the BatchNorm statistics
        (default valid_Bk)."""
        x = torch.nn.functional.normalize(tokens_BkE, dim=-1)
        h = self.mlp[2](self.mlp[1](self.mlp[0](x), valid_Bk if stats_Bk is None else stats_Bk))
        y = self.fc(x) + self.mlp[3](h)
        pooled = y.masked_fill(~valid_Bk[..., None], float("-inf")).max(dim=1).values
        return torch.where(valid_Bk.any(dim=1, keepdim=True), pooled, torch.zeros_like(pooled))
