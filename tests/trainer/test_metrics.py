import pytest
import torch

from tbps.trainer.inference.metrics import retrieval_metrics


def test_single_correct_image_per_query():
    # query 0: correct at rank 1; query 1: correct at rank 3; query 2: rank 2
    sim = torch.tensor([[0.9, 0.1, 0.2],
                        [0.5, 0.4, 0.1],
                        [0.2, 0.3, 0.1]])
    m = retrieval_metrics(sim, [10, 12, 10], [10, 11, 12])
    assert m["R1"] == pytest.approx(100 / 3)
    assert m["R5"] == m["R10"] == pytest.approx(100.0)
    # AP: 1, 1/3, 1/2 ; INP = |G| / last rank = same
    assert m["mAP"] == pytest.approx(100 * (1 + 1 / 3 + 1 / 2) / 3)
    assert m["mINP"] == pytest.approx(100 * (1 + 1 / 3 + 1 / 2) / 3)


def test_several_correct_images_per_query():
    # gallery pids:  a  b  a  c  a ; query pid a
    # ranking by similarity: g1(b) g0(a) g3(c) g2(a) g4(a) -> correct at ranks 2, 4, 5
    sim = torch.tensor([[0.8, 0.9, 0.6, 0.7, 0.5]])
    m = retrieval_metrics(sim, [1], [1, 2, 1, 3, 1])
    assert m["R1"] == 0.0 and m["R5"] == 100.0
    ap = (1 / 2 + 2 / 4 + 3 / 5) / 3
    assert m["mAP"] == pytest.approx(100 * ap)
    assert m["mINP"] == pytest.approx(100 * 3 / 5)


def test_ties_keep_gallery_order_and_chunking_changes_nothing():
    torch.manual_seed(0)
    sim = torch.randn(50, 30).round(decimals=1)
    q = torch.randint(0, 5, (50,))
    g = torch.arange(30) % 5
    assert retrieval_metrics(sim, q, g) == pytest.approx(retrieval_metrics(sim, q, g, chunk=7))
    tie = retrieval_metrics(torch.zeros(1, 3), [2], [1, 2, 2])
    assert tie["R1"] == 0.0 and tie["mAP"] == pytest.approx(100 * (1 / 2 + 2 / 3) / 2)


def test_query_without_match_is_an_error():
    with pytest.raises(ValueError, match="no match"):
        retrieval_metrics(torch.zeros(2, 2), [1, 5], [1, 2])
    with pytest.raises(ValueError, match="does not match"):
        retrieval_metrics(torch.zeros(2, 2), [1], [1, 2])
