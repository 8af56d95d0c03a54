"""Both architectures: shapes, and causal models never read the future."""
import numpy as np
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


@pytest.mark.parametrize("arch", ["lstm", "hybrid"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("size", ["small", "shipped"])
def test_forward_last_equals_the_last_position_of_forward(arch, causal, size):
    """forward_last (the real-time path) == forward(x)[:, -1], for every window length, 1 included."""
    torch.manual_seed(0)
    if size == "small":
        model, n_features = small(arch, causal), 6
    elif arch == "lstm":
        model, n_features = SleepLSTM(LSTMConfig(causal=causal)), 15
    else:  # the shipped hybrid's shape (train_hybrid.MODEL)
        model, n_features = SleepHybrid(HybridConfig(channels=64, kernel_size=5, n_layers=3, n_heads=4,
                                                     causal=causal)), 15
    model.eval()
    for seq_len in (1, 2, 9, 25, 40):
        x = torch.randn(7, seq_len, n_features) * 2.0
        with torch.inference_mode():
            last, full = model.forward_last(x), model(x)[:, -1]
        assert last.shape == (7, 4)
        torch.testing.assert_close(last, full, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(torch.softmax(last, -1), torch.softmax(full, -1), atol=1e-6, rtol=0)


@pytest.mark.parametrize("kernel_size", [3, 5])
def test_hybrid_conv_outputs_split_as_the_streaming_cache_uses_them(kernel_size):
    """embed == the conv blocks of forward; with pad=False, position j >= receptive_field of a window
    is the conv output computed from its receptive_field + 1 inputs alone (what StagerBatch caches)."""
    torch.manual_seed(0)
    model = SleepHybrid(HybridConfig(n_features=6, channels=16, kernel_size=kernel_size, n_layers=1, n_heads=2,
                                     causal=True)).eval()
    r = model.receptive_field
    x = torch.randn(5, 25, 6)
    with torch.inference_mode():
        conv = model.conv2(model.conv1(x.transpose(1, 2))).transpose(1, 2)
        torch.testing.assert_close(model.embed(x), conv, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.embed(x[:, :r]), conv[:, :r], atol=1e-5, rtol=1e-5)  # padded start
        for j in (r, 13, 24):
            alone = model.embed(x[:, j - r:j + 1], pad=False)[:, 0]
            torch.testing.assert_close(alone, conv[:, j], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.encode_last(conv), model(x)[:, -1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_dilated_conv_stack_embeds_as_forward_and_stays_causal(causal):
    """The dilated residual blocks (the whole-night and TCN models): embed (the stream's fast path) gives
    forward's conv features, pad=False gives each position from its receptive field alone, and a causal
    stack never reads a later epoch."""
    torch.manual_seed(0)
    model = SleepHybrid(HybridConfig(n_features=6, channels=16, kernel_size=3, n_layers=0, dilated=3,
                                     lookahead=2, causal=causal)).eval()
    r = model.receptive_field
    assert r == 2 * (2 + 2 + 4 + 8)
    x = torch.randn(4, 60, 6)
    with torch.inference_mode():
        conv = model.conv2(model.conv1(x.transpose(1, 2)))
        for block in model.dilated:
            conv = conv + block(conv)
        conv = conv.transpose(1, 2)
        torch.testing.assert_close(model.embed(x), conv, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.forward_last(x, lags=True), model(x, lags=True)[:, -1], atol=1e-5, rtol=1e-5)
        if causal:
            for j in (r, 45, 59):
                torch.testing.assert_close(model.embed(x[:, j - r:j + 1], pad=False)[:, 0], conv[:, j],
                                           atol=1e-5, rtol=1e-5)
            later = x.clone()
            later[:, 40:] += 3.0
            torch.testing.assert_close(model(later)[:, :40], model(x)[:, :40])


@pytest.mark.parametrize("arch", ["lstm", "hybrid"])
def test_pooled_whole_night_models_label_every_epoch_of_any_length(arch):
    """pool > 1 (offline): sequences that are not a multiple of pool still get one output per epoch, each
    epoch's own input still counts, and a causal model refuses pooling (it would mix in later epochs)."""
    torch.manual_seed(0)
    if arch == "lstm":
        model, config = SleepLSTM(LSTMConfig(n_features=6, hidden=16, n_layers=1, n_heads=2, pool=4)), LSTMConfig
    else:
        model, config = SleepHybrid(HybridConfig(n_features=6, channels=16, n_layers=1, n_heads=2, pool=4)), HybridConfig
    model.eval()
    x = torch.randn(2, 37, 6)
    changed = x.clone()
    changed[:, 9] += 3.0  # one epoch inside a token of four
    with torch.no_grad():
        out, out_changed = model(x), model(changed)
        assert out.shape == (2, 37, 4)
        torch.testing.assert_close(model.forward_last(x), out[:, -1])
    per_epoch = (out - out_changed).abs().amax(dim=(0, 2))
    assert per_epoch[9] > per_epoch[8]  # the changed epoch moves most: not just its token's mean
    with pytest.raises(ValueError, match="offline"):
        (SleepLSTM if arch == "lstm" else SleepHybrid)(config(n_features=6, causal=True, pool=4))


@pytest.mark.parametrize("ensemble,summary_epochs", [(1, 0), (2, 0), (1, 7), (2, 7)])
def test_a_causal_whole_night_model_steps_one_epoch_at_a_time_as_forward(ensemble, summary_epochs):
    """SleepHybrid.step (and an Ensemble's, its members stepped as one) gives forward(night so far)[:, -1] at
    every epoch, lags included,
    past the precomputed positions; nights that start at different steps each pad with their own first epoch."""
    from checkpoint import build_model
    torch.manual_seed(0)
    config = dict(n_features=6, channels=16, kernel_size=3, n_layers=0, dilated=3, causal=True, lookahead=4, max_len=32,
                  summary_epochs=summary_epochs)
    model = build_model("hybrid", config, ensemble_size=ensemble).eval()
    x = torch.randn(2, 70, 6)
    with torch.no_grad():
        state, outs = model.init_state(2), []
        for t in range(70):
            logits, state = model.step(x[:, t], state, lags=True)
            outs.append(logits)
        torch.testing.assert_close(torch.stack(outs, 1), model(x, lags=True), atol=1e-5, rtol=0)
        # night 1 starts over at step 40 (its state rows reset): its outputs are those of the night from there
        state = model.init_state(2)
        for t in range(40):
            _, state = model.step(x[:, t], state)
        fresh = model.init_state(1)
        state = [torch.cat([a[:1], b]) for a, b in zip(state, fresh)]  # rows first, for a model or an ensemble
        logits, _ = model.step(x[:, 40], state)
        torch.testing.assert_close(logits[1], model(x[1:, 40:41])[0, -1], atol=1e-5, rtol=0)
        torch.testing.assert_close(logits[0], model(x[:1, :41])[0, -1], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="step needs a causal model without a Transformer"):
        SleepHybrid(HybridConfig(n_features=6, channels=16, n_layers=1, causal=True)).init_state(1)


def test_stepping_works_with_a_kernel_of_one_and_a_model_made_in_inference_mode():
    """Edge cases of SleepHybrid.step: a kernel of 1 keeps no past inputs (its state keeps its shape, so
    more rows can join), and a model built under torch.inference_mode steps (its weights cache too)."""
    from evaluation import NightSteps
    with torch.inference_mode():
        model = SleepHybrid(HybridConfig(n_features=4, channels=8, kernel_size=1, n_layers=0, dilated=2, causal=True,
                                         lookahead=2)).eval()
        x = torch.randn(1, 12, 4)
        expected = torch.softmax(model(x, lags=True)[0], dim=-1).numpy()
    steps = NightSteps(model, None, 1)
    out = [steps.push(np.array([t]), x[0, t:t + 1].numpy())[0][0] for t in range(12)]
    steps.add_rows(2)
    np.testing.assert_allclose(np.stack(out), expected, atol=1e-5, rtol=0)
    assert [len(t) for t in steps.state] == [3] * len(steps.state)


def test_the_decaying_summary_is_the_weighted_mean_of_the_outputs_so_far():
    from model_hybrid import causal_summary
    torch.manual_seed(2)
    h = torch.randn(2, 1300, 3, dtype=torch.float64)  # past one 512-position block of the computation
    for n in (2, 40):
        d = 1 - 1 / n
        weights = [d ** torch.arange(t, -1, -1, dtype=torch.float64) for t in range(h.shape[1])]  # d ** (t - s)
        expected = torch.stack([(h[:, :t + 1] * w.view(1, -1, 1)).sum(1) / w.sum() for t, w in enumerate(weights)], dim=1)
        torch.testing.assert_close(causal_summary(h, n), expected)
    torch.testing.assert_close(causal_summary(h, 0), h.cumsum(1) / torch.arange(1, 1301, dtype=torch.float64).view(1, -1, 1))
    with pytest.raises(ValueError, match="summary_epochs 1"):
        SleepHybrid(HybridConfig(n_features=4, channels=8, n_layers=0, causal=True, summary_epochs=1))
    with pytest.raises(ValueError, match="offline model's summary"):
        SleepHybrid(HybridConfig(n_features=4, channels=8, n_layers=0, summary_epochs=10))


def test_a_step_writes_its_state_in_place_whichever_mode_made_it():
    """The step state is a ring per conv block, written in place: a state made under inference mode steps
    outside it, and a plain one inside it, with the same outputs."""
    torch.manual_seed(5)
    model = SleepHybrid(HybridConfig(n_features=4, channels=8, kernel_size=3, n_layers=0, dilated=2, causal=True)).eval()
    x = torch.randn(2, 9, 4)
    with torch.inference_mode():
        made_inside = model.init_state(2)
    made_outside, outs = model.init_state(2), {"inside": [], "outside": []}
    for t in range(9):
        with torch.no_grad():
            logits, state = model.step(x[:, t], made_inside)
        assert state is made_inside  # in place
        outs["inside"].append(logits)
        with torch.inference_mode():
            outs["outside"].append(model.step(x[:, t], made_outside)[0])
    torch.testing.assert_close(torch.stack(outs["inside"], 1), model(x).detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.stack(outs["outside"], 1), model(x).detach(), atol=1e-5, rtol=0)
    assert not made_outside[0].is_inference()


def test_a_step_after_the_weights_change_uses_the_new_weights():
    """The stacked weights step_members keeps between steps are made again once a parameter changes in
    place (as an optimizer step changes it) or is replaced (load_state_dict of other weights)."""
    torch.manual_seed(3)
    model = SleepHybrid(HybridConfig(n_features=4, channels=8, kernel_size=3, n_layers=0, dilated=1, causal=True)).eval()
    x = torch.randn(1, 5, 4)
    with torch.no_grad():
        model.step(x[:, 0], model.init_state(1))  # builds the cache
        model.head[-1].bias.add_(1.0)             # in place, as an optimizer step
        state, out = model.init_state(1), []
        for t in range(5):
            logits, state = model.step(x[:, t], state)
            out.append(logits)
        torch.testing.assert_close(torch.stack(out, 1), model(x), atol=1e-5, rtol=0)
        other = SleepHybrid(model.config).eval()
        model.load_state_dict(other.state_dict())
        logits, _ = model.step(x[:, 0], model.init_state(1))
        torch.testing.assert_close(logits, other(x[:, :1])[:, 0], atol=1e-5, rtol=0)
