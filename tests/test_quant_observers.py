"""quant.observers: min/max and EMA ranges, the histogram calibrators (percentile, MSE, entropy) on synthetic
data, the weight ranges per channel (MSE, percentile), the registry, state dicts."""
import pytest
import torch

from quant import QuantError
from quant.observers import OBSERVERS, WEIGHT_RANGES, EMAObserver, MinMaxObserver, WeightMSEObserver, build_observer
from quant.qparams import QParams, choose_qparams, fake_quantize


def observed(name: str, x: torch.Tensor, bits: int = 8, **kw) -> tuple[float, float]:
    obs = build_observer(name, bits, **kw)
    for chunk in x.split(len(x) // 4):
        obs(chunk)
    qp = obs.calculate_qparams()
    lo = float((qp.qmin - qp.zero_point) * qp.scale)
    return lo, float((qp.qmax - qp.zero_point) * qp.scale)


def test_percentile_100_is_minmax_on_uniform():
    x = torch.rand(40_000, generator=torch.Generator().manual_seed(0)) * 6 - 1
    assert observed("percentile", x, percentile=100.0) == pytest.approx(observed("minmax", x), rel=1e-6)


@pytest.mark.parametrize("name", ["percentile", "mse", "entropy"])
def test_one_outlier_is_clipped_except_by_minmax(name):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40_000, generator=g).relu()
    x[123] = 100.0
    assert observed("minmax", x)[1] == pytest.approx(100.0, rel=0.01)
    assert observed(name, x, bits=4)[1] < 30.0  # mse searches down to 20% of the range


def test_histogram_observers_widen_their_range_across_batches():
    """Batches with growing ranges: the histogram is rebinned, its total count kept."""
    obs = build_observer("percentile", 8)
    for k in range(1, 5):
        obs(torch.linspace(0, k, 1000))
    assert obs.hist.sum() == 4000 and float(obs.max_val) == 4.0
    ent = build_observer("entropy", 8)
    ent(torch.linspace(0, 1, 1000))
    assert ent.hist.sum() == 999  # the exact zero is left out (see EntropyObserver.skip_zeros)
    assert 0 < observed("entropy", torch.linspace(0, 4, 4000))[1] <= 4.0 + 1e-6


def test_mse_never_worse_than_minmax_on_its_error():
    g = torch.Generator().manual_seed(1)
    for bits in (2, 4, 8):
        x = torch.randn(20_000, generator=g) ** 3
        errs = {}
        for name in ("minmax", "mse"):
            obs = build_observer(name, bits)
            obs(x)
            errs[name] = (fake_quantize(x, obs.calculate_qparams()) - x).pow(2).mean()
        assert errs["mse"] <= errs["minmax"] * (1 + 1e-6)


def test_weight_percentile_range_clips_per_channel():
    w = torch.randn(4, 3, 3, 3, generator=torch.Generator().manual_seed(2))
    w[1, 0, 0, 0] = 50.0
    pct = WEIGHT_RANGES["percentile"](4, symmetric=True, narrow=True, axis=0, percentile=90.0)
    pct(w)
    mm = WEIGHT_RANGES["minmax"](4, symmetric=True, narrow=True, axis=0)
    mm(w)
    assert float(mm.max_val[1]) == 50.0 and float(pct.max_val[1]) < 5.0
    assert (pct.max_val <= w.abs().reshape(4, -1).amax(1)).all()


def test_every_calibrator_is_registered():
    assert {"minmax", "ema", "mse", "percentile", "entropy"} <= set(OBSERVERS)
    assert {"minmax", "mse", "percentile"} <= set(WEIGHT_RANGES)


def test_observers():
    a, b = torch.tensor([-1.0, 2.0]), torch.tensor([-3.0, 1.0])
    mm = build_observer("minmax", 8)
    mm(a), mm(b)
    assert (mm.min_val.item(), mm.max_val.item()) == (-3.0, 2.0)
    ema = build_observer("ema", 8, momentum=0.75)
    assert isinstance(ema, EMAObserver) and set(OBSERVERS) >= {"minmax", "ema"}
    ema(a), ema(b)
    assert ema.min_val.item() == pytest.approx(0.75 * -1 + 0.25 * -3)
    assert ema.max_val.item() == pytest.approx(0.75 * 2 + 0.25 * 1)
    ema.frozen = True
    ema(torch.tensor([-100.0, 100.0]))
    assert ema.max_val.item() == pytest.approx(1.75)
    with pytest.raises(QuantError, match="calibrate"):
        build_observer("minmax", 8).calculate_qparams()


@pytest.mark.parametrize("bits", [2, 3, 4, 8], ids=lambda b: f"b{b}")
def test_weight_mse_range_is_the_least_error_clip_per_channel(bits):
    """Each channel's range is the grid ratio of max |w| with the least squared error (at most the
    min/max range's error); a channel that its full range represents exactly keeps it."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, 8, 3, 3, generator=g) * torch.tensor([0.1, 1.0, 3.0, 0.5, 2.0]).reshape(-1, 1, 1, 1)
    w[0] = torch.where(w[0] < 0, -0.1, 0.1)   # every |w| = 0.1: the full range is exact
    obs = WeightMSEObserver(bits, symmetric=True, narrow=True, axis=0)
    obs(w)
    qp = obs.calculate_qparams()
    amax = w.reshape(5, -1).abs().amax(1)
    clip = obs.max_val
    assert torch.equal(obs.min_val, -clip) and (clip <= amax).all() and (clip >= 0.3 * amax * (1 - 1e-6)).all()

    def err(scale):
        q = QParams(scale, torch.zeros(5, dtype=torch.int32), -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1, 0)
        return (fake_quantize(w, q) - w).pow(2).reshape(5, -1).sum(1)

    minmax = choose_qparams(-amax, amax, bits, True, True, 0)
    assert (err(qp.scale) <= err(minmax.scale) * (1 + 1e-6)).all()
    for a in (0.3, 0.55, 0.8, 0.99):  # no other grid ratio does better
        assert (err(qp.scale) <= err(minmax.scale * a) * (1 + 1e-6)).all()
    if bits <= 3:
        assert (clip[1:] < amax[1:]).all()  # Gaussian channels: the tails are clipped at 2-3 bits
    assert clip[0] == amax[0] and err(qp.scale)[0] < 1e-12  # exact at the full range (ties keep the widest)
    with pytest.raises(QuantError, match="symmetric"):
        WeightMSEObserver(4, symmetric=False)(w)


def test_observer_state_dict_roundtrip():
    obs = MinMaxObserver(8, symmetric=True, narrow=True, axis=0)
    obs(torch.randn(4, 5))
    obs.frozen = True
    fresh = MinMaxObserver(8, symmetric=True, narrow=True, axis=0)
    fresh.load_state_dict(obs.state_dict())
    assert torch.equal(fresh.min_val, obs.min_val) and fresh.frozen


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_flat_values_is_a_view_in_any_dense_layout(fmt):
    """Activations in channels-last layout are reduced through a view, not a copy, and give the same range."""
    from quant.observers import flat_values
    x = torch.randn(4, 6, 5, 3).contiguous(memory_format=fmt)
    flat = flat_values(x)
    assert flat.dim() == 1 and flat.numel() == x.numel() and flat.data_ptr() == x.data_ptr()
    assert sorted(flat.tolist()) == sorted(x.reshape(-1).tolist())
    strided = x[:, ::2]  # not dense: copied
    assert sorted(flat_values(strided).tolist()) == sorted(strided.reshape(-1).tolist())
    obs = MinMaxObserver(8)
    obs(x)
    assert obs.min_val == x.min() and obs.max_val == x.max()
