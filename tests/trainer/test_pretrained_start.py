"""model.pretrained accepts this project's own weights folders: a run's final/ or one of its
checkpoints is the start, tensor for tensor; a folder whose tensors do not fit is refused
naming them (exit 2), a checkpoint without its model's description told to use final/."""
import shutil

import torch
from safetensors.torch import load_file, save_file

from tbps.trainer.common.config_files import load_config
from tbps.trainer.common import dist
from tbps.trainer.model.weights import build_model, load_tokenizer, load_weights_folder
from tbps.trainer.running import checkpoint
from tbps.trainer.train import main
from tests.trainer.conftest import REPO, TINY_MODEL

CONFIG = str(REPO / "launch/configs/irra_synth.yaml")


def test_a_runs_final_weights_are_the_start_and_a_misfit_is_refused(tmp_path, tiny_shards,
                                                                    capsys):
    run = tmp_path / "run"
    common = ["--config", CONFIG, f"data.shards={tiny_shards}", *TINY_MODEL,
              "eval.select_split=none", "eval.final_split=none", "train.max_steps=2"]
    assert main([*common, f"train.output_dir={run}", "train.ckpt_every_steps=2"]) == 0
    final = run / "final"
    cfg = load_config(CONFIG, [f"data.shards={tiny_shards}", *TINY_MODEL,
                               f"model.pretrained={final}"])
    tok = load_tokenizer(cfg)
    _, _, trained = load_weights_folder(final)
    start = build_model(cfg, tok, trained.classifier.weight.shape[0], 320)
    want = trained.state_dict()
    for name, value in start.state_dict().items():
        if name != "sample_weight":
            assert torch.equal(value, want[name]), name
    assert main([*common, f"train.output_dir={tmp_path / 'again'}",
                 f"model.pretrained={final}"]) == 0
    capsys.readouterr()

    ckpt = checkpoint.newest(run)                  # the step-2 checkpoint: the same weights
    cfg = load_config(CONFIG, [f"data.shards={tiny_shards}", *TINY_MODEL,
                               f"model.pretrained={ckpt}"])
    start = build_model(cfg, load_tokenizer(cfg), trained.classifier.weight.shape[0], 320)
    saved = dist.checkpoint_model_state(ckpt)
    for name, value in start.state_dict().items():
        if name != "sample_weight":
            assert torch.equal(value, want[name]) and torch.equal(value, saved[name]), name

    for source in (final, ckpt):
        state = load_file(str(source / "model.safetensors"))
        del state["encoder.clip.text_projection.weight"]
        save_file(state, str(source / "model.safetensors"))
        code = main([*common, f"train.output_dir={tmp_path / 'bad'}",
                     f"model.pretrained={source}"])
        err = capsys.readouterr().err
        assert code == 2 and "encoder.clip.text_projection.weight" in err, source
        assert "Traceback" not in err
    (ckpt / "clip_config.json").unlink()             # as checkpoints were written before
    shutil.rmtree(ckpt / "tokenizer")
    code = main([*common, f"train.output_dir={tmp_path / 'old'}", f"model.pretrained={ckpt}"])
    err = capsys.readouterr().err
    assert code == 2 and "start from the run's best/ or final/" in err and "Traceback" not in err
