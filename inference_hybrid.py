"""Evaluate the CNN + Transformer sleep stager: the shipped checkpoint on the bundled test subjects.

    python inference_hybrid.py                            # metrics, report, plots in out/plots/
    python inference_hybrid.py --data-dir DIR --predictions-out preds.csv
    python inference_hybrid.py --checkpoint checkpoints/hybrid_causal/model.pth
"""
import sys

from evaluation import CHECKPOINT_DIR, main

DEFAULT_CHECKPOINT = CHECKPOINT_DIR / "hybrid_offline" / "model.pth"

if __name__ == "__main__":
    sys.exit(main("hybrid", DEFAULT_CHECKPOINT, sys.argv[1:]))
