"""Bad input never ends in a traceback: every trainer command answers a missing or damaged file,
a wrong value or an impossible combination with one paragraph naming it and exit code 2, and
refuses to write into its own input."""
import json
import logging
import os
import shutil
import signal
import subprocess
import sys

import pytest

from tests.trainer.conftest import REPO, TINY_MODEL

LEGACY = REPO / "tests/trainer/data/legacy_weights/irra"
CONFIG = str(REPO / "launch/configs/irra_synth.yaml")


@pytest.fixture(autouse=True)
def _fresh_logging():
    """Each command sets up logging on the stderr of its own test (capsys swaps it)."""
    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers.clear()
    yield
    root.handlers[:] = saved


def _check(capsys, code, want: str):
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    last = err.rstrip("\n").split("\n")[-1]                 # one paragraph, said last
    assert last.startswith("error: ") and want in last, err


@pytest.fixture
def weights(tmp_path):
    folder = tmp_path / "best"
    shutil.copytree(LEGACY, folder)
    return folder


@pytest.mark.parametrize("args, want", [
    (["--config", "nope.yaml"], "config file nope.yaml does not exist"),
    (["--config", CONFIG, "train.epochs=0"], "invalid config field 'train.epochs': must be >= 1"),
    (["--config", CONFIG, "train.epoch=3"], "unknown config field 'train.epoch' (did you mean"),
    (["--config", CONFIG, "train.precision=fp8"], "invalid config field 'train.precision'"),
    (["--config", CONFIG, "recipe.enrich.kind=argmax", "recipe.losses=[{kind: sdm}]"],
     "text enrichment predicts words with the MLM head"),
    (["--config", CONFIG, "train.collective_timeout_s=0"], "train.collective_timeout_s"),
    (["--config", CONFIG, "data.shards=/nonexistent/shards"],
     "/nonexistent/shards/manifest.parquet does not exist"),
    (["--config", CONFIG, "--launch", "x.yaml"], "--launch and --gpu-memory go with --dry-run"),
    (["--dry-run", "--config", CONFIG, "--launch", "nope.yaml"],
     "--launch nope.yaml: no such accelerate config file"),
])
def test_train_refuses_bad_input(capsys, args, want):
    from tbps.trainer.train import main

    _check(capsys, main(args), want)
    # called in-process, it leaves no signal ignored (children would inherit that)
    assert signal.getsignal(signal.SIGUSR1) is not signal.SIG_IGN


def test_train_refuses_a_damaged_config_file(capsys, tmp_path):
    from tbps.trainer.train import main

    (tmp_path / "c.yaml").write_text("model: [1, 2\n")
    _check(capsys, main(["--config", str(tmp_path / "c.yaml")]), "is not valid YAML")


def test_train_never_writes_into_its_shards(capsys, tiny_shards):
    from tbps.trainer.train import main

    code = main(["--config", CONFIG, f"data.shards={tiny_shards}", *TINY_MODEL,
                 f"train.output_dir={tiny_shards / 'run'}"])
    _check(capsys, code, "overlap: a run must not write into its input")
    assert not (tiny_shards / "run").exists()


def test_train_resume_without_a_checkpoint(capsys, tiny_shards, tmp_path):
    from tbps.trainer.train import main

    code = main(["--config", CONFIG, f"data.shards={tiny_shards}", *TINY_MODEL,
                 f"train.output_dir={tmp_path / 'run'}", "train.resume=latest"])
    _check(capsys, code, "no complete checkpoint under")


def test_a_pretrained_folder_that_is_not_there_is_named(capsys, tiny_shards, tmp_path):
    from tbps.trainer.train import main

    code = main(["--config", CONFIG, f"data.shards={tiny_shards}", *TINY_MODEL,
                 f"train.output_dir={tmp_path / 'run'}",
                 f"model.pretrained={tmp_path / 'runs' / 'x' / 'final'}"])
    _check(capsys, code, "final: no such folder")
    assert not (tmp_path / "run").exists()


def _model_json(w, num_classes):
    (w / "model.json").write_text(json.dumps({"format": 3, "num_classes": num_classes,
                                              "num_samples": 0}))


def _clip_size(w, hidden):
    data = json.loads((w / "clip_config.json").read_text())
    data["vision_config"]["hidden_size"] = hidden
    (w / "clip_config.json").write_text(json.dumps(data))


def _reshaped_tensor(w):
    from safetensors.torch import load_file, save_file

    state = load_file(str(w / "model.safetensors"))
    key = "encoder.clip.text_projection.weight"
    state[key] = state[key][:, :-1].contiguous()
    save_file(state, str(w / "model.safetensors"))


@pytest.mark.parametrize("damage, want", [
    (lambda w: (w / "model.safetensors").write_bytes(b"\0" * 100), "model.safetensors cannot be read"),
    (lambda w: (w / "clip_config.json").write_text("{"), "clip_config.json is damaged"),
    (lambda w: (w / "model.json").write_text("{"), "model.json is damaged"),
    (lambda w: (w / "config.yaml").write_text("model: [1,"), "config.yaml is not valid YAML"),
    (lambda w: (w / "tokenizer" / "tokenizer.json").write_text("xx"), "could not load a tokenizer"),
    (lambda w: shutil.rmtree(w), "is not a weights folder: model.safetensors is missing"),
    (lambda w: _model_json(w, -5), "num_classes is -5, not a whole number"),
    (lambda w: _model_json(w, 1e13), "num_classes is 10000000000000.0, not a whole number"),
    (lambda w: _model_json(w, "many"), "num_classes is 'many', not a whole number"),
    (lambda w: _clip_size(w, 2**40), "vision_config.hidden_size is 1099511627776"),
    (lambda w: _reshaped_tensor(w), "tensors of another shape: encoder.clip.text_projection"),
], ids=["weights", "clip-config", "model-json", "config", "tokenizer", "missing",
        "classes-negative", "classes-huge", "classes-text", "hidden-huge", "tensor-shape"])
def test_evaluate_and_export_refuse_damaged_weights(capsys, weights, tmp_path, damage, want):
    from tbps.trainer.inference.evaluate import main as evaluate
    from tbps.trainer.inference.export import main as export

    damage(weights)
    _check(capsys, evaluate([str(weights)]), want)
    _check(capsys, export([str(weights), str(tmp_path / "hf")]), want)


def test_export_never_writes_over_its_input_or_foreign_files(capsys, weights, tmp_path):
    from tbps.trainer.inference.export import main as export

    before = (weights / "model.safetensors").read_bytes()
    _check(capsys, export([str(weights), str(weights)]), "overlaps the weights folder")
    _check(capsys, export([str(weights), str(weights / "hf")]), "overlaps the weights folder")
    assert (weights / "model.safetensors").read_bytes() == before
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    _check(capsys, export([str(weights), str(tmp_path / "mine")]), "did not write")


def test_a_run_that_fails_at_set_up_leaves_no_folder(capsys, tmp_path, tiny_shards):
    from tbps.trainer.train import main

    run = tmp_path / "run"
    code = main(["--config", CONFIG, f"data.shards={tiny_shards}", *TINY_MODEL,
                 f"train.output_dir={run}", "data.tokenizer=" + str(tmp_path / "no-tokenizer")])
    _check(capsys, code, "no-tokenizer")
    assert not run.exists()


def test_bench_and_search_refuse_bad_input(capsys, weights, tmp_path):
    from tbps.trainer.inference.search import main as search
    from tbps.trainer.tools.step_timing import phases_main as bench

    _check(capsys, bench(["--config", "nope.yaml"]), "config file nope.yaml does not exist")
    _check(capsys, bench(["--config", CONFIG, "--steps", "0"]), "--steps must be >= 1")
    _check(capsys, search(["query", str(tmp_path / "nope"), "a man"]), "is no search index")
    gallery = tmp_path / "gallery"
    gallery.mkdir()
    _check(capsys, search(["index", str(weights), str(gallery), "--out", str(gallery / "ix")]),
           "overlaps the gallery")


def test_quickstart_refuses_bad_input(tmp_path, tiny_shards):
    """A wrong override stops the quickstart at the training step with the trainer's paragraph
    and exit code 2 (the data steps are skipped: their outputs exist)."""
    data = tmp_path / "data"
    shutil.copytree(tiny_shards.parent / "data", data / "synth-t40")
    shutil.copytree(tiny_shards, data / "synth-t40-shards")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-m", "tbps.trainer.tools.quickstart", "--data", str(data),
                           "--out", str(tmp_path / "run"), "--train-ids", "40",
                           "train.epochs=zero"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "invalid config field 'train.epochs': expected int, got 'zero'" in proc.stderr
    assert "quickstart: training refused its input" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


@pytest.mark.slow
def test_bad_input_under_the_launcher_is_said_once(tmp_path, tiny_shards):
    """Under `tbps launch` with 2 ranks: the message once (rank 0), exit code 2,
    no launcher failure report."""
    from tests.trainer.conftest import launch

    proc = launch("cpu_ddp.yaml", tmp_path / "run", tiny_shards, "train.epochs=-1",
                  wait=False, wrapper=True)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2, out[-3000:]
    assert out.count("invalid config field 'train.epochs'") == 1
    assert "Traceback" not in out and "ChildFailedError" not in out
