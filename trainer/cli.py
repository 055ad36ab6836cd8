"""The project's command line: `tbps VERB ...`, one face over every tool.

    tbps quickstart                          # the main job on the built-in default (CPU)
    tbps VERB --help                         # what a verb takes
    tbps bench kernels --help                # verbs with sub-verbs: bench, study

`accelerate launch -m tbps.trainer.train ...` (or `tbps launch ... -m tbps.trainer.train ...`)
stays the way to start ranks on a cluster; every verb is also `python -m` of its module. A verb's
module is imported only when the verb runs, so `tbps --help` starts in a fraction of a second.
"""
from __future__ import annotations

import importlib
import sys
from importlib import metadata

# verb -> (module:function, arguments put before the user's, one line of help)
Entry = tuple[str, tuple[str, ...], str]
DATA = "tbps.data_pipeline.cli:main"
VERBS: dict[str, Entry | dict[str, Entry]] = {
    "synth": (DATA, ("synth",), "generate the synthetic person dataset (CUHK-PEDES format)"),
    "shard": (DATA, ("shard",), "annotations + images -> webdataset shards + manifest"),
    "verify": (DATA, ("verify",), "check every shard against its manifest"),
    "stats": (DATA, ("stats",), "per-split counts from a shard folder's manifest"),
    "train": ("tbps.trainer.train:command", (), "train one recipe (one process), or --dry-run"),
    "launch": ("tbps.trainer.launch:main", (),
               "accelerate launch whose ranks hear stop signals and whose exit code says why"),
    "evaluate": ("tbps.trainer.inference.evaluate:main", (), "metrics of a weights folder on a split"),
    "export": ("tbps.trainer.inference.export:main", (), "a weights folder -> a transformers CLIP folder"),
    "convert": ("tbps.trainer.tools.convert:main", (),
                "an OpenAI-format CLIP or IRRA/RDE checkpoint -> a weights folder"),
    "search": ("tbps.trainer.inference.search:main", (), "index a gallery, query it by sentence"),
    "pictures": ("tbps.trainer.tools.pictures:main", (), "what AWM drops, AGM masks and TEM writes"),
    "pretrain": ("tbps.trainer.tools.pretrain:main", (), "the noise study's backbone, trained clean"),
    "quickstart": ("tbps.trainer.tools.quickstart:main", (),
                   "synthesise, shard, train on 2 CPU processes, evaluate"),
    "bench": {
        "kernels": ("tbps.kernels.bench:main", (), "the fused kernels against eager PyTorch"),
        "step": ("tbps.trainer.tools.step_timing:phases_main", (),
                 "the training step of a recipe, phase by phase"),
        "step-kernels": ("tbps.trainer.tools.step_timing:kernels_main", (),
                         "the training step with the kernels against impl=reference"),
        "search": ("tbps.trainer.tools.search_bench:main", (), "gallery search: throughput, recall"),
        "data": (DATA, ("bench",), "loader samples/s per CPU core"),
    },
    "study": {
        "run": ("tbps.trainer.tools.study:main", (), "the noise study: methods x noise rates x seeds"),
        "report": ("tbps.trainer.tools.study_report:main", (), "the study's tables and plots again"),
    },
}


def _version() -> str:
    try:
        return metadata.version("tbps-trainer")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def _usage(table: dict, prog: str) -> str:
    width = max(map(len, table))
    lines = [f"usage: {prog} VERB [ARGS ...]   ({prog} VERB --help for a verb's options)", "",
             "verbs:"]
    for verb, entry in table.items():
        text = entry[2] if isinstance(entry, tuple) else f"{', '.join(entry)} ({prog} {verb} --help)"
        lines.append(f"  {verb:<{width}}  {text}")
    return "\n".join(lines)


def _call(entry: Entry, argv: list[str]) -> int:
    target, prefix, _ = entry
    module, function = target.split(":")
    code = getattr(importlib.import_module(module), function)([*prefix, *argv])
    return code if isinstance(code, int) else 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    table, prog = VERBS, "tbps"
    while True:
        if not args or args[0] in ("-h", "--help"):      # no verb: the list, as a usage error
            print(_usage(table, prog), file=sys.stdout if args else sys.stderr)
            return 0 if args else 2
        if table is VERBS and args[0] == "--version":
            print(f"tbps {_version()}")
            return 0
        verb, args = args[0], args[1:]
        entry = table.get(verb)
        if entry is None:
            print(f"{prog}: unknown verb {verb!r}; the verbs are: {', '.join(table)}",
                  file=sys.stderr)
            return 2
        if isinstance(entry, tuple):
            return _call(entry, args)
        table, prog = entry, f"{prog} {verb}"


if __name__ == "__main__":
    sys.exit(main())
