"""Both architectures: shapes, and causal models never read the future."""
import pytest
import torch

from model import LSTMConfig, SleepLSTM
from model_hybrid import HybridConfig, SleepHybrid


def small(arch, causal):
    if arch == "lstm":
        return SleepLSTM(LSTMConfig(n_features=6, hidden=32, n_layers=2, n_heads=2, causal=causal))
    return SleepHybrid(HybridConfig(n_features=6, channels=16, n_layers=2, n_heads=2, causal=causal))


@pytest.mark.parametrize("arch", ["lstm", "hybrid"])
@pytest.mark.parametrize("causal", [False, True])
def test_output_shape_and_future_dependence(arch, causal):
    torch.manual_seed(0)
    model = small(arch, causal).eval()
    x = torch.randn(3, 25, 6)
    later = x.clone()
    later[:, 15:] += 3.0  # change only epochs 15..24
    with torch.no_grad():
        out, out_later = model(x), model(later)
    assert out.shape == (3, 25, 4)
    same_past = torch.allclose(out[:, :15], out_later[:, :15], atol=1e-5)
    assert same_past == causal  # causal: the past is untouched; offline: context flows both ways
    assert not torch.allclose(out[:, 15:], out_later[:, 15:])


@pytest.mark.parametrize("arch", ["lstm", "hybrid"])
def test_windows_of_other_lengths_work(arch):
    model = small(arch, False).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 7, 6)).shape == (2, 7, 4)
