"""tbps convert: an OpenAI-format CLIP state dict (ViT-B/16's names, a small width) becomes a
weights folder whose model computes what the OpenAI layout computes (a plain forward of that
layout, written here, is the reference); IRRA's and RDE's checkpoints keep their heads; bad
files are refused in one line (exit 2)."""
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tbps.trainer.cli import main as tbps
from tbps.trainer.model.weights import load_weights_folder
from tbps.trainer.tools.convert import convert

sys.path.insert(0, str(Path(__file__).parents[2] / "launch" / "parity"))
import fixture  # noqa: E402 (the harness's OpenAI-layout builder, a script folder)

WIDTH, LAYERS, PATCH, SIDE, EMBED, CONTEXT = 128, 2, 16, 4, 64, 77


def clip_layout_tokenizer(folder, mask_last: bool = False):
    """The harness's word-level tokenizer in the authors' id layout (launch/parity/fixture.py)
    and its vocabulary size."""
    return fixture.tokenizer_folder(folder, mask_last), len(fixture.WORDS) + 4


def openai_state(vocab: int, seed: int = 0) -> dict:
    """A random CLIP state dict with OpenAI ViT-B/16's tensor names and layout, at this test's
    sizes (the parity harness's builder, launch/parity/fixture.py)."""
    return fixture.openai_state(seed, vocab=vocab, side=SIDE, embed=EMBED, scalars=True)


# -- the reference: OpenAI's layout, computed directly from the state dict ----------------------

def _ln(x, sd, name):
    return F.layer_norm(x, x.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"], 1e-5)


def _blocks(x_BTD, sd, tower, heads, causal):
    B, T, D = x_BTD.shape
    for i in range(LAYERS):
        p = f"{tower}.resblocks.{i}."
        h = _ln(x_BTD, sd, p + "ln_1")
        qkv = h @ sd[p + "attn.in_proj_weight"].T + sd[p + "attn.in_proj_bias"]
        q, k, v = (t.reshape(B, T, heads, D // heads).transpose(1, 2) for t in qkv.split(D, -1))
        scores = q @ k.transpose(-1, -2) / math.sqrt(D // heads)
        if causal:
            scores = scores + torch.full((T, T), float("-inf"), dtype=x_BTD.dtype).triu(1)
        a = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, D)
        x_BTD = x_BTD + a @ sd[p + "attn.out_proj.weight"].T + sd[p + "attn.out_proj.bias"]
        h = _ln(x_BTD, sd, p + "ln_2") @ sd[p + "mlp.c_fc.weight"].T + sd[p + "mlp.c_fc.bias"]
        h = h * torch.sigmoid(1.702 * h)
        x_BTD = x_BTD + h @ sd[p + "mlp.c_proj.weight"].T + sd[p + "mlp.c_proj.bias"]
    return x_BTD


def reference_image(sd, pixels):
    x = F.conv2d(pixels, sd["visual.conv1.weight"], stride=PATCH).flatten(2).transpose(1, 2)
    cls = sd["visual.class_embedding"].expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], 1) + sd["visual.positional_embedding"]
    x = _blocks(_ln(x, sd, "visual.ln_pre"), sd, "visual.transformer", WIDTH // 64, False)
    return _ln(x, sd, "visual.ln_post")[:, 0] @ sd["visual.proj"]


def reference_text(sd, ids):
    x = sd["token_embedding.weight"][ids] + sd["positional_embedding"]
    x = _ln(_blocks(x, sd, "transformer", WIDTH // 64, True), sd, "ln_final")
    return x[torch.arange(ids.shape[0]), ids.argmax(-1)] @ sd["text_projection"]


# -- tests ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return clip_layout_tokenizer(tmp_path_factory.mktemp("tok"))


def _ids(tok, vocab, n=3):
    g = torch.Generator().manual_seed(1)
    ids = torch.full((n, CONTEXT), vocab - 1, dtype=torch.long)       # padded with the end token
    for b, length in enumerate((5, 12, CONTEXT - 2)[:n]):
        ids[b, 0] = vocab - 2
        ids[b, 1:1 + length] = torch.randint(1, vocab - 3, (length,), generator=g)
    return ids


def test_converted_model_computes_the_openai_layout_forward(tmp_path, tokenizer):
    folder, vocab = tokenizer
    sd = openai_state(vocab)
    torch.save(sd, tmp_path / "clip.pt")
    summary = convert(tmp_path / "clip.pt", tmp_path / "w", tokenizer=str(folder),
                      image_size=(SIDE * PATCH, SIDE * PATCH))
    assert summary["left_out"] == ["context_length", "input_resolution", "vocab_size"]
    cfg, tok, model = load_weights_folder(tmp_path / "w")
    assert model.classifier is None and model.cross is None and model.tse_image is None
    model = model.double()
    sd64 = {k: v.double() for k, v in sd.items()}
    pixels = torch.randn(2, 3, SIDE * PATCH, SIDE * PATCH, dtype=torch.float64,
                         generator=torch.Generator().manual_seed(2))
    ids = _ids(tok, vocab)
    with torch.no_grad():
        img = model.encoder.encode_image(pixels, rows="none").embeds_BE
        txt = model.encoder.encode_text(ids, rows="none").embeds_BE
    torch.testing.assert_close(img, reference_image(sd64, pixels), rtol=0, atol=1e-10)
    torch.testing.assert_close(txt, reference_text(sd64, ids), rtol=0, atol=1e-10)


def test_a_non_square_image_size_interpolates_the_square_position_table(tmp_path, tokenizer):
    folder, vocab = tokenizer
    sd = openai_state(vocab)
    torch.save(sd, tmp_path / "clip.pt")
    convert(tmp_path / "clip.pt", tmp_path / "w", tokenizer=str(folder), image_size=(96, 32))
    _, _, model = load_weights_folder(tmp_path / "w")
    got = model.encoder.clip.vision_model.embeddings.position_embedding.weight
    grid = sd["visual.positional_embedding"][1:].reshape(SIDE, SIDE, WIDTH)
    # bilinear, align_corners False: 4 -> 2 columns averages neighbouring pairs; 4 -> 6 rows
    # samples at (i + 0.5) * 4/6 - 0.5, clamped at the edge
    cols = (grid[:, 0::2] + grid[:, 1::2]) / 2
    pos = ((torch.arange(6) + 0.5) * SIDE / 6 - 0.5).clamp(min=0)
    lo = pos.floor().long().clamp(max=SIDE - 1)
    hi = (lo + 1).clamp(max=SIDE - 1)
    frac = (pos - lo)[:, None, None]
    rows = cols[lo] * (1 - frac) + cols[hi] * frac
    assert got.shape == (1 + 6 * 2, WIDTH)
    torch.testing.assert_close(got[0], sd["visual.positional_embedding"][0])
    torch.testing.assert_close(got[1:], rows.reshape(12, WIDTH), rtol=1e-6, atol=1e-7)


def _irra_rde_heads(vocab, g):
    r = lambda *s: torch.randn(*s, generator=g) * 0.05                 # noqa: E731
    heads = {"classifier.weight": r(7, EMBED), "classifier.bias": r(7),
             "cross_attn.in_proj_weight": r(3 * EMBED, EMBED), "cross_attn.in_proj_bias": r(3 * EMBED),
             "cross_attn.out_proj.weight": r(EMBED, EMBED), "cross_attn.out_proj.bias": r(EMBED),
             "mlm_head.dense.weight": r(EMBED, EMBED), "mlm_head.dense.bias": r(EMBED),
             "mlm_head.fc.weight": r(vocab, EMBED), "mlm_head.fc.bias": r(vocab)}
    for ln in ("ln_pre_t", "ln_pre_i", "ln_post", "mlm_head.ln"):
        heads[f"{ln}.weight"], heads[f"{ln}.bias"] = 1 + r(EMBED), r(EMBED)
    block = openai_state(vocab, seed=5)
    for k, v in block.items():        # one cross-modal block: the text tower's block 0 resized
        if k.startswith("transformer.resblocks.0."):
            heads["cross_modal_transformer.resblocks.0." + k[len("transformer.resblocks.0."):]] = \
                r(*[EMBED * (n // WIDTH) if n >= WIDTH else n for n in v.shape])
    return heads


def test_an_irra_checkpoint_keeps_its_heads(tmp_path, tokenizer):
    folder, vocab = tokenizer
    g = torch.Generator().manual_seed(3)
    heads = _irra_rde_heads(vocab, g)
    state = {**{f"base_model.{k}": v.half() for k, v in openai_state(vocab).items()}, **heads}
    torch.save({"model": state, "epoch": 3}, tmp_path / "best.pth")
    summary = convert(tmp_path / "best.pth", tmp_path / "w", tokenizer=str(folder),
                      image_size=(SIDE * PATCH, SIDE * PATCH))
    assert summary["heads"] == ["id", "mlm"] and summary["prefix"] == "base_model."
    cfg, _, model = load_weights_folder(tmp_path / "w")
    assert [t.kind for t in cfg.recipe.losses] == ["sdm", "id", "mlm"]
    assert cfg.model.cross_layers == 1 and model.classifier.weight.shape == (7, EMBED)
    q, k, v = heads["cross_attn.in_proj_weight"].chunk(3)
    torch.testing.assert_close(model.cross.cross.k.weight, k)
    torch.testing.assert_close(model.cross.blocks[0].mlp[2].weight,
                               heads["cross_modal_transformer.resblocks.0.mlp.c_proj.weight"])
    torch.testing.assert_close(model.mlm_head.decoder.weight, heads["mlm_head.fc.weight"])
    torch.testing.assert_close(model.encoder.clip.text_projection.weight,
                               state["base_model.text_projection"].float().T)


def test_an_rde_checkpoint_maps_its_tse_layers_and_names_what_it_left_out(tmp_path, tokenizer):
    folder, vocab = tokenizer
    g = torch.Generator().manual_seed(4)
    r = lambda *s: torch.randn(*s, generator=g)                       # noqa: E731
    dim = 2 * EMBED
    state = {f"base_model.{k}": v for k, v in openai_state(vocab).items()}
    for layer, fc in (("visul_emb_layer", "fc"), ("texual_emb_layer", "linear")):
        for name, shape in ((fc, (dim, EMBED)), ("mlp.layers.0", (EMBED, EMBED)),
                            ("mlp.layers.1", (dim, EMBED))):
            state[f"{layer}.{name}.weight"], state[f"{layer}.{name}.bias"] = r(*shape), r(shape[0])
        for bn, n in (("mlp.bns.0", EMBED), ("mlp.bns.1", dim)):
            for p in ("weight", "bias", "running_mean"):
                state[f"{layer}.{bn}.{p}"] = r(n)
            state[f"{layer}.{bn}.running_var"] = r(n).abs() + 0.5
            state[f"{layer}.{bn}.num_batches_tracked"] = torch.tensor(9)
    state["visul_emb_layer.linear.weight"], state["visul_emb_layer.linear.bias"] = r(dim, EMBED), r(dim)
    torch.save({"model": state}, tmp_path / "best.pth")
    summary = convert(tmp_path / "best.pth", tmp_path / "w", tokenizer=str(folder),
                      image_size=(SIDE * PATCH, SIDE * PATCH))
    assert "visul_emb_layer.linear.weight" in summary["left_out"]
    assert "texual_emb_layer.mlp.bns.1.running_mean" in summary["left_out"]
    cfg, _, model = load_weights_folder(tmp_path / "w")
    assert cfg.recipe.branches == ("bge", "tse") and cfg.recipe.tse.dim == dim
    torch.testing.assert_close(model.tse_text.fc.weight, state["texual_emb_layer.linear.weight"])
    torch.testing.assert_close(model.tse_image.mlp[1].running_var,
                               state["visul_emb_layer.mlp.bns.0.running_var"])


def test_the_mask_row_a_tokenizer_appends_is_the_authors_mask_row(tmp_path, tokenizer):
    folder, vocab = clip_layout_tokenizer(tmp_path / "tok", mask_last=True)
    sd = openai_state(vocab - 1)             # the checkpoint's rows end at the end token
    torch.save(sd, tmp_path / "clip.pt")
    convert(tmp_path / "clip.pt", tmp_path / "w", tokenizer=str(folder),
            image_size=(SIDE * PATCH, SIDE * PATCH))
    _, tok, model = load_weights_folder(tmp_path / "w")
    rows = model.encoder.clip.text_model.embeddings.token_embedding.weight
    assert tok.mask_id == vocab - 1 and rows.shape[0] == vocab
    torch.testing.assert_close(rows[:-1], sd["token_embedding.weight"])
    torch.testing.assert_close(rows[-1], sd["token_embedding.weight"][vocab - 1 - 3])
    other, _ = tokenizer                     # mask inside the vocabulary: one row too few
    with pytest.raises(ValueError, match="token_embedding.weight has"):
        convert(tmp_path / "clip.pt", tmp_path / "w2", tokenizer=str(other),
                image_size=(SIDE * PATCH, SIDE * PATCH))


def _run(capsys, *argv):
    code = tbps(["convert", *map(str, argv)])
    return code, capsys.readouterr().err.strip()


def test_bad_files_are_refused_in_one_line(tmp_path, tokenizer, capsys):
    folder, vocab = tokenizer
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    code, err = _run(capsys, tmp_path / "junk.pt", "--out", tmp_path / "a", "--tokenizer", folder)
    assert code == 2 and "junk.pt is not a readable state dict" in err and "\n" not in err
    sd = openai_state(vocab)
    del sd["transformer.resblocks.1.mlp.c_fc.bias"]
    torch.save(sd, tmp_path / "cut.pt")
    code, err = _run(capsys, tmp_path / "cut.pt", "--out", tmp_path / "b", "--tokenizer", folder)
    assert code == 2 and "transformer.resblocks.1.mlp.c_fc.bias is missing" in err
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    code, err = _run(capsys, tmp_path / "other.pt", "--out", tmp_path / "c", "--tokenizer", folder)
    assert code == 2 and "no OpenAI-format CLIP" in err and "\n" not in err
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(tmp_path / "jit.pt"))
    code, err = _run(capsys, tmp_path / "jit.pt", "--out", tmp_path / "d", "--tokenizer", folder)
    assert code == 2 and "TorchScript archive" in err and "--torchscript" in err
    assert not any((tmp_path / n).exists() for n in "abcd")
