"""Registry packages named `trainer` and `kernels` exist: the imported ones must be ours."""
from pathlib import Path

import data_pipeline
import kernels
import trainer

REPO = Path(__file__).resolve().parents[1]


def test_packages_come_from_this_repository():
    for pkg in (trainer, kernels, data_pipeline):
        assert Path(pkg.__file__).resolve().parent.parent == REPO, pkg.__file__
