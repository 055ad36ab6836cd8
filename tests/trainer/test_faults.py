"""Faults on 2 CPU processes: a stop requested through the launcher (SIGUSR1, SIGTERM) and the
resume that continues it exactly; SIGUSR1 to a bare `accelerate launch`; a killed and a stuck
rank; a resume on one rank from a two-rank checkpoint; two machines over loopback; a loss that
is not finite."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch

from tbps.trainer.running import checkpoint
from tests.trainer.conftest import EMA, EPOCHS, REPO, TINY_MODEL, launch, step_losses

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def _events(run, kind):
    return [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()
            if json.loads(x)["event"] == kind]


def _wait_for(run, kind, proc, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if (run / "log.jsonl").exists() and _events(run, kind):
            return True
        time.sleep(0.05)
    return False


def _processes_of(run) -> list[psutil.Process]:
    """Processes still running for this run (its output folder is on their command line)."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(str(run) in a for a in (p.info["cmdline"] or [])):
                found.append(p)
        except psutil.Error:
            pass
    return found


def _no_orphans(run, within=10.0):
    deadline = time.time() + within
    while _processes_of(run) and time.time() < deadline:
        time.sleep(0.2)
    left = _processes_of(run)
    for p in left:                                   # clean up before failing
        p.kill()
    assert not left, [p.info["cmdline"] for p in left]


@pytest.fixture(scope="module")
def stopped(tmp_path_factory, tiny_shards):
    """A 2-rank run through tbps.trainer.launch, logging only every 1000 steps, sent SIGUSR1 just
    after the first epoch's evaluation (step 10); a copy of its folder right after the stop."""
    run = tmp_path_factory.mktemp("stopped") / "run"
    proc = launch("cpu_ddp.yaml", run, tiny_shards, *EPOCHS, *EMA,
                  "train.log_every_steps=1000", wait=False, wrapper=True)
    assert _wait_for(run, "eval", proc), proc.communicate()[0][-3000:]
    proc.send_signal(signal.SIGUSR1)                 # what a scheduler sends the job
    out, _ = proc.communicate(timeout=300)
    copy = run.parent / "copy"
    shutil.copytree(run, copy)
    return run, copy, proc.returncode, out


def test_usr1_to_the_launcher_stops_every_rank_within_two_steps(stopped):
    run, _, code, out = stopped
    assert code == 3, out[-3000:]
    state = json.loads((checkpoint.find(run, "latest")[0] / checkpoint.STATE_FILE).read_text())
    # the request reached the ranks at step 10 or a step later; the flag is agreed on one step
    # after it is raised, whatever train.log_every_steps (1000 here)
    assert 10 <= state["step"] <= 13, state["step"]
    assert "stopped on request at step" in out and "train.resume=latest" in out
    assert "Traceback" not in out and "ChildFailedError" not in out
    assert state["history"] == [{"epoch": 1, "split": "val", "R1": state["best_score"]}]
    _no_orphans(run)


def test_the_resume_equals_the_uninterrupted_run(stopped, tiny_shards, ddp_run):
    run, _, _, _ = stopped
    stop = _events(run, "stopped")[0]["step"]
    launch("cpu_ddp.yaml", run, tiny_shards, *EPOCHS, *EMA, "train.resume=latest",
           wrapper=True)
    resumed, full = step_losses(run), step_losses(ddp_run)
    assert sorted(resumed) == list(range(stop + 1, 21))
    for step in resumed:
        assert resumed[step] == pytest.approx(full[step], rel=1e-5, abs=1e-6), step
    a, b = (json.loads((r / "metrics.json").read_text()) for r in (run, ddp_run))
    assert a["best_epoch"] == b["best_epoch"] and a["history"] == b["history"]
    for key in ("best", "final"):
        assert a[key]["t2i"] == pytest.approx(b[key]["t2i"], abs=1e-6), key
    for rank in range(2):                            # the EMA continued too
        x, y = (checkpoint._read_ema(checkpoint.find(r, "latest")[0] / checkpoint.ema_file(rank))
                for r in (run, ddp_run))
        assert x["fragments"] == y["fragments"]
        for u, v in zip(x["shadow"], y["shadow"]):
            torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-7)


def test_a_two_rank_checkpoint_resumes_on_one_rank(stopped, tiny_shards):
    _, copy, _, _ = stopped
    state = json.loads((checkpoint.find(copy, "latest")[0] / checkpoint.STATE_FILE).read_text())
    launch("cpu_ddp.yaml", copy, tiny_shards, *EPOCHS, *EMA, "train.resume=latest",
           processes=1, wrapper=True)
    notes = " | ".join(_events(copy, "resumed")[0]["notes"])
    # the global batch is the config's on any number of ranks: the same steps an epoch
    assert "written by 2 rank(s)" in notes and "this run has 1 x 32 x 1" in notes
    assert f"step {state['step']} -> {state['step']}" in notes
    assert "re-cut for this run's 1 rank(s)" in notes
    # the learning rate continues where the 2-rank run left it (no jump)
    steps = _events(copy, "step")
    first = steps[0]
    assert first["step"] == state["step"] + 1
    layout = state["layout"]
    from tbps.trainer.common.config_files import load_config
    from tbps.trainer.running.resume import lr_at as _lr_at

    cfg = load_config(REPO / "launch/configs/irra_synth.yaml", TINY_MODEL)
    before = cfg.optim.lr * _lr_at(cfg, layout, state["step"])
    assert first["lr"] == pytest.approx(before, rel=0.15)
    assert steps[-1]["step"] == 20 and (copy / "metrics.json").is_file()


def test_term_to_the_launcher_stops_with_exit_code_3(tmp_path, tiny_shards):
    run = tmp_path / "run"
    proc = launch("cpu_ddp.yaml", run, tiny_shards, *EPOCHS, wait=False, wrapper=True)
    assert _wait_for(run, "step", proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 3 and "stopped on request" in out, out[-3000:]
    assert checkpoint.find(run, "latest")[0].name == f"step-{_events(run, 'stopped')[0]['step']:08d}"
    _no_orphans(run)


def test_usr1_to_a_bare_accelerate_launch_leaves_no_rank_training(tmp_path, tiny_shards):
    """accelerate launch itself dies of SIGUSR1; its ranks hear it (a stop request when their
    parent dies), checkpoint and end instead of training on unattended."""
    run = tmp_path / "run"
    proc = launch("cpu_ddp.yaml", run, tiny_shards, *EPOCHS, wait=False)
    assert _wait_for(run, "step", proc)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=60)
    _no_orphans(run, within=60)
    assert _events(run, "stopped"), out[-3000:]
    assert not (run / "metrics.json").exists()


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "stuck"])
def test_a_dead_or_stuck_rank_ends_the_run(tmp_path, tiny_shards, sig):
    timeout = 10
    run = tmp_path / "run"
    proc = launch("cpu_ddp.yaml", run, tiny_shards, *EPOCHS, "train.epochs=4",
                  f"train.collective_timeout_s={timeout}", wait=False, wrapper=True)
    assert _wait_for(run, "step", proc)
    launcher = psutil.Process(proc.pid).children()[0]
    rank1 = max(launcher.children(), key=lambda p: p.pid)
    t0 = time.time()
    os.kill(rank1.pid, sig)
    out, _ = proc.communicate(timeout=120)
    took = time.time() - t0
    assert proc.returncode == 1, out[-3000:]
    assert "error on rank 0: a collective operation failed" in out
    assert "train.collective_timeout_s" in out and "train.resume=latest" in out
    # killed: seen at once; stuck: after the timeout, then the wrapper ends what is left
    assert took < (15 if sig == signal.SIGKILL else timeout + 25), took
    _no_orphans(run)


def test_two_machines_over_loopback_train_like_one(tmp_path, tiny_shards, ddp_run):
    """launch/multinode.sh on 'two machines' (machine ranks 0 and 1, one process each) over
    127.0.0.1 gives the losses of one 2-process launch."""
    from tests.distributed import free_port

    run = tmp_path / "run"
    path = f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ.get('PATH', '')}"
    env = dict(os.environ, NNODES="2", GPUS_PER_NODE="1", MASTER_ADDR="127.0.0.1", PATH=path,
               MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               ACCELERATE_CONFIG=str(REPO / "launch/accelerate/cpu_ddp.yaml"))
    env.pop("TRITON_INTERPRET", None)
    args = ["--config", str(REPO / "launch/configs/irra_synth.yaml"), f"data.shards={tiny_shards}",
            f"train.output_dir={run}", *TINY_MODEL, *EPOCHS, *EMA]
    nodes = [subprocess.Popen(["bash", str(REPO / "launch/multinode.sh"), *args], cwd=REPO,
                              env={**env, "NODE_RANK": str(rank)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    outs = [n.communicate(timeout=600)[0] for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    two, one = step_losses(run), step_losses(ddp_run)
    assert sorted(two) == sorted(one)
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-5, abs=1e-6), step


def test_a_non_finite_loss_skips_the_step_and_k_in_a_row_stop(tmp_path, tiny_shards,
                                                             monkeypatch):
    """One process, precision auto on a (mocked) CPU without bf16: fp32. Steps 3, 5, 6 and 7
    get a NaN loss: step 3 is skipped (weights and Adam's state untouched) and the run goes on;
    5-7 are three in a row, which stops it."""
    from tbps.trainer.common.config_files import load_config
    from tbps.trainer.running import precision
    from tbps.trainer.train import Run

    monkeypatch.setattr(precision, "cpu_bf16", lambda: (False, "a CPU without bf16 (mocked)"))
    cfg = load_config(REPO / "launch/configs/irra_synth.yaml", [
        f"data.shards={tiny_shards}", f"train.output_dir={tmp_path / 'run'}", *TINY_MODEL,
        "train.precision=auto", "train.max_nonfinite_steps=3", "eval.select_split=none"])
    run = Run(cfg)
    assert cfg.train.precision == "fp32"
    poison = {3, 5, 6, 7}
    forward, step_fn = run.model.forward, run.train_step
    seen = {}

    def poisoned(entry, *args):
        out = forward(entry, *args)
        if entry == run.recipe.train_losses and run.state.step + 1 in poison:
            out = {**out, "loss": out["loss"] * float("nan")}
        return out

    def watched(batch, mark=None):
        before = [p.detach().clone() for p in run.model.parameters()]
        moments = [v.clone() for s in run.optimizer.state.values() for v in s.values()]
        result = step_fn(batch, mark)
        seen[run.state.step + 1] = (before, moments, result[3])
        return result

    run.model.forward, run.train_step = poisoned, watched
    with pytest.raises(FloatingPointError, match="not finite in 3 steps in a row"):
        run.fit()
    assert [seen[s][2] for s in sorted(seen)] == [True, True, False, True, False, False, False]
    before, moments, _ = seen[3]
    after, after_moments, _ = seen[4]
    for a, b in zip(before, after):
        assert torch.equal(a, b)                    # step 3 changed no weight
    for a, b in zip(moments, after_moments):
        assert torch.equal(a, b)                    # nor Adam's state
    skipped = _events(tmp_path / "run", "skipped")
    assert [e["step"] for e in skipped] == [3, 5, 6, 7]
    assert [e["in_a_row"] for e in skipped] == [1, 1, 2, 3]
    logged = {e["step"]: e["loss"] for e in _events(tmp_path / "run", "step")}
    assert sorted(logged) == [1, 2, 4] and all(v == v for v in logged.values())


def test_a_zero2_checkpoint_resumes_on_one_rank_through_a_universal_checkpoint(tmp_path,
                                                                              tiny_shards):
    """DeepSpeed cannot load its optimizer partitions on another number of ranks: the trainer
    converts the checkpoint to DeepSpeed's universal form beside it and loads that."""
    run = tmp_path / "run"
    proc = launch("cpu_zero2.yaml", run, tiny_shards, *EPOCHS, *EMA, wait=False, wrapper=True)
    assert _wait_for(run, "eval", proc)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 3, out[-3000:]
    stopped = _events(run, "stopped")[0]["step"]
    launch("cpu_zero2.yaml", run, tiny_shards, *EPOCHS, *EMA, "train.resume=latest",
           processes=1, wrapper=True)
    notes = " | ".join(_events(run, "resumed")[0]["notes"])
    assert "converted to a universal checkpoint" in notes and "re-cut for 1" in notes
    assert f"step {stopped} -> {stopped}" in notes
    assert (run / "checkpoints" / f"step-{stopped:08d}").is_dir()       # the original kept
    assert _events(run, "step")[-1]["step"] == 20 and (run / "metrics.json").is_file()


def test_a_loss_not_finite_on_one_rank_skips_the_step_on_every_rank(tmp_path, tiny_shards):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-m", "tbps.trainer.launch", "--config_file",
                           str(REPO / "launch/accelerate/cpu_ddp.yaml"), "--num_processes", "2",
                           str(REPO / "tests/trainer/nonfinite_worker.py"), str(tiny_shards),
                           str(tmp_path / "run")], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    for rank in (0, 1):
        for step in range(1, 7):
            want = "False changed False" if step == 3 else "True changed True"
            assert f"rank {rank} step {step} applied {want}" in proc.stdout, proc.stdout
    assert [e["step"] for e in _events(tmp_path / "run", "skipped")] == [3]
