"""Weights folders: model.json says what the model is; folders written before it still load."""
import json
from pathlib import Path

import pytest
import torch

from tbps.data_pipeline.transforms import normalize_images
from tbps.trainer.model.retrieval import embed
from tbps.trainer.model.weights import MODEL_INFO, load_weights_folder, save_weights

pytestmark = pytest.mark.smoke      # also in CI's newest-packages job (.ci/smoke)

LEGACY = Path(__file__).parent / "data" / "legacy_weights"


@pytest.mark.parametrize("name", ["irra", "rde"])
def test_a_folder_written_before_recipes_had_parts_loads_and_embeds_as_it_did(name):
    assert not (LEGACY / name / MODEL_INFO).exists()
    cfg, tok, model = load_weights_folder(LEGACY / name)
    inputs = torch.load(LEGACY / "inputs.pt")
    want = json.loads((LEGACY / "expected.json").read_text())[name]
    with torch.no_grad():
        img = model(embed, {"image": normalize_images(inputs["images_uint8"])}, "image")
        txt = model(embed, {"input_ids": inputs["input_ids"]}, "text")
    for got, expected in ((img, want["image"]), (txt, want["text"])):
        assert sorted(got) == sorted(expected)
        for branch, values in expected.items():
            torch.testing.assert_close(got[branch], torch.tensor(values), rtol=1e-5, atol=1e-6)
    if name == "rde":
        assert cfg.recipe.branches == ("bge", "tse") and cfg.recipe.weighting.kind == "consensus"
        assert model.sample_weight.tolist() == [1, 0, 1, 1, 0, 1, 1]
    else:
        assert [t.kind for t in cfg.recipe.losses] == ["sdm", "id", "mlm"]
        assert model.classifier.weight.shape[0] == 5


def test_a_new_folder_records_its_model_and_reloads(tmp_path):
    cfg, tok, model = load_weights_folder(LEGACY / "rde")
    save_weights(model.state_dict(), tmp_path / "w", cfg, tok, model.encoder.clip.config)
    info = json.loads((tmp_path / "w" / MODEL_INFO).read_text())
    assert info["num_samples"] == 7 and info["num_classes"] == 0
    assert info["branches"] == ["bge", "tse"] and info["terms"] == ["tal"]
    _, _, again = load_weights_folder(tmp_path / "w")
    for (n, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        torch.testing.assert_close(a, b, msg=n)


def test_a_format_2_folder_with_heads_under_recipe_loads(tmp_path):
    """Format 2 saved the heads and the pair weights under `recipe.`; they load as they were."""
    from safetensors.torch import load_file, save_file

    cfg, tok, model = load_weights_folder(LEGACY / "rde")
    save_weights(model.state_dict(), tmp_path / "w", cfg, tok, model.encoder.clip.config)
    weights = tmp_path / "w" / "model.safetensors"
    state = {(k if k.startswith("encoder.") else f"recipe.{k}"): v
             for k, v in load_file(str(weights)).items()}
    assert "recipe.sample_weight" in state and "recipe.tse_image.fc.weight" in state
    save_file(state, str(weights))
    info = json.loads((tmp_path / "w" / MODEL_INFO).read_text())
    (tmp_path / "w" / MODEL_INFO).write_text(json.dumps({**info, "format": 2}))
    _, _, again = load_weights_folder(tmp_path / "w")
    for (n, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        torch.testing.assert_close(a, b, msg=n)


def test_a_damaged_or_incomplete_folder_is_named(tmp_path):
    cfg, tok, model = load_weights_folder(LEGACY / "irra")
    save_weights(model.state_dict(), tmp_path / "w", cfg, tok, model.encoder.clip.config)
    data = (tmp_path / "w" / "model.safetensors").read_bytes()
    (tmp_path / "w" / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors cannot be read"):
        load_weights_folder(tmp_path / "w")
    (tmp_path / "w" / "clip_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="clip_config.json is missing"):
        load_weights_folder(tmp_path / "w")
