#!/usr/bin/env bash
# Writes launch/constraints-cpu.txt: every package of the CPU install pinned, so that the README's
# two commands and CI install the same versions next month as today.
#
#     bash launch/freeze_constraints.sh          # then: bash .ci/run, and commit both files
#
# How: a new virtual environment; `pip install -c launch/cpu-pins.txt -c launch/cpu-holds.txt
# -e ".[test]"` resolves the newest versions that setup.cfg's ranges allow, torch held at its CPU
# build and the packages of cpu-holds.txt at the versions it names (each with its reason, copied
# into the header); `pip freeze` of that environment, local version labels dropped (torch==2.13.0
# matches the CPU build's 2.13.0+cpu), with the date, the Python and the machine in the header.
# HuggingFace's `kernels` comes with transformers from 5.25 and is pinned like everything else.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d -t tbps-freeze.XXXXXX)
trap 'rm -rf "$work"' EXIT
python3 -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q --disable-pip-version-check -c launch/cpu-pins.txt \
  -c launch/cpu-holds.txt -e ".[test]"
out=launch/constraints-cpu.txt
{
  echo "# Every package of the CPU install, pinned. Written by launch/freeze_constraints.sh on"
  echo "# $(date -u +%Y-%m-%d) from setup.cfg's ranges, launch/cpu-pins.txt (torch's CPU build) and"
  echo "# launch/cpu-holds.txt (held below the newest, that file says why: $(grep -v '^#' launch/cpu-holds.txt | grep . | paste -sd' ')),"
  echo "# with $("$work/venv/bin/python" -c 'import platform; print("CPython", platform.python_version(), "on", platform.machine(), platform.system())')."
  echo "# Used by the README's two commands and by .ci/run; CI's newest-packages job installs without"
  echo "# it and names what moved. On a GPU cluster leave it out (README: Set-up)."
  "$work/venv/bin/python" -m pip freeze --disable-pip-version-check --exclude-editable \
    | sed -E 's/^([A-Za-z0-9_.-]+==[^+ ]+)\+[A-Za-z0-9.]+$/\1/' | LC_ALL=C sort -f
} > "$out"
echo "wrote $out ($(grep -vc '^#' "$out") packages)"
