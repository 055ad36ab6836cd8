"""A trained model ready to embed gallery images and query sentences (what search indexes with).

    emb = load_embedder("runs/irra-synth/best")        # or its transformers export (hf/)
    image_vecs = emb.images(images_BHWC)                # {branch: B x D}
    text_vecs = emb.texts(["a woman in a red coat"])
    scores = emb.similarity(text_vecs, image_vecs)      # {similarity name: Q x B}

A weights folder of a run (best/, final/) gives every branch its recipe scores with; a
transformers export (hf/) holds the global branch only. `linear_forms` tells which similarities
are weighted sums of per-branch dot products (what an approximate index can serve).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPModel
from transformers.utils import logging as hf_logging

from tbps.data_pipeline.tokenizer import CaptionTokenizer
from tbps.data_pipeline.transforms import prepare_batch
from tbps.trainer.inference import model_calls
from tbps.trainer.model import retrieval
from tbps.trainer.model.weights import WEIGHTS, load_weights_folder


class TransformersModel(nn.Module):
    """An exported transformers CLIP folder behind the trained model's interface: the `embed`
    entry point only (the global branch)."""

    def __init__(self, clip):
        super().__init__()
        self.clip = clip

    def forward(self, entry, batch: dict, modality: str):
        if entry is not retrieval.embed:
            raise ValueError(f"a transformers export only embeds; {entry.__name__} needs a weights "
                             "folder of a run (best/ or final/)")
        if modality == "image":
            out = self.clip.get_image_features(pixel_values=batch["image"],
                                               interpolate_pos_encoding=True)
        else:
            out = self.clip.get_text_features(input_ids=batch["input_ids"])
        out = getattr(out, "pooler_output", out)
        return {"bge": F.normalize(out.float(), dim=-1)}


@dataclass
class Embedder:
    """A trained model ready to embed gallery images and query sentences."""

    model: nn.Module
    tokenizer: object
    image_size: tuple[int, int]
    device: torch.device
    kind: str                       # "weights" or "transformers"
    path: str
    sha256: str
    dims: dict | None = None        # {branch: dimension}
    similarities: dict | None = None  # {name: {branch: weight} or None when not linear}

    @torch.no_grad()
    def images(self, images_BHWC: torch.Tensor) -> dict[str, torch.Tensor]:
        """uint8 B x H x W x 3 at image_size -> {branch: B x D}, L2-normalised."""
        B = images_BHWC.shape[0]
        ids = np.stack([self.tokenizer.encode("")] * B)
        return model_calls.embed_batch(self.model, prepare_batch(loader_batch(ids, images_BHWC),
                                                                 self.device), "image")

    @torch.no_grad()
    def texts(self, texts: list[str]) -> dict[str, torch.Tensor]:
        ids = self.tokenizer.encode_batch(list(texts))
        return model_calls.embed_batch(self.model, prepare_batch(loader_batch(ids), self.device),
                                       "text")

    def similarity(self, text: dict, image: dict) -> dict[str, torch.Tensor]:
        return model_calls.similarity(self.model, text, image)


def loader_batch(ids: np.ndarray, images: torch.Tensor | None = None) -> dict:
    """A batch shaped as the evaluation loader makes it."""
    n = ids.shape[0]
    batch = {"input_ids": torch.from_numpy(ids), "pid": torch.zeros(n, dtype=torch.long),
             "index": torch.arange(n), "image_id": torch.arange(n),
             "noisy": torch.zeros(n, dtype=torch.bool)}
    if images is not None:
        batch["image"] = images
    return batch


def load_embedder(path: Path, device=None) -> Embedder:
    """A weights folder or an exported transformers folder; ValueError / FileNotFoundError
    naming the folder when it is neither or cannot be read."""
    path = Path(path)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if not path.is_dir():
        raise FileNotFoundError(f"weights {path} is not a folder: pass a weights folder of a run "
                                "(best/ or final/) or its transformers export (hf/)")
    if (path / "tbps_export.json").is_file():
        kind, files = "transformers", sorted(path.glob("*.safetensors"))
    elif (path / WEIGHTS).is_file():
        kind, files = "weights", [path / WEIGHTS]
    else:
        raise FileNotFoundError(f"{path} holds neither {WEIGHTS} (a weights folder of a run) nor "
                                "tbps_export.json (a transformers export): pass best/, final/ or "
                                "hf/ of a run")
    try:
        model, tokenizer, image_size = (_load_weights(path) if kind == "weights"
                                        else _load_transformers(path))
    except (FileNotFoundError, ValueError) as exc:
        raise ValueError(f"cannot load the model in {path}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - a corrupt file surfaces as any library's error
        raise ValueError(f"cannot load the model in {path} ({type(exc).__name__}: {exc}); is the "
                         "folder complete? Copy it again or export it again") from None
    emb = Embedder(model.to(device).eval(), tokenizer, image_size, device, kind,
                   str(path.resolve()), sha256_of(files))
    probe_t = emb.texts(["a person"])
    probe_i = emb.images(torch.zeros(1, *image_size, 3, dtype=torch.uint8))
    emb.dims = {b: int(v.shape[-1]) for b, v in sorted(probe_i.items())}
    if {b: int(v.shape[-1]) for b, v in sorted(probe_t.items())} != emb.dims:
        raise ValueError(f"{path}: text and image branches differ")
    emb.similarities = linear_forms(emb.similarity, emb.dims, device)
    return emb


def _load_weights(path: Path):
    cfg, tokenizer, model = load_weights_folder(path)
    return model, tokenizer, tuple(cfg.model.image_size)


def _load_transformers(path: Path):
    hf_logging.disable_progress_bar()
    info = json.loads((path / "tbps_export.json").read_text())
    tokenizer = CaptionTokenizer.from_pretrained(path, context_length=info["context_length"])
    clip = CLIPModel.from_pretrained(str(path))
    return TransformersModel(clip), tokenizer, tuple(info["image_size"])


def sha256_of(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def linear_forms(similarity, dims: dict[str, int], device) -> dict[str, dict | None]:
    """{similarity name: {branch: w}} where the similarity is sum_b w_b <t_b, i_b> (checked on
    random embeddings), None where it is not: what an approximate index can serve."""
    def unit(b):
        out = {c: torch.zeros(1, d, device=device) for c, d in dims.items()}
        out[b][0, 0] = 1.0
        return out

    weights = {}
    for b in dims:
        for name, s in similarity(unit(b), unit(b)).items():
            weights.setdefault(name, {})[b] = float(s[0, 0])
    g = torch.Generator().manual_seed(0)
    t = {b: torch.randn(3, d, generator=g).to(device) for b, d in dims.items()}
    i = {b: torch.randn(5, d, generator=g).to(device) for b, d in dims.items()}
    out = {}
    for name, s in similarity(t, i).items():
        want = sum(w * (t[b] @ i[b].T) for b, w in weights[name].items())
        out[name] = weights[name] if torch.allclose(s, want, rtol=1e-4, atol=1e-4) else None
    return out
