"""Find a data set on disk, decode it once into uint8 tensors, cache the result.

Lookup order, first hit wins (the run prints which one it used):

fashion_mnist
  1. torchvision layout ``<root>/FashionMNIST/raw/*-ubyte[.gz]``
  2. torchvision ``download=True`` into the root, where the internet is reachable
  3. Debian's ``/usr/share/datasets/fashion-mnist/*.gz`` (``apt-get install dataset-fashion-mnist``)
cifar10
  1. torchvision layout ``<root>/cifar-10-batches-py/``
  2. torchvision ``download=True`` into the root, where the internet is reachable
  3. the JPEG copy ``<root>/cifar10-jpeg/{train,test}/<class>/*.jpg`` or ``<root>/cifar10-jpeg.tar.gz``

Decoded splits are cached as ``<root>/cache/<dataset>-<source>-<split>.pt``
(``{"images": uint8 (N, C, H, W), "labels": int64 (N,), "source": str}``).
"""
from __future__ import annotations

import gzip
import io
import os
import pickle
import socket
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from data.errors import DataError

REPO_ROOT = Path(__file__).resolve().parent.parent
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
SPLIT_SIZES = {"fashion_mnist": {"train": 60000, "test": 10000}, "cifar10": {"train": 50000, "test": 10000}}
_FMNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                 "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


@dataclass
class Split:
    images: torch.Tensor  # uint8 (N, C, H, W)
    labels: torch.Tensor  # int64 (N,)
    source: str           # e.g. "debian", "torchvision", "jpeg-copy"


def default_data_root() -> Path:
    """``$QDNN_DATA_ROOT`` if set, else ``datasets/`` in the repository."""
    env = os.environ.get("QDNN_DATA_ROOT")
    return Path(env) if env else REPO_ROOT / "datasets"


def internet_reachable(host: str = "ossci-datasets.s3.amazonaws.com", timeout: float = 2.0) -> bool:
    """True if a TCP connection to the torchvision mirror opens within ``timeout`` seconds."""
    if os.environ.get("QDNN_OFFLINE"):
        return False
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------- parsers

def _read_maybe_gz(path: Path) -> bytes:
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
            return f.read()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"{path} is corrupt or truncated ({e}); delete it and provide the data again") from e


def parse_idx(raw: bytes, path: Path, expect_ndim: int) -> np.ndarray:
    """Parse an IDX file (big-endian header: magic 0x0000 08 <ndim>, then ndim uint32 sizes, then uint8 data)."""
    header = 4 + 4 * expect_ndim
    if len(raw) < header or raw[:3] != b"\x00\x00\x08" or raw[3] != expect_ndim:
        raise DataError(f"{path} is not a uint8 IDX file with {expect_ndim} dimensions; replace it with the original file")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(expect_ndim)]
    size = int(np.prod(dims))
    if len(raw) - header != size:
        raise DataError(f"{path} is truncated or corrupt: header says {dims} ({size} bytes) but "
                        f"{len(raw) - header} bytes follow; replace it with the original file")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _fmnist_from_dir(directory: Path, split: str, source: str) -> Split:
    img_name, lbl_name = _FMNIST_FILES[split]

    def find(name: str) -> Path:
        for cand in (directory / name, directory / f"{name}.gz"):
            if cand.exists():
                return cand
        raise DataError(f"{directory} lacks {name}[.gz]; provide all four Fashion-MNIST IDX files")

    img_path, lbl_path = find(img_name), find(lbl_name)
    images = parse_idx(_read_maybe_gz(img_path), img_path, 3)
    labels = parse_idx(_read_maybe_gz(lbl_path), lbl_path, 1)
    if len(images) != len(labels):
        raise DataError(f"{img_path} has {len(images)} images but {lbl_path} has {len(labels)} labels; replace the files")
    return Split(torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)), source)


def _cifar_from_pickles(directory: Path, split: str) -> Split:
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    xs, ys = [], []
    for name in names:
        path = directory / name
        try:
            with open(path, "rb") as f:
                entry = pickle.load(f, encoding="latin1")
            xs.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(entry["labels"], dtype=np.int64))
        except (OSError, EOFError, pickle.UnpicklingError, KeyError, ValueError) as e:
            raise DataError(f"{path} is missing, corrupt or truncated ({e}); re-download CIFAR-10 into {directory.parent}") from e
    return Split(torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys)), "torchvision")


def _decode_jpeg(raw: bytes, where: str) -> torch.Tensor:
    from PIL import Image
    try:
        with Image.open(io.BytesIO(raw)) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except Exception as e:  # PIL raises many types for bad files
        raise DataError(f"{where} is not a readable JPEG ({e}); replace the CIFAR-10 JPEG copy") from e
    if arr.shape != (32, 32, 3):
        raise DataError(f"{where} has shape {arr.shape}, expected 32x32 RGB; replace the CIFAR-10 JPEG copy")
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def _cifar_from_jpeg_dir(directory: Path, split: str) -> Split:
    xs, ys = [], []
    for label, cls in enumerate(CIFAR10_CLASSES):
        files = sorted((directory / split / cls).glob("*.jpg"))
        xs += [_decode_jpeg(p.read_bytes(), str(p)) for p in files]
        ys += [label] * len(files)
    return Split(torch.stack(xs), torch.tensor(ys, dtype=torch.int64), "jpeg-copy")


def _cifar_from_jpeg_tar(tar_path: Path, split: str) -> Split:
    items: list[tuple[int, str, bytes]] = []
    index = {c: i for i, c in enumerate(CIFAR10_CLASSES)}
    try:
        with tarfile.open(tar_path, "r:*") as tar:
            for member in tar:
                parts = Path(member.name).parts
                if member.isfile() and len(parts) >= 3 and parts[-3] == split and parts[-2] in index \
                        and parts[-1].endswith(".jpg"):
                    items.append((index[parts[-2]], parts[-1], tar.extractfile(member).read()))
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"{tar_path} is corrupt or truncated ({e}); copy cifar10-jpeg.tar.gz again") from e
    items.sort(key=lambda t: (t[0], t[1]))
    if not items:
        raise DataError(f"{tar_path} holds no {split}/<class>/*.jpg files; it is not the CIFAR-10 JPEG copy")
    xs = [_decode_jpeg(raw, f"{tar_path}:{split}/{CIFAR10_CLASSES[y]}/{name}") for y, name, raw in items]
    return Split(torch.stack(xs), torch.tensor([y for y, _, _ in items], dtype=torch.int64), "jpeg-copy")


# ---------------------------------------------------------------------- lookup

def _torchvision_download(dataset: str, root: Path) -> bool:
    """Try torchvision's download into ``root``; True if it succeeded."""
    import torchvision
    cls = torchvision.datasets.FashionMNIST if dataset == "fashion_mnist" else torchvision.datasets.CIFAR10
    try:
        for train in (True, False):
            cls(str(root), train=train, download=True)
        return True
    except Exception:  # network errors come in many types; fall through to the offline sources
        return False


def _candidates(dataset: str, root: Path, split: str) -> list[tuple[str, Path, str, object]]:
    """(description, path, source name, loader-or-None) in lookup order; loader None means 'try a
    download here'."""
    if dataset == "fashion_mnist":
        raw = root / "FashionMNIST" / "raw"
        return [
            ("torchvision layout", raw, "torchvision", lambda: _fmnist_from_dir(raw, split, "torchvision")),
            ("torchvision download", root, "torchvision", None),
            ("Debian dataset-fashion-mnist", DEBIAN_FASHION_MNIST, "debian",
             lambda: _fmnist_from_dir(DEBIAN_FASHION_MNIST, split, "debian")),
        ]
    batches = root / "cifar-10-batches-py"
    jpeg_dir, jpeg_tar = root / "cifar10-jpeg", root / "cifar10-jpeg.tar.gz"
    return [
        ("torchvision layout", batches, "torchvision", lambda: _cifar_from_pickles(batches, split)),
        ("torchvision download", root, "torchvision", None),
        ("JPEG copy (directory)", jpeg_dir / split, "jpeg-copy", lambda: _cifar_from_jpeg_dir(jpeg_dir, split)),
        ("JPEG copy (tarball)", jpeg_tar, "jpeg-copy", lambda: _cifar_from_jpeg_tar(jpeg_tar, split)),
    ]


def _how_to_provide(dataset: str, root: Path) -> str:
    if dataset == "fashion_mnist":
        return "run `apt-get install -y dataset-fashion-mnist`, or put the IDX files in " f"{root}/FashionMNIST/raw/"
    return f"copy or symlink cifar10-jpeg.tar.gz (see ../shared/data/README.md) into {root}/, or put the official python batches in {root}/cifar-10-batches-py/"


def _cache_path(root: Path, dataset: str, source: str, split: str) -> Path:
    return root / "cache" / f"{dataset}-{source}-{split}.pt"


def _load_cache(path: Path) -> Split | None:
    try:
        blob = torch.load(path, weights_only=True)
        return Split(blob["images"], blob["labels"], blob["source"])
    except Exception:  # a broken cache is rebuilt, never fatal
        return None


def _save_cache(path: Path, split: Split) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save({"images": split.images, "labels": split.labels, "source": split.source}, tmp)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only root just means no cache


def load_split(dataset: str, split: str, root: str | Path | None = None, verbose: bool = True) -> Split:
    """Return one split of ``dataset`` as uint8 images (N, C, H, W) and int64 labels.

    Sources are tried in the module docstring's order; the decoded tensors are
    cached under ``<root>/cache`` so later runs load in about a second. Raises
    ``DataError`` (one line) naming every place looked at when nothing is found.
    """
    if dataset not in SPLIT_SIZES:
        raise DataError(f"unknown dataset {dataset!r}; choose one of: {', '.join(SPLIT_SIZES)}")
    if split not in ("train", "test"):
        raise DataError(f"unknown split {split!r}; use 'train' or 'test'")
    if root is None and not os.environ.get("QDNN_DATA_ROOT"):
        root = default_data_root()  # datasets/ in the repository: may be absent, Debian's copy may serve
    else:
        root = Path(root if root is not None else os.environ["QDNN_DATA_ROOT"])
        if not root.is_dir():
            raise DataError(f"data root {root} does not exist; create it, or pass an existing --data-root "
                            f"(or unset QDNN_DATA_ROOT to use datasets/ in the repository)")
    looked: list[str] = []
    tried_download = False
    for desc, path, source, loader in _candidates(dataset, root, split):
        if loader is None:
            if tried_download or not internet_reachable():
                looked.append(f"{desc} (offline)")
                continue
            tried_download = True
            if _torchvision_download(dataset, root):
                return load_split(dataset, split, root, verbose)
            looked.append(f"{desc} (failed)")
            continue
        looked.append(f"{desc} {path}")
        if not path.exists():
            continue
        cache = _cache_path(root, dataset, source, split)
        out = _load_cache(cache) if cache.exists() else None
        if out is None:
            out = loader()
            _check_split(out, dataset, split, path)
            _save_cache(cache, out)
        if verbose:
            print(f"[data] {dataset}/{split}: {len(out.labels)} images from {desc} {path}")
        return out
    raise DataError(f"no {dataset} data found; looked in: {'; '.join(looked)}. To fix: {_how_to_provide(dataset, root)}")


def _check_split(s: Split, dataset: str, split: str, path: Path) -> None:
    n = SPLIT_SIZES[dataset][split]
    if len(s.labels) != n or len(s.images) != n:
        raise DataError(f"{path} gave {len(s.labels)} {split} images, expected {n}; the copy is incomplete, provide it again")
    if int(s.labels.min()) < 0 or int(s.labels.max()) > 9:
        raise DataError(f"{path} has labels outside 0..9; the copy is corrupt, provide it again")
