"""The many-wearer fast path: wearers in lockstep, every one's state in numpy arrays, one model call per epoch.

For a server that closes an epoch for all its wearers at once (every 30 s); each wearer gets what a
realtime.StreamingStager fed the same per-epoch aggregates gives (tested).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

import data_loader as dl
import features
from evaluation import NightSteps, in_parallel, predict_windows, revision_lags, revision_span_of, thread_parts
from realtime import StreamingStager, checked_resting_hr, lookahead_of


class RevisedEpochs(NamedTuple):
    """Revised stages of some wearers' epochs (StagerBatch.revised, end_night, reset): wearer index (m,),
    epoch_start_s (m,), stage (m,) (-1: no data), probabilities (m, 4) (NaN: no data)."""
    wearer: np.ndarray
    epoch_start_s: np.ndarray
    stage: np.ndarray
    probabilities: np.ndarray


NO_REVISIONS = RevisedEpochs(np.zeros(0, np.int64), np.zeros(0), np.zeros(0, np.int64), np.zeros((0, 4)))


class StagerBatch:
    """Many wearers in lockstep, vectorised: one epoch closes for every wearer at once, one model call.

        batch = StagerBatch(model, scaler, checkpoint, n_wearers=1000)
        aggregates = batch.aggregate(hr_wearer, hr_bpm, count_wearer, counts)   # this epoch's readings
        epoch_start_s, stages, probabilities = batch.step(**aggregates)         # (n,), (n,), (n, 4)

    For a server that ticks every 30 s: the state of all wearers (features.IncrementalFeatures running
    sums and ring buffers, the last seq_len scaled feature rows) lives in numpy arrays, so closing an
    epoch costs a few array operations for everyone instead of Python work per wearer. Each
    wearer gets what a StreamingStager (start_s = start_s[w]) fed the same readings gives: the
    same float64 operations per number (feature rows equal; tested), the same windows, and the
    same model (probabilities equal to a lone stager's to ~1e-6: float rounding only; tested).
    What it does not do: timestamps, late or duplicate readings, clock jumps, raw motion
    filtering and the steps span rule. Readings are already assigned to the epoch; a wearer
    without readings in an epoch passes NaN (missing), as the stream's empty epoch. Raw motion
    and steps: reduce them per wearer (data_loader.motion_epoch_aggregates, the stream's steps
    rule) and pass the aggregates. The model runs on chunks of batch_size windows (128: the
    activations of a chunk stay in cache), the wearers split into one part per torch thread
    (in_parallel).
    With the hybrid model, each wearer's conv outputs of its last seq_len epochs are kept
    (`conv`, n_wearers x seq_len x channels float32): a conv output at window position
    j >= model.receptive_field depends only on the epochs at j - receptive_field .. j, so it is
    the one computed when that epoch closed (the last position of its own window, built the same
    way: edge padding included). Each step runs the convolutions at the first receptive_field
    positions (replicate padding) and at the new epoch only, then the encoder on whole windows.
    Where the window is not more than twice the receptive field, no cache is kept (it would save
    nothing): the step is the plain batched model call.

    resting_hr_bpm: each wearer's resting heart rate (scalar or (n,); None or NaN: none), which the
    features hr_minus_resting_bpm and resting_hr_missing read; kept across reset(), changed by
    set_resting_hr (a row given to another wearer).

    A model with a lookahead L also revises each wearer's epochs, as a StreamingStager does
    (realtime.Revisions): the step that closes epoch k adds its model call's output to the revisions
    of the epochs it revises and gives the revision of epoch k - L, in `revised` (RevisedEpochs,
    replaced by every step: read it after each); end_night() revises the epochs still waiting (the
    night's end), and reset() does so before starting the new night (both return what they revise).
    """

    def __init__(self, model: torch.nn.Module, scaler: dl.FeatureScaler, checkpoint: dict, n_wearers: int,
                 start_s=0.0, batch_size: int = 128, resting_hr_bpm=None):
        StreamingStager(model, scaler, checkpoint)  # the same checks: causal, known features
        self.model, self.scaler, self.checkpoint = model, scaler, checkpoint
        self.features = tuple(checkpoint["features"])
        self.seq_len, self.target_pos = int(checkpoint["seq_len"]), int(checkpoint["target_pos"])
        self.n_wearers, self.batch_size = int(n_wearers), int(batch_size)
        self.start_s = np.broadcast_to(np.asarray(start_s, np.float64), (self.n_wearers,)).copy()
        self._wearers = np.arange(self.n_wearers)
        self._features = features.IncrementalFeatures(self.n_wearers, self.features)
        self._features.set_resting(None, checked_resting_hr(resting_hr_bpm))  # None: none (NaN)
        # the wearers' last seq_len scaled feature rows, or a whole-night model's step state (seq_len 0)
        self._last = np.zeros((self.n_wearers, len(self.features)), np.float32)  # the last step's scaled rows
        self._ring = (NightSteps(model, None, self.n_wearers) if self.seq_len == 0 else
                      features.WindowRing(self.n_wearers, self.seq_len, len(self.features), self.target_pos))
        config = getattr(model, "config", None)
        self.conv: torch.Tensor | None = None  # conv outputs by epoch % seq_len (see the class docstring)
        # the cache pays where most of a window's positions come from it: a window not twice the receptive
        # field (the dilated models, whose field is the window) would run the convolutions twice instead
        if (hasattr(model, "encode_last") and getattr(config, "causal", False)
                and self.target_pos == self.seq_len - 1 and self.seq_len > 2 * model.receptive_field):
            device = next(model.parameters()).device
            self.conv = torch.zeros(self.n_wearers, self.seq_len, config.channels, device=device)
        self.lookahead = lookahead_of(model)
        self.revised = NO_REVISIONS  # what the last step revised
        if self.lookahead:
            first, last = revision_lags(self.lookahead, revision_span_of(model))
            self._lags = range(first, last + 1)                          # the lags a window adds to a revision
            ring = self.lookahead + 1                                     # the last L + 1 epochs, epoch e at e % ring
            self._every_lag = np.full((self.n_wearers, ring, 4), np.nan)  # each wearer's latest window, every lag
            self._no_data = np.zeros((self.n_wearers, ring), bool)
            self._total = np.zeros((self.n_wearers, ring, 4))             # each waiting epoch's revision: the sum
            self._count = np.zeros((self.n_wearers, ring), np.int64)      # of its windows' outputs, and how many
            self._revised_n = np.zeros(self.n_wearers, np.int64)          # epochs of the night revised so far

    @property
    def n(self) -> np.ndarray:
        """Epochs closed in each wearer's night (n,)."""
        return self._features.n

    @property
    def rows(self) -> np.ndarray:
        """Each wearer's last seq_len scaled feature rows, epoch e at e % seq_len (n, seq_len, F); a
        whole-night model (seq_len 0), which keeps none: each wearer's last row (n, 1, F)."""
        return self._last[:, None] if self.seq_len == 0 else self._ring.rows

    def reset(self, wearers=None) -> RevisedEpochs:
        """A new night for the given wearers (indices or boolean mask; None: all); returns the revisions of
        the night that ends (end_night)."""
        revised = self.end_night(wearers)
        self._features.reset(wearers)  # keeps each wearer's resting heart rate
        if self.lookahead:
            self._revised_n[self._select(wearers)] = 0
        # the ring, self.conv and the revision state need no more: a window reads only epochs of its
        # night, each written when it closed
        return revised

    def set_resting_hr(self, wearers, resting_hr_bpm) -> None:
        """The resting heart rate (bpm; None or NaN: none) of these wearers (indices or boolean mask; None: all),
        scalar or one per wearer, for their epochs closed from now on."""
        self._features.set_resting(self._select(wearers), checked_resting_hr(resting_hr_bpm))

    def end_night(self, wearers=None) -> RevisedEpochs:
        """The night ends for the given wearers (None: all): each epoch still waiting for its look-ahead is
        revised from the windows it has, or from the wearer's latest window at the shorter lag
        (evaluation.revision_lags), by wearer, in epoch order. Epochs closed later are revised as usual."""
        if not self.lookahead:
            return NO_REVISIONS
        w = self._select(wearers)
        n, first = self.n[w], self._revised_n[w]
        count = n - first
        wearer = np.repeat(w, count)
        epoch = np.repeat(first, count) + np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count)
        self._revised_n[w] = n
        later = self.n[wearer] - 1 - epoch
        last_only = later < self._lags.start  # no window of the span yet: the latest one
        self._add(wearer[last_only], epoch[last_only], later[last_only])
        return self._revision(wearer, epoch)

    def _select(self, wearers) -> np.ndarray:
        return self._wearers if wearers is None else np.atleast_1d(self._wearers[wearers])

    def aggregate(self, hr_wearer=None, hr_bpm=None, count_wearer=None, counts=None) -> dict[str, np.ndarray]:
        """Per-wearer heart-rate mean/std and activity count of one epoch from flat reading arrays.

        hr_wearer / count_wearer: wearer index of each reading; readings of one wearer in time order
        (as the stream sorts an epoch's samples). Non-finite and implausible values are dropped as
        the stream drops them. Wearers without readings get NaN (missing).
        """
        n = self.n_wearers
        out = {"heart_rate_bpm": np.full(n, np.nan), "heart_rate_std_bpm": np.full(n, np.nan),
               "activity_count": np.full(n, np.nan)}
        if hr_wearer is not None and len(hr_wearer):
            idx, v = np.asarray(hr_wearer, np.int64), np.asarray(hr_bpm, np.float64)
            ok = np.isfinite(v) & dl.plausible("heart_rate", v[:, None])
            out["heart_rate_bpm"], out["heart_rate_std_bpm"], _ = features.epoch_mean_std(idx[ok], v[ok], n)
        if count_wearer is not None and len(count_wearer):
            idx, v = np.asarray(count_wearer, np.int64), np.asarray(counts, np.float64)
            ok = np.isfinite(v) & dl.plausible("counts", v[:, None])
            out["activity_count"] = features.epoch_mean_std(idx[ok], v[ok], n)[0]
        return out

    def feature_rows(self, heart_rate_bpm, activity_count=None, steps=None, motion_mag_mean_g=None,
                     motion_mag_std_g=None, heart_rate_std_bpm=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Close one epoch for every wearer: (epoch_start_s (n,), raw feature rows (n, n_features) float32,
        no_data (n,): wearers whose epoch gets no stage). NaN marks a missing aggregate; the heart
        rate's within-epoch spread is accepted (aggregate()'s output) and not used."""
        epoch_start = self.start_s + (features.EPOCH_S * self.n).astype(np.float64)
        rows, no_data = self._features.update((epoch_start - self.start_s) / 3600.0, heart_rate_bpm, activity_count,
                                              steps, motion_mag_mean_g, motion_mag_std_g)
        return epoch_start, rows, no_data

    def step(self, heart_rate_bpm, activity_count=None, steps=None, motion_mag_mean_g=None, motion_mag_std_g=None,
             heart_rate_std_bpm=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Close one epoch for every wearer and stage it: (epoch_start_s (n,), stage (n,), probabilities (n, 4));
        stage -1 and NaN probabilities where a wearer's epoch has no data (features.no_data). With a
        lookahead, `revised` then holds the revisions the same model call gave (epoch k - lookahead)."""
        k = self.n.copy()
        epoch_start, rows, no_data = self.feature_rows(heart_rate_bpm, activity_count, steps, motion_mag_mean_g,
                                                       motion_mag_std_g)
        self._last = self.scaler.transform(rows)  # elementwise: as on windows
        windows, slots = self._ring.push(k, self._last)
        if self.seq_len == 0:  # a whole-night model: the push was the model's step, every lag
            probs = windows if self.lookahead else windows[:, 0]
        elif self.conv is not None:  # every wearer, so each one's conv cache holds its new epoch
            probs = self._predict_cached(windows, slots)
        elif self.lookahead:
            probs = predict_windows(self.model, windows, self.target_pos, self.batch_size, every_lag=True)
        else:
            probs = predict_windows(self.model, windows, self.target_pos, self.batch_size)
        if self.lookahead:
            probs = self._revise(k, no_data, probs)
        probs[no_data] = np.nan
        return epoch_start, features.stages_of(probs), probs

    def _revise(self, k: np.ndarray, no_data: np.ndarray, every_lag: np.ndarray) -> np.ndarray:
        """Keep the step's output at every lag (n, 1 + L, 4), add it to the revisions of the epochs it
        revises, revise epoch k - L where it waits; the immediate probabilities (lag 0)."""
        self._every_lag = every_lag
        slot = k % (self.lookahead + 1)  # epoch k's: its last user, epoch k - L - 1, was revised before
        self._no_data[self._wearers, slot] = no_data
        self._total[self._wearers, slot] = 0.0
        self._count[self._wearers, slot] = 0
        for lag in self._lags:  # in order of lag, as a stream adds them up
            waiting = np.flatnonzero(k - lag >= self._revised_n)  # in the night and not revised at an end already
            self._add(waiting, k[waiting] - lag, np.full(len(waiting), lag))
        epoch = k - self.lookahead
        due = np.flatnonzero(epoch >= self._revised_n)
        self.revised = self._revision(due, epoch[due])
        self._revised_n[due] = epoch[due] + 1
        return every_lag[:, 0].copy()

    def _add(self, wearer: np.ndarray, epoch: np.ndarray, lag: np.ndarray) -> None:
        """Add the wearers' latest windows' outputs at these lags to these epochs' revisions."""
        slot = epoch % (self.lookahead + 1)
        self._total[wearer, slot] += self._every_lag[wearer, lag]
        self._count[wearer, slot] += 1

    def _revision(self, wearer: np.ndarray, epoch: np.ndarray) -> RevisedEpochs:
        """RevisedEpochs of these wearers' epochs: the mean of the outputs added to each."""
        slot = epoch % (self.lookahead + 1)
        probs = self._total[wearer, slot] / self._count[wearer, slot][:, None]  # every window runs: count >= 1
        probs[self._no_data[wearer, slot]] = np.nan
        return RevisedEpochs(wearer, self.start_s[wearer] + (features.EPOCH_S * epoch).astype(np.float64),
                             features.stages_of(probs), probs)

    @torch.inference_mode()
    def _predict_cached(self, windows: np.ndarray, slots: np.ndarray) -> np.ndarray:
        """predict_windows for the hybrid model, reusing the conv outputs of earlier epochs.

        slots: (n, seq_len) ring position (epoch % seq_len) of each window position. On CPU the
        wearers are split into one part per torch thread, each run on its own thread (see in_parallel).
        """
        if self.model.training:
            self.model.eval()
        device = self.conv.device
        x = torch.from_numpy(windows).to(device)
        w, slots = torch.from_numpy(self._wearers).to(device), torch.from_numpy(slots).to(device)
        parts = [(x[part], w[part], slots[part]) for part in thread_parts(len(x), self.batch_size, device)]
        logits = torch.cat(in_parallel(self._logits_cached, parts))
        return torch.softmax(logits.float(), dim=-1).cpu().numpy().astype(np.float64)

    def _logits_cached(self, part: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Last-position logits of some wearers' windows (x, wearer index, slots), in chunks of batch_size.

        The new epoch's conv output goes into the cache first: early in a night, edge padding repeats it.
        """
        x, w, slots = part
        model, r = self.model, self.model.receptive_field
        self.conv[w, slots[:, -1]] = model.embed(x[:, -(r + 1):], pad=False)[:, 0]
        h = torch.cat([model.embed(x[:, :r]), self.conv[w[:, None], slots[:, r:]]], dim=1)
        lags = bool(self.lookahead)  # (B, 1 + lookahead, 4): the revisions from the same call
        return torch.cat([model.encode_last(h[i:i + self.batch_size], lags) for i in range(0, len(h), self.batch_size)])
