"""The parity harness's weights and tokenizer: a small random CLIP in OpenAI's layout.

ViT: width 128 (2 heads, OpenAI's width / 64), 2 layers, patch 16, a square 8x8 position table
(so both codes interpolate it to the 8x4 grid of 128x64 images); text: width 128, 2 layers,
context 77, a vocabulary laid out as the authors' BPE (words, then <|mask|>, <|startoftext|>,
<|endoftext|>: the end token is the largest id, which their argmax finds); embedding 512, the
input width RDE's TSE layers are built for.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

WORDS = ("a woman in red coat carrying black backpack man with blue shirt and white shoes "
         "walking bag hair long short pants jeans").split()
VOCAB = 1 + len(WORDS) + 3
MASK, SOT, EOT = VOCAB - 3, VOCAB - 2, VOCAB - 1
IMAGE = (128, 64)
WIDTH, LAYERS, PATCH, SIDE, EMBED, CONTEXT = 128, 2, 16, 8, 512, 77


def tokenizer_folder(folder: Path, mask_last: bool = False) -> Path:
    """A word-level tokenizer with the authors' id layout (words, then <|mask|>,
    <|startoftext|>, <|endoftext|>: the end token the largest id), saved as a transformers
    folder; mask_last: as transformers' CLIP tokenizer with a mask added (words, start, end,
    mask)."""
    from tokenizers import Tokenizer, models, pre_tokenizers   # noqa: I001 (lazy, as the project)
    from transformers import PreTrainedTokenizerFast

    specials = ["<|startoftext|>", "<|endoftext|>", "<|mask|>"] if mask_last else \
        ["<|mask|>", "<|startoftext|>", "<|endoftext|>"]
    vocab = {w: i for i, w in enumerate(["<unk>", *WORDS, *specials])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", mask_token="<|mask|>",
                                 bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                                 pad_token="<|endoftext|>")
    hf.save_pretrained(str(folder))
    return folder


def openai_state(seed: int = 0, *, vocab: int = VOCAB, side: int = SIDE, embed: int = EMBED,
                 scalars: bool = False) -> dict:
    """Random tensors under OpenAI's CLIP names and layouts (fp32; also tests/trainer/
    test_convert.py's); scalars: with the entries OpenAI's files carry beside the tensors
    (input_resolution, context_length, vocab_size)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, std=0.05):
        return torch.randn(*shape, generator=g) * std

    sd = {"visual.class_embedding": r(WIDTH), "visual.conv1.weight": r(WIDTH, 3, PATCH, PATCH),
          "visual.positional_embedding": r(1 + side * side, WIDTH), "visual.proj": r(WIDTH, embed),
          "token_embedding.weight": r(vocab, WIDTH), "positional_embedding": r(CONTEXT, WIDTH),
          "text_projection": r(WIDTH, embed), "logit_scale": torch.tensor(math.log(1 / 0.07))}
    if scalars:
        sd.update({"input_resolution": torch.tensor(side * PATCH),
                   "context_length": torch.tensor(CONTEXT), "vocab_size": torch.tensor(vocab)})
    for ln in ("visual.ln_pre", "visual.ln_post", "ln_final"):
        sd[f"{ln}.weight"], sd[f"{ln}.bias"] = 1 + r(WIDTH, std=0.1), r(WIDTH)
    for tower in ("visual.transformer", "transformer"):
        for i in range(LAYERS):
            p = f"{tower}.resblocks.{i}."
            sd[p + "attn.in_proj_weight"], sd[p + "attn.in_proj_bias"] = r(3 * WIDTH, WIDTH), r(3 * WIDTH)
            sd[p + "attn.out_proj.weight"], sd[p + "attn.out_proj.bias"] = r(WIDTH, WIDTH), r(WIDTH)
            for ln in ("ln_1", "ln_2"):
                sd[p + f"{ln}.weight"], sd[p + f"{ln}.bias"] = 1 + r(WIDTH, std=0.1), r(WIDTH)
            sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"] = r(4 * WIDTH, WIDTH), r(4 * WIDTH)
            sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"] = r(WIDTH, 4 * WIDTH), r(WIDTH)
    return sd
