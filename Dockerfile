# sleep-staging: the scripts, the bundled data and the shipped checkpoints in one image.
#
#   docker build -t sleep-staging .                      # CPU (default): CPU-only torch wheel
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 -t sleep-staging:gpu .
#
# TORCH_INDEX is the pip index torch is installed from; any CUDA index that carries the torch
# version pinned in requirements.txt works for the GPU variant (run it with `docker run --gpus all`).
# Trained runs write to /app/runs (mount a host folder there), outputs of inference to /app/out.

# ---------------------------------------------------------------- stage 1: dependencies
# Everything pip needs lives here; the final image only receives the finished virtual environment.
FROM python:3.11.13-slim-bookworm AS deps

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH

# requirements.txt alone first: this layer is rebuilt only when the dependencies change. It holds
# what running needs; the test and lint tools (requirements-dev.txt) stay out of the image.
COPY requirements.txt /tmp/requirements.txt
# torch from TORCH_INDEX (CPU wheels by default, not the multi-GB CUDA build), then the rest from
# PyPI, where requirements.txt's torch==2.13.0 pin is already satisfied by the installed build.
RUN python -m venv /opt/venv \
 && pip install --no-cache-dir --index-url "$TORCH_INDEX" torch==2.13.0 \
 && pip install --no-cache-dir -r /tmp/requirements.txt

# ---------------------------------------------------------------- stage 2: runtime
FROM python:3.11.13-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH \
    SLEEP_STAGING_CACHE=/tmp/sleep-staging-cache \
    MPLCONFIGDIR=/tmp/matplotlib

# a non-root user (created before the code is copied, so this layer stays cached)
RUN useradd --create-home --no-log-init --uid 1000 --user-group app

COPY --from=deps /opt/venv /opt/venv

WORKDIR /app
COPY . .

# The code stays root-owned (read-only for the user); the user may write the output folders and
# the checkpoint folders (train.py / train_hybrid.py default to checkpoints/<arch>_<mode>/).
# Files written by the training scripts are mode 0600, so everything copied in is made
# world-readable: otherwise the user could not read the shipped checkpoints.
RUN mkdir -p /app/out /app/runs /app/checkpoints /app/db \
 && find /app \( ! -perm -o=r -o \( -type d ! -perm -o=x \) \) -exec chmod a+rX {} + \
 && find /app/checkpoints -type d -exec chown app:app {} + \
 && chown app:app /app/out /app/runs /app/db
# numeric, so the runtime (and Kubernetes' runAsNonRoot) can tell it is not root
USER 1000:1000

# /app/data: the bundled data (a host mount replaces it); /app/out, /app/runs: outputs; /app/db: the
# service's database. /app/checkpoints is deliberately not a volume: the shipped checkpoints must stay visible.
VOLUME ["/app/data", "/app/out", "/app/runs", "/app/db"]
# serve.py's port (docker-compose --profile serve up serve)
EXPOSE 8000

CMD ["python", "inference_hybrid.py"]
