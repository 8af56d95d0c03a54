"""Train the bidirectional LSTM + attention sleep stager.

    python train.py                          # 80/10/10 subject split on the bundled data -> runs/lstm_offline/
    python train.py --causal                 # real-time model (window ends at the predicted epoch) -> runs/lstm_causal/
    python train.py --cv 5                   # 5-fold cross-validation by subject
    torchrun --standalone --nproc_per_node=2 train.py   # same script, DistributedDataParallel

Every setting below is a command-line flag (--seq-len, --batch-size, --epochs, --lr, --data-dir,
...); SEQ_LEN, BATCH_SIZE, EPOCHS and LR may also come from the environment (docker-compose).
Offline models read whole nights (--seq-len 0); --causal starts from the real-time recipe below.
Runs go to runs/<arch>_<mode>/; replacing a shipped model is `--out-dir checkpoints/lstm_offline`.
"""
import sys
from dataclasses import replace

from model import LSTMConfig
from training import TrainConfig, run, script_config

# -----------------------------------------------------------------------------
# offline: the BiLSTM + attention over whole nights, on means of 4 epochs (2 min; fewer sequential steps)
MODEL = LSTMConfig(hidden=128, n_layers=2, n_heads=4, pool=4)
TRAIN = TrainConfig(
    seq_len=0, crop_epochs=(240, 960), crops_per_night=8,  # whole nights: crops of 2-8 h in training
    batch_size=8, epochs=15, lr=2e-3, dropout=0.25,
    validate=False,          # fixed passes, chosen by cross-validation: no validation hold-out
    p_recorded=0.5,          # half the training nights as recorded, half under drawn conditions
    rem_noise=0.1,
    class_weight_power=0.5,  # sqrt of balanced weights: full balancing cost kappa 0.06 in CV (README)
    rem_boost=1.0,           # the seed range 1.6-2.5 traded Light recall for REM recall
    smooth=False,
)
# real time: a 30 min window ending at the epoch, and a revision of epoch t - lookahead (10 min later)
CAUSAL_MODEL = replace(MODEL, hidden=256, pool=1, lookahead=20)
CAUSAL_TRAIN = replace(TRAIN, seq_len=61, stride=20, batch_size=96, epochs=20, lr=8e-4, causal=True)
# -----------------------------------------------------------------------------

if __name__ == "__main__":
    sys.exit(run("lstm", script_config(MODEL), TRAIN, sys.argv[1:],
                 causal_recipe=(script_config(CAUSAL_MODEL), CAUSAL_TRAIN)))
