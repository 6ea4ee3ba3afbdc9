"""quant.fold: folding a BatchNorm into the conv before it is pure and equals conv -> BN in eval mode."""
import torch
import torch.nn as nn

from quant.fold import fold_bn
from tests.conftest import randomise_bn_seeded as _randomise_bn


def test_fold_bn_equals_conv_bn_eval():
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(3, 8, 3), _randomise_bn(nn.BatchNorm2d(8))
    conv_nobias = nn.Conv2d(3, 8, 3, bias=False)
    x = torch.randn(4, 3, 10, 10)
    for c in (conv, conv_nobias):
        before = {k: v.clone() for k, v in (*c.state_dict().items(), *bn.state_dict().items())}
        w, b = fold_bn(c, bn)
        after = {k: v for k, v in (*c.state_dict().items(), *bn.state_dict().items())}
        assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)  # pure
        assert w is not c.weight and w.data_ptr() != c.weight.data_ptr()  # a new tensor, not the conv's
        assert torch.allclose(nn.functional.conv2d(x, w, b), bn(c(x)), atol=1e-5)
