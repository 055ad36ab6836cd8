"""The CLIP dual encoder: transformers' CLIP weights, a forward written for person retrieval.

Shapes: B batch, N patch tokens (gh x gw grid), K kept patches, L text tokens, D encoder width,
E joint embedding size, H heads.

The parameters live in a transformers `CLIPModel` (so `from_pretrained` of a hub id or folder
loads them, and the export in `trainer/inference/export.py` writes them back); the forward is ours:
- non-square images: the position embedding is a (1 + gh*gw) x D table for the patch grid,
  interpolated once at load from a pretrained square one (bilinear, as IRRA), or random;
- token dropping: `encode_image(pixels, keep_BK=...)` runs the transformer on [CLS] + the kept
  patches only (AMNS's AWM drops 30 % and saves that much compute);
- all token features go through the final LayerNorm and the projection (IRRA), so the global
  embedding is token 0 (image) or the EOS token (text);
- the attention row of the CLS (image) or EOS (text) token, averaged over heads, of the last
  layer (`rows="last"`, RDE's TSE) or of every layer (`rows="all"`, AGA's AGM), is computed as
  that one row from each layer's queries and keys, never as full attention maps;
- captions are cut to the batch's longest (EOS + 1): the text encoder is causal, so the
  tokens up to each EOS are unchanged and the padding costs nothing. The cut length is found on
  the device (a host sync) unless the caller passes it (`length=`, known on the host from the
  loader's CPU batch).
The model knows nothing about distribution.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn
from transformers import CLIPConfig, CLIPModel

from tbps.trainer.common.config import ModelConfig

log = logging.getLogger(__name__)


@dataclass
class ImageFeatures:
    embeds_BE: torch.Tensor       # projected CLS token (not normalised)
    tokens_BTE: torch.Tensor      # projected tokens, T = 1 + K, token 0 is CLS
    attn_BK: torch.Tensor | None  # last-layer CLS -> patch attention, head-averaged, fp32
    keep_BK: torch.Tensor | None  # indices of the kept patches (None: all N)
    attn_rows_BlK: torch.Tensor | None = None   # every layer's CLS row (rows="all"), l layers


@dataclass
class TextFeatures:
    embeds_BE: torch.Tensor       # projected EOS token (not normalised)
    tokens_BLE: torch.Tensor      # projected tokens of the cut captions
    attn_BL: torch.Tensor | None  # last-layer EOS -> token attention, head-averaged, fp32
    eos_B: torch.Tensor           # EOS position of each caption
    input_ids_BL: torch.Tensor    # the captions cut to L
    attn_rows_BlL: torch.Tensor | None = None   # every layer's EOS row (rows="all")


class DualEncoder(nn.Module):
    def __init__(self, clip: CLIPModel, grid_hw: tuple[int, int], eot_id: int):
        super().__init__()
        self.clip = clip
        self.grid_hw = tuple(grid_hw)
        self.eot_id = eot_id
        self.patch_size = clip.config.vision_config.patch_size
        # The temperature is the loss's (scheduled or fixed), not CLIP's learnt logit scale: keep
        # it as a buffer (saved and exported under its name; a 0-dim parameter also breaks
        # DeepSpeed's parameter broadcast).
        if isinstance(clip.logit_scale, nn.Parameter):
            scale = clip.logit_scale.detach().clone()
            del clip.logit_scale
            clip.register_buffer("logit_scale", scale)
        n = 1 + grid_hw[0] * grid_hw[1]
        pos = clip.vision_model.embeddings.position_embedding
        assert pos.weight.shape[0] == n, "position table must match the patch grid"

    # -- construction -----------------------------------------------------------------------

    @classmethod
    def from_config(cls, cfg: ModelConfig, *, vocab_size: int, sot_id: int, eot_id: int,
                    pad_id: int) -> "DualEncoder":
        """A randomly initialised CLIP of the configured size for the configured image grid."""
        config = CLIPConfig(
            text_config=dict(vocab_size=vocab_size, hidden_size=cfg.text_width,
                             intermediate_size=4 * cfg.text_width,
                             num_hidden_layers=cfg.text_layers,
                             num_attention_heads=cfg.text_heads,
                             max_position_embeddings=cfg.context_length, hidden_act="quick_gelu",
                             bos_token_id=sot_id, eos_token_id=eot_id, pad_token_id=pad_id,
                             projection_dim=cfg.embed_dim),
            vision_config=dict(hidden_size=cfg.vision_width, intermediate_size=4 * cfg.vision_width,
                               num_hidden_layers=cfg.vision_layers,
                               num_attention_heads=cfg.vision_heads,
                               image_size=max(cfg.image_size), patch_size=cfg.patch_size,
                               hidden_act="quick_gelu", projection_dim=cfg.embed_dim),
            projection_dim=cfg.embed_dim)
        return cls.from_clip_config(config, cfg.image_size, eot_id)

    @classmethod
    def from_clip_config(cls, config: CLIPConfig, image_size: tuple[int, int], eot_id: int
                         ) -> "DualEncoder":
        """Random weights for a CLIP architecture, with a position table for the image grid."""
        patch = config.vision_config.patch_size
        grid = (image_size[0] // patch, image_size[1] // patch)
        clip = CLIPModel(config)
        table = nn.Embedding(1 + grid[0] * grid[1], config.vision_config.hidden_size)
        nn.init.normal_(table.weight, std=config.vision_config.initializer_range)
        clip.vision_model.embeddings.position_embedding = table
        return cls(clip, grid, eot_id)

    @classmethod
    def from_pretrained(cls, name: str, cfg: ModelConfig, *, vocab_size: int, eot_id: int
                        ) -> "DualEncoder":
        """A pretrained CLIP for the configured grid; vocabulary grown if the tokenizer added
        tokens (the mask token). The position table, in order of preference: used as it is when
        it already has 1 + gh*gw rows (a folder saved from a model of this grid, e.g.
        `encoder.clip.save_pretrained`); the trained points picked out of the square table of an
        export of this grid (`tbps_export.json` says exact_position_grid: trainer/inference/export.py put
        them there); else interpolated bilinearly from the square table (IRRA)."""
        try:
            clip, table = _load_clip(name)
        except OSError as exc:
            raise FileNotFoundError(f"could not load CLIP weights from {name!r}: {exc}") from None
        patch = clip.config.vision_config.patch_size
        h, w = cfg.image_size
        if h % patch or w % patch:
            raise ValueError(f"model.image_size {cfg.image_size} is not a multiple of the "
                             f"pretrained patch size {patch}")
        grid = (h // patch, w // patch)
        emb = clip.vision_model.embeddings
        table = emb.position_embedding.weight.data if table is None else table
        if table.shape[0] == 1 + grid[0] * grid[1]:
            emb.position_embedding = nn.Embedding.from_pretrained(table.clone(), freeze=False)
            log.info("the pretrained position table fits the %dx%d patch grid: used as it is",
                     *grid)
        elif _exported_for(name, cfg.image_size):
            emb.position_embedding = _exact_points(table, grid)
            log.info("took the %dx%d trained positions out of the exported square table", *grid)
        else:
            emb.position_embedding = _grid_table(table, grid)
            log.info("interpolated the pretrained position embedding to the %dx%d patch grid",
                     *grid)
        if vocab_size > clip.config.text_config.vocab_size:
            _grow_vocab(clip, vocab_size)
        clip.config.text_config.eos_token_id = eot_id
        return cls(clip, grid, eot_id)

    def external_parameters(self) -> list[nn.Parameter]:
        """Parameters read outside their own module's forward (ZeRO-3 must be told)."""
        return [self.clip.vision_model.embeddings.class_embedding]

    def forward(self, image=None, input_ids=None, keep_BK=None, rows: str = "last"):
        """(ImageFeatures, TextFeatures); either may be None."""
        return (None if image is None else self.encode_image(image, keep_BK, rows=rows),
                None if input_ids is None else self.encode_text(input_ids, rows=rows))

    # -- forward ------------------------------------------------------------------------------

    @property
    def embed_dim(self) -> int:
        return self.clip.config.projection_dim

    def encode_image(self, pixels_BCHW: torch.Tensor, keep_BK: torch.Tensor | None = None, *,
                     rows: str = "last") -> ImageFeatures:
        """rows: which CLS attention rows to compute: "none", "last" or "all" layers."""
        vm = self.clip.vision_model
        emb = vm.embeddings
        dtype = emb.patch_embedding.weight.dtype
        x = emb.patch_embedding(pixels_BCHW.to(dtype))
        if tuple(x.shape[-2:]) != self.grid_hw:
            raise ValueError(f"images of {tuple(pixels_BCHW.shape[-2:])} give a "
                             f"{tuple(x.shape[-2:])} patch grid; the model was built for "
                             f"{self.grid_hw} (model.image_size)")
        pos = emb.position_embedding(torch.arange(1 + x.shape[-2] * x.shape[-1], device=x.device))
        x_BND = x.flatten(2).transpose(1, 2) + pos[1:]
        if keep_BK is not None:
            x_BND = torch.gather(x_BND, 1, keep_BK.unsqueeze(-1).expand(-1, -1, x_BND.shape[-1]))
        cls_B1D = (emb.class_embedding + pos[0]).to(x_BND.dtype).expand(x_BND.shape[0], 1, -1)
        x = vm.pre_layrnorm(torch.cat([cls_B1D, x_BND], dim=1))
        query_B = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        x, row_BT, rows_BlT = _transformer(vm.encoder.layers, x, causal=False, query_B=query_B,
                                           rows=rows)
        tokens = self.clip.visual_projection(vm.post_layernorm(x))
        return ImageFeatures(tokens[:, 0], tokens, None if row_BT is None else row_BT[:, 1:],
                             keep_BK, None if rows_BlT is None else rows_BlT[:, :, 1:])

    def encode_text(self, input_ids_BL: torch.Tensor, *, rows: str = "last",
                    length: int | None = None) -> TextFeatures:
        """rows: which EOS attention rows to compute ("none", "last", "all" layers); length:
        the batch's longest caption with its EOS, when the caller knows it (no host sync)."""
        tm = self.clip.text_model
        is_eot = input_ids_BL == self.eot_id
        if length is None:
            if not bool(is_eot.any(dim=1).all()):
                raise ValueError("every caption needs an end-of-text token (use CaptionTokenizer)")
        eos_B = is_eot.int().argmax(dim=1)
        if length is None:
            length = int(eos_B.max()) + 1
        ids = input_ids_BL[:, :length]
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = tm.embeddings.token_embedding(ids) + tm.embeddings.position_embedding(positions)
        x, row_BL, rows_BlL = _transformer(tm.encoder.layers, x, causal=True, query_B=eos_B,
                                           rows=rows)
        tokens = self.clip.text_projection(tm.final_layer_norm(x))
        embeds = tokens[torch.arange(tokens.shape[0], device=tokens.device), eos_B]
        return TextFeatures(embeds, tokens, row_BL, eos_B, ids, rows_BlL)


def word_positions(ids_BL: torch.Tensor, eos_B: torch.Tensor) -> torch.Tensor:
    """True at each caption's words: after the start token, before its EOS."""
    pos = torch.arange(ids_BL.shape[1], device=ids_BL.device)[None]
    return (pos >= 1) & (pos < eos_B[:, None])


def padding_mask(eos_B: torch.Tensor, length: int) -> torch.Tensor:
    """B x length, True past each caption's EOS (the positions attention must not read)."""
    return torch.arange(length, device=eos_B.device)[None] > eos_B[:, None]


def _transformer(layers, x_BTD: torch.Tensor, *, causal: bool, query_B: torch.Tensor,
                 rows: str = "last"):
    """CLIP pre-LN blocks; also the attention row of token query_B[b] (head-averaged, fp32) of
    the last layer (rows "last" or "all") and of every layer (rows "all": B x layers x T)."""
    if rows not in ("none", "last", "all"):
        raise ValueError(f"rows={rows!r}: none, last or all")
    row, every = None, []
    for i, layer in enumerate(layers):
        attn = layer.self_attn
        h = layer.layer_norm1(x_BTD)
        B, T, _ = h.shape
        heads = attn.num_heads

        def split(t):
            return t.view(B, T, heads, -1).transpose(1, 2)

        q, k, v = split(attn.q_proj(h)), split(attn.k_proj(h)), split(attn.v_proj(h))
        out = attention(q, k, v, causal=causal, scale=attn.scale)
        x_BTD = x_BTD + attn.out_proj(out.transpose(1, 2).reshape(B, T, -1))
        x_BTD = x_BTD + layer.mlp(layer.layer_norm2(x_BTD))
        if rows == "all" or (rows == "last" and i == len(layers) - 1):
            row = _attention_row(q, k, query_B, attn.scale, causal)
            every.append(row)
    return x_BTD, row, (torch.stack(every, dim=1) if rows == "all" else None)


def attention(q, k, v, *, causal: bool = False, scale: float | None = None,
              keep_mask=None) -> torch.Tensor:
    """softmax(q k^T * scale) v over B x H x T x d; keep_mask (broadcastable, True = attend).

    SDPA on GPU; on CPU, for the short sequences here, plain matmul + softmax, which is as fast
    in fp32 and several times faster in bf16 (CPU flash attention's bf16 backward is slow)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if q.is_cuda:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep_mask, is_causal=causal,
                                              scale=scale)
    scores = (q @ k.transpose(-1, -2)) * scale
    if causal:
        T = q.shape[-2]
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1),
                                    float("-inf"))
    if keep_mask is not None:
        scores = scores.masked_fill(~keep_mask, float("-inf"))
    return scores.softmax(dim=-1) @ v


def _attention_row(q_BHTd, k_BHTd, query_B, scale: float, causal: bool) -> torch.Tensor:
    """softmax(q_i k^T * scale) for the one query token i per sample, mean over heads, fp32."""
    B, H, T, d = q_BHTd.shape
    q = q_BHTd[torch.arange(B, device=q_BHTd.device), :, query_B]            # B, H, d
    scores = torch.einsum("bhd,bhtd->bht", q.float(), k_BHTd.float()) * scale
    if causal:
        later = torch.arange(T, device=scores.device)[None, None] > query_B[:, None, None]
        scores = scores.masked_fill(later, float("-inf"))
    return scores.softmax(dim=-1).mean(dim=1)


def _grid_table(weight_PD: torch.Tensor, grid: tuple[int, int]) -> nn.Embedding:
    """A pretrained (1 + S*S) x D position table -> (1 + gh*gw) x D for the grid (bilinear)."""
    cls, patches = weight_PD[:1], weight_PD[1:]
    side = int(round(patches.shape[0] ** 0.5))
    assert side * side == patches.shape[0], "pretrained position table is not a square grid"
    g = patches.reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
    g = F.interpolate(g, size=grid, mode="bilinear", align_corners=False)
    table = torch.cat([cls.float(), g.permute(0, 2, 3, 1).reshape(-1, g.shape[1])])
    emb = nn.Embedding(table.shape[0], table.shape[1])
    emb.weight.data.copy_(table.to(weight_PD.dtype))
    return emb


POSITIONS = "vision_model.embeddings.position_embedding.weight"


def _load_clip(name: str) -> tuple[CLIPModel, torch.Tensor | None]:
    """The CLIP of `name`, and the stored position table when it is not the square one the
    config describes (a local folder saved from a model of a non-square grid; transformers
    cannot hold that table, so it is read from the file and every other tensor is checked)."""
    path = Path(name) / "model.safetensors"
    if not path.is_file():
        return _checked(name, *CLIPModel.from_pretrained(name, output_loading_info=True)), None
    with safe_open(str(path), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        table = f.get_tensor(POSITIONS) if POSITIONS in shapes else None
    vc = CLIPConfig.from_pretrained(name).vision_config
    if table is None or table.shape[0] == 1 + (vc.image_size // vc.patch_size) ** 2:
        return _checked(name, *CLIPModel.from_pretrained(name, output_loading_info=True)), None
    clip = _checked(name, *CLIPModel.from_pretrained(name, ignore_mismatched_sizes=True,
                                                     output_loading_info=True))
    have = {k: tuple(v.shape) for k, v in clip.state_dict().items()}
    wrong = [k for k, s in shapes.items() if k != POSITIONS and k in have and have[k] != s]
    if wrong:
        raise ValueError(f"{name}: stored tensors do not fit its config.json: {wrong[:5]}")
    return clip, table


def _checked(name: str, clip: CLIPModel, info: dict) -> CLIPModel:
    """The loaded CLIP, or a ValueError naming the tensors the folder or hub id did not supply
    (transformers would start them random, silently) or supplied but the model has not."""
    ok = lambda k: k.endswith("position_ids") or k == POSITIONS      # noqa: E731
    missing = [k for k in info.get("missing_keys", ()) if not ok(k)]
    unexpected = [k for k in info.get("unexpected_keys", ()) if not ok(k)]
    mismatched = [k[0] if isinstance(k, tuple) else k for k in info.get("mismatched_keys", ())]
    mismatched = [k for k in mismatched if not ok(k)]
    if missing or unexpected or mismatched:
        raise ValueError(f"model.pretrained={name}: its tensors do not make a CLIP of its "
                         f"config: missing {sorted(missing)[:5]}, unexpected "
                         f"{sorted(unexpected)[:5]}, of another shape {sorted(mismatched)[:5]}"
                         " (a weights folder of this project is best/ or final/ of a run)")
    return clip


def _exported_for(name: str, image_size: tuple[int, int]) -> bool:
    """Whether `name` is an export (trainer/inference/export.py) of a model of this image size whose
    square table holds the trained positions exactly."""
    info = Path(name) / "tbps_export.json"
    if not info.is_file():
        return False
    data = json.loads(info.read_text())
    return bool(data.get("exact_position_grid")) and tuple(data.get("image_size", ())) == \
        tuple(image_size)


def _exact_points(weight_PD: torch.Tensor, grid: tuple[int, int]) -> nn.Embedding:
    """The (1 + gh*gw) x D table an export placed in its (1 + S*S) x D square one (the points
    trainer/inference/export.py square_grid wrote: row i*S/gh + (S/gh - 1)/2, the same for columns)."""
    gh, gw = grid
    side = int(round((weight_PD.shape[0] - 1) ** 0.5))
    rh, rw = side // gh, side // gw
    rows = torch.arange(gh) * rh + (rh - 1) // 2
    cols = torch.arange(gw) * rw + (rw - 1) // 2
    patches = weight_PD[1:].reshape(side, side, -1)[rows[:, None], cols[None, :]]
    table = torch.cat([weight_PD[:1], patches.reshape(gh * gw, -1)])
    return nn.Embedding.from_pretrained(table.clone(), freeze=False)


def _grow_vocab(clip: CLIPModel, vocab_size: int) -> None:
    old = clip.text_model.embeddings.token_embedding
    new = nn.Embedding(vocab_size, old.weight.shape[1])
    nn.init.normal_(new.weight, std=0.02)
    new.weight.data[: old.weight.shape[0]] = old.weight.data
    clip.text_model.embeddings.token_embedding = new
    log.info("grew the text vocabulary from %d to %d tokens", old.weight.shape[0], vocab_size)
    clip.config.text_config.vocab_size = vocab_size
