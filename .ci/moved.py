"""Which installed packages differ from the pinned constraints, and which of them a failure's
traceback passes through (CI's newest-packages job, .ci/smoke).

    python .ci/moved.py launch/constraints-cpu.txt LOG [JOB]   # after a failure: the suspects first
    python .ci/moved.py --brief launch/constraints-cpu.txt # one line: what moved

Run it with the Python of the environment under test: it reads that environment's packages.
"""
from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pinned(constraints: Path) -> dict[str, str]:
    pins = {}
    for line in constraints.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[_norm(name)] = version.strip()
    return pins


def installed() -> dict[str, tuple[str, str]]:
    """normalised name -> (name as published, version)"""
    return {_norm(d.metadata["Name"]): (d.metadata["Name"], d.version.split("+")[0])
            for d in metadata.distributions() if d.metadata["Name"]}


def moved(pins: dict[str, str], have: dict[str, tuple[str, str]]) -> list[tuple[str, str, str]]:
    """(name, pinned or 'not pinned', installed) for every installed package not at its pin."""
    out = []
    for key, (name, version) in sorted(have.items()):
        if key in ("tbps-trainer", "pip", "setuptools", "wheel"):
            continue
        if pins.get(key) != version:
            out.append((name, pins.get(key, "not pinned"), version))
    return out


def in_traceback(log: str, candidates: list[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    """The candidates whose files the log's tracebacks name, in the order they first appear."""
    owners = metadata.packages_distributions()          # top-level module -> distributions
    order = []
    for module in re.findall(r"site-packages/([A-Za-z0-9_]+)", log):
        for dist in owners.get(module, ()):
            if _norm(dist) not in order:
                order.append(_norm(dist))
    by_key = {_norm(c[0]): c for c in candidates}
    return [by_key[k] for k in order if k in by_key]


def _fmt(rows) -> str:
    return ", ".join(f"{n} {p} -> {v}" for n, p, v in rows) or "none"


def main(argv: list[str]) -> int:
    brief = argv[:1] == ["--brief"]
    args = argv[1:] if brief else argv
    if not args:
        print(__doc__, file=sys.stderr)
        return 2
    rows = moved(pinned(Path(args[0])), installed())
    if brief:
        print(f"{len(rows)} package(s) not at their pin: {_fmt(rows)}")
        return 0
    log = Path(args[1]).read_text(errors="replace") if len(args) > 1 else ""
    job = args[2] if len(args) > 2 else "newest"
    suspects = in_traceback(log, rows)
    print(f"{job}: packages not at their pin in {args[0]} (pinned -> installed):")
    print(f"{job}:   {_fmt(rows)}")
    if suspects:
        print(f"{job}: the failure's traceback runs through: {_fmt(suspects)}")
    elif rows:
        print(f"{job}: no moved package appears in the failure's traceback; any of the above")
    else:
        print(f"{job}: nothing moved: the failure is not an upstream release")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
