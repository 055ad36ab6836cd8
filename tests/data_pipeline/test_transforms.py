import numpy as np
import torch

from tbps.data_pipeline.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    Geometry,
    TrainAugment,
    erase_box,
    normalize_images,
    place_image,
    prepare_batch,
)


def _pad_crop_reference(img, pad, top, left):
    padded = np.pad(img, ((pad, pad), (pad, pad), (0, 0)))
    return padded[top:top + img.shape[0], left:left + img.shape[1]]


def test_placing_equals_flip_then_pad_then_crop():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (37, 13, 3), dtype=np.uint8)
    out = np.full((37, 13, 3), 7, dtype=np.uint8)           # stale content must not survive
    for flip in (False, True):
        src = img[:, ::-1] if flip else img
        for top in [*range(0, 21, 3), 20]:
            for left in [*range(0, 21, 4), 19, 20]:
                place_image(img, Geometry(flip, top - 10, left - 10), out)
                assert np.array_equal(out, _pad_crop_reference(src, 10, top, left))
    place_image(img, Geometry(True, 0, 20), out)             # shifted out of view
    assert not out.any()


def test_erase_box_inside_and_sized():
    rng = np.random.default_rng(1)
    for _ in range(200):
        top, left, h, w = erase_box(96, 32, rng, (0.02, 0.4), (0.3, 3.3))
        if h:
            assert 0 <= top and top + h <= 96 and 0 <= left and left + w <= 32
            assert 0.01 <= h * w / (96 * 32) <= 0.45


def test_augment_is_deterministic_per_generator_and_flips():
    img = np.arange(8 * 4 * 3, dtype=np.uint8).reshape(8, 4, 3)
    aug = TrainAugment(flip_p=1.0, pad=0, erase_p=0.0)
    out, box = aug(img, np.random.default_rng(0))
    assert np.array_equal(out, img[:, ::-1]) and box == (0, 0, 0, 0)
    a = TrainAugment()(img, np.random.default_rng(5))
    b = TrainAugment()(img, np.random.default_rng(5))
    assert np.array_equal(a[0], b[0]) and a[1] == b[1]


def test_normalized_batch_values_and_erasing():
    img = torch.full((2, 4, 3, 3), 255, dtype=torch.uint8)
    x = normalize_images(img, torch.tensor([[0, 0, 2, 2], [0, 0, 0, 0]]))
    assert x.shape == (2, 3, 4, 3) and x.dtype == torch.float32
    expect = (1.0 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert torch.allclose(x[1, :, 0, 0], expect)
    assert (x[0, :, :2, :2] == 0).all() and torch.allclose(x[0, :, 3, 2], expect)
    assert int((x[0] == 0).all(0).sum()) == 4                   # only the 2 x 2 box


def test_prepare_batch_matches_a_per_image_reference():
    rng = np.random.default_rng(0)
    imgs = torch.from_numpy(rng.integers(0, 256, (3, 8, 5, 3), dtype=np.uint8))
    boxes = torch.tensor([[1, 2, 3, 2], [0, 0, 0, 0], [6, 0, 2, 5]], dtype=torch.int32)
    out = prepare_batch({"image": imgs, "erase": boxes, "pid": torch.arange(3)}, "cpu")
    assert set(out) == {"image", "pid"}
    for b in range(3):
        ref = (imgs[b].permute(2, 0, 1).float() / 255 - torch.tensor(CLIP_MEAN).view(3, 1, 1)) \
            / torch.tensor(CLIP_STD).view(3, 1, 1)
        top, left, h, w = boxes[b].tolist()
        ref[:, top:top + h, left:left + w] = 0
        torch.testing.assert_close(out["image"][b], ref)
