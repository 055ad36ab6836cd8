"""OpenAI-format CLIP weights (and IRRA / RDE fine-tuned checkpoints) -> a weights folder.

    tbps convert ViT-B-16-state.pt --out weights/clip-b16 --tokenizer openai/clip-vit-base-patch16
    tbps convert irra-cuhk/best.pth --out weights/irra-cuhk --image-size 384 128
    tbps convert ViT-B-16.pt --torchscript --out weights/clip-b16     # OpenAI's own download

The folder is one of this project's weights folders (trainer/model/weights.py: model.safetensors,
clip_config.json, config.yaml, model.json, tokenizer/): `model.pretrained=FOLDER` starts a run
from it, `tbps evaluate FOLDER` and `tbps search index FOLDER ...` read it.

Sources:
- an OpenAI-format state dict (`visual.conv1.weight`, `visual.transformer.resblocks.N...`,
  `token_embedding.weight`, ...), as `torch.save(model.state_dict())` of OpenAI's CLIP writes;
- the authors' checkpoints (IRRA and RDE utils/checkpoint.py: `{"model": state_dict, ...}`),
  whose backbone sits under `base_model.` beside the heads: IRRA's `classifier`, `cross_attn`,
  `cross_modal_transformer`, `ln_pre_t`, `ln_pre_i`, `ln_post`, `mlm_head`; RDE's
  `visul_emb_layer` and `texual_emb_layer` (TSE). Each head this project has is mapped; what is
  left out is printed by name (RDE's unused `visul_emb_layer.linear` and the second BatchNorm
  of each TSE MLP, which their forward never calls);
- OpenAI's original files are TorchScript archives. Reading them with torch.jit.load runs the
  code inside; this command refuses them unless `--torchscript` says the file is trusted.
  Everything else is read with torch's weights-only loader (no code runs).

The architecture is read off the shapes (widths, layers, patch size, context length, vocabulary,
embedding size); head counts are width / 64 as in OpenAI's CLIP unless given. The vision
position table is interpolated bilinearly to the --image-size patch grid when it is square and
the grid is not (as the authors' resize_pos_embed does); a fine-tuned table of the grid's size
is kept. The text vocabulary: when the tokenizer appends a mask token after the checkpoint's
rows, the mask's row is the checkpoint's row at the authors' mask id (vocabulary - 3: their
tokenizer gives id 49405 to <|mask|>), in the token embedding and in the MLM decoder.
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import CLIPConfig

from tbps.data_pipeline.tokenizer import CaptionTokenizer
from tbps.trainer.common import dist, errors
from tbps.trainer.common.config_files import load_config
from tbps.trainer.model.weights import MODEL_INFO, save_weights

log = logging.getLogger(__name__)

ANCHOR = "visual.conv1.weight"
# scalars OpenAI's archives hold beside the tensors; nothing to map
SCALARS = ("input_resolution", "context_length", "vocab_size")


@dataclass(frozen=True)
class Arch:
    vision_width: int
    vision_layers: int
    patch_size: int
    position_rows: int
    embed_dim: int
    text_width: int
    text_layers: int
    context_length: int
    vocab_size: int
    vision_mlp: int
    text_mlp: int


# -- reading ------------------------------------------------------------------------------------

def is_torchscript(path: Path) -> bool:
    """A TorchScript archive: a zip with code in it (torch.save's zips have none)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any("/code/" in n or n.endswith("constants.pkl") for n in z.namelist())


def read_source(path: Path, *, torchscript: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of a state dict file (a checkpoint's `model` / `state_dict` entry)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    if is_torchscript(path):
        if not torchscript:
            raise ValueError(f"{path} is a TorchScript archive (OpenAI's original download): "
                             "reading it runs the code it holds; pass --torchscript if you "
                             "trust the file, or convert a torch.save'd state dict")
        obj = torch.jit.load(str(path), map_location="cpu").state_dict()
    else:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:           # noqa: BLE001 (any unreadable file, named)
            raise ValueError(f"{path} is not a readable state dict ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:200]})") from None
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj:
        raise ValueError(f"{path}: expected a state dict (name -> tensor), got "
                         f"{type(obj).__name__}")
    return {k: v for k, v in obj.items() if isinstance(k, str) and torch.is_tensor(v)}


def split_backbone(state: dict, source: Path) -> tuple[dict, dict, str]:
    """(the CLIP's tensors without their prefix, the other tensors, the prefix)."""
    anchors = [k for k in state if k == ANCHOR or k.endswith("." + ANCHOR)]
    if len(anchors) != 1:
        raise ValueError(f"{source}: no OpenAI-format CLIP in it (found {len(anchors)} tensors "
                         f"named *{ANCHOR}; expected one)")
    prefix = anchors[0][: -len(ANCHOR)]
    clip = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    heads = {k: v for k, v in state.items() if not k.startswith(prefix)}
    if "visual.proj" not in clip:
        raise ValueError(f"{source}: {prefix}visual.proj is missing (a ResNet CLIP?): only "
                         "ViT CLIPs are converted")
    return clip, heads, prefix


def _need(sd: dict, key: str, source: Path, ndim: int) -> torch.Tensor:
    if key not in sd:
        raise ValueError(f"{source}: tensor {key} is missing")
    if sd[key].dim() != ndim:
        raise ValueError(f"{source}: tensor {key} has shape {tuple(sd[key].shape)}, expected "
                         f"{ndim} dimensions")
    return sd[key]


def architecture(sd: dict, source: Path) -> Arch:
    """The CLIP's sizes, read off its tensors' shapes."""
    conv = _need(sd, "visual.conv1.weight", source, 4)
    if conv.shape[2] != conv.shape[3] or conv.shape[1] != 3:
        raise ValueError(f"{source}: visual.conv1.weight has shape {tuple(conv.shape)}, "
                         "expected width x 3 x patch x patch")
    layers = lambda p: len({m.group(1) for k in sd           # noqa: E731
                            if (m := re.match(p + r"transformer\.resblocks\.(\d+)\.", k))})
    arch = Arch(vision_width=conv.shape[0], vision_layers=layers(r"visual\."),
                patch_size=conv.shape[-1],
                position_rows=_need(sd, "visual.positional_embedding", source, 2).shape[0],
                embed_dim=_need(sd, "visual.proj", source, 2).shape[1],
                text_width=_need(sd, "ln_final.weight", source, 1).shape[0],
                text_layers=layers(""),
                context_length=_need(sd, "positional_embedding", source, 2).shape[0],
                vocab_size=_need(sd, "token_embedding.weight", source, 2).shape[0],
                vision_mlp=_mlp(sd, "visual.", source), text_mlp=_mlp(sd, "", source))
    if not arch.vision_layers or not arch.text_layers:
        raise ValueError(f"{source}: no transformer blocks found (visual.transformer.resblocks.N"
                         " / transformer.resblocks.N)")
    if _need(sd, "text_projection", source, 2).shape != (arch.text_width, arch.embed_dim):
        raise ValueError(f"{source}: text_projection has shape "
                         f"{tuple(sd['text_projection'].shape)}, expected "
                         f"({arch.text_width}, {arch.embed_dim})")
    return arch


def _mlp(sd: dict, prefix: str, source: Path) -> int:
    return _need(sd, f"{prefix}transformer.resblocks.0.mlp.c_fc.weight", source, 2).shape[0]


# -- mapping ------------------------------------------------------------------------------------

def _block(sd: dict, src: str, dst: str, out: dict, *, hf: bool) -> None:
    """One OpenAI residual attention block (`src`.ln_1, attn, ln_2, mlp) -> transformers'
    CLIPEncoderLayer names (hf) or this project's heads.Block names."""
    q, k, v = sd[f"{src}attn.in_proj_weight"].chunk(3)
    qb, kb, vb = sd[f"{src}attn.in_proj_bias"].chunk(3)
    names = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
              "layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2") if hf else
             ("attn.q", "attn.k", "attn.v", "attn.out", "ln_1", "ln_2", "mlp.0", "mlp.2"))
    for name, w, b in zip(names[:3], (q, k, v), (qb, kb, vb)):
        out[f"{dst}{name}.weight"], out[f"{dst}{name}.bias"] = w, b
    for name, theirs in zip(names[3:], ("attn.out_proj", "ln_1", "ln_2", "mlp.c_fc",
                                        "mlp.c_proj")):
        for p in ("weight", "bias"):
            out[f"{dst}{name}.{p}"] = sd[f"{src}{theirs}.{p}"]


def _pair(sd: dict, src: str, dst: str, out: dict) -> None:
    for p in ("weight", "bias"):
        out[f"{dst}.{p}"] = sd[f"{src}.{p}"]


def position_table(table_PD: torch.Tensor, grid: tuple[int, int], source: Path) -> torch.Tensor:
    """The vision position table for the patch grid: kept when it fits, else a square one
    interpolated bilinearly (align_corners False, [CLS] kept), as the authors' resize_pos_embed."""
    rows = 1 + grid[0] * grid[1]
    if table_PD.shape[0] == rows:
        return table_PD
    side = int(round((table_PD.shape[0] - 1) ** 0.5))
    if side * side != table_PD.shape[0] - 1:
        raise ValueError(f"{source}: visual.positional_embedding has {table_PD.shape[0]} rows, "
                         f"neither square nor the {grid[0]}x{grid[1]} grid of --image-size: "
                         "give the image size the checkpoint was trained at")
    g = table_PD[1:].float().reshape(1, side, side, -1).permute(0, 3, 1, 2)
    g = F.interpolate(g, size=grid, mode="bilinear", align_corners=False)
    return torch.cat([table_PD[:1].float(), g.permute(0, 2, 3, 1).reshape(rows - 1, -1)])


def backbone_tensors(sd: dict, arch: Arch, grid: tuple[int, int], source: Path) -> dict:
    """The CLIP's tensors under this project's names (`encoder.clip.` + transformers' CLIP)."""
    out = {"vision_model.embeddings.class_embedding": _need(sd, "visual.class_embedding", source, 1),
           "vision_model.embeddings.patch_embedding.weight": sd["visual.conv1.weight"],
           "vision_model.embeddings.position_embedding.weight":
               position_table(sd["visual.positional_embedding"], grid, source),
           "visual_projection.weight": sd["visual.proj"].t(),
           "text_model.embeddings.token_embedding.weight": sd["token_embedding.weight"],
           "text_model.embeddings.position_embedding.weight": sd["positional_embedding"],
           "text_projection.weight": sd["text_projection"].t(),
           "logit_scale": sd.get("logit_scale", torch.tensor(4.6052))}
    try:
        _pair(sd, "visual.ln_pre", "vision_model.pre_layrnorm", out)
        _pair(sd, "visual.ln_post", "vision_model.post_layernorm", out)
        _pair(sd, "ln_final", "text_model.final_layer_norm", out)
        for i in range(arch.vision_layers):
            _block(sd, f"visual.transformer.resblocks.{i}.", f"vision_model.encoder.layers.{i}.",
                   out, hf=True)
        for i in range(arch.text_layers):
            _block(sd, f"transformer.resblocks.{i}.", f"text_model.encoder.layers.{i}.", out,
                   hf=True)
    except KeyError as exc:
        raise ValueError(f"{source}: tensor {exc.args[0]} is missing") from None
    return {f"encoder.clip.{k}": v for k, v in out.items()}


def head_tensors(heads: dict, source: Path) -> tuple[dict, dict]:
    """IRRA's and RDE's heads under this project's names, and what the model config needs to
    hold them: {"id": classes, "cross_layers": n, "tse_dim": d} (only the heads present)."""
    out, found = {}, {}
    try:
        if "classifier.weight" in heads:
            _pair(heads, "classifier", "classifier", out)
            found["id"] = heads["classifier.weight"].shape[0]
        if "cross_attn.in_proj_weight" in heads:
            q, k, v = heads["cross_attn.in_proj_weight"].chunk(3)
            qb, kb, vb = heads["cross_attn.in_proj_bias"].chunk(3)
            for n, w, b in (("q", q, qb), ("k", k, kb), ("v", v, vb)):
                out[f"cross.cross.{n}.weight"], out[f"cross.cross.{n}.bias"] = w, b
            _pair(heads, "cross_attn.out_proj", "cross.cross.out", out)
            for theirs, ours in (("ln_pre_t", "ln_text"), ("ln_pre_i", "ln_image"),
                                 ("ln_post", "ln_post")):
                _pair(heads, theirs, f"cross.{ours}", out)
            n = len({k.split(".")[2] for k in heads
                     if k.startswith("cross_modal_transformer.resblocks.")})
            for i in range(n):
                _block(heads, f"cross_modal_transformer.resblocks.{i}.", f"cross.blocks.{i}.",
                       out, hf=False)
            found["cross_layers"] = n
        if "mlm_head.fc.weight" in heads:
            for theirs, ours in (("dense", "dense"), ("ln", "ln"), ("fc", "decoder")):
                _pair(heads, f"mlm_head.{theirs}", f"mlm_head.{ours}", out)
            found["mlm"] = True
        for theirs, ours, fc in (("visul_emb_layer", "tse_image", "fc"),
                                 ("texual_emb_layer", "tse_text", "linear")):
            if f"{theirs}.mlp.layers.0.weight" not in heads:
                continue
            _pair(heads, f"{theirs}.{fc}", f"{ours}.fc", out)
            _pair(heads, f"{theirs}.mlp.layers.0", f"{ours}.mlp.0", out)
            _pair(heads, f"{theirs}.mlp.layers.1", f"{ours}.mlp.3", out)
            for p in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
                out[f"{ours}.mlp.1.{p}"] = heads[f"{theirs}.mlp.bns.0.{p}"]
            found["tse_dim"] = heads[f"{theirs}.{fc}.weight"].shape[0]
    except KeyError as exc:
        raise ValueError(f"{source}: head tensor {exc.args[0]} is missing") from None
    if ("tse_image.fc.weight" in out) != ("tse_text.fc.weight" in out):
        raise ValueError(f"{source}: only one of RDE's two TSE layers (visul_emb_layer, "
                         "texual_emb_layer) is present")
    if ("cross_layers" in found) != ("mlm" in found):
        raise ValueError(f"{source}: IRRA's cross-modal encoder and mlm_head come together; "
                         "one of them is missing")
    return out, found


def grow_vocabulary(out: dict, arch: Arch, tokenizer: CaptionTokenizer, source: Path) -> None:
    """Fit the token embedding (and MLM decoder) to the tokenizer: equal, or one mask row
    appended, taken from the authors' mask row (vocabulary - 3)."""
    have, want = arch.vocab_size, tokenizer.vocab_size
    if want == have:
        return
    if want != have + 1 or tokenizer.mask_id != have:
        raise ValueError(f"{source}: token_embedding.weight has {have} rows but the tokenizer "
                         f"{tokenizer.source} has {want} tokens (mask id {tokenizer.mask_id}): "
                         "give the --tokenizer the checkpoint was trained with")
    authors_mask = have - 3
    for key in ("encoder.clip.text_model.embeddings.token_embedding.weight",
                "mlm_head.decoder.weight", "mlm_head.decoder.bias"):
        if key in out:
            out[key] = torch.cat([out[key], out[key][authors_mask: authors_mask + 1]])


def left_out(state: dict, prefix: str, used_backbone: set, used_heads: set) -> list[str]:
    return sorted(k for k in state if not (k.startswith(prefix) and k[len(prefix):] in
                                           used_backbone) and k not in used_heads)


# -- the folder ---------------------------------------------------------------------------------

def clip_config(arch: Arch, image_size, tokenizer, vision_heads: int, text_heads: int
                ) -> CLIPConfig:
    for what, width, heads in (("vision", arch.vision_width, vision_heads),
                               ("text", arch.text_width, text_heads)):
        if heads < 1 or width % heads:
            raise ValueError(f"--{what}-heads {heads} does not divide the {what} width {width}")
    return CLIPConfig(
        text_config=dict(vocab_size=tokenizer.vocab_size, hidden_size=arch.text_width,
                         intermediate_size=arch.text_mlp, num_hidden_layers=arch.text_layers,
                         num_attention_heads=text_heads, max_position_embeddings=arch.context_length,
                         hidden_act="quick_gelu", bos_token_id=tokenizer.sot_id,
                         eos_token_id=tokenizer.eot_id, pad_token_id=tokenizer.pad_id,
                         projection_dim=arch.embed_dim),
        vision_config=dict(hidden_size=arch.vision_width, intermediate_size=arch.vision_mlp,
                           num_hidden_layers=arch.vision_layers, num_attention_heads=vision_heads,
                           image_size=max(image_size), patch_size=arch.patch_size,
                           hidden_act="quick_gelu", projection_dim=arch.embed_dim),
        projection_dim=arch.embed_dim)


def run_config(arch: Arch, image_size, found: dict, vision_heads: int, text_heads: int):
    """The config written beside the weights: the model's sizes and the recipe whose heads the
    checkpoint holds (RDE with TSE; IRRA's terms for its heads; else SDM alone)."""
    h, w = image_size
    o = [f"model.image_size=[{h}, {w}]", f"model.patch_size={arch.patch_size}",
         f"model.vision_width={arch.vision_width}", f"model.vision_layers={arch.vision_layers}",
         f"model.vision_heads={vision_heads}", f"model.text_width={arch.text_width}",
         f"model.text_layers={arch.text_layers}", f"model.text_heads={text_heads}",
         f"model.embed_dim={arch.embed_dim}", f"model.context_length={arch.context_length}",
         "loss.tau_start=null"]
    if "tse_dim" in found:
        return load_config(None, ["method=rde", "recipe.weighting.kind=none",
                                  f"recipe.tse.dim={found['tse_dim']}", "loss.tau=0.015", *o])
    terms = ["{kind: sdm}"] + ["{kind: id}"] * ("id" in found) + ["{kind: mlm}"] * ("mlm" in found)
    if "cross_layers" in found:
        o += [f"model.cross_layers={found['cross_layers']}",
              f"model.cross_heads={max(1, arch.embed_dim // 64)}"]
    return load_config(None, ["method=irra", f"recipe.losses=[{', '.join(terms)}]", *o])


def convert(source: Path, out: Path, *, tokenizer: str, image_size=(384, 128),
            torchscript: bool = False, vision_heads: int | None = None,
            text_heads: int | None = None) -> dict:
    """Write the weights folder `out`; returns what was mapped and what was left out."""
    source, out = Path(source), Path(out)
    state = read_source(source, torchscript=torchscript)
    clip_sd, heads, prefix = split_backbone(state, source)
    arch = architecture(clip_sd, source)
    h, w = image_size
    if h % arch.patch_size or w % arch.patch_size:
        raise ValueError(f"--image-size {h} {w} is not a multiple of the patch size "
                         f"{arch.patch_size}")
    vision_heads = vision_heads or max(1, arch.vision_width // 64)
    text_heads = text_heads or max(1, arch.text_width // 64)
    tok = CaptionTokenizer.from_pretrained(tokenizer, context_length=arch.context_length)
    tensors = backbone_tensors(clip_sd, arch, (h // arch.patch_size, w // arch.patch_size), source)
    mapped_heads, found = head_tensors(heads, source)
    tensors.update(mapped_heads)
    grow_vocabulary(tensors, arch, tok, source)
    used = _used_backbone(arch)
    skipped = left_out(state, prefix, used, _used_heads(heads, found))
    cfg = run_config(arch, image_size, found, vision_heads, text_heads)
    save_weights(tensors, out, cfg, tok, clip_config(arch, image_size, tok, vision_heads,
                                                     text_heads),
                 extra={"converted_from": source.name}, num_classes=found.get("id", 0),
                 num_samples=0)
    return {"out": str(out), "prefix": prefix, "architecture": arch.__dict__,
            "heads": sorted(k for k in found if k != "cross_layers"),
            "tensors": len(tensors), "left_out": skipped}


def _used_backbone(arch: Arch) -> set[str]:
    top = {"visual.class_embedding", "visual.conv1.weight", "visual.positional_embedding",
           "visual.proj", "token_embedding.weight", "positional_embedding", "text_projection",
           "logit_scale"} | {f"{m}.{p}" for m in ("visual.ln_pre", "visual.ln_post", "ln_final")
                             for p in ("weight", "bias")}
    block = {"attn.in_proj_weight", "attn.in_proj_bias"} | {
        f"{m}.{p}" for m in ("attn.out_proj", "ln_1", "ln_2", "mlp.c_fc", "mlp.c_proj")
        for p in ("weight", "bias")}
    top |= {f"visual.transformer.resblocks.{i}.{b}" for i in range(arch.vision_layers)
            for b in block}
    return top | {f"transformer.resblocks.{i}.{b}" for i in range(arch.text_layers) for b in block}


def _used_heads(heads: dict, found: dict) -> set[str]:
    """The head tensors head_tensors read (by the prefixes it maps)."""
    used = set()
    rules = [("id", ("classifier.",)),
             ("cross_layers", ("cross_attn.", "ln_pre_t.", "ln_pre_i.", "ln_post.",
                               "cross_modal_transformer.")),
             ("mlm", ("mlm_head.",)),
             ("tse_dim", ("visul_emb_layer.fc.", "visul_emb_layer.mlp.layers.",
                          "visul_emb_layer.mlp.bns.0.", "texual_emb_layer.linear.",
                          "texual_emb_layer.mlp.layers.", "texual_emb_layer.mlp.bns.0."))]
    for key, prefixes in rules:
        if key in found:
            used |= {k for k in heads if k.startswith(prefixes)}
    return used


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="tbps convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="an OpenAI-format CLIP state dict, or IRRA's / RDE's best.pth")
    p.add_argument("--out", required=True, help="the weights folder to write")
    p.add_argument("--tokenizer", default="openai/clip-vit-base-patch16",
                   help="tokenizer folder or hub id saved with the weights (default: CLIP's BPE)")
    p.add_argument("--image-size", type=int, nargs=2, default=(384, 128), metavar=("H", "W"),
                   help="image height and width the model will see (default 384 128)")
    p.add_argument("--vision-heads", type=int, help="default: vision width / 64 (OpenAI's rule)")
    p.add_argument("--text-heads", type=int, help="default: text width / 64")
    p.add_argument("--torchscript", action="store_true",
                   help="accept a TorchScript archive (OpenAI's download); loading it runs the "
                        "code the file holds: only for files you trust")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    dist.quiet_third_party()

    def run() -> int:
        errors.check_output(args.out, {"source": args.source}, own_marker=MODEL_INFO)
        summary = convert(Path(args.source), Path(args.out), tokenizer=args.tokenizer,
                          image_size=tuple(args.image_size), torchscript=args.torchscript,
                          vision_heads=args.vision_heads, text_heads=args.text_heads)
        if summary["left_out"]:
            log.info("left out (no such module here): %s", ", ".join(summary["left_out"]))
        print(json.dumps(summary))
        return 0

    return errors.guard(run, on_stop="the folder may be incomplete; run it again")


if __name__ == "__main__":
    sys.exit(main())
