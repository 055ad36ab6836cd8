"""The gathered local loss on 2 ranks equals one process on the same global batch.

Each rank scores its own rows against the embeddings and ids of both ranks (gathered with
gradient); averaging the two ranks' losses and their parameter gradients, as data-parallel
training does, must give the single-process loss and gradients on the concatenated batch.
"""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tbps.data_pipeline.tokenizer import PROBE, train_word_level
from tbps.trainer.common.config_files import load_config
from tbps.trainer.model.weights import build_model
from tbps.trainer.recipe.step import Recipe, StepInfo
from tests.distributed import free_port, init_gloo

B, WORLD = 6, 2
OVERRIDES = ["model.image_size=[32, 16]", "model.vision_width=32", "model.text_width=32",
             "model.embed_dim=16", "model.vision_layers=1", "model.text_layers=1",
             "model.vision_heads=2", "model.text_heads=2",
             "recipe.losses=[{kind: sdm}, {kind: id}]"]


def _setup(tok_dir):
    from tbps.data_pipeline.tokenizer import CaptionTokenizer

    tok = CaptionTokenizer.from_pretrained(tok_dir)
    cfg = load_config(None, OVERRIDES)
    torch.manual_seed(0)
    model = build_model(cfg, tok, num_classes=5, num_samples=B * WORLD).double()
    model.test_recipe = Recipe(cfg, tok)
    g = torch.Generator().manual_seed(1)
    captions = [PROBE, "the man wears blue jeans", "a man with a green bag", "a woman in red"]
    batch = {
        "image": torch.randn(B * WORLD, 3, 32, 16, generator=g, dtype=torch.float64),
        "input_ids": torch.from_numpy(tok.encode_batch([captions[i % 4] for i in range(B * WORLD)])),
        # ids 0 and 3 have positives on the other rank; id 4 appears once
        "pid": torch.tensor([0, 1, 3, 0, 2, 4, 3, 1, 0, 2, 3, 1]),
    }
    return model, batch


def _loss_and_grads(model, batch, tau):
    out = model(model.test_recipe.train_losses, batch, StepInfo(0, 0, tau, torch.Generator()))
    out["loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def _worker(rank, port, tok_dir, out_path):
    init_gloo(rank, port, WORLD)
    torch.set_num_threads(1)
    model, batch = _setup(tok_dir)
    local = {k: v[rank * B:(rank + 1) * B] for k, v in batch.items()}
    out, grads = _loss_and_grads(model, local, tau=0.05)
    values = torch.stack([out["loss"].detach(), out["sdm"].detach(), out["id"].detach()])
    dist.all_reduce(values)
    for g in grads.values():                       # what DDP / DeepSpeed do: mean over ranks
        dist.all_reduce(g)
        g /= WORLD
    if rank == 0:
        torch.save({"values": values / WORLD, "grads": grads}, out_path)
    dist.destroy_process_group()



@pytest.mark.distributed
def test_two_rank_local_loss_equals_one_process(tmp_path):
    tok_dir = tmp_path / "tok"
    train_word_level([PROBE, "the man wears blue jeans", "a man with a green bag"] * 2, tok_dir)
    out_path = tmp_path / "dist.pt"
    mp.start_processes(_worker, args=(free_port(), str(tok_dir), str(out_path)), nprocs=WORLD,
                       start_method="spawn")
    got = torch.load(out_path)
    model, batch = _setup(str(tok_dir))
    out, grads = _loss_and_grads(model, batch, tau=0.05)
    want = torch.stack([out["loss"].detach(), out["sdm"].detach(), out["id"].detach()])
    torch.testing.assert_close(got["values"], want, rtol=1e-10, atol=1e-12)
    assert set(got["grads"]) == set(grads)
    for name, g in grads.items():
        torch.testing.assert_close(got["grads"][name], g, rtol=1e-8, atol=1e-12, msg=name)
