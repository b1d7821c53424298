"""`full_precision`: reported evaluations compute in fp32 under a mixed-precision trainer."""
import torch

from tasks.common.full_precision import full_precision


def test_full_precision_switches_autocast_off_and_back_on():
    layer, x = torch.nn.Linear(4, 4), torch.randn(2, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16
        with full_precision(x.device):
            assert layer(x).dtype == torch.float32
        with full_precision(x.device, enabled=False):
            assert layer(x).dtype == torch.bfloat16
        assert layer(x).dtype == torch.bfloat16
