"""Where DeepSpeed's ops are compiled: a folder per DeepSpeed (and torch, Python, CUDA) version,
since torch's default folder would load a build of another DeepSpeed after an upgrade."""
from tbps.trainer.common import dist


def test_each_deepspeed_version_builds_its_ops_apart(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(dist.metadata, "version", lambda name: "0.19.0")
    old = dist.deepspeed_build_dir()
    monkeypatch.setattr(dist.metadata, "version", lambda name: "0.19.8")
    new = dist.deepspeed_build_dir()
    assert old != new and new.startswith(str(tmp_path)) and "deepspeed0.19.8" in new
    assert dist.torch.__version__.split("+")[0] in new
