"""The `tbps` command: every verb answers --help, an unknown verb is refused with the list."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tbps.trainer import cli


def _leaves(table=cli.VERBS, prefix=()):
    for verb, entry in table.items():
        if isinstance(entry, dict):
            yield from _leaves(entry, (*prefix, verb))
        else:
            yield (*prefix, verb)


def _exit_code(argv) -> int:
    try:
        return cli.main(list(argv))
    except SystemExit as exc:             # argparse's --help
        return exc.code


@pytest.mark.parametrize("verb", list(_leaves()), ids=" ".join)
def test_every_verb_answers_help(verb, capsys):
    assert _exit_code([*verb, "--help"]) == 0
    out = capsys.readouterr().out
    assert "usage" in out.lower() or "accelerate launch" in out, out[:300]


def test_every_verb_group_lists_its_verbs(capsys):
    for group in ("bench", "study"):
        assert _exit_code([group, "--help"]) == 0
        out = capsys.readouterr().out
        assert all(f"  {verb} " in out for verb in cli.VERBS[group]), out


def test_unknown_or_missing_verbs_exit_2_with_the_list(capsys):
    assert _exit_code(["trian"]) == 2
    err = capsys.readouterr().err
    assert "unknown verb 'trian'" in err and all(v in err for v in cli.VERBS)
    assert _exit_code(["bench", "kernel"]) == 2
    assert "step-kernels" in capsys.readouterr().err
    assert _exit_code([]) == 2
    assert "verbs:" in capsys.readouterr().err


def test_the_console_script_is_installed():
    exe = shutil.which("tbps") or str(Path(sys.executable).with_name("tbps"))
    proc = subprocess.run([exe, "nope"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown verb 'nope'" in proc.stderr
    proc = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.startswith("tbps ")
