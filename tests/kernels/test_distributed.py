"""The loss on 2 CPU ranks (gloo) with keys gathered with autograd equals one process on the
concatenated batch: per-query losses and the gradients of every local feature. The ranks run the
kernel in the Triton interpreter; the single process runs it on DEVICE (compiled on a GPU box)."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.multiprocessing as mp
import torch.nn.functional as F

from tbps.kernels.similarity_loss import bidirectional_similarity_loss
from tests.distributed import free_port, init_gloo
from tests.kernels.utils import DEVICE

pytestmark = pytest.mark.smoke      # also in CI's newest-packages job (.ci/smoke)

WORLD, N_LOCAL, D = 2, 24, 16
KINDS = ("sdm", "bsdm", "tal", "itc", "waf")


def global_batch():
    """Same on every process: features, momentum features, ids (ids shared across ranks, the last
    sample of rank 1 is padding with id -1), and per-query upstream weights."""
    g = torch.Generator().manual_seed(0)
    n = WORLD * N_LOCAL
    ids = torch.randint(0, 10, (n,), generator=g)
    ids[-1] = -1
    feats = [F.normalize(torch.randn(n, D, generator=g), dim=-1) for _ in range(4)]
    weights = torch.rand(2, n, generator=g)
    return (*feats, ids, weights)


def losses_and_grads(img, txt, mimg, mtxt, ids, keys, weights, kind):
    """Per-query losses and d(weighted sum)/d(img, txt) for local rows over the given keys."""
    img_keys, txt_keys, mimg_keys, mtxt_keys, key_ids = keys(img, txt, mimg, mtxt, ids)
    i2t, t2i = bidirectional_similarity_loss(
        img, txt, ids, img_keys, txt_keys, key_ids, kind=kind, tau=0.05, momentum_img_nD=mimg,
        momentum_txt_nD=mtxt, momentum_img_keys_ND=mimg_keys, momentum_txt_keys_ND=mtxt_keys,
        impl="triton")
    ((i2t * weights[0]).sum() + (t2i * weights[1]).sum()).backward()
    return i2t.detach(), t2i.detach(), img.grad, txt.grad


def gathered_keys(img, txt, mimg, mtxt, ids):
    cat_grad = lambda x: torch.cat(dist_nn.all_gather(x))  # noqa: E731  carries the gradient back

    def cat_plain(x):
        out = [torch.empty_like(x) for _ in range(WORLD)]
        dist.all_gather(out, x)
        return torch.cat(out)

    return cat_grad(img), cat_grad(txt), cat_plain(mimg), cat_plain(mtxt), cat_plain(ids)


def worker(rank, port, out_dir):
    init_gloo(rank, port, WORLD)
    img, txt, mimg, mtxt, ids, weights = global_batch()
    rows = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
    results = {}
    for kind in KINDS:
        local = [x[rows].clone().requires_grad_() for x in (img, txt)]
        results[kind] = losses_and_grads(*local, mimg[rows], mtxt[rows], ids[rows], gathered_keys,
                                         weights[:, rows], kind)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()



@pytest.mark.distributed
def test_two_ranks_equal_one_process(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the spawned ranks import kernels afresh, on CPU
    mp.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    img, txt, mimg, mtxt, ids, weights = (x.to(DEVICE) for x in global_batch())
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for kind in KINDS:
        whole = losses_and_grads(img.clone().requires_grad_(), txt.clone().requires_grad_(), mimg,
                                 mtxt, ids, lambda *xs: xs, weights, kind)
        whole = [x.cpu() for x in whole]
        for name, want, got in zip(("i2t", "t2i", "d img", "d txt"), whole,
                                   (torch.cat([r[kind][i] for r in ranks]) for i in range(4))):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=f"{kind} {name}")
        assert whole[0][-1] == 0 and whole[1][-1] == 0  # the padded sample is a masked query
