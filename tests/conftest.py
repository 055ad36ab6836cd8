"""Shared test set-up.

TRITON_INTERPRET must be set before any @triton.jit decorator runs, so it is set here, at
collection time, before a test module imports `kernels`, and only on a machine without CUDA: there
the kernels run in the Triton interpreter on CPU tensors. With a GPU the kernels are compiled and
the kernel tests run on CUDA tensors, GPU-marked tests included.
"""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402  (after OMP_NUM_THREADS)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
