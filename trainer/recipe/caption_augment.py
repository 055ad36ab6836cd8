"""RDE's caption augmentation (config recipe.caption_augment; the authors' --txt_aug).

What the authors' code does (2024-CVPR-RDE/datasets/bases.py, ImageTextDataset.txt_data_aug,
on every load of a training caption): one uniform u per token whose id is in (0, 49405), i.e.
every word token (0 is their padding, 49405 their mask token, 49406 / 49407 start and end):
    u < 0.2 x 0.6                 -> the mask token
    0.2 x 0.6 <= u < 0.2 x 0.8    -> random.choice(ids 1 .. 49404), the original id included
    0.2 x 0.8 <= u < 0.2          -> deleted: every later token (end token and padding too)
                                     moves one place left; zeros fill the end
(their comments say 15 %, 50 %, 30 %: the code says 20 %, 60 %, 20 %, 20 %). No minimum: a
caption may lose every word. Deletion only shortens, so the context length holds, and the end
token survives, so the text encoder still reads its feature there (they find it by argmax: the
end token has the highest id). Their division pass (processor/processor.py, get_loss) iterates
the same training loader, so the captions it scores are augmented too, with fresh draws.
IRRA's authors have no caption augmentation: their dataset (datasets/bases.py,
ImageTextMLMDataset) masks a copy of the caption for the MLM and leaves the caption itself alone.

Here, on the device, on a batch of token ids:
- word tokens are the positions between the start token and the first end token
  (encoder.word_positions) that hold no special id;
- a random word is drawn uniformly from every non-special id, as caption_masking's 80/10/10.
  Theirs excludes "!" (BPE id 0, indistinguishable from their zero padding) from both the
  chosen and the drawn tokens, and their vocabulary lacks CLIP's last merge (tokenizer
  differences: 2 ids of 49 406);
- the end is filled with the tokenizer's pad id (CLIP's is the end token; EOS is the first one);
- the draws are keyed by (training seed, epoch, pass) x sample index x position (draws.py), so a
  caption gets the same augmentation on any number of ranks, in any batch order and on resume;
  the division's pass (DIVISION) draws apart from the training pass (TRAIN), as the authors'
  fresh load does.

    aug = CaptionAugment.build(cfg.recipe.caption_augment, tokenizer, seed)  # None when off
    ids_BL = aug(ids_BL, index_B, epoch=3, stage=TRAIN)
"""
from __future__ import annotations

import torch

from tbps.trainer.model.encoder import word_positions
from tbps.trainer.recipe import draws

TRAIN, DIVISION = 0, 1     # the passes that augment, each with draws of its own


class CaptionAugment:
    """The configured augmentation (ac: config CaptionAugmentConfig) with the tokenizer's ids."""

    def __init__(self, ac, *, seed: int, eot_id: int, pad_id: int, mask_id: int,
                 vocab_size: int, special_ids):
        self.ac, self.seed = ac, seed
        self.eot_id, self.pad_id, self.mask_id, self.vocab_size = eot_id, pad_id, mask_id, vocab_size
        self.special_ids = tuple(sorted(set(special_ids)))

    @classmethod
    def build(cls, ac, tokenizer, seed: int) -> "CaptionAugment | None":
        if ac.kind == "none":
            return None
        return cls(ac, seed=seed, eot_id=tokenizer.eot_id, pad_id=tokenizer.pad_id,
                   mask_id=tokenizer.mask_id, vocab_size=tokenizer.vocab_size,
                   special_ids=tokenizer.special_ids)

    def __call__(self, ids_BL: torch.Tensor, index_B: torch.Tensor, *, epoch: int,
                 stage: int) -> torch.Tensor:
        """The captions augmented with this (epoch, stage)'s draws for samples index_B."""
        seed = draws.step_seed(self.seed, epoch, stage)
        L = ids_BL.shape[1]
        index_B = index_B.to(ids_BL.device)
        u_BL = draws.uniform(seed, index_B, L, stream=draws.AUGMENT_KIND)
        pick_BL = draws.uniform(seed, index_B, L, stream=draws.AUGMENT_WORD)
        return augment_ids(ids_BL, u_BL, pick_BL, prob=self.ac.prob, mask=self.ac.mask,
                           random=self.ac.random, eot_id=self.eot_id, pad_id=self.pad_id,
                           mask_id=self.mask_id, vocab_size=self.vocab_size,
                           special_ids=self.special_ids)


def augment_ids(ids_BL: torch.Tensor, u_BL: torch.Tensor, pick_BL: torch.Tensor, *,
                prob: float, mask: float, random: float, eot_id: int, pad_id: int, mask_id: int,
                vocab_size: int, special_ids) -> torch.Tensor:
    """The rule on given uniforms in (0, 1): a word token with u < prob x mask becomes mask_id,
    with u < prob x (mask + random) the non-special id chosen by pick, with u < prob it is
    deleted (delete_tokens); the rest stays."""
    eos_B = (ids_BL == eot_id).int().argmax(dim=1)
    special = torch.tensor(sorted(set(special_ids)), dtype=ids_BL.dtype, device=ids_BL.device)
    words = word_positions(ids_BL, eos_B) & ~torch.isin(ids_BL, special)
    u = u_BL.to(ids_BL.device)
    to_mask = words & (u < prob * mask)
    to_random = words & ~to_mask & (u < prob * (mask + random))
    delete = words & ~to_mask & ~to_random & (u < prob)
    out = torch.where(to_mask, mask_id, ids_BL)
    out = torch.where(to_random, word_id(pick_BL.to(ids_BL.device), vocab_size, special), out)
    return delete_tokens(out, delete, pad_id)


def word_id(u: torch.Tensor, vocab_size: int, special_sorted: torch.Tensor) -> torch.Tensor:
    """The non-special id of rank floor(u x (vocab_size - #special)) in increasing order: a
    uniform draw of a word id, without a vocabulary-sized table. The rank r maps to
    r + #{j : special[j] - j <= r} (each special id at or below the answer shifts it by one)."""
    n_words = vocab_size - special_sorted.numel()
    rank = (u * n_words).long().clamp(max=n_words - 1)
    shifted = special_sorted - torch.arange(special_sorted.numel(), device=u.device)
    return rank + torch.searchsorted(shifted, rank, right=True)


def delete_tokens(ids_BL: torch.Tensor, delete_BL: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Remove the marked tokens; the rest keep their order, moved left; pad_id fills the end."""
    L = ids_BL.shape[1]
    pos = torch.arange(L, device=ids_BL.device)[None]
    order = torch.where(delete_BL, pos + L, pos).argsort(dim=1)    # kept first, in order
    kept_B1 = (~delete_BL).sum(dim=1, keepdim=True)
    return torch.where(pos < kept_B1, ids_BL.gather(1, order), pad_id)
