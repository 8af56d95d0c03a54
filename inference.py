"""Evaluate the LSTM sleep stager: the shipped checkpoint on the bundled test subjects by default.

    python inference.py                                   # metrics, report, plots in out/plots/
    python inference.py --data-dir DIR --predictions-out preds.csv
    python inference.py --checkpoint checkpoints/lstm_causal/model.pth
"""
import sys

from evaluation import CHECKPOINT_DIR, main

DEFAULT_CHECKPOINT = CHECKPOINT_DIR / "lstm_offline" / "model.pth"

if __name__ == "__main__":
    sys.exit(main("lstm", DEFAULT_CHECKPOINT, sys.argv[1:]))
