"""The AWM / AGM pictures from a weights folder: files written, the numbers behind them sound."""
import json
import math

import pytest
import torch


@pytest.fixture(scope="module")
def weights(tmp_path_factory, tiny_shards):
    from tbps.data_pipeline.manifest import read_meta
    from tbps.trainer.common.config_files import load_config
    from tbps.trainer.model.weights import build_model, load_tokenizer, save_weights
    from tests.trainer.conftest import REPO, TINY_MODEL

    cfg = load_config(REPO / "launch/configs/irra_synth.yaml",
                      [f"data.shards={tiny_shards}", "method=aga",
                       "recipe.image_tokens.kind=attention", *TINY_MODEL])
    tok, meta = load_tokenizer(cfg), read_meta(tiny_shards)
    torch.manual_seed(0)
    model = build_model(cfg, tok, meta["num_classes"], meta["splits"]["train"]["num_samples"])
    out = tmp_path_factory.mktemp("w") / "final"
    save_weights(model.state_dict(), out, cfg, tok, model.encoder.clip.config)
    return out


def test_pictures_of_a_weights_folder(tmp_path, weights):
    from tbps.trainer.tools.pictures import main

    assert main([str(weights), "--out", str(tmp_path), "--n", "3"]) == 0
    assert (tmp_path / "awm.png").stat().st_size > 10_000
    assert (tmp_path / "agm.png").stat().st_size > 10_000
    info = json.loads((tmp_path / "pictures.json").read_text())
    n_patches = len(info["awm"]["scores"][0])
    for kept in info["awm"]["kept"]:
        assert len(kept) == n_patches - math.floor(0.3 * n_patches) and kept == sorted(kept)
    for caption in info["agm"]["captions"]:
        k = math.ceil(0.15 * len(caption["words"]))
        assert sum(caption["mask_probability"]) == pytest.approx(k, abs=1e-3)  # k masked a draw
        assert sum(caption["masked_in_one_draw"]) == k and len(caption["tem"]) == len(caption["words"])


def test_pictures_refuse_a_missing_folder(tmp_path, capsys):
    from tbps.trainer.tools.pictures import main

    assert main([str(tmp_path / "nothing"), "--out", str(tmp_path / "o")]) == 2
    assert "not a weights folder" in capsys.readouterr().err
