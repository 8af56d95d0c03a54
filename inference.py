"""Evaluate the LSTM sleep stager: the shipped checkpoint on the bundled test subjects by default.

    python inference.py                                   # metrics, report, plots in out/plots/
    python inference.py --data-dir DIR --predictions-out preds.csv
    python inference.py --checkpoint checkpoints/lstm_causal/model.pth
    python inference.py --realtime                        # the same, streamed reading by reading (causal model)
    python inference.py --follow hr.csv counts.csv        # live: a line per closed 30 s epoch
    python inference.py --sleep-metrics                   # + sleep metrics vs PSG, Bland-Altman PNG
    python inference.py --hr hr.csv --motion counts.csv   # your own night: stages, hypnogram, summary

Notebook API, as in inference_hybrid.py, with the causal LSTM (checkpoints/lstm_causal/model.pth):

    from inference import load_model, predict_label_from_triplet, reset_context
"""
import sys

import realtime
from checkpoint import ARCHITECTURES
from inference_cli import main
from realtime import get_context, predict_label_from_triplet, reset_context  # noqa: F401 (notebook API)

DEFAULT_CHECKPOINT = ARCHITECTURES["lstm"].shipped(causal=False)
REALTIME_CHECKPOINT = ARCHITECTURES["lstm"].shipped(causal=True)

__all__ = ["load_model", "predict_label_from_triplet", "reset_context", "get_context", "main"]


def load_model(checkpoint=None):
    """(model, scaler) of the causal LSTM (default: the shipped checkpoints/lstm_causal/model.pth)."""
    return realtime.load_model(checkpoint if checkpoint is not None else REALTIME_CHECKPOINT, arch="lstm")


if __name__ == "__main__":
    sys.exit(main("lstm", DEFAULT_CHECKPOINT, sys.argv[1:], REALTIME_CHECKPOINT))
