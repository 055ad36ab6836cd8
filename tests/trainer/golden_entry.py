"""`python -m tests.trainer.golden_entry ARGS` = `tbps train ARGS` with oneDNN off,
so the golden runs take the same kernels on every x86-64 CPU (tests/trainer/golden.py)."""
import sys

import torch

torch.backends.mkldnn.enabled = False     # convolutions through ATen + MKL (MKL_CBWR pinned)

if __name__ == "__main__":
    from tbps.trainer.train import main

    sys.exit(main(sys.argv[1:]))
