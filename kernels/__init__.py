"""Fused Triton ops, each with its eager reference, autograd Function and dispatch.

  similarity_loss.py   the similarity matrix fused with SDM / BSDM / TAL / ITC / WAF, per query
  topk_select.py       top-k (or weighted sampling without replacement) of token scores + gather
  bench.py             `python -m kernels.bench`: eager vs torch.compile vs Triton, checked
  step_timing.py       `python -m kernels.step_timing`: the real training step, kernels vs eager
  gpu_check.sh         every check that needs a GPU, in one command within a time budget
  _dispatch.py         impl="auto" | "triton" | "reference", logged once per op; every launch

Importing this package never touches CUDA. The package attributes `similarity_loss` and
`topk_select` are the functions; reach the modules with importlib.import_module("kernels.<op>").
"""
from kernels.similarity_loss import (
                                     bidirectional_similarity_loss,
                                     similarity_loss,
                                     similarity_loss_reference,
)
from kernels.topk_select import TopK, topk_select, topk_select_reference

__all__ = ["similarity_loss", "bidirectional_similarity_loss", "similarity_loss_reference",
           "topk_select", "topk_select_reference", "TopK"]
