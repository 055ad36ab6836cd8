"""Shared test set-up.

TRITON_INTERPRET must be set before any @triton.jit decorator runs, so it is set here, at
collection time, before a test module imports `kernels`. On a machine with a GPU the GPU-marked
tests still run compiled kernels: they are started in a subprocess without the variable.
"""
import os

if not os.environ.get("TBPS_TEST_GPU"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
