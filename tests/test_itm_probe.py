"""launch/itm_probe.py on planted features: a head that reads the match scores it, and a fresh
fusion encoder trained on easy negatives learns them (no model is loaded)."""
import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("itm_probe", REPO / "launch" / "itm_probe.py")
itm_probe = importlib.util.module_from_spec(spec)
sys.modules["itm_probe"] = itm_probe
spec.loader.exec_module(itm_probe)


def planted(n_ids=12, per_id=2, width=16, seed=0, noise_seed=None):
    """Each identity a random direction; its images' tokens and its captions' tokens are that
    direction plus noise, so matching pairs agree and the global embeddings separate people."""
    g = torch.Generator().manual_seed(seed)
    proto = F.normalize(torch.randn(n_ids, width, generator=g), dim=-1)
    if noise_seed is not None:
        g = torch.Generator().manual_seed(noise_seed)
    ipid = torch.arange(n_ids).repeat_interleave(per_id)
    tpid = torch.arange(n_ids).repeat_interleave(per_id)
    img = 3 * proto[ipid][:, None] + 0.3 * torch.randn(len(ipid), 5, width, generator=g)
    txt = 3 * proto[tpid][:, None] + 0.3 * torch.randn(len(tpid), 6, width, generator=g)
    eos = torch.full((len(tpid),), 4)
    return {"img": img, "ipid": ipid, "txt": txt, "eos": eos, "tpid": tpid,
            "ie": F.normalize(img.mean(1), dim=-1), "te": F.normalize(txt.mean(1), dim=-1)}


def test_fixed_draws_never_pick_the_captions_identity_and_scores_are_rates():
    d = planted()
    test = itm_probe.TestSet(d, tau=0.05, k=8)
    for neg in test.neg.values():
        assert not (d["ipid"][neg] == d["tpid"][test.ti]).any()
    assert (d["ipid"][test.pos] == d["tpid"][test.ti]).all()

    class Oracle(torch.nn.Module):          # first token = the caption's agreement with the image
        def forward(self, txt, img, pad):
            s = (txt.mean(1) * img.mean(1)).sum(-1, keepdim=True)
            return torch.cat([s, s], -1)[:, None].expand(-1, txt.shape[1], -1)
    head = torch.nn.Linear(2, 2)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 0.0]]))
        head.bias.zero_()
    m = test.evaluate(Oracle(), head)
    assert m["auc_uniform"] == 1.0 and m["pair_hard"] == 1.0 and m["rerank_r1_itm"] == 100.0
    assert 0.0 <= m["itc_pair_hard"] <= 1.0 and m["rerank_r1_itc"] == 100.0


def test_a_fresh_head_learns_easy_negatives():
    torch.manual_seed(0)
    feats = {"train": planted(seed=1), "test": planted(seed=1, noise_seed=2)}
    cfg = SimpleNamespace(model=SimpleNamespace(cross_heads=2, cross_layers=1),
                          recipe=SimpleNamespace(cross=SimpleNamespace(residual=True)))
    args = SimpleNamespace(seed=0, lr=3e-3, eps=1e-8, steps=60, tau=0.05)
    test = itm_probe.TestSet(feats["test"], tau=0.05, k=8)
    out = itm_probe.train_fresh(cfg, feats, test, "identity", "uniform", args)
    assert [c["step"] for c in out["curve"]] == [15, 30, 45, 60]
    assert out["curve"][-1]["auc_uniform"] > 0.9          # planted matches are learnable
    text = itm_probe.markdown({"weights": "w", "k": 8, "trained": out["curve"][0],
                               "fresh": {"identity init, uniform negatives": out}, "steps": 60,
                               "lr": 3e-3, "eps": 1e-8, "tau": 0.05, "seed": 0,
                               "environment": {"cpu": "x", "threads": 1, "python": "3",
                                               "torch": "t", "commit": "c", "command": "cmd"}})
    assert "| fresh, identity init, uniform negatives | 60 |" in text
