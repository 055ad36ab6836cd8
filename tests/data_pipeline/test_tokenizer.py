import numpy as np
import pytest

from tbps.data_pipeline.tokenizer import (
    PROBE,
    PROBE_FILE,
    CaptionTokenizer,
    TokenizerError,
    train_word_level,
)

pytestmark = pytest.mark.smoke      # also in CI's newest-packages job (.ci/smoke)

CAPTIONS = [PROBE, "the man wears blue jeans and white shoes", "a man with a green bag"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_word_level(CAPTIONS * 3, tmp_path_factory.mktemp("tok"))


def test_frame_start_end_padding_and_mask(tok):
    ids = tok.encode("A man in Blue jeans!")
    assert ids.shape == (77,) and ids.dtype == np.int64
    assert ids[0] == tok.sot_id
    eos = int(np.argmax(ids == tok.eot_id))
    assert eos == 1 + 6                                      # a man in blue jeans !
    assert (ids[eos + 1:] == tok.pad_id).all()
    assert tok.mask_id not in (tok.sot_id, tok.eot_id, tok.pad_id)
    assert tok.decode(ids) == "a man in blue jeans <unk>"
    assert tok.eot_id != 2                                   # 2 selects transformers' legacy pooling


def test_truncation_keeps_end_token(tok):
    ids = tok.encode(" ".join(["man"] * 200))
    assert ids[-1] == tok.eot_id and (ids[1:-1] != tok.pad_id).all()
    assert np.array_equal(tok.encode_batch([PROBE, "a man"])[0], tok.encode(PROBE))


def test_saved_folder_reloads_identically(tok, tmp_path):
    tok.save(tmp_path)
    again = CaptionTokenizer.from_pretrained(tmp_path)
    assert again.vocab_size == tok.vocab_size
    assert np.array_equal(again.encode(PROBE), tok.encode(PROBE))


def test_offline_hub_trap_is_refused(monkeypatch):
    """Offline, CLIPTokenizer.from_pretrained(hub id) returns a 2-token tokenizer silently."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import CLIPTokenizer

    try:
        broken = CLIPTokenizer.from_pretrained("openai/clip-vit-base-patch16")
    except OSError:
        pytest.skip("this transformers version raises instead of returning a broken tokenizer")
    with pytest.raises(TokenizerError, match="looks broken"):
        CaptionTokenizer(broken)


def test_unknown_source_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TokenizerError, match="could not load a tokenizer"):
        CaptionTokenizer.from_pretrained(tmp_path / "nothing-here")


def test_a_trained_tokenizer_is_judged_by_its_own_captions(tmp_path):
    """A tiny non-English vocabulary fails the English sentence but passes its own captions."""
    captions = ["eine frau in einem roten mantel", "ein mann mit blauer hose", "一个穿红色外套的女人"]
    tok = train_word_level(captions * 2, tmp_path / "tok")
    assert tok.probe == sorted(captions)
    assert tok.unk_id not in tok.encode(captions[0])
    with pytest.raises(TokenizerError, match="unknown"):
        CaptionTokenizer(tok.hf)                               # judged by PROBE
    tok.save(tmp_path / "saved")                               # the probe travels with it
    assert CaptionTokenizer.from_pretrained(tmp_path / "saved").probe == tok.probe
    (tmp_path / "tok" / PROBE_FILE).write_text("[")
    with pytest.raises(TokenizerError, match="damaged"):
        CaptionTokenizer.from_pretrained(tmp_path / "tok")


def test_html_entities_read_as_their_characters(tok):
    """Annotations carry "&amp;" where "&" was meant; IRRA's and RDE's tokenizer unescapes them
    (launch/results/parity/data_path.md found the difference)."""
    want = tok.encode("the man & a green bag")
    assert (tok.encode("the man &amp; a green bag") == want).all()
    assert (tok.encode_batch(["the man &amp; a green bag"])[0] == want).all()
    raw = tok.hf("&amp;", add_special_tokens=False)["input_ids"]     # without unescaping
    assert len(raw) > len(tok.hf("&", add_special_tokens=False)["input_ids"])
