"""Caption tokenizer: a Hugging Face tokenizer with a mask token, fixed length and a sanity check.

Two sources:
- CLIP's BPE from a pretrained model folder or hub id (`CaptionTokenizer.from_pretrained(
  "openai/clip-vit-base-patch16")`), as the pretrained recipes use;
- a word-level tokenizer trained with `tokenizers` on the training captions
  (`train_word_level(captions, out_dir)`), which `tbps shard` saves beside the
  shards (`OUT/tokenizer/`) for models trained from scratch on the synthetic data.

Every caption becomes [SOT] + tokens + [EOT] + padding, truncated to `context_length` (77) with
EOT kept last. The EOS position is the first EOT (CLIP pads with EOT itself, so padding is found by
position, never by id). A mask token (<|mask|>) is added if the tokenizer has none.

Offline, `from_pretrained("openai/...")` can return a tokenizer with two tokens that maps every
caption to [0, 2, 2, ...] without raising; `validate()` refuses such a tokenizer. It judges the
tokenizer by probe captions: a tokenizer trained on a dataset's captions keeps a few of them
(`caption_probe.json` beside its files), so a small or non-English dataset is judged by its own
words; any other tokenizer by a fixed English sentence (PROBE).
"""
from __future__ import annotations

import html
import json
import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

MASK_TOKEN = "<|mask|>"
SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"
PROBE = "a woman in a red coat carrying a black backpack"
PROBE_FILE = "caption_probe.json"
PROBE_CAPTIONS = 8
CONTEXT_LENGTH = 77


class TokenizerError(ValueError):
    pass


class CaptionTokenizer:
    """Wraps a transformers tokenizer; picklable, so loader workers tokenize."""

    def __init__(self, hf_tokenizer, *, context_length: int = CONTEXT_LENGTH, source: str = "",
                 probe: list[str] | None = None):
        if context_length < 3:
            raise ValueError(f"context_length must be at least 3, got {context_length}")
        self.hf = hf_tokenizer
        self.context_length = context_length
        self.source = source or getattr(hf_tokenizer, "name_or_path", "")
        self.probe = list(probe) if probe else None
        """Captions the tokenizer is judged by (None: PROBE)."""
        if self.hf.mask_token is None:
            self.hf.add_special_tokens({"mask_token": MASK_TOKEN})
            log.info("tokenizer %s had no mask token: added %s", self.source, MASK_TOKEN)
        self.sot_id = self._special_id("bos_token", SOT_TOKEN)
        self.eot_id = self._special_id("eos_token", EOT_TOKEN)
        self.mask_id = self.hf.mask_token_id
        self.pad_id = self.hf.pad_token_id if self.hf.pad_token_id is not None else 0
        self.unk_id = self.hf.unk_token_id
        self.validate()

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, *, context_length: int = CONTEXT_LENGTH
                        ) -> "CaptionTokenizer":
        from transformers import AutoTokenizer  # lazy: about a second to import

        name = str(name_or_path)
        try:
            hf = AutoTokenizer.from_pretrained(name)
        except Exception as exc:        # the Rust tokenizer reports a damaged file as Exception
            where = "local folder" if Path(name).exists() else "hub id (offline or unknown?)"
            raise TokenizerError(f"could not load a tokenizer from {name!r} ({where}): {exc}. "
                                 "Pass a folder holding tokenizer files, e.g. the shards' "
                                 "tokenizer/ folder or a downloaded model.") from None
        return cls(hf, context_length=context_length, source=name, probe=_read_probe(name))

    def save(self, out_dir: str | Path) -> None:
        self.hf.save_pretrained(str(out_dir))
        if self.probe:
            (Path(out_dir) / PROBE_FILE).write_text(json.dumps({"captions": self.probe}, indent=1))

    # -- properties ----------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    @property
    def special_ids(self) -> list[int]:
        ids = {self.sot_id, self.eot_id, self.mask_id, self.pad_id}
        if self.unk_id is not None:
            ids.add(self.unk_id)
        return sorted(ids)

    # -- encoding ------------------------------------------------------------------------------

    def encode(self, caption: str) -> np.ndarray:
        """int64 ids of length context_length: SOT, tokens, EOT, padding."""
        ids = self.hf(html.unescape(caption), add_special_tokens=False)["input_ids"]
        return self._frame(ids)

    def encode_batch(self, captions: list[str]) -> np.ndarray:
        """B x context_length int64 ids, the rows of `encode`, in one call of the tokenizer."""
        out = np.full((len(captions), self.context_length), self.pad_id, dtype=np.int64)
        # HTML entities in annotations ("&amp;") read as the characters they stand for, as
        # the CLIP tokenizer of IRRA's and RDE's authors does
        unescaped = [html.unescape(c) for c in captions]
        for row, ids in zip(out, self._token_ids(unescaped), strict=True):
            ids = ids[: self.context_length - 2]
            row[0], row[1 + len(ids)] = self.sot_id, self.eot_id
            row[1: 1 + len(ids)] = ids
        return out

    def _token_ids(self, captions: list[str]) -> list[list[int]]:
        # the Rust tokenizer directly: transformers' __call__ costs more than the tokenizing
        # itself (35 against 18 us a caption); only where that gives the same ids (a fast
        # tokenizer without truncation or padding of its own)
        backend = getattr(self.hf, "backend_tokenizer", None) if self.hf.is_fast else None
        if backend is None or backend.truncation or backend.padding:
            return self.hf(captions, add_special_tokens=False)["input_ids"] if captions else []
        encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
        return [e.ids for e in encode(captions, add_special_tokens=False)]

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        end = ids.index(self.eot_id) if self.eot_id in ids else len(ids)
        return self.hf.decode(ids[1:end])

    def _frame(self, ids: list[int]) -> np.ndarray:
        out = np.full(self.context_length, self.pad_id, dtype=np.int64)
        ids = ids[: self.context_length - 2]
        out[0] = self.sot_id
        out[1: 1 + len(ids)] = ids
        out[1 + len(ids)] = self.eot_id
        return out

    # -- checks --------------------------------------------------------------------------------

    def validate(self) -> None:
        """Refuse a tokenizer that cannot tell captions apart (the offline trap), judged by the
        probe captions: as many distinct ids as they have distinct words (up to 5), at most a
        quarter of their tokens unknown."""
        probe = self.probe or [PROBE]
        rows = self._token_ids(probe)
        ids = [i for row in rows for i in row]
        words = {w for caption in probe for w in caption.lower().split()}
        distinct = set(ids)
        unknown = sum(i == self.unk_id for i in ids) if self.unk_id is not None else 0
        shown = probe[0] if len(probe) == 1 else f"{probe[0]} (and {len(probe) - 1} more)"
        problems = []
        if self.vocab_size < min(16, len(words) + 2):
            problems.append(f"a vocabulary of only {self.vocab_size} tokens")
        if len(distinct) < min(5, len(words)):
            problems.append(f"the probe {shown!r} maps to {rows[0]}")
        if ids and unknown > len(ids) // 4:
            problems.append(f"{unknown} of the probe's {len(ids)} tokens are unknown")
        if self.sot_id == self.eot_id:
            problems.append("start and end tokens share an id")
        if problems:
            raise TokenizerError(
                f"tokenizer {self.source!r} looks broken: {'; '.join(problems)}. Offline, "
                "transformers can return an empty tokenizer for a hub id instead of failing; "
                "pass a local folder holding real tokenizer files.")

    def _special_id(self, attr: str, fallback_token: str) -> int:
        token = getattr(self.hf, attr) or fallback_token
        tid = self.hf.convert_tokens_to_ids(token)
        if tid is None or (self.hf.unk_token_id is not None and tid == self.hf.unk_token_id
                           and token != self.hf.unk_token):
            raise TokenizerError(f"tokenizer {self.source!r} has no {attr} ({fallback_token})")
        return tid


def train_word_level(captions, out_dir: str | Path, *, context_length: int = CONTEXT_LENGTH,
                     probe: list[str] | None = None) -> CaptionTokenizer:
    """Train a lower-cased word-level tokenizer on `captions` and save it in `out_dir`, with the
    captions it is judged by (`probe`; default: up to 8 of `captions`, spread over their sorted
    order).

    Special tokens take ids 0..4 (<pad>, <unk>, <|mask|>, <|startoftext|>, <|endoftext|>); the
    words follow by decreasing frequency. Saved as a transformers folder: loads with
    `CaptionTokenizer.from_pretrained(out_dir)` or `AutoTokenizer.from_pretrained(out_dir)`.
    """
    # tokenizers and transformers: lazy, about a second to import
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [PAD_TOKEN, UNK_TOKEN, MASK_TOKEN, SOT_TOKEN, EOT_TOKEN]
    tok = Tokenizer(models.WordLevel(unk_token=UNK_TOKEN))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=specials, min_frequency=1,
                                        show_progress=False)
    captions = list(captions)
    tok.train_from_iterator(captions, trainer=trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD_TOKEN, unk_token=UNK_TOKEN,
                                 mask_token=MASK_TOKEN, bos_token=SOT_TOKEN, eos_token=EOT_TOKEN,
                                 model_max_length=context_length)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(out_dir))
    if not probe:
        unique = sorted({c for c in captions if c.strip()})
        probe = unique[:: max(1, len(unique) // PROBE_CAPTIONS)][:PROBE_CAPTIONS]
    (out_dir / PROBE_FILE).write_text(json.dumps({"captions": probe}, indent=1))
    return CaptionTokenizer.from_pretrained(out_dir, context_length=context_length)


def _read_probe(name: str) -> list[str] | None:
    path = Path(name) / PROBE_FILE
    if not path.is_file():
        return None
    try:
        captions = json.loads(path.read_text())["captions"]
        if isinstance(captions, list) and captions and all(isinstance(c, str) for c in captions):
            return captions
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        pass
    raise TokenizerError(f"{path} is damaged: it should hold {{\"captions\": [...]}}, a few of "
                         "the captions the tokenizer was trained on; rewrite it or delete it "
                         "(then the tokenizer is judged by an English sentence)")
