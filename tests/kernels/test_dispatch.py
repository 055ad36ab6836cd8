"""The dispatch switches benchmarks use: forced implementations and intercepted ops."""
import torch

from tbps.kernels import _dispatch
from tbps.kernels.similarity_loss import bidirectional_similarity_loss
from tbps.kernels.topk_select import topk_select


def test_intercepted_ops_go_through_the_wrapper_and_only_within():
    seen = []

    def wrap(op, region):
        def call(*args, **kwargs):
            seen.append((op.__name__, region))
            return op(*args, **kwargs)
        return call

    x = torch.randn(4, 8)
    ids = torch.tensor([0, 1, 0, 2])
    with _dispatch.intercepted(wrap):
        topk_select(x, None, 3, impl="reference")
        bidirectional_similarity_loss(x, x, ids, x, x, ids, kind="sdm", tau=0.1, impl="reference")
    topk_select(x, None, 3, impl="reference")
    assert seen == [("topk_select", "selection"), ("bidirectional_similarity_loss", "similarity")]


def test_forced_resolves_auto_and_restores():
    x = torch.zeros(1)
    with _dispatch.forced("reference"):
        assert _dispatch.resolve_impl("test", "auto", x) == "reference"
    assert _dispatch.resolve_impl("test", "reference", x) == "reference"
