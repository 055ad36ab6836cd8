"""One import namespace, tbps: nothing of this project shadows another package.

HuggingFace's `kernels` (required by transformers from 5.25) and Coqui's `trainer` are packages on
the same registry as this project's folders kernels/ and trainer/. Run from the repository root,
where `python -m` puts the folder first on the import path, `import kernels` must still find
HuggingFace's, and transformers' CLIPModel must import beside the project's packages.
"""
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

pytestmark = pytest.mark.smoke      # also in CI's newest-packages job (.ci/smoke)

REPO = Path(__file__).resolve().parents[1]
FOLDERS = ("trainer", "kernels", "data_pipeline")


def test_packages_come_from_this_repository():
    import tbps.data_pipeline.schema
    import tbps.kernels._dispatch
    import tbps.trainer.common.config
    for module, folder in ((tbps.trainer.common.config, "trainer/common"),
                           (tbps.kernels._dispatch, "kernels"),
                           (tbps.data_pipeline.schema, "data_pipeline")):
        assert Path(module.__file__).resolve().parent == REPO / folder, module.__file__


@pytest.mark.parametrize("folder", FOLDERS)
def test_no_folder_is_a_top_level_package(folder):
    """A folder with __init__.py at the root is importable under its own name from the root."""
    assert not (REPO / folder / "__init__.py").exists()


def test_huggingface_kernels_wins_from_the_repository_root():
    try:
        metadata.distribution("kernels")
    except metadata.PackageNotFoundError:
        pytest.skip("HuggingFace's `kernels` is not installed (transformers < 5.25 does not need it)")
    code = ("import tbps.kernels.similarity_loss, tbps.trainer.model.encoder, tbps.data_pipeline.loader\n"
            "from transformers import CLIPModel\n"
            "import kernels\n"
            "print(kernels.__file__)\n"
            "assert hasattr(kernels, 'CUDAProperties'), kernels.__file__\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert Path(proc.stdout.strip()).resolve().parent != REPO / "kernels"
