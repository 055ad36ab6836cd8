"""Checkpoints that fail to write or are damaged: the last good one stays usable and is found,
a damaged one is named and skipped, never half-loaded; the EMA is re-cut for another world size.
One process; the accelerate state is a stand-in writing the same kind of files."""
import errno
import hashlib
import io
import json
import os
import pickle
import random
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from tbps.trainer.common.errors import RankError
from tbps.trainer.running import checkpoint
from tbps.trainer.running.checkpoint import CheckpointError, TrainState


class FakeAcc:
    """The part of an Accelerator checkpoint.save/load use, writing the same kinds of files
    (safetensors, a torch pickle, the random states); fail_at names a file whose write fails
    with a full disk (after half of it is written)."""

    is_main_process = True

    def __init__(self, fail_at: str | None = None):
        self.fail_at, self.loaded = fail_at, None

    def save_state(self, folder):
        files = {"model.safetensors": save_safetensors({"w": WEIGHT}),
                 "optimizer.bin": _pickled({"state": {0: {"exp_avg": WEIGHT}}})}
        for name, data in files.items():
            path = f"{folder}/{name}"
            with open(path, "wb") as fh:
                if name == self.fail_at:
                    fh.write(data[: len(data) // 2])
                    raise OSError(errno.ENOSPC, "No space left on device", path)
                fh.write(data)
        torch.save({"python": 1, "torch": torch.get_rng_state()}, f"{folder}/random_states_0.pkl")
        os.makedirs(f"{folder}/pytorch_model")           # DeepSpeed's own, with its records
        from deepspeed.runtime.zero.config import ZeroStageEnum
        torch.save({"optimizer_state_dict": {"zero_stage": ZeroStageEnum(2), "exp_avg": WEIGHT}},
                   f"{folder}/pytorch_model/{DS_OPTIM}")

    def load_state(self, folder):
        model = load_safetensors(open(f"{folder}/model.safetensors", "rb").read())
        optim = torch.load(f"{folder}/optimizer.bin", weights_only=True)
        if not (torch.equal(model["w"], WEIGHT) and torch.equal(optim["state"][0]["exp_avg"],
                                                                 WEIGHT)):
            raise RuntimeError("unexpected values")
        self.loaded = folder


WEIGHT = torch.arange(1000, dtype=torch.float32)
DS_OPTIM = "zero_pp_rank_0_mp_rank_00_optim_states.pt"


def _pickled(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _save(run, step, acc=None, keep=3):
    return checkpoint.save(acc or FakeAcc(), run, TrainState(step=step, epoch=step // 10,
                                                            layout={"world_size": 1}), keep)


def test_a_failed_save_leaves_the_last_good_checkpoint(tmp_path):
    _save(tmp_path, 10)
    _save(tmp_path, 20)
    with pytest.raises(CheckpointError) as err:
        _save(tmp_path, 30, FakeAcc(fail_at="optimizer.bin"))
    msg = str(err.value)
    assert "step-00000030 failed" in msg and "no space left" in msg.lower()
    assert "step-00000020) is untouched" in msg and "train.resume=latest" in msg
    root = tmp_path / "checkpoints"
    assert (root / "latest").read_text() == "step-00000020"
    assert (root / "step-00000030.partial").is_dir()          # never taken for a checkpoint
    path, skipped = checkpoint.find(tmp_path, "latest")
    assert path.name == "step-00000020" and not skipped
    _save(tmp_path, 30)                                       # the next save cleans it up
    assert not (root / "step-00000030.partial").exists()
    assert checkpoint.find(tmp_path, "latest")[0].name == "step-00000030"


def test_a_killed_save_is_never_complete(tmp_path):
    _save(tmp_path, 10)
    partial = tmp_path / "checkpoints" / "step-00000020.partial"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half")       # killed before the rename
    assert checkpoint.find(tmp_path, "latest")[0].name == "step-00000010"


def test_a_damaged_newest_checkpoint_is_named_and_skipped(tmp_path):
    _save(tmp_path, 10)
    newest = _save(tmp_path, 20)
    with open(newest / "optimizer.bin", "r+b") as fh:           # truncated (a half copy)
        fh.truncate(100)
    path, skipped = checkpoint.find(tmp_path, "latest")
    assert path.name == "step-00000010"
    assert len(skipped) == 1 and "step-00000020 is damaged" in skipped[0]
    assert re.search(r"optimizer.bin has 100 bytes, \d+ were written", skipped[0])
    moved = checkpoint.set_aside(tmp_path, path)
    assert [m.name for m in moved] == ["step-00000020.damaged"]
    with pytest.raises(CheckpointError, match="optimizer.bin has 100 bytes"):
        checkpoint.find(tmp_path, str(moved[0]))               # named: refused, not skipped
    state, notes = checkpoint.load(FakeAcc(), path)
    assert state.step == 10 and notes == []


def test_damage_the_manifest_cannot_see_is_an_error_not_a_half_load(tmp_path):
    path = _save(tmp_path, 10)
    data = bytearray((path / "optimizer.bin").read_bytes())
    data[len(data) // 2] ^= 0xFF                               # same size, other values
    (path / "optimizer.bin").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="step-00000010 cannot be loaded.*damaged"):
        checkpoint.load(FakeAcc(), path)


def test_a_checkpoint_from_before_the_heads_moved_says_so(tmp_path):
    """Checkpoints of the layout where the heads lived under `recipe.`: a clear message."""
    path = _save(tmp_path, 10)

    class OldKeysAcc(FakeAcc):
        def load_state(self, folder):
            model = nn.ModuleDict({"classifier": nn.Linear(2, 2)})
            model.load_state_dict({"recipe.classifier.weight": torch.zeros(2, 2),
                                   "recipe.classifier.bias": torch.zeros(2)})

    with pytest.raises(CheckpointError, match="heads under `recipe.`.*resume it with that version"):
        checkpoint.load(OldKeysAcc(), path)


def test_the_random_generators_are_json_and_restored(tmp_path):
    path = _save(tmp_path, 10)
    assert not (path / "random_states_0.pkl").exists()     # accelerate's pickle replaced
    state = json.loads((path / "rng-rank00000.json").read_text())
    assert set(state) >= {"step", "python", "numpy", "torch"}
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    checkpoint.save(FakeAcc(), tmp_path, TrainState(step=20, layout={"world_size": 1}), 3)
    want = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    checkpoint.load(FakeAcc(), tmp_path / "checkpoints/step-00000020")
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[:2] == want[:2] and torch.equal(got[2], want[2])


@pytest.mark.parametrize("older", [False, True])
def test_a_truncated_random_state_is_not_ignored(tmp_path, older):
    path = _save(tmp_path, 10)
    (path / checkpoint.MANIFEST).unlink()                      # as written by older versions
    rng = path / "rng-rank00000.json"
    if older:                                                  # accelerate's pickle, as before
        rng.unlink()
        torch.save({"python": 1, "torch": torch.get_rng_state()}, path / "random_states_0.pkl")
        rng = path / "random_states_0.pkl"
    rng.write_bytes(rng.read_bytes()[:50])
    assert f"{rng.name} cannot be read" in checkpoint.verify(path)[0]
    with pytest.raises(RankError, match=f"{rng.name} cannot be read"):
        checkpoint.load(FakeAcc(), path)


def test_a_random_state_of_the_wrong_shape_is_named(tmp_path):
    path = _save(tmp_path, 10)
    state = json.loads((path / "rng-rank00000.json").read_text())
    state["numpy"][1] = state["numpy"][1][:10]
    (path / "rng-rank00000.json").write_text(json.dumps(state))
    with pytest.raises(RankError, match="field 'numpy' is missing or malformed"):
        checkpoint.load(FakeAcc(), path)


class _Payload:
    """A pickle that runs code when loaded: it would create the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


@pytest.mark.parametrize("name", ["random_states_0.pkl", "optimizer.bin",
                                  f"pytorch_model/{DS_OPTIM}", "ema-rank00000.pt"])
def test_a_crafted_pickle_is_never_run_and_the_previous_checkpoint_used(tmp_path, name):
    _save(tmp_path, 10)
    newest = _save(tmp_path, 20)
    marker = tmp_path / "ran"
    (newest / name).write_bytes(pickle.dumps(_Payload(marker), protocol=2))
    manifest = json.loads((newest / checkpoint.MANIFEST).read_text())   # made to match
    manifest["files"][name] = (newest / name).stat().st_size
    manifest["sha256"][name] = hashlib.sha256((newest / name).read_bytes()).hexdigest()
    (newest / checkpoint.MANIFEST).write_text(json.dumps(manifest))
    path, skipped = checkpoint.find(tmp_path, "latest")
    assert path.name == "step-00000010" and "holding code" in skipped[0]
    assert "makedirs" in skipped[0] and "weights_only" not in skipped[0]   # no unsafe advice
    with pytest.raises(CheckpointError, match=f"{name} cannot be read"):
        checkpoint.find(tmp_path, str(newest))
    (newest / checkpoint.MANIFEST).unlink()                     # an older layout: still read
    assert "holding code" in checkpoint.verify(newest)[0]
    assert not marker.exists()


def test_loads_that_ask_for_unpickling_get_the_restricted_loader(tmp_path):
    """DeepSpeed's checkpoint engine calls torch.load(weights_only=False): under
    weights_only_loads the payload is refused, DeepSpeed's own records still load."""
    from tbps.trainer.common import dist

    marker, crafted = tmp_path / "ran", tmp_path / "crafted.pt"
    crafted.write_bytes(pickle.dumps(_Payload(marker), protocol=2))
    _save(tmp_path, 10)
    real = torch.load
    with dist.weights_only_loads(deepspeed=True):
        with pytest.raises(pickle.UnpicklingError):
            torch.load(crafted, weights_only=False)
        ds = torch.load(tmp_path / f"checkpoints/step-00000010/pytorch_model/{DS_OPTIM}",
                        weights_only=False)
    assert int(ds["optimizer_state_dict"]["zero_stage"]) == 2 and not marker.exists()
    assert torch.load is real


def test_damage_in_place_is_seen_by_its_checksum(tmp_path):
    """Bytes changed inside tensor data (the size and the header intact) load without error;
    the manifest's SHA-256 names the file and the previous checkpoint is used."""
    _save(tmp_path, 10)
    newest = _save(tmp_path, 20)
    data = bytearray((newest / "model.safetensors").read_bytes())
    data[-64:] = bytes(b ^ 0xFF for b in data[-64:])
    (newest / "model.safetensors").write_bytes(bytes(data))
    path, skipped = checkpoint.find(tmp_path, "latest")
    assert path.name == "step-00000010" and "SHA-256 differs" in skipped[0]
    assert "model.safetensors" in skipped[0]


def test_same_size_damage_falls_back_to_the_previous_checkpoint(tmp_path):
    _save(tmp_path, 10)
    newest = _save(tmp_path, 20)
    (newest / checkpoint.MANIFEST).unlink()          # as written before manifests had digests
    data = bytearray((newest / "model.safetensors").read_bytes())
    data[8:16] = b"{broken!"                                   # the header, same size
    (newest / "model.safetensors").write_bytes(bytes(data))
    path, skipped = checkpoint.find(tmp_path, "latest")
    assert path.name == "step-00000010" and "model.safetensors cannot be read" in skipped[0]


def test_no_complete_checkpoint_says_what_to_do(tmp_path):
    with pytest.raises(CheckpointError, match="no complete checkpoint.*start the run afresh"):
        checkpoint.find(tmp_path, "latest")


def test_a_checkpoint_of_the_same_step_is_replaced_whole(tmp_path):
    _save(tmp_path, 10)
    path = _save(tmp_path, 10)                                 # a stop right after a save
    assert json.loads((path / checkpoint.STATE_FILE).read_text())["step"] == 10
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == \
        ["latest", "step-00000010"]


def test_pruning_keeps_the_newest(tmp_path):
    for step in (10, 20, 30, 40):
        _save(tmp_path, step, keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*")) == \
        ["step-00000030", "step-00000040"]


# -- the EMA on another world size --------------------------------------------------------


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(5, 7), nn.Linear(7, 3))
        self.head = nn.Linear(3, 2)


def _ema(model):
    from accelerate import Accelerator

    from tbps.trainer.running.ema import ShardedEMA

    return ShardedEMA(Accelerator(cpu=True), model, factory=Tiny, modules=("encoder",),
                      momentum=0.9)


def test_the_ema_is_recut_from_every_rank_fragments(tmp_path):
    torch.manual_seed(0)
    ema = _ema(Tiny())
    full = {n: torch.randn_like(p) for n, p in ema.params.items()}
    flat = torch.cat([v.view(-1) for v in full.values()])
    # the two states a 2-rank DDP run writes: the flattened parameters cut in two ranges
    states, half = [], -(-flat.numel() // 2)
    for rank in range(2):
        lo, hi, offset, frags, shadow = rank * half, min(flat.numel(), (rank + 1) * half), 0, [], []
        for name, v in full.items():
            a, b = max(lo, offset), min(hi, offset + v.numel())
            if a < b:
                frags.append((name, a - offset, b - a))
                shadow.append(v.view(-1)[a - offset: b - offset].clone())
            offset += v.numel()
        states.append({"kind": "flat", "world_size": 2, "modules": ("encoder",),
                       "fragments": frags, "shadow": shadow})
    assert not ema.same_layout(states[0])
    with pytest.raises(ValueError, match="load_state_dicts"):
        ema.load_state_dict(states[0])
    with pytest.raises(ValueError, match="an EMA file of some rank is missing"):
        ema.load_state_dicts(states[:1])
    ema.load_state_dicts(states)
    for name, value in ema.full_state_dict().items():
        torch.testing.assert_close(value, full[name])
    assert ema.same_layout(ema.state_dict())
    f = tmp_path / checkpoint.ema_file(0)                   # as a checkpoint holds it
    checkpoint._save_ema(ema.state_dict(), f)
    again = _ema(Tiny())
    again.load_state_dict(checkpoint._read_ema(f))
    for name, value in again.full_state_dict().items():
        torch.testing.assert_close(value, full[name], rtol=0, atol=0)
