"""Evaluate the CNN + Transformer sleep stager: the shipped checkpoint on the bundled test subjects.

    python inference_hybrid.py                            # metrics, report, plots in out/plots/
    python inference_hybrid.py --data-dir DIR --predictions-out preds.csv
    python inference_hybrid.py --checkpoint checkpoints/hybrid_causal/model.pth
    python inference_hybrid.py --realtime                 # the same, streamed reading by reading (causal model)
    python inference_hybrid.py --follow hr.csv acc.csv    # live: a line per closed 30 s epoch
    python inference_hybrid.py --sleep-metrics            # + sleep metrics vs PSG, Bland-Altman PNG
    python inference_hybrid.py --hr hr.csv --motion acc.csv [--steps steps.csv] [--out-dir out/report]
                                                          # your own night: stages, hypnogram, summary

Notebook API (real-time, one reading per 30 s epoch; the causal model by default):

    from inference_hybrid import load_model, predict_label_from_triplet, reset_context
    model, scaler = load_model()                          # checkpoints/hybrid_causal/model.pth
    pred, probs = predict_label_from_triplet(model, scaler, hr=62.0, motion=0.0, steps=0.0)
    pred, probs = predict_label_from_triplet(model, scaler, hr=80.0, motion=120.0, wearer="bob")
    reset_context(model)                                  # a new night for every wearer of this model

hr: mean heart rate over the epoch (bpm); motion: activity count per 15 s bin as in the counts
files (Walch counts, typically 0 to a few hundred); steps: steps in the epoch. See realtime.py.
"""
import sys

import realtime
from checkpoint import ARCHITECTURES
from inference_cli import main
from realtime import get_context, predict_label_from_triplet, reset_context  # noqa: F401 (notebook API)

DEFAULT_CHECKPOINT = ARCHITECTURES["hybrid"].shipped(causal=False)
REALTIME_CHECKPOINT = ARCHITECTURES["hybrid"].shipped(causal=True)

__all__ = ["load_model", "predict_label_from_triplet", "reset_context", "get_context", "main"]


def load_model(checkpoint=None):
    """(model, scaler) of the causal hybrid model (default: the shipped checkpoints/hybrid_causal/model.pth)."""
    return realtime.load_model(checkpoint if checkpoint is not None else REALTIME_CHECKPOINT, arch="hybrid")


if __name__ == "__main__":
    sys.exit(main("hybrid", DEFAULT_CHECKPOINT, sys.argv[1:], REALTIME_CHECKPOINT))
