"""quant.checkpoint: fake-quant and integer models saved (atomically) and loaded back exactly; a checkpoint of
another model or of another kind is refused in one line."""
import pytest
import torch

import quant
from models import build_model
from quant import QuantConfig, QuantError
from tests.conftest import synthetic_setup


def test_save_load_roundtrip(tmp_path):
    model, batch = synthetic_setup("cnn_bn", "fashion_mnist")
    q = quant.quantize(model, QuantConfig(weight_bits=6, act_bits=6, observer="ema"))
    quant.calibrate(q, [batch(64)[0] for _ in range(3)])
    im = quant.convert(q, rounding="builtin")
    x, _ = batch(100)
    meta = {"dataset": "fashion_mnist", "model": "cnn_bn"}
    quant.save_quantized(tmp_path / "q.pt", q, meta)
    quant.save_integer(tmp_path / "i.pt", im, meta)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["i.pt", "q.pt"]  # no temp files left behind

    q2, meta2 = quant.load_quantized(tmp_path / "q.pt", build_model("cnn_bn", "fashion_mnist"))
    assert meta2 == meta and q2.quant_config == q.quant_config
    with torch.no_grad():
        assert torch.equal(q2(x), q(x))  # observers stay frozen after loading
        assert torch.equal(q2(x * 3), q(x * 3))
    im2, _ = quant.load_integer(tmp_path / "i.pt", build_model("cnn_bn", "fashion_mnist"))
    assert im2.rounding == "builtin"
    assert torch.equal(im2.forward_int(x), im.forward_int(x))
    assert torch.equal(quant.convert(q2, rounding="builtin").forward_int(x), im.forward_int(x))


def test_loading_another_models_checkpoint_is_a_clear_error(tmp_path):
    model, batch = synthetic_setup("cnn", "fashion_mnist")
    q = quant.quantize(model, QuantConfig(observer="minmax"))
    quant.calibrate(q, [batch(32)[0]])
    meta = {"dataset": "fashion_mnist", "model": "cnn"}
    quant.save_quantized(tmp_path / "q.pt", q, meta)
    quant.save_integer(tmp_path / "i.pt", quant.convert(q), meta)
    for load, path in ((quant.load_quantized, "q.pt"), (quant.load_integer, "i.pt")):
        with pytest.raises(QuantError, match="fashion_mnist/cnn, not this one") as e:
            load(tmp_path / path, build_model("cnn_bn", "fashion_mnist"))
        assert "\n" not in str(e.value)
    with pytest.raises(QuantError, match="not a quant.integer checkpoint"):
        quant.load_integer(tmp_path / "q.pt")
    with pytest.raises(QuantError, match="not found"):
        quant.load_integer(tmp_path / "missing.pt")
    torch.save({"model": model.state_dict(), "epoch": 3}, tmp_path / "float.pt")
    with pytest.raises(QuantError, match="not a quant.fakequant checkpoint"):
        quant.load_quantized(tmp_path / "float.pt", model)


def test_atomic_writes_get_the_umask_mode_and_keep_an_existing_files(tmp_path):
    import os
    from quant.io import atomic_write_bytes
    old = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "new.csv", b"a\n")
        assert (tmp_path / "new.csv").stat().st_mode & 0o777 == 0o644  # not mkstemp's owner-only 0o600
        (tmp_path / "kept.csv").write_bytes(b"a\n")
        (tmp_path / "kept.csv").chmod(0o640)
        atomic_write_bytes(tmp_path / "kept.csv", b"b\n")
        assert (tmp_path / "kept.csv").stat().st_mode & 0o777 == 0o640 and (tmp_path / "kept.csv").read_bytes() == b"b\n"
    finally:
        os.umask(old)
