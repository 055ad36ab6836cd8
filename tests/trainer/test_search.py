"""tbps search: gallery index (folder and shards, incremental, bad files), queries, CLI errors."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from tbps.trainer.inference import search
from tbps.trainer.inference.approximate import APPROX
from tbps.trainer.inference.embedder import load_embedder
from tbps.trainer.inference.exact_topk import exact_topk, topk_rows
from tbps.trainer.inference.gallery import list_gallery
from tbps.trainer.inference.search_index import HEADER, TABLE, load_index
from tests.trainer.conftest import REPO, TINY_MODEL


def make_weights(out: Path, shards: Path, preset: str = "irra_synth.yaml", seed: int = 0) -> Path:
    """An untrained tiny model saved as a weights folder (what training writes)."""
    from tbps.trainer.common.config_files import load_config
    from tbps.trainer.model.weights import build_model, load_tokenizer, save_weights

    cfg = load_config(REPO / "launch/configs" / preset, [f"data.shards={shards}", *TINY_MODEL])
    tok = load_tokenizer(cfg)
    torch.manual_seed(seed)
    model = build_model(cfg, tok, num_classes=40, num_samples=320).eval()
    save_weights(model.state_dict(), out, cfg, tok, model.encoder.clip.config)
    return out


@pytest.fixture(scope="session")
def rde_weights(tmp_path_factory, tiny_shards):
    return make_weights(tmp_path_factory.mktemp("rde") / "w", tiny_shards, "rde_synth.yaml")


@pytest.fixture(scope="session")
def irra_weights(tmp_path_factory, tiny_shards):
    return make_weights(tmp_path_factory.mktemp("irra") / "w", tiny_shards)


def photo_folder(root: Path, tiny_shards: Path, people: list[int]) -> Path:
    """A plain gallery: the synthetic images of some people, a folder per person."""
    src = tiny_shards.parent / "data" / "imgs" / "synth"
    for pid in people:
        shutil.copytree(src / f"{pid:05d}", root / f"{pid:05d}", dirs_exist_ok=True)
    return root


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = search.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def table(index_dir: Path):
    return pq.read_table(index_dir / TABLE)


def test_index_and_query_every_branch_and_rebuild_is_identical(tmp_path, tiny_shards,
                                                                rde_weights, capsys):
    gallery = photo_folder(tmp_path / "photos", tiny_shards, [1, 2, 3, 4, 5])
    rc, out, _ = run(capsys, "index", rde_weights, gallery, "--out", tmp_path / "a",
                     "--no-progress", "--batch-size", 7)
    assert rc == 0, out
    summary = json.loads(out.splitlines()[-1])
    assert summary["embedded"] == summary["count"] == 20 and summary["skipped"] == 0
    header = json.loads((tmp_path / "a" / HEADER).read_text())
    assert set(header["branches"]) == {"bge", "tse"}           # every branch RDE scores with
    assert header["similarities"]["BGE+TSE"] == {"bge": 0.5, "tse": 0.5}
    assert table(tmp_path / "a").column_names == ["key", "path", "id", "source", "stamp",
                                                  "emb_bge", "emb_tse"]
    assert table(tmp_path / "a")["id"].to_pylist()[:4] == ["00001"] * 4
    run(capsys, "index", rde_weights, gallery, "--out", tmp_path / "b", "--no-progress")
    for name in (TABLE, HEADER):                   # other batches, same bytes
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()

    queries = ["a woman in a purple skirt", "a man with a black bag and white shoes"]
    rc, out, _ = run(capsys, "query", tmp_path / "a", *queries, "--top-k", 5, "--json")
    assert rc == 0
    got = json.loads(out)
    assert got["similarity"] == "BGE+TSE" and [r["query"] for r in got["results"]] == queries
    # against a plain sort of the recipe's similarity over the stored embeddings
    emb = load_embedder(rde_weights)
    index = load_index(tmp_path / "a")
    sim = emb.similarity(emb.texts(queries), index.emb)["BGE+TSE"]
    want = torch.argsort(sim, dim=1, descending=True, stable=True)[:, :5]
    for q, res in enumerate(got["results"]):
        assert [h["position"] for h in res["hits"]] == want[q].tolist()
        assert [h["rank"] for h in res["hits"]] == [1, 2, 3, 4, 5]
        np.testing.assert_allclose([h["score"] for h in res["hits"]],
                                   sim[q, want[q]].numpy(), rtol=1e-6)
        assert res["hits"][0]["path"] == index.rows["path"][want[q, 0]]
    qfile = tmp_path / "queries.txt"
    qfile.write_text("\n".join(queries) + "\n\n")
    rc, out, _ = run(capsys, "query", tmp_path / "a", "--file", qfile, "--similarity", "TSE",
                     "--top-k", 3, "--grid", tmp_path / "grid.png")
    assert rc == 0 and "rank" in out and "score" in out
    assert (tmp_path / "grid.png").stat().st_size > 1000


def test_grown_gallery_embeds_only_what_is_new(tmp_path, tiny_shards, irra_weights, capsys):
    gallery = photo_folder(tmp_path / "photos", tiny_shards, [1, 2, 3])
    idx = tmp_path / "idx"
    run(capsys, "index", irra_weights, gallery, "--out", idx, "--no-progress")
    before = table(idx)
    photo_folder(gallery, tiny_shards, [4, 5])                     # 8 new images
    shutil.rmtree(gallery / "00002")                               # 4 removed
    changed = gallery / "00001" / "00001_0.jpg"
    changed.write_bytes((gallery / "00003" / "00003_0.jpg").read_bytes())
    rc, out, _ = run(capsys, "index", irra_weights, gallery, "--out", idx, "--no-progress")
    assert rc == 0
    s = json.loads(out.splitlines()[-1])
    assert (s["embedded"], s["kept"], s["removed"], s["count"]) == (9, 7, 4, 16)
    after = table(idx)
    kept = {k: e for k, e in zip(before["key"].to_pylist(), before["emb_bge"].to_pylist())}
    for k, e in zip(after["key"].to_pylist(), after["emb_bge"].to_pylist()):
        if k in kept and k != "00001/00001_0.jpg":
            assert e == kept[k]                                     # carried over untouched
    run(capsys, "index", irra_weights, gallery, "--out", tmp_path / "fresh", "--no-progress")
    fresh = table(tmp_path / "fresh")
    assert after.select(["key", "path", "id", "stamp"]).equals(
        fresh.select(["key", "path", "id", "stamp"]))
    np.testing.assert_allclose(np.stack(after["emb_bge"].to_numpy(zero_copy_only=False)),
                               np.stack(fresh["emb_bge"].to_numpy(zero_copy_only=False)),
                               atol=1e-6)
    rc, out, _ = run(capsys, "index", irra_weights, gallery, "--out", idx, "--no-progress")
    assert json.loads(out.splitlines()[-1])["embedded"] == 0        # nothing new: nothing to do


def test_missing_corrupt_and_non_image_files_are_reported_and_skipped(tmp_path, tiny_shards,
                                                                      irra_weights, capsys):
    gallery = photo_folder(tmp_path / "photos", tiny_shards, [1, 2])
    (gallery / "00001" / "00001_1.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (gallery / "00002" / "00002_3.jpg").write_bytes(
        (gallery / "00002" / "00002_3.jpg").read_bytes()[:200])   # truncated
    (gallery / "notes.txt").write_text("who is who")
    os.symlink(gallery / "gone.jpg", gallery / "00002" / "link.jpg")
    rc, out, err = run(capsys, "index", irra_weights, gallery, "--out", tmp_path / "idx",
                       "--no-progress")
    assert rc == 0, err
    header = json.loads((tmp_path / "idx" / HEADER).read_text())
    skipped = {p["path"]: p["reason"] for p in header["skipped"]}
    assert set(skipped) == {"00001/00001_1.jpg", "00002/00002_3.jpg", "notes.txt",
                            "00002/link.jpg"}
    assert "not an image" in skipped["notes.txt"] and "missing" in skipped["00002/link.jpg"]
    assert "not a readable image" in skipped["00001/00001_1.jpg"]
    for path in skipped:
        assert f"skipped {path}" in err
    assert header["count"] == 6 and set(skipped).isdisjoint(table(tmp_path / "idx")["key"]
                                                               .to_pylist())


def test_shard_gallery_and_transformers_export_share_the_global_branch(tmp_path, tiny_shards,
                                                                       rde_weights, capsys):
    from tbps.trainer.inference.export import export_hf

    export_hf(rde_weights, tmp_path / "hf")
    rc, _, err = run(capsys, "index", rde_weights, tiny_shards, "--out", tmp_path / "w",
                     "--no-progress")
    assert rc == 0, err
    rc, _, err = run(capsys, "index", tmp_path / "hf", tiny_shards, "--out", tmp_path / "h",
                     "--no-progress")
    assert rc == 0, err
    w, h = load_index(tmp_path / "w"), load_index(tmp_path / "h")
    items, _ = list_gallery(tiny_shards, "test")
    assert len(w) == len(items) == 40 and w.rows["key"] == [it.key for it in items]
    assert w.rows["id"][0] == str(items[0].id) and w.rows["path"][0].endswith(".jpg")
    assert set(h.header["branches"]) == {"bge"} and h.header["model"]["kind"] == "transformers"
    torch.testing.assert_close(h.emb["bge"], w.emb["bge"], atol=1e-5, rtol=1e-4)
    rc, out, _ = run(capsys, "query", tmp_path / "h", "a man in a green jacket", "--json")
    assert rc == 0 and json.loads(out)["similarity"] == "t2i"


@pytest.mark.parametrize("n, k, block", [(5000, 10, 256), (300, 7, 64), (64, 64, 1024),
                                         (10, 20, 1024)])
def test_exact_topk_is_a_stable_sort(n, k, block):
    g = torch.Generator().manual_seed(n)
    scores = torch.randint(0, 50, (6, n), generator=g).float() / 7     # many ties
    values, idx = topk_rows(scores, k, block=block)
    want = torch.argsort(scores, dim=1, descending=True, stable=True)[:, :min(k, n)]
    assert torch.equal(idx, want) and torch.equal(values, scores.gather(1, want))
    gallery = {"bge": torch.randn(n, 8, generator=g)}
    text = {"bge": torch.randn(3, 8, generator=g)}

    def sim(t, i):
        return {"t2i": torch.round(t["bge"] @ i["bge"].T)}           # ties across chunks

    v, i = exact_topk(sim, text, gallery, "t2i", k, chunk=max(1, n // 3))
    full = sim(text, gallery)["t2i"]
    assert torch.equal(i, torch.argsort(full, dim=1, descending=True, stable=True)[:, :min(k, n)])


def test_approximate_search_agrees_with_exact(tmp_path, tiny_shards, rde_weights, capsys):
    pytest.importorskip("faiss", reason="faiss-cpu (the `search` / `test` extra) not installed")
    rc, _, err = run(capsys, "index", rde_weights, tiny_shards, "--out", tmp_path / "idx",
                     "--no-progress", "--approximate")
    assert rc == 0, err
    assert (tmp_path / "idx" / APPROX).is_file()
    qs = ["a woman in a purple skirt", "a man wearing blue jeans"]
    for sim in ("BGE+TSE", "TSE"):
        _, exact, _ = run(capsys, "query", tmp_path / "idx", *qs, "--similarity", sim, "--json")
        rc, approx, _ = run(capsys, "query", tmp_path / "idx", *qs, "--similarity", sim,
                            "--json", "--approximate")
        assert rc == 0
        for e, a in zip(json.loads(exact)["results"], json.loads(approx)["results"]):
            assert [h["position"] for h in a["hits"]] == [h["position"] for h in e["hits"]]
            np.testing.assert_allclose([h["score"] for h in a["hits"]],
                                       [h["score"] for h in e["hits"]], atol=1e-5)


def test_bad_input_is_one_error_paragraph_and_exit_2(tmp_path, tiny_shards, irra_weights,
                                                     rde_weights, capsys):
    gallery = photo_folder(tmp_path / "photos", tiny_shards, [1])
    corrupt = tmp_path / "corrupt"
    shutil.copytree(irra_weights, corrupt)
    (corrupt / "model.safetensors").write_bytes(b"\x00" * 64)
    run(capsys, "index", irra_weights, gallery, "--out", tmp_path / "idx", "--no-progress")
    cases = {
        "weights folder of a run": ("index", tmp_path / "nope", gallery, "--out", tmp_path / "x"),
        "folder of images": ("index", irra_weights, tmp_path / "nope", "--out", tmp_path / "x"),
        "cannot load the model": ("index", corrupt, gallery, "--out", tmp_path / "x"),
        "holds neither": ("index", gallery, gallery, "--out", tmp_path / "x"),
        "other weights": ("index", rde_weights, gallery, "--out", tmp_path / "idx"),
        "--batch-size": ("index", irra_weights, gallery, "--out", tmp_path / "x",
                         "--batch-size", 0),
        "no search index": ("query", gallery, "a man"),
        "no query": ("query", tmp_path / "idx"),
        "query 2 is empty": ("query", tmp_path / "idx", "a man", "  "),
        "--top-k must be": ("query", tmp_path / "idx", "a man", "--top-k", 0),
        "scores with": ("query", tmp_path / "idx", "a man", "--similarity", "TSE"),
        "no approximate part": ("query", tmp_path / "idx", "a man", "--approximate"),
        "not the one": ("query", tmp_path / "idx", "a man", "--weights", rde_weights),
        "query file": ("query", tmp_path / "idx", "--file", tmp_path / "none.txt"),
    }
    for needle, argv in cases.items():
        rc, out, err = run(capsys, *argv)
        assert rc == 2, (needle, out, err)
        assert err.startswith("error: ") and needle in err and "Traceback" not in err, err
    (tmp_path / "idx" / TABLE).write_bytes(b"PAR1 broken")
    rc, _, err = run(capsys, "query", tmp_path / "idx", "a man")
    assert rc == 2 and "damaged" in err and f"remove {tmp_path / 'idx'}" in err
    rc, _, err = run(capsys, "index", irra_weights, gallery, "--out", tmp_path / "idx")
    assert rc == 2 and "damaged" in err and f"remove {tmp_path / 'idx'}" in err
    proc = subprocess.run([sys.executable, "-m", "tbps.trainer.inference.search", "index", str(corrupt),
                           str(gallery), "--out", str(tmp_path / "y")], capture_output=True,
                          text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and str(corrupt) in proc.stderr


@pytest.mark.distributed
def test_two_ranks_build_the_same_index(tmp_path, tiny_shards, irra_weights, capsys):
    gallery = photo_folder(tmp_path / "photos", tiny_shards, [1, 2, 3])
    (gallery / "bad.png").write_bytes(b"nope")
    run(capsys, "index", irra_weights, gallery, "--out", tmp_path / "one", "--no-progress")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
         str(REPO / "launch/accelerate/cpu_ddp.yaml"), "--num_processes", "2", "-m",
         "tbps.trainer.inference.search", "index", str(irra_weights), str(gallery), "--out",
         str(tmp_path / "two"), "--no-progress", "--batch-size", "4"],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.splitlines()[-1])["embedded"] == 12
    assert (tmp_path / "one" / HEADER).read_bytes() == \
        (tmp_path / "two" / HEADER).read_bytes()
    one, two = (pq.read_table(tmp_path / d / TABLE).to_pydict() for d in ("one", "two"))
    assert list(one) == list(two)
    for column in one:          # the embeddings of batches of 4 against one batch: the same to
        if column.startswith("emb_"):   # rounding (bit for bit on some CPUs, not on AVX2's MKL)
            np.testing.assert_allclose(np.array(two[column]), np.array(one[column]), atol=1e-6)
        else:
            assert two[column] == one[column], column
