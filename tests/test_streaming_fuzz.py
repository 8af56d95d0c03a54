"""The streaming predictor under hostile input, property-based.

Random sequences of pushes of the four signals (one wearer, or several interleaved through a
StagerPool): bursts ahead of the clock, shuffled and late readings, duplicates, timestamps far
in the past or future (also beyond the +-1e12 s plausibility limit), NaN/inf and impossible
values, empty batches, clock ticks, and a wearer silent for hours. Whatever comes: no exception,
valid stages on a strictly increasing 30 s grid, the readings held are only those of open epochs,
dropped readings are counted, and stages resume once data comes back after a silence. With a
lookahead model, every emitted epoch is revised once, in order, at most `lookahead` epochs behind
(all of them after the final flush), without a stage exactly where the immediate one has none.
An untrained tiny causal model stands in: the plumbing is under test, not the stages.
"""
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import data_loader as dl
import evaluation
import features
import realtime
from checkpoint import build_model, load_model_from_checkpoint, make_checkpoint, save_checkpoint
from realtime import StagerPool, StreamingStager
from conftest import count_forward_last

FUZZ = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TINY_HYBRID = {"channels": 16, "kernel_size": 3, "n_layers": 1, "n_heads": 2}
N_VALUES = {"heart_rate": 1, "motion": 3, "counts": 1, "steps": 1}
HOUR = 3600.0


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with evaluation.single_thread():  # tiny batches; also kind to a busy machine
        yield


def untrained(tmp_path_factory, lookahead: int = 0):
    """An untrained causal tiny hybrid on every feature (motion magnitude and steps too), saved and loaded."""
    torch.manual_seed(0)
    names = features.FEATURES
    model = build_model("hybrid", {**TINY_HYBRID, "n_features": len(names), "causal": True,
                                   "lookahead": lookahead}).eval()
    scaler = dl.FeatureScaler(np.zeros(len(names), np.float32), np.ones(len(names), np.float32))
    ckpt = make_checkpoint(model, "hybrid", features=list(names), seq_len=25, target_pos=24, scaler=scaler)
    path = tmp_path_factory.mktemp("fuzz-checkpoint") / "causal.pth"
    save_checkpoint(ckpt, path)
    return load_model_from_checkpoint(path)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return untrained(tmp_path_factory)


@pytest.fixture(scope="module")
def by_lookahead(loaded, tmp_path_factory):
    """The untrained model without a lookahead (no revisions), and one with a lookahead of 2."""
    return {0: loaded, 2: untrained(tmp_path_factory, lookahead=2)}


# ----------------------------------------------------------------------------- hostile streams

KIND = st.sampled_from(tuple(N_VALUES))
PUSH = st.tuples(st.just("push"), KIND,
                 st.sampled_from(["ahead", "ahead", "dense", "shuffled", "duplicate", "far_future", "far_past",
                                  "implausible_time", "empty"]),
                 st.integers(0, 40), st.sampled_from([0.0, 0.0, 0.1, 0.5, 1.0]), st.integers(0, 2**32 - 1))
SILENCE = st.tuples(st.just("silence"), st.sampled_from([0.5, 1.5, 5.9, 6.1, 12.0, 30.0]))
TICK = st.tuples(st.just("tick"), st.sampled_from(["flush", "tick"]), st.floats(0.0, 2 * HOUR))
OPS = st.lists(st.one_of(PUSH, PUSH, PUSH, SILENCE, TICK), min_size=3, max_size=25)
STAGER = st.fixed_dictionaries({
    "start_s": st.sampled_from([None, 0.0, 12.5, -HOUR, 1.7e9]),
    "max_delay_s": st.sampled_from([0.0, 10.0, 90.0]),
    "max_gap_s": st.sampled_from([HOUR, 6 * HOUR]),
})


def readings(kind, mode, n, bad_share, seed, cursor, previous):
    """(t, values (n, k)) of one push; cursor is the stream's time now."""
    rng = np.random.default_rng(seed)
    if mode == "empty":
        n = 0
    if mode == "dense":  # ~50 Hz, as raw acceleration comes
        n *= 40
        t = cursor + np.arange(n) / 50.0 + rng.uniform(0, 1)
    elif mode == "ahead":
        t = cursor + np.sort(rng.uniform(0, rng.choice([1.0, 30.0, 300.0, HOUR]), n))
    elif mode == "shuffled":  # out of order, some for epochs already closed
        t = cursor + rng.uniform(-120.0, 30.0, n)
    elif mode == "duplicate":  # repeated within the batch, and again from the last push of this signal
        t = np.repeat(cursor + rng.uniform(-10.0, 30.0, (n + 1) // 2), 2)[:n]
        if previous is not None and len(previous):
            t[::3] = rng.choice(previous, len(t[::3]))
    elif mode == "far_future":
        t = cursor + rng.choice([7 * HOUR, 48 * HOUR, 1e8, 1e10]) + rng.uniform(0, 60, n)
    elif mode == "far_past":
        t = cursor - rng.choice([HOUR, 48 * HOUR, 1e9, 1e11]) + rng.uniform(0, 60, n)
    elif mode == "implausible_time":
        t = rng.choice([1e13, -1e13, 1e20, -1e300, 1.7e308], n)
    else:
        t = cursor + rng.uniform(0, 30, n)
    if kind == "heart_rate":
        v = rng.uniform(35, 140, (n, 1))
    elif kind == "motion":
        v = rng.normal(0, 0.6, (n, 3)) + [0.0, 0.0, 1.0]
    elif kind == "counts":
        v = rng.uniform(0, 300, (n, 1))
    else:
        v = rng.integers(0, 25, (n, 1)).astype(float)
    bad = rng.random(n) < bad_share
    if bad.any():  # NaN, inf, impossible values, in any column (time included)
        junk = rng.choice([np.nan, np.inf, -np.inf, -5.0, 300.0, 1e6], bad.sum())
        cols = rng.integers(0, v.shape[1] + 1, bad.sum())
        t, v = t.copy(), v.copy()
        for row, col, value in zip(np.flatnonzero(bad), cols, junk):
            if col == 0:
                t[row] = value if not np.isfinite(value) else t[row]
            else:
                v[row, col - 1] = value
    return t, v


def expected_drops(kind, t, v):
    """(non_finite, out_of_range) the stream must count for one push."""
    finite = np.isfinite(t) & np.isfinite(v).all(axis=1)
    with np.errstate(invalid="ignore"):
        if kind == "heart_rate":
            plausible = (v[:, 0] >= dl.HR_MIN_BPM) & (v[:, 0] <= dl.HR_MAX_BPM)
        elif kind == "motion":
            plausible = (np.abs(v) <= dl.MOTION_MAX_G).all(axis=1)
        else:
            plausible = v[:, 0] >= 0
        plausible &= np.abs(t) <= realtime.MAX_ABS_TIME_S
    return int((~finite).sum()), int((finite & ~plausible).sum()), t[finite & plausible]


class Checker:
    """Replays one op list on one stager and checks the invariants after every op."""

    def __init__(self, stager: StreamingStager):
        self.stager = stager
        self.grid0 = stager.start_s
        self.last_start = -math.inf
        self.emitted = 0
        self.non_finite = self.out_of_range = 0
        self.valid_t = {kind: [np.zeros(0)] for kind in N_VALUES}
        self.previous = {}
        self.cursor = 0.0 if stager.start_s is None else stager.start_s
        self.immediate, self.revised = [], []

    def check_epochs(self, epochs):
        for epoch in epochs:
            p = epoch.probabilities
            if epoch.stage == -1:  # no heart rate or motion within features.NO_DATA_EPOCHS: no stage
                assert p.shape == (4,) and np.isnan(p).all()
            else:
                assert p.shape == (4,) and np.isfinite(p).all() and abs(p.sum() - 1) < 1e-5
                assert epoch.stage == int(p.argmax()) and 0 <= epoch.stage <= 3
            assert epoch.epoch_start_s > self.last_start  # each epoch once, in time order
            if self.grid0 is None:
                self.grid0 = epoch.epoch_start_s
            k = (epoch.epoch_start_s - self.grid0) / dl.EPOCH_S
            assert abs(k - round(k)) < 1e-6  # new nights keep the 30 s grid
            self.last_start = epoch.epoch_start_s
        self.emitted += len(epochs)
        self.immediate += epochs

    def check_revisions(self):
        """Revised epochs: the emitted ones in order, no stage where the immediate has none, at most
        `lookahead` behind (a model without one revises nothing)."""
        new = self.stager.take_revised()
        self.revised += new
        n = len(self.revised)
        if not self.stager.lookahead:
            assert not new
            return
        assert [e.epoch_start_s for e in self.revised] == [e.epoch_start_s for e in self.immediate[:n]]
        for revised, immediate in zip(self.revised[n - len(new):], self.immediate[n - len(new):n]):
            assert (revised.stage == -1) == (immediate.stage == -1)
            if revised.stage >= 0:
                assert np.isfinite(revised.probabilities).all() and revised.stage == int(revised.probabilities.argmax())
        assert len(self.immediate) - n <= self.stager.lookahead

    def check_state(self):
        s = self.stager
        assert s.stats["epochs_closed"] == self.emitted and not s.n_waiting
        assert (s.stats["non_finite"], s.stats["out_of_range"]) == (self.non_finite, self.out_of_range)
        assert s.windows.state.ring.rows.shape[:2] == (1, s.seq_len) and not s.feature_rows
        assert s.windows.state.features.hr_c1.shape == (1, 61) and s.windows.state.features.la_c1.shape == (1, 21)
        open_epochs = s.open_epochs()
        # only open epochs hold readings: at most the epochs within max_delay_s of the clock
        assert len(open_epochs) <= math.ceil(s.max_delay_s / dl.EPOCH_S) + 1
        assert all(k >= s.n_closed for k in open_epochs)
        if open_epochs:
            lo, hi = s.epoch_start(min(open_epochs)), s.epoch_start(max(open_epochs) + 1)
            held = s.buffered_samples()
            for kind, parts in self.valid_t.items():
                t = np.concatenate(parts)
                assert held[kind] <= len(np.unique(t[(t >= lo) & (t < hi)]))
        if s.clock is not None:
            self.cursor = max(self.cursor, s.clock)
        self.check_revisions()

    def push(self, kind, t, v):
        non_finite, out_of_range, valid = expected_drops(kind, t, v)
        self.non_finite += non_finite
        self.out_of_range += out_of_range
        self.valid_t[kind].append(valid)
        return self.stager.push(kind, t, *v.T)

    def run(self, op):
        if op[0] == "push":
            _, kind, mode, n, bad_share, seed = op
            t, v = readings(kind, mode, n, bad_share, seed, self.cursor, self.previous.get(kind))
            self.check_epochs(self.push(kind, t, v))
            self.previous[kind] = t
        elif op[0] == "tick":
            _, how, ahead_s = op
            self.check_epochs(getattr(self.stager, how)(self.cursor + ahead_s))
        else:  # the wearer is silent for hours, then heart rate comes back
            hours = op[1]
            t0 = self.cursor + hours * HOUR
            t1 = t0 + dl.EPOCH_S + self.stager.max_delay_s + 1.0
            closed = self.push("heart_rate", np.array([t0]), np.array([[62.0]]))
            closed += self.push("heart_rate", np.array([t1]), np.array([[61.0]]))
            self.check_epochs(closed)
            # the epoch holding the first reading after the silence is staged once the next one arrives...
            assert any(e.epoch_start_s <= t0 < e.epoch_start_s + dl.EPOCH_S for e in closed)
            # ...and a silence longer than max_gap_s is a new night, not hours of filler epochs
            gap = min(hours * HOUR, self.stager.max_gap_s)
            assert len(closed) <= gap / dl.EPOCH_S + self.stager.max_delay_s / dl.EPOCH_S + 4
        self.check_state()


@pytest.mark.parametrize("lookahead", [0, 2])
@FUZZ
@given(config=STAGER, ops=OPS)
def test_hostile_stream_never_raises_holds_only_open_epochs_and_resumes(by_lookahead, lookahead, config, ops):
    model, scaler, ckpt = by_lookahead[lookahead]
    checker = Checker(StreamingStager(model, scaler, ckpt, **config))
    for op in ops:
        checker.run(op)
    # the end of the recording: everything up to the clock closes, nothing is held, everything is revised
    if checker.stager.clock is not None:
        checker.check_epochs(checker.stager.flush(checker.stager.clock + checker.stager.max_delay_s + dl.EPOCH_S))
        assert sum(checker.stager.buffered_samples().values()) == 0
        checker.check_revisions()
        assert len(checker.revised) == (len(checker.immediate) if lookahead else 0)
    for name, count in checker.stager.stats.items():  # what was exercised: --hypothesis-show-statistics
        if count:
            event(name)


@pytest.mark.parametrize("lookahead", [0, 2])
@FUZZ
@given(config=STAGER, ops=st.lists(st.tuples(st.integers(0, 2), st.one_of(PUSH, PUSH, TICK)), min_size=1, max_size=30))
def test_pool_of_interleaved_wearers_matches_one_stager_each(by_lookahead, lookahead, config, ops):
    model, scaler, ckpt = by_lookahead[lookahead]
    pool = StagerPool(model, scaler, ckpt, **config)
    revised = {w: [] for w in range(3)}
    alone = {w: Checker(StreamingStager(model, scaler, ckpt, **config)) for w in range(3)}
    cursors = {w: alone[w].cursor for w in range(3)}
    previous = {w: {} for w in range(3)}
    expected = {w: [] for w in range(3)}
    pooled = {w: [] for w in range(3)}
    for i, (wearer, op) in enumerate(ops):
        checker = alone[wearer]
        if op[0] == "push":
            _, kind, mode, n, bad_share, seed = op
            t, v = readings(kind, mode, n, bad_share, seed, cursors[wearer], previous[wearer].get(kind))
            previous[wearer][kind] = t
            pool.push(wearer, kind, t, *v.T)
            epochs = checker.push(kind, t, v)
        else:
            now = cursors[wearer] + op[2]
            pool.flush(now, [wearer])
            epochs = checker.stager.flush(now)
        checker.check_epochs(epochs)
        checker.check_state()
        expected[wearer] += epochs
        cursors[wearer] = checker.cursor
        if i % 4 == 3 or i == len(ops) - 1:  # the pool predicts every few pushes, for all wearers at once
            for w, staged in pool.predict().items():
                pooled[w] += staged
            for w, staged in pool.take_revised().items():
                revised[w] += staged
        held = pool[wearer].buffered_samples()
        assert held == checker.stager.buffered_samples()
    for w in range(3):
        assert [e.epoch_start_s for e in pooled[w]] == [e.epoch_start_s for e in expected[w]]
        if expected[w]:
            np.testing.assert_allclose(np.stack([e.probabilities for e in pooled[w]]),
                                       np.stack([e.probabilities for e in expected[w]]), atol=1e-5, rtol=0)
        if w in pool.stagers:
            assert pool[w].stats == alone[w].stager.stats
        assert [e.epoch_start_s for e in revised[w]] == [e.epoch_start_s for e in alone[w].revised]
        if revised[w]:
            np.testing.assert_allclose(np.stack([e.probabilities for e in revised[w]]),
                                       np.stack([e.probabilities for e in alone[w].revised]), atol=1e-5, rtol=0)


def test_timestamps_beyond_the_plausible_range_are_dropped_without_moving_the_clock(loaded):
    model, scaler, ckpt = loaded
    stager = StreamingStager(model, scaler, ckpt, start_s=0.0)
    stager.push_heart_rate([10.0, 20.0], [60.0, 61.0])
    assert stager.push_heart_rate([1e13, -1e300, 1.7e308], [60.0, 60.0, 60.0]) == []
    assert stager.stats["out_of_range"] == 3 and stager.clock == 20.0 and stager.stats["new_nights"] == 0
    assert [e.epoch_start_s for e in stager.push_heart_rate(31.0, 60.0)] == [0.0]
    with pytest.raises(ValueError, match="now_s must be finite"):
        stager.flush(1e13)
    with pytest.raises(ValueError, match="start_s must be finite"):
        StreamingStager(model, scaler, ckpt, start_s=1e20)


def test_large_model_calls_are_split_into_few_shapes_with_the_same_probabilities(loaded, monkeypatch):
    model, _, _ = loaded
    shapes = count_forward_last(monkeypatch, model)
    rng = np.random.default_rng(0)
    calls = {}
    try:
        for n in (1, 5, 64, 65, 200, 1000):
            windows = rng.normal(size=(n, 25, len(features.FEATURES))).astype(np.float32)
            shapes.clear()
            probs = evaluation.predict_windows(model, windows, 24, batch_size=256)
            calls[n] = list(shapes)
            with torch.inference_mode():
                whole = torch.softmax(model(torch.from_numpy(windows))[:, 24], -1).numpy()
            np.testing.assert_allclose(probs, whole, atol=1e-5, rtol=0)
    finally:
        monkeypatch.undo()
    assert calls == {1: [1], 5: [5], 64: [64], 65: [64, 1], 200: [128, 64, 8],
                     1000: [256, 256, 256, 128, 64, 32, 8]}
