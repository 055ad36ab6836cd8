import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, CLIPModel

from tbps.data_pipeline.tokenizer import PROBE, CaptionTokenizer, train_word_level
from tbps.trainer.common.config import ModelConfig
from tbps.trainer.common.config_files import load_config
from tbps.trainer.inference.export import export_hf
from tbps.trainer.model.encoder import DualEncoder
from tbps.trainer.model.weights import load_weights_folder, save_weights

pytestmark = pytest.mark.smoke      # also in CI's newest-packages job (.ci/smoke)

CAPTIONS = [PROBE, "the man wears blue jeans and white shoes", "a man with a green bag"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_word_level(CAPTIONS * 3, tmp_path_factory.mktemp("tok"))


def _encoder(tok, image_size=(32, 32)):
    torch.manual_seed(0)
    cfg = ModelConfig(image_size=image_size, vision_width=64, vision_layers=2, vision_heads=4,
                      text_width=64, text_layers=2, text_heads=4, embed_dim=32)
    return DualEncoder.from_config(cfg, vocab_size=tok.vocab_size, sot_id=tok.sot_id,
                                   eot_id=tok.eot_id, pad_id=tok.pad_id).eval()


def _ids(tok):
    return torch.from_numpy(tok.encode_batch(CAPTIONS + ["a woman"]))


def test_square_image_and_text_match_transformers_and_attention_rows(tok):
    enc = _encoder(tok)
    pixels, ids = torch.randn(4, 3, 32, 32), _ids(tok)
    with torch.no_grad():
        img, txt = enc.encode_image(pixels), enc.encode_text(ids)
        clip = enc.clip
        clip.config._attn_implementation = "eager"
        clip.vision_model.config._attn_implementation = "eager"
        clip.text_model.config._attn_implementation = "eager"
        v = clip.vision_model(pixel_values=pixels, output_attentions=True)
        t = clip.text_model(input_ids=txt.input_ids_BL, output_attentions=True)
    torch.testing.assert_close(img.embeds_BE, clip.visual_projection(v.pooler_output))
    torch.testing.assert_close(txt.embeds_BE, clip.text_projection(t.pooler_output))
    # the one-row attention equals the row of the full (head-averaged) last-layer map
    torch.testing.assert_close(img.attn_BK, v.attentions[-1].mean(1)[:, 0, 1:])
    rows = t.attentions[-1].mean(1)[torch.arange(4), txt.eos_B]
    torch.testing.assert_close(txt.attn_BL, rows)
    assert txt.eos_B.tolist() == [int(np.argmax(r == tok.eot_id)) for r in ids.numpy()]
    assert txt.tokens_BLE.shape[1] == int(txt.eos_B.max()) + 1          # cut to the longest


def test_attention_rows_of_every_layer_equal_the_full_maps(tok):
    """rows="all": each layer's CLS / EOS row (head-averaged) against transformers' full maps;
    the last one is the row rows="last" gives; nothing changes the features."""
    enc = _encoder(tok)
    pixels, ids = torch.randn(4, 3, 32, 32), _ids(tok)
    with torch.no_grad():
        img, txt = enc.encode_image(pixels, rows="all"), enc.encode_text(ids, rows="all")
        img1, txt1 = enc.encode_image(pixels), enc.encode_text(ids, rows="none")
        clip = enc.clip
        for m in (clip, clip.vision_model, clip.text_model):
            m.config._attn_implementation = "eager"
        v = clip.vision_model(pixel_values=pixels, output_attentions=True)
        t = clip.text_model(input_ids=txt.input_ids_BL, output_attentions=True)
    layers = len(v.attentions)
    assert img.attn_rows_BlK.shape == (4, layers, 16) and txt.attn_rows_BlL.shape[1] == layers
    for layer in range(layers):
        torch.testing.assert_close(img.attn_rows_BlK[:, layer], v.attentions[layer].mean(1)[:, 0, 1:])
        torch.testing.assert_close(txt.attn_rows_BlL[:, layer],
                                   t.attentions[layer].mean(1)[torch.arange(4), txt.eos_B])
    torch.testing.assert_close(img.attn_rows_BlK[:, -1], img1.attn_BK)
    torch.testing.assert_close(img.tokens_BTE, img1.tokens_BTE)
    assert txt1.attn_BL is None and txt1.attn_rows_BlL is None
    torch.testing.assert_close(txt.tokens_BLE, txt1.tokens_BLE)
    # a length known on the host gives the same features without reading it from the device
    again = enc.encode_text(ids, rows="none", length=txt.input_ids_BL.shape[1])
    torch.testing.assert_close(again.embeds_BE, txt1.embeds_BE)


def test_non_square_grid_and_token_dropping(tok):
    enc = _encoder(tok, image_size=(64, 32))
    assert enc.grid_hw == (8, 4)
    pixels = torch.randn(3, 3, 64, 32)
    with torch.no_grad():
        full = enc.encode_image(pixels)
        perm = torch.stack([torch.randperm(32) for _ in range(3)])
        shuffled = enc.encode_image(pixels, keep_BK=perm)   # all tokens, any order: same CLS
        some = enc.encode_image(pixels, keep_BK=perm[:, :10])
    assert full.tokens_BTE.shape == (3, 33, 32) and full.attn_BK.shape == (3, 32)
    torch.testing.assert_close(shuffled.embeds_BE, full.embeds_BE, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shuffled.attn_BK, torch.gather(full.attn_BK, 1, perm))
    assert some.tokens_BTE.shape == (3, 11, 32)
    assert bool((some.attn_BK.sum(1) < 1).all())          # the rest is CLS's own share
    with pytest.raises(ValueError, match="patch grid"):
        enc.encode_image(torch.randn(1, 3, 32, 32))


def test_pretrained_folder_interpolates_grid_and_grows_vocab(tok, tmp_path):
    square = _encoder(tok)                        # 4x4 grid, "pretrained" with square images
    folder = tmp_path / "pretrained"
    clip = square.clip
    clip.save_pretrained(folder)
    cfg = ModelConfig(image_size=(64, 32), patch_size=8)
    enc = DualEncoder.from_pretrained(str(folder), cfg, vocab_size=tok.vocab_size + 3,
                                      eot_id=tok.eot_id)
    assert enc.grid_hw == (8, 4)
    old = clip.vision_model.embeddings.position_embedding.weight
    new = enc.clip.vision_model.embeddings.position_embedding.weight
    assert new.shape == (33, old.shape[1])
    torch.testing.assert_close(new[0], old[0])
    grid = old[1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    want = F.interpolate(grid, size=(8, 4), mode="bilinear", align_corners=False)
    torch.testing.assert_close(new[1:], want.permute(0, 2, 3, 1).reshape(32, -1))
    emb = enc.clip.text_model.embeddings.token_embedding.weight
    assert emb.shape[0] == tok.vocab_size + 3
    torch.testing.assert_close(emb[: tok.vocab_size],
                               clip.text_model.embeddings.token_embedding.weight)
    with pytest.raises(FileNotFoundError, match="could not load CLIP weights"):
        DualEncoder.from_pretrained(str(tmp_path / "missing"), cfg, vocab_size=10, eot_id=4)


def test_pretrained_table_that_fits_the_grid_is_used_as_it_is(tok, tmp_path):
    trained = _encoder(tok, image_size=(96, 32))                  # 12 x 4 grid, 49 positions
    trained.clip.save_pretrained(tmp_path / "plain")              # transformers cannot hold it
    cfg = ModelConfig(image_size=(96, 32), patch_size=8)
    enc = DualEncoder.from_pretrained(str(tmp_path / "plain"), cfg, vocab_size=tok.vocab_size,
                                      eot_id=tok.eot_id).eval()
    want = trained.clip.vision_model.embeddings.position_embedding.weight
    assert torch.equal(enc.clip.vision_model.embeddings.position_embedding.weight, want)
    pixels = torch.randn(2, 3, 96, 32)
    with torch.no_grad():
        torch.testing.assert_close(enc.encode_image(pixels).embeds_BE,
                                   trained.encode_image(pixels).embeds_BE, rtol=0, atol=0)


def test_export_of_a_non_square_grid_loads_back_exactly(tok, tmp_path):
    """The export writes the 12 x 4 grid into a 12 x 12 table (columns 1, 4, 7, 10); loading it
    as model.pretrained gives the trained table back bit for bit, and so does the bilinear
    resampling the loader uses for other square tables."""
    from tbps.trainer.model.weights import build_model

    cfg = load_config(None, ["model.image_size=[96, 32]", "model.vision_width=64",
                             "model.text_width=64", "model.embed_dim=32", "model.vision_layers=2",
                             "model.text_layers=2", "recipe.losses=[{kind: itc, alpha: 0}]"])
    torch.manual_seed(2)
    model = build_model(cfg, tok, num_classes=0, num_samples=10).eval()
    save_weights(model.state_dict(), tmp_path / "w", cfg, tok, model.encoder.clip.config)
    assert export_hf(tmp_path / "w", tmp_path / "hf")["exact_position_grid"]
    tok_back = CaptionTokenizer.from_pretrained(tmp_path / "hf")
    enc = DualEncoder.from_pretrained(str(tmp_path / "hf"), cfg.model,
                                      vocab_size=tok_back.vocab_size, eot_id=tok_back.eot_id)
    want = model.encoder.clip.vision_model.embeddings.position_embedding.weight
    assert torch.equal(enc.clip.vision_model.embeddings.position_embedding.weight, want)
    square = CLIPModel.from_pretrained(tmp_path / "hf").vision_model.embeddings
    assert square.position_embedding.weight.shape[0] == 1 + 12 * 12
    from tbps.trainer.model.encoder import _grid_table
    assert torch.equal(_grid_table(square.position_embedding.weight.data, (12, 4)).weight, want)
    pixels, ids = torch.randn(2, 3, 96, 32), _ids(tok)
    with torch.no_grad():
        torch.testing.assert_close(enc.eval().encode_image(pixels).embeds_BE,
                                   model.encoder.encode_image(pixels).embeds_BE, rtol=0, atol=0)
        torch.testing.assert_close(enc.encode_text(ids).embeds_BE,
                                   model.encoder.encode_text(ids).embeds_BE, rtol=0, atol=0)


def test_export_loads_with_transformers_alone_and_gives_the_same_embeddings(tok, tmp_path):
    from tbps.trainer.model.weights import build_model

    cfg = load_config(None, ["model.image_size=[96, 32]", "model.vision_width=64",
                             "model.text_width=64", "model.embed_dim=32", "model.vision_layers=2",
                             "model.text_layers=2",
                             "recipe.losses=[{kind: sdm}, {kind: id}]"])
    torch.manual_seed(1)
    model = build_model(cfg, tok, num_classes=5, num_samples=10).eval()
    save_weights(model.state_dict(), tmp_path / "w", cfg, tok, model.encoder.clip.config)
    info = export_hf(tmp_path / "w", tmp_path / "hf")
    assert info["exact_position_grid"]
    hf = CLIPModel.from_pretrained(tmp_path / "hf").eval()
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    pixels = torch.randn(2, 3, 96, 32)
    ids = torch.from_numpy(CaptionTokenizer(hf_tok).encode_batch(CAPTIONS[:2]))
    with torch.no_grad():
        ours_img = model.encoder.encode_image(pixels).embeds_BE
        ours_txt = model.encoder.encode_text(ids).embeds_BE
        theirs_img = hf.get_image_features(pixel_values=pixels, interpolate_pos_encoding=True)
        theirs_txt = hf.get_text_features(input_ids=ids)
    theirs_img = getattr(theirs_img, "pooler_output", theirs_img)
    theirs_txt = getattr(theirs_txt, "pooler_output", theirs_txt)
    torch.testing.assert_close(theirs_img, ours_img, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(theirs_txt, ours_txt, atol=1e-5, rtol=1e-4)
    # the weights folder itself reloads to the same model
    _, _, again = load_weights_folder(tmp_path / "w")
    with torch.no_grad():
        torch.testing.assert_close(again.encoder.encode_image(pixels).embeds_BE, ours_img)
