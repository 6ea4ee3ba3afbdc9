import gzip

import pytest
import torch

from data import DataError, Loader, load_split, synthetic_split
from data.loader import batch_crop, batch_erase, batch_flip, parse_augment
from tests.conftest import real_split

EXPECTED = {"fashion_mnist": ((1, 28, 28), {"train": 60000, "test": 10000}),
            "cifar10": ((3, 32, 32), {"train": 50000, "test": 10000})}


@pytest.mark.parametrize("dataset", ["fashion_mnist", "cifar10"])
@pytest.mark.parametrize("split", ["train", "test"])
def test_real_split_shapes_dtypes_balance(dataset, split):
    s = real_split(dataset, split)
    shape, sizes = EXPECTED[dataset]
    assert s.images.dtype == torch.uint8 and s.labels.dtype == torch.int64
    assert tuple(s.images.shape) == (sizes[split], *shape)
    assert int(s.labels.min()) == 0 and int(s.labels.max()) == 9
    assert s.labels.bincount().tolist() == [sizes[split] // 10] * 10
    assert 0.1 < s.images.float().mean().item() / 255 < 0.6  # real pixels, not zeros or noise


@pytest.mark.parametrize("dataset", ["fashion_mnist", "cifar10"])
def test_real_loader_batches(dataset):
    s = real_split(dataset, "test")
    loader = Loader(s.images, s.labels, dataset, 1000)
    xs, ys = zip(*loader)
    x = torch.cat(xs)
    assert x.dtype == torch.float32 and x.shape[0] == 10000 and torch.equal(torch.cat(ys), s.labels)
    assert abs(x.mean().item()) < 0.15 and 0.8 < x.std().item() < 1.2  # normalised with train statistics


def test_augmentation_keeps_shapes_and_label_alignment():
    n = 64
    # each image is constant and equal to its label: any mix-up of images and labels would show
    labels = torch.arange(n) % 10
    images = (labels * 20).to(torch.uint8).view(n, 1, 1, 1).expand(n, 3, 32, 32).contiguous()
    loader = Loader(images, labels, "cifar10", 16, train=True, augment="crop4,flip", seed=3)
    seen = []
    for x, y in loader:
        assert x.shape == (16, 3, 32, 32)
        per_channel = x.flatten(2)
        assert torch.equal(per_channel.amax(2), per_channel.amin(2))  # reflect padding: still constant
        expected = Loader(images[:1] * 0 + (y * 20).to(torch.uint8).view(-1, 1, 1, 1), y, "cifar10", 16).x
        assert torch.allclose(x, expected.expand_as(x))
        seen.append(y)
    assert sorted(torch.cat(seen).tolist()) == sorted(labels.tolist())  # a permutation of the data set


def test_crop_and_flip_move_pixels():
    g = torch.Generator().manual_seed(0)
    x = torch.arange(2 * 1 * 8 * 8, dtype=torch.float32).view(2, 1, 8, 8)
    flipped = batch_flip(x.repeat(50, 1, 1, 1), g)
    n_flipped = sum(torch.equal(flipped[i], x[i % 2].flip(2)) for i in range(100))
    assert 20 < n_flipped < 80
    cropped = batch_crop(x.repeat(50, 1, 1, 1), 2, g)
    assert cropped.shape == (100, 1, 8, 8)
    assert any(not torch.equal(cropped[i], x[i % 2]) for i in range(100))
    # a crop is a translation: the centre 4x4 of the original appears somewhere in each crop
    for i in range(10):
        centre = x[i % 2, 0, 2:6, 2:6]
        windows = cropped[i, 0].unfold(0, 4, 1).unfold(1, 4, 1).reshape(-1, 4, 4)
        assert any(torch.equal(w, centre) for w in windows)


def test_random_erasing_blanks_one_rectangle():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 1, 28, 28) + 10  # no pixel is 0 before erasing
    out = batch_erase(x, 0.5, g)
    erased = out == 0
    counts = erased.flatten(1).sum(1)
    assert 150 < int((counts > 0).sum()) < 250  # about half the images
    assert torch.equal(out[~erased], x[~erased])  # everything else untouched
    for i in torch.nonzero(counts).flatten()[:50].tolist():
        rows, cols = erased[i, 0].any(1).nonzero().flatten(), erased[i, 0].any(0).nonzero().flatten()
        h, w = len(rows), len(cols)
        assert int(counts[i]) == h * w  # one solid rectangle
        assert rows[-1] - rows[0] + 1 == h and cols[-1] - cols[0] + 1 == w
        assert h * w <= 0.4 * 784 * 1.2 + 28
    assert 0.12 < counts[counts > 0].float().mean().item() / 784 < 0.3  # area ratio uniform in 2%..40%
    assert torch.equal(batch_erase(x, 1.0, torch.Generator().manual_seed(1)),
                       batch_erase(x, 1.0, torch.Generator().manual_seed(1)))
    assert parse_augment("flip,erase25") == [("flip", 0), ("erase", 25)]
    for bad in ("erase0", "erase101", "erase"):
        with pytest.raises(ValueError, match="unknown augmentation"):
            parse_augment(bad)


def test_shuffle_is_seeded_per_epoch():
    s = synthetic_split("fashion_mnist", 100)
    a = Loader(s.images, s.labels, "fashion_mnist", 10, train=True, seed=1)
    b = Loader(s.images, s.labels, "fashion_mnist", 10, train=True, seed=1)
    ya = torch.cat([y for _, y in a])
    assert torch.equal(ya, torch.cat([y for _, y in b]))
    a.set_epoch(1)
    assert not torch.equal(ya, torch.cat([y for _, y in a]))


def test_bad_augment_spec():
    with pytest.raises(ValueError, match="unknown augmentation 'rotate'"):
        parse_augment("crop4,rotate")


def test_missing_data_root_is_one_line_error(tmp_path):
    with pytest.raises(DataError, match="does not exist") as e:
        load_split("cifar10", "train", tmp_path / "nope")
    assert "\n" not in str(e.value)


def test_nothing_found_lists_every_place(tmp_path, monkeypatch):
    monkeypatch.setenv("QDNN_OFFLINE", "1")
    with pytest.raises(DataError) as e:
        load_split("cifar10", "test", tmp_path)
    msg = str(e.value)
    assert "\n" not in msg
    for place in ("cifar-10-batches-py", "torchvision download", "cifar10-jpeg", "cifar10-jpeg.tar.gz", "To fix"):
        assert place in msg


def test_truncated_idx_file_gives_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("QDNN_OFFLINE", "1")
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    header = b"\x00\x00\x08\x03" + (10000).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
    with gzip.open(raw / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(header + bytes(1000))  # far fewer pixels than the header promises
    with gzip.open(raw / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(b"\x00\x00\x08\x01" + (10000).to_bytes(4, "big") + bytes(10000))
    with pytest.raises(DataError, match="truncated or corrupt"):
        load_split("fashion_mnist", "test", tmp_path)
    (raw / "t10k-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b\x08garbage")
    with pytest.raises(DataError, match="corrupt or truncated"):
        load_split("fashion_mnist", "test", tmp_path)


def test_idx_files_under_root_win_and_are_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("QDNN_OFFLINE", "1")
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    n = 10000
    images = torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(n) % 10
    (raw / "t10k-images-idx3-ubyte").write_bytes(
        b"\x00\x00\x08\x03" + n.to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + images.numpy().tobytes())
    (raw / "t10k-labels-idx1-ubyte").write_bytes(
        b"\x00\x00\x08\x01" + n.to_bytes(4, "big") + labels.to(torch.uint8).numpy().tobytes())
    s = load_split("fashion_mnist", "test", tmp_path, verbose=False)
    assert s.source == "torchvision" and torch.equal(s.images[:, 0], images) and torch.equal(s.labels, labels)
    assert (tmp_path / "cache" / "fashion_mnist-torchvision-test.pt").exists()
    (raw / "t10k-images-idx3-ubyte").unlink()  # the cache now serves
    assert torch.equal(load_split("fashion_mnist", "test", tmp_path, verbose=False).images, s.images)
