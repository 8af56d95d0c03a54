"""serve.py: the API contract and its errors, equality with `--realtime`, restart after a crash (a real
server process killed with SIGKILL), the WebSocket feed and the token, the revised stage of a model with
a lookahead (a tiny one trained here: the shipped causal checkpoints have none yet), database migration."""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import httpx
import numpy as np
import pytest

import data_loader as dl
import evaluation
import realtime
import serve
import serve_store
import sleep_metrics as sm
import training
from loadtest import free_port
from checkpoint import load_model_from_checkpoint

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # starlette's note on httpx versions
    from fastapi.testclient import TestClient

ROOT = Path(__file__).resolve().parent.parent
CHECKPOINT = serve.DEFAULT_CHECKPOINT
BASE_S = 1_767_225_600.0  # 2026-01-01T00:00Z, a multiple of 30 s
SUBJECT = "46343"
API_NAMES = {"heart_rate": "heart_rate", "counts": "counts", "motion": "acceleration", "steps": "steps"}
LOOKAHEAD = 10  # epochs (5 min): the tiny model's revision


# ----------------------------------------------------------------------------- helpers

@pytest.fixture(scope="module")
def night_pushes(small_data_dir):
    """A real night as API pushes (times shifted into 2026), its start and end, and its Night."""
    night = dl.load_night(small_data_dir, SUBJECT, cache_dir=None)
    start, end = float(night.epoch_start_s[0]), float(night.epoch_start_s[-1] + 30)
    readings = realtime.recorded_readings(small_data_dir, SUBJECT)
    rng = np.random.default_rng(3)
    pushes, t = [], start
    while t < end:  # pushes of 1-12 epochs' readings, every signal in each
        hi = min(t + 30.0 * rng.integers(1, 13), end)
        body = {}
        for kind, rows in readings.items():
            part = rows[(rows[:, 0] >= t) & (rows[:, 0] < hi)]
            if len(part):
                body[API_NAMES[kind]] = [[BASE_S + r[0], *r[1:]] for r in part.tolist()]
        pushes.append(body)
        t = hi
    return pushes, BASE_S + start, BASE_S + end, night


@pytest.fixture(scope="module")
def lookahead_ckpt(small_data_dir, tmp_path_factory):
    """A tiny causal hybrid with a lookahead and a revision span, trained for one pass over the small data (seconds)."""
    out = tmp_path_factory.mktemp("lookahead")
    argv = ["--data-dir", str(small_data_dir), "--out-dir", str(out), "--epochs", "1", "--batch-size", "64",
            "--stride", "10", "--causal"]
    config = {"channels": 16, "kernel_size": 3, "n_layers": 1, "n_heads": 2, "lookahead": LOOKAHEAD,
              "revision_span": 3}  # the revision: the mean of its last 3 windows
    with evaluation.single_thread():
        assert training.run("hybrid", config, training.TrainConfig(), argv) == 0
    return out / "model.pth"


@pytest.fixture(scope="module")
def night_ckpt(small_data_dir, tmp_path_factory):
    """A tiny causal hybrid over whole nights (seq_len 0: staged one epoch at a time), with a lookahead and
    a revision span, trained for one pass (seconds)."""
    out = tmp_path_factory.mktemp("night")
    argv = ["--data-dir", str(small_data_dir), "--out-dir", str(out), "--epochs", "1", "--batch-size", "4",
            "--seq-len", "0", "--crop-epochs", "60,120", "--crops-per-night", "2", "--causal"]
    config = {"channels": 16, "kernel_size": 3, "n_layers": 0, "dilated": 2, "lookahead": LOOKAHEAD, "revision_span": 3}
    with evaluation.single_thread():
        assert training.run("hybrid", config, training.TrainConfig(), argv) == 0
    return out / "model.pth"


def make_service(db: Path, checkpoint: Path = CHECKPOINT, **kwargs) -> serve.Service:
    return serve.Service(checkpoint, db, **kwargs)


def night_answers(client, wearer: str, pushes, start: float, end: float) -> list[dict]:
    """Open the night at its first epoch (a clock tick), push everything, end it at its end (a flush that
    revises what waits): every answer, in order."""
    answers = [client.post(f"/v1/wearers/{wearer}/flush", json={"now": start}).json()]
    for body in pushes:
        response = client.post(f"/v1/wearers/{wearer}/readings", json=body)
        assert response.status_code == 200, response.text
        answers.append(response.json())
    answers.append(client.post(f"/v1/wearers/{wearer}/flush", json={"now": end, "revise": True}).json())
    return answers


def run_night(client, wearer: str, pushes, start: float, end: float) -> list[dict]:
    """night_answers' epochs: every epoch answered."""
    return [e for answer in night_answers(client, wearer, pushes, start, end) for e in answer["epochs"]]


def answered(stored: list[dict]) -> list[dict]:
    """GET .../epochs items as a push answered them: the immediate stage."""
    return [{"epoch_start": e["epoch_start"], "stage": e["immediate_stage"],
             "stage_name": serve.STAGE_NAMES[e["immediate_stage"]], "probabilities": e["immediate_probabilities"]}
            for e in stored]


def latest(answers: list[dict]) -> list[dict]:
    """Each epoch's latest stage from a run's answers: its revision where one was answered."""
    out = {e["epoch_start"]: e for a in answers for e in a["epochs"]}
    out.update({e["epoch_start"]: e for a in answers for e in a["revised"]})
    return [out[t] for t in sorted(out)]


def assert_same_epochs(a: list[dict], b: list[dict]) -> None:
    """The same epochs and stages; probabilities equal up to float rounding (the model call's batch size
    differs between runs: ~1e-7)."""
    assert [(e["epoch_start"], e["stage"], e["stage_name"]) for e in a] == \
        [(e["epoch_start"], e["stage"], e["stage_name"]) for e in b]
    np.testing.assert_allclose(np.array([e["probabilities"] or [np.nan] * 4 for e in a], dtype=float),
                               np.array([e["probabilities"] or [np.nan] * 4 for e in b], dtype=float), atol=1e-5)


class ServerProcess:
    """python serve.py in its own process, as a user runs it."""

    def __init__(self, db: Path, token: str | None = None, checkpoint: Path = CHECKPOINT):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, str(ROOT / "serve.py"), "--port", str(self.port), "--db", str(db),
                   "--checkpoint", str(checkpoint)]
        env = {k: v for k, v in os.environ.items() if k != serve.TOKEN_ENV}
        if token:
            command += ["--token", token]
        self.log = db.with_suffix(f".{self.port}.log")
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + 120
        while time.time() < deadline:
            assert self.process.poll() is None, self.log.read_text()
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        self.stop()
        raise AssertionError("serve.py did not come up within 120 s:\n" + self.log.read_text())

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:  # never leave a server behind
                self.process.kill()
                self.process.wait(timeout=30)
                raise AssertionError("serve.py did not stop within 30 s of SIGTERM:\n" + self.log.read_text())


@pytest.fixture(scope="module")
def uninterrupted_answers(night_pushes, tmp_path_factory):
    """The night through one in-process service with the shipped model that never stops: every answer."""
    pushes, start, end, _ = night_pushes
    with TestClient(serve.create_app(make_service(tmp_path_factory.mktemp("db") / "a.db"))) as client:
        return night_answers(client, "w1", pushes, start, end)


@pytest.fixture(scope="module")
def uninterrupted(uninterrupted_answers):
    """Its epochs (the immediate stages), every one answered."""
    return [e for answer in uninterrupted_answers for e in answer["epochs"]]


@pytest.fixture(scope="module")
def uninterrupted_revised(night_pushes, lookahead_ckpt, tmp_path_factory):
    """The night through one in-process service with the lookahead model: its answers, then what GET
    .../epochs, the summary and /metrics give at the end."""
    pushes, start, end, _ = night_pushes
    with TestClient(serve.create_app(make_service(tmp_path_factory.mktemp("db") / "r.db", lookahead_ckpt))) as client:
        answers = night_answers(client, "w1", pushes, start, end)
        return {"answers": answers, "stored": client.get("/v1/wearers/w1/epochs").json()["epochs"],
                "summary": client.get("/v1/wearers/w1/summary").json(), "metrics": client.get("/metrics").text,
                "wearers": client.get("/v1/wearers").json()}


# ----------------------------------------------------------------------------- the contract

def test_replaying_a_night_through_the_api_gives_the_realtime_stages(night_pushes, uninterrupted, small_data_dir):
    """Equal to `inference_hybrid.py --realtime` (realtime.replay_nights) on the same night."""
    pushes, start, end, night = night_pushes
    model, scaler, ckpt = load_model_from_checkpoint(CHECKPOINT)
    expected = realtime.replay_nights(model, scaler, ckpt, small_data_dir, [night])
    epochs = uninterrupted
    assert [e["epoch_start"] for e in epochs] == list(BASE_S + night.epoch_start_s)
    assert [e["stage"] for e in epochs] == expected["pred"].tolist()
    probabilities = np.array([e["probabilities"] for e in epochs], dtype=float)
    np.testing.assert_allclose(probabilities, expected[["p_wake", "p_light", "p_deep", "p_rem"]].to_numpy(),
                               atol=1e-5)
    assert all(e["stage_name"] == serve.STAGE_NAMES[e["stage"]] for e in epochs)


def test_push_answers_and_stores(tmp_path, night_pushes, uninterrupted):
    pushes, start, end, night = night_pushes
    service = make_service(tmp_path / "s.db")
    lookahead = service.lookahead
    with TestClient(serve.create_app(service)) as client:
        answers = night_answers(client, "w1", pushes[:5], start, start + 600)
        epochs = [e for answer in answers for e in answer["epochs"]]
        assert [e["epoch_start"] for e in epochs] == [start + 30 * k for k in range(20)]
        stored = client.get("/v1/wearers/w1/epochs").json()["epochs"]
        # the night's end revised every epoch still waiting (all 20 with a lookahead, none without)
        assert answered(stored) == epochs and all(e["revised"] == (lookahead > 0) for e in stored)
        assert [{k: e[k] for k in epochs[0]} for e in stored] == latest(answers)  # the latest stage
        assert answered(client.get("/v1/wearers/w1/epochs", params={"since": start + 300}).json()["epochs"]) == epochs[10:]
        iso = datetime.fromtimestamp(start + 300, timezone.utc).isoformat()
        assert answered(client.get("/v1/wearers/w1/epochs", params={"since": iso}).json()["epochs"]) == epochs[10:]
        assert client.get("/v1/wearers").json() == {
            "wearers": [{"wearer_id": "w1", "epochs": 20, "last_epoch_start": start + 570}], "lookahead": lookahead}
        summary = client.get("/v1/wearers/w1/summary").json()
        assert summary["epochs"] == 20 and summary["night_start"] == start
        assert summary["revised_epochs"] == (20 if lookahead else 0)
        assert summary["metrics"]["time_in_bed_min"] == 10.0
        sleep_min = sum(e["stage"] >= 1 for e in latest(answers)) / 2
        assert summary["metrics"]["total_sleep_time_min"] == sleep_min
        metrics = client.get("/metrics").text
        accepted = sum(len(rows) for body in pushes[:5] for rows in body.values())
        assert f"sleep_staging_readings_accepted_total {float(accepted)}" in metrics
        assert "sleep_staging_wearers 1.0" in metrics
        assert 'sleep_staging_request_seconds_count{route="/v1/wearers/{wearer_id}/readings"} 5.0' in metrics
        assert client.get("/healthz").json()["status"] == "ok"


def test_summary_leaves_no_data_out_as_the_reports_do(tmp_path, small_data_dir):
    """2 h of a real night in 10-min pushes with the watch off for 25 min: the summary is the reports' rule
    (sleep_metrics.night_metrics: no-data epochs are neither sleep nor wake), not "no data" counted as awake."""
    readings = realtime.recorded_readings(small_data_dir, SUBJECT)
    start = math.floor(min(rows[0, 0] for rows in readings.values()) / 30) * 30
    off = (start + 3000, start + 3000 + 1500)
    with TestClient(serve.create_app(make_service(tmp_path / "s.db"))) as client:
        client.post("/v1/wearers/w/flush", json={"now": BASE_S + start})
        for lo in range(int(start), int(start) + 7200, 600):
            body = {}
            for kind, rows in readings.items():
                t = rows[:, 0]
                part = rows[(t >= lo) & (t < lo + 600) & ~((t >= off[0]) & (t < off[1]))]
                if len(part):
                    body[API_NAMES[kind]] = [[BASE_S + r[0], *r[1:]] for r in part.tolist()]
            assert client.post("/v1/wearers/w/readings", json=body).status_code == 200
        client.post("/v1/wearers/w/flush", json={"now": BASE_S + start + 7200})
        stages = np.array([e["stage"] for e in client.get("/v1/wearers/w/epochs").json()["epochs"]])
        summary = client.get("/v1/wearers/w/summary").json()
    assert summary["epochs"] == len(stages) == 240
    n_no_data = int((stages < 0).sum())
    assert n_no_data >= 20 and summary["metrics"]["no_data_min"] == n_no_data / 2
    expected = sm.sleep_metrics(stages[stages >= 0])  # what the reports give on the same stages
    for name in sm.METRICS:
        assert summary["metrics"][name] == (None if math.isnan(expected[name]) else pytest.approx(expected[name])), name
    assert summary["metrics"]["time_in_bed_min"] == (240 - n_no_data) / 2


def test_an_unknown_wearer_is_a_404(tmp_path):
    """A typo in a wearer id is not a wearer with no epochs: 404 on the read endpoints, close code 4404
    on the live feed; known once anything of it was taken (also after a restart)."""
    from starlette.websockets import WebSocketDisconnect
    with TestClient(serve.create_app(make_service(tmp_path / "s.db"))) as client:
        for path in ("/v1/wearers/nobody/epochs", "/v1/wearers/nobody/summary"):
            response = client.get(path)
            assert response.status_code == 404 and "unknown wearer 'nobody'" in response.json()["detail"], path
        with pytest.raises(WebSocketDisconnect) as closed:
            with client.websocket_connect("/v1/wearers/nobody/live?since=0") as ws:
                ws.receive_text()
        assert closed.value.code == serve.UNKNOWN_WEARER == 4404 and "nobody" in closed.value.reason
        assert client.post("/v1/wearers/nobody/flush", json={"now": BASE_S}).status_code == 200
        assert client.get("/v1/wearers/nobody/epochs").json() == {"epochs": []}
        assert client.get("/v1/wearers/nobody/summary").json()["epochs"] == 0
    with TestClient(serve.create_app(make_service(tmp_path / "s.db"))) as client:  # restarted
        assert client.get("/v1/wearers/nobody/summary").status_code == 200
        with client.websocket_connect("/v1/wearers/nobody/live") as ws:
            client.post("/v1/wearers/nobody/readings", json={"heart_rate": [[BASE_S + 5, 60], [BASE_S + 31, 60]]})
            assert ws.receive_json()["epoch_start"] == BASE_S


def test_stream_rules_are_counted_in_stats(tmp_path):
    with TestClient(serve.create_app(make_service(tmp_path / "s.db"))) as client:
        t = BASE_S
        first = client.post("/v1/wearers/w/readings", json={"heart_rate": [[t + 5, 60], [t + 35, 61]]}).json()
        assert first["stats"]["accepted"] == 2 and len(first["epochs"]) == 1
        again = client.post("/v1/wearers/w/readings", json={
            "heart_rate": [[t + 10, 62],          # late: epoch 0 closed
                           [t + 35, 70],          # duplicate timestamp
                           [t + 40, 400]],        # out of range
            "counts": [[t + 45, -1], [t + 50, 3]]}).json()
        stats = again["stats"]
        assert (stats["late"], stats["duplicates"], stats["out_of_range"], stats["accepted"]) == (1, 1, 2, 1)
        metrics = client.get("/metrics").text
        assert 'sleep_staging_readings_dropped_total{reason="out_of_range"} 2.0' in metrics
        # the watch off for 20 minutes: the stretch is "no data", not a guess
        gap = client.post("/v1/wearers/w/readings", json={"heart_rate": [[t + 1500, 60]]}).json()["epochs"]
        assert gap[-1] == {"epoch_start": t + 1470, "stage": -1, "stage_name": "no data", "probabilities": None}


def test_many_wearers_in_one_request_equal_separate_requests(tmp_path, night_pushes):
    pushes, start, _, _ = night_pushes
    with TestClient(serve.create_app(make_service(tmp_path / "a.db"))) as client:
        for w in ("a", "b"):
            client.post(f"/v1/wearers/{w}/flush", json={"now": start + (0 if w == "a" else 30)})
        together = {"a": [], "b": []}
        for body in pushes[:8]:
            answer = client.post("/v1/readings", json={"a": body, "b": body}).json()
            for w in together:
                together[w] += answer[w]["epochs"]
    with TestClient(serve.create_app(make_service(tmp_path / "b.db"))) as client:
        client.post("/v1/wearers/a/flush", json={"now": start})
        alone = []
        for body in pushes[:8]:
            alone += client.post("/v1/wearers/a/readings", json=body).json()["epochs"]
    assert_same_epochs(together["a"], alone)
    assert len(alone) > 10
    assert together["b"][0]["epoch_start"] == start + 30  # b's night opened an epoch later


def test_iso_times_equal_unix_seconds(tmp_path):
    t = BASE_S + 7
    with TestClient(serve.create_app(make_service(tmp_path / "s.db"))) as client:
        as_numbers = client.post("/v1/wearers/n/readings", json={"heart_rate": [[t, 60], [t + 40, 62]]}).json()
        iso = [datetime.fromtimestamp(x, timezone.utc).isoformat().replace("+00:00", "Z") for x in (t, t + 40)]
        as_text = client.post("/v1/wearers/s/readings", json={"heart_rate": [[iso[0], 60], [iso[1], 62]]}).json()
    assert as_text["stats"] == as_numbers["stats"] and len(as_numbers["epochs"]) == 1
    assert_same_epochs(as_text["epochs"], as_numbers["epochs"])


BAD = [  # (body bytes or JSON, expected status, words the message must contain)
    (b'{"heart_rate": [[1767225600, 60]', 400, ["malformed JSON"]),
    (b'{"heart_rate": [[1767225600, NaN]]}', 400, ["malformed JSON"]),
    ([1, 2], 422, ["body", "JSON object"]),
    ({"heart_rate": [[1767225600, 60], [1767225605]]}, 422, ["heart_rate[1]", "[t, bpm]"]),
    ({"heart_rate": [[1767225600, "60"]]}, 422, ["heart_rate[0][1]", "bpm", "'60'"]),
    ({"heart_rate": [[1767225600, True]]}, 422, ["heart_rate[0][1]"]),
    ({"heart_rate": [[1767225600, None]]}, 422, ["heart_rate[0][1]", "null"]),
    ({"acceleration": [[1767225600, 0.1, 0.2]]}, 422, ["acceleration[0]", "[t, x, y, z]"]),
    ({"heart_rate": {"t": 1}}, 422, ["heart_rate", "list"]),
    ({"heart_rate": [[1767225600000, 60]]}, 422, ["heart_rate[0][0]", "milliseconds"]),
    ({"heart_rate": [[-5, 60]]}, 422, ["heart_rate[0][0]"]),
    ({"heart_rate": [["2026-01-01T00:00:00", 60]]}, 422, ["heart_rate[0][0]", "UTC offset"]),
    ({"heart_rate": [["yesterday", 60]]}, 422, ["heart_rate[0][0]", "ISO-8601"]),
    ({"heart_rate": [[1767225600, 60]], "spo2": []}, 422, ["spo2", "unknown field"]),
    (b'{"counts": [[1767225600, 1e400]]}', 400, ["malformed JSON"]),
    (b'{"heart_rate": [], "counts": [], "heart_rate": []}', 400, ["malformed JSON", "'heart_rate' appears twice"]),
    ({"heart_rate": [[time.time() + 3 * 86400, 60]]}, 422, ["heart_rate[0][0]", "ahead of this server's clock"]),
]


@pytest.mark.parametrize("body, status, words", BAD, ids=range(len(BAD)))
def test_bad_input_is_a_4xx_naming_the_field(tmp_path, body, status, words):
    with TestClient(serve.create_app(make_service(tmp_path / "s.db")), raise_server_exceptions=True) as client:
        kwargs = ({"content": body, "headers": {"Content-Type": "application/json"}} if isinstance(body, bytes)
                  else {"json": body})
        response = client.post("/v1/wearers/w/readings", **kwargs)
        assert response.status_code == status, response.text
        detail = response.json()["detail"]
        assert all(w in detail for w in words), detail
        # the same body for a wearer inside a gateway request names the wearer too
        if not isinstance(body, bytes) and isinstance(body, dict):
            response = client.post("/v1/readings", json={"watch-1": body})
            assert response.status_code == status and "watch-1." in response.json()["detail"]
        # nothing was stored or ingested
        assert client.get("/v1/wearers").json()["wearers"] == []


DEEP = 5000


@pytest.mark.parametrize("path, body", [
    ("/v1/wearers/w/readings", b"[" * DEEP + b"]" * DEEP),                                     # the whole body
    ("/v1/wearers/w/readings", b'{"heart_rate": ' + b"[" * DEEP + b"]" * DEEP + b"}"),        # in a field
    ("/v1/readings", b'{"w": {"counts": ' + b"[" * DEEP + b"]" * DEEP + b"}}"),              # a gateway's wearer
    ("/v1/wearers/w/flush", b'{"now": ' + b"[" * DEEP + b"]" * DEEP + b"}"),
    ("/v1/wearers/w/readings", b"[" * DEEP),                                                  # and not even JSON
    ("/v1/wearers/w/readings", b'{"heart_rate": [[[[[[[[[1767225600, 60]]]]]]]]]}'),           # just past the limit
], ids=["body", "field", "gateway", "flush", "unclosed", "nine"])
def test_deeply_nested_bodies_are_a_400_not_a_recursion_error(tmp_path, path, body):
    with TestClient(serve.create_app(make_service(tmp_path / "s.db")), raise_server_exceptions=True) as client:
        response = client.post(path, content=body, headers={"Content-Type": "application/json"})
        assert response.status_code == 400, response.text
        detail = response.json()["detail"]
        assert "malformed JSON" in detail and "nested" in detail and str(serve.MAX_JSON_DEPTH) in detail, detail
        assert client.get("/v1/wearers").json()["wearers"] == []  # nothing ingested


def test_nesting_is_measured_outside_strings():
    """Brackets inside strings (escaped quotes too) do not nest; the API's own bodies nest 4 deep."""
    for text in ('{"w": {"heart_rate": [[1767225600, 60]]}}', '{"a": "[[[[[[[[[[[[", "b": [[1]]}',
                 '{"a": "x\\\\", "b": [[[]]]}', '{"a": "\\" [[[[[[[[[[", "b": {"c": [[]]}}'):
        assert serve.json_depth(text.encode()) == max(_depth(json.loads(text)), 0), text
    assert serve.json_depth(b"1") == 0 and serve.json_depth(b"[" * DEEP + b"]" * DEEP) == DEEP


def _depth(value) -> int:
    children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else None
    return 0 if children is None else 1 + max(map(_depth, children), default=0)


def test_wearers_per_request_and_per_process_are_bounded(tmp_path):
    """A gateway request naming 100,000 new wearers is refused before anything is taken (413), and past
    --max-wearers new wearers get a 503 naming the limit while known ones go on."""
    with TestClient(serve.create_app(make_service(tmp_path / "a.db"))) as client:
        response = client.post("/v1/readings", json={f"w{i}": {} for i in range(100_000)})
        assert response.status_code == 413, response.text[:300]
        assert f"more than the {serve.MAX_REQUEST_WEARERS} one request may" in response.json()["detail"]
        assert client.get("/v1/wearers").json()["wearers"] == []
        many = client.post("/v1/readings", json={f"w{i}": {} for i in range(serve.MAX_REQUEST_WEARERS)})
        assert many.status_code == 200 and len(many.json()) == serve.MAX_REQUEST_WEARERS
    db = tmp_path / "b.db"
    hr = {"heart_rate": [[BASE_S, 60]]}
    with TestClient(serve.create_app(make_service(db, max_wearers=3))) as client:
        assert client.post("/v1/readings", json={"a": hr, "b": hr}).status_code == 200
        response = client.post("/v1/readings", json={"a": hr, "c": hr, "d": hr})  # two new: one too many
        assert response.status_code == 503, response.text
        assert "limit is 3 (--max-wearers)" in response.json()["detail"] and "2 new" in response.json()["detail"]
        assert [w["wearer_id"] for w in client.get("/v1/wearers").json()["wearers"]] == ["a", "b"]
        assert client.post("/v1/wearers/c/flush", json={"now": BASE_S + 30}).status_code == 200
        assert client.post("/v1/wearers/d/readings", json=hr).status_code == 503
        assert client.post("/v1/wearers/a/readings", json={"heart_rate": [[BASE_S + 31, 61]]}).status_code == 200
    with TestClient(serve.create_app(make_service(db, max_wearers=2))) as client:  # lowered: stored ones stay
        assert client.get("/healthz").json()["wearers"] == 3
        assert client.post("/v1/wearers/c/readings", json=hr).status_code == 200
        assert client.post("/v1/wearers/e/readings", json=hr).status_code == 503
    args = serve.build_parser().parse_args(["--max-wearers", "1000", "--max-request-wearers", "200"])
    assert (args.max_wearers, args.max_request_wearers) == (1000, 200)
    with pytest.raises(SystemExit):
        serve.main(["--max-wearers", "0"])


def test_other_bad_requests(tmp_path):
    with TestClient(serve.create_app(make_service(tmp_path / "s.db", max_body_bytes=1000))) as client:
        big = {"heart_rate": [[BASE_S + i, 60] for i in range(200)]}
        response = client.post("/v1/wearers/w/readings", json=big)
        assert response.status_code == 413 and "1000 bytes" in response.json()["detail"]
        for wearer in ("a b", "x" * 65, "é", "a%2Fb"):
            response = client.post(f"/v1/wearers/{wearer}/readings", json={})
            assert response.status_code in (404, 422), wearer
            if response.status_code == 422:
                assert "wearer id" in response.json()["detail"]
        response = client.post("/v1/readings", json={"bad id": {}})
        assert response.status_code == 422 and "'bad id'" in response.json()["detail"]
        assert client.post("/v1/wearers/w/flush", json={}).status_code == 422
        response = client.post("/v1/wearers/w/flush", json={"now": 1.0e9, "then": 1})
        assert response.status_code == 422 and "then" in response.json()["detail"]
        response = client.post("/v1/wearers/w/flush", json={"now": 1.0e9, "revise": "yes"})
        assert response.status_code == 422 and "revise: expected true or false" in response.json()["detail"]
        response = client.get("/v1/wearers/w/epochs", params={"since": "soon"})
        assert response.status_code == 422 and "since" in response.json()["detail"]
        # a form post (what another web site's page can send without asking) is refused
        response = client.post("/v1/wearers/w/readings", content=b'{"heart_rate": []}',
                               headers={"Content-Type": "text/plain"})
        assert response.status_code == 415 and "application/json" in response.json()["detail"]
        response = client.post("/v1/readings", json={"watch-1": [1]})
        assert response.status_code == 422 and response.json()["detail"].startswith("watch-1: expected a JSON object")


def test_the_token_guards_the_api_but_not_the_page(tmp_path):
    service = make_service(tmp_path / "s.db")
    with TestClient(serve.create_app(service, token="s3cret")) as client:
        assert client.post("/v1/wearers/w/readings", json={}).status_code == 401
        wrong = {"Authorization": "Bearer nope"}
        assert client.get("/v1/wearers", headers=wrong).status_code == 401
        assert client.get("/metrics").status_code == 401
        good = {"Authorization": "Bearer s3cret"}
        assert client.post("/v1/wearers/w/readings", json={}, headers=good).status_code == 200
        assert client.get("/v1/wearers", headers=good).status_code == 200
        assert client.get("/healthz").status_code == 200
        page = client.get("/")
        assert page.status_code == 200 and "<canvas" in page.text and "http" not in page.text.split("<script>")[0]
        from starlette.websockets import WebSocketDisconnect
        with pytest.raises(WebSocketDisconnect):
            with client.websocket_connect("/v1/wearers/w/live") as ws:
                ws.receive_text()
        with client.websocket_connect("/v1/wearers/w/live?token=s3cret") as ws:
            client.post("/v1/wearers/w/readings", json={"heart_rate": [[BASE_S, 60], [BASE_S + 31, 60]]},
                        headers=good)
            assert ws.receive_json()["epoch_start"] == BASE_S


def test_the_page_has_the_reports_palette_and_a_favicon(tmp_path):
    with TestClient(serve.create_app(make_service(tmp_path / "s.db"), token="s3cret")) as client:
        page = client.get("/").text
        assert "__PALETTE__" not in page and json.dumps(serve.PALETTE) in page
        assert serve.PALETTE == {"stages": evaluation.STAGE_COLORS, "no_data": evaluation.NO_DATA_COLOR}
        icon = client.get("/favicon.ico")  # open, like the page: a browser asks without the token
        assert icon.status_code == 200 and icon.headers["content-type"] == "image/svg+xml"
        from xml.etree import ElementTree
        fills = {rect.get("fill") for rect in ElementTree.fromstring(icon.content)}
        assert fills == set(evaluation.STAGE_COLORS.values())


def test_refuses_a_public_address_without_a_token(capsys, monkeypatch):
    monkeypatch.delenv(serve.TOKEN_ENV, raising=False)
    with pytest.raises(SystemExit) as exit_info:
        serve.main(["--host", "0.0.0.0"])
    assert exit_info.value.code == 2 and "--token" in capsys.readouterr().err
    assert serve.is_loopback("127.0.0.1") and serve.is_loopback("::1") and serve.is_loopback("localhost")
    assert not serve.is_loopback("0.0.0.0") and not serve.is_loopback("192.168.1.4")


def test_live_feed_sends_the_backlog_then_each_epoch(tmp_path, night_pushes):
    pushes, start, _, _ = night_pushes
    with TestClient(serve.create_app(make_service(tmp_path / "s.db"))) as client:
        client.post("/v1/wearers/w/flush", json={"now": start})
        first = []
        for body in pushes[:3]:
            first += client.post("/v1/wearers/w/readings", json=body).json()["epochs"]
        with client.websocket_connect(f"/v1/wearers/w/live?since={start}") as ws:
            backlog = [ws.receive_json() for _ in first]
            assert backlog == first
            later = client.post("/v1/wearers/w/readings", json=pushes[3]).json()["epochs"]
            assert later and [ws.receive_json() for _ in later] == later


def test_grouping_a_push_by_epoch_gives_the_time_ordered_result(small_data_dir):
    """serve.merged_runs takes a push's readings epoch by epoch; the stream gives what time order gives."""
    model, scaler, ckpt = load_model_from_checkpoint(CHECKPOINT)
    readings = realtime.recorded_readings(small_data_dir, SUBJECT)
    out = []
    for grid in (None, 0.0):
        stager = realtime.StreamingStager(model, scaler, ckpt, start_s=0.0, max_delay_s=40.0, record_features=True)
        epochs = []
        for kind, rows in realtime.time_ordered_runs(readings, epoch_grid_s=grid):
            epochs += stager.push(kind, rows[:, 0], *rows[:, 1:].T)
        out.append((epochs, stager.stats, np.stack(stager.feature_rows)))
    (a, stats_a, rows_a), (b, stats_b, rows_b) = out
    assert len(a) == len(b) > 500 and stats_a == stats_b
    # a push inside one epoch: one run per signal, each in stable time order
    one = {"counts": np.array([[45.0, 1], [31.0, 2]]), "heart_rate": np.array([[40.0, 60], [33.0, 61], [40.0, 62]])}
    runs = list(realtime.time_ordered_runs(one, epoch_grid_s=0.0))
    assert [k for k, _ in runs] == ["heart_rate", "counts"]
    np.testing.assert_array_equal(runs[0][1], [[33.0, 61], [40.0, 60], [40.0, 62]])
    np.testing.assert_array_equal(runs[1][1], [[31.0, 2], [45.0, 1]])
    assert [e.epoch_start_s for e in a] == [e.epoch_start_s for e in b]
    np.testing.assert_array_equal(rows_a, rows_b)


# ----------------------------------------------------------------------------- the revised stage (a model with a lookahead)

def test_revisions_are_answered_stored_and_equal_the_realtime_replay(night_pushes, lookahead_ckpt,
                                                                     uninterrupted_revised, small_data_dir):
    """Each epoch's revision comes once, with the push that closed epoch t + lookahead (the same model
    call), the last ones with the flush that ends the night; they are `--realtime`'s pred_revised. The
    immediate stages stay as they are. GET .../epochs gives the latest stage and says it is revised,
    the summary counts on the latest stages."""
    pushes, start, end, night = night_pushes
    model, scaler, ckpt = load_model_from_checkpoint(lookahead_ckpt)
    assert realtime.lookahead_of(model) == LOOKAHEAD
    expected = realtime.replay_nights(model, scaler, ckpt, small_data_dir, [night])
    answers = uninterrupted_revised["answers"]
    epochs = [e for a in answers for e in a["epochs"]]
    revised = [e for a in answers for e in a["revised"]]
    starts = list(BASE_S + night.epoch_start_s)
    assert [e["epoch_start"] for e in epochs] == [e["epoch_start"] for e in revised] == starts  # each once, in order
    assert [e["stage"] for e in epochs] == expected["pred"].tolist()
    assert [e["stage"] for e in revised] == expected["pred_revised"].tolist()
    np.testing.assert_allclose(np.array([e["probabilities"] for e in revised], dtype=float),
                               expected[realtime.REVISED_COLUMNS[1:]].to_numpy(), atol=1e-5)
    assert all(e["stage_name"] == serve.STAGE_NAMES[e["stage"]] for e in revised)
    assert [e["stage"] for e in epochs] != [e["stage"] for e in revised]  # another output, not a copy
    for i, answer in enumerate(answers):
        closed = {e["epoch_start"] for e in answer["epochs"]}
        for e in answer["revised"]:
            assert e["epoch_start"] + 30 * LOOKAHEAD in closed or (
                i == len(answers) - 1 and e["epoch_start"] >= end - 30 * LOOKAHEAD), (i, e["epoch_start"])
    assert len(answers[-1]["revised"]) == LOOKAHEAD + len(answers[-1]["epochs"])  # the last window's, then the end's
    stored = uninterrupted_revised["stored"]
    assert all(e["revised"] for e in stored) and answered(stored) == epochs
    assert [{k: e[k] for k in revised[0]} for e in stored] == revised
    summary = uninterrupted_revised["summary"]
    assert summary["epochs"] == summary["revised_epochs"] == len(starts)
    on_revised = sm.night_metrics(np.array([e["stage"] for e in revised]))
    assert summary["metrics"] == {k: None if math.isnan(v) else pytest.approx(v) for k, v in on_revised.items()}
    assert uninterrupted_revised["wearers"]["lookahead"] == LOOKAHEAD
    counted = uninterrupted_revised["metrics"]
    for name in dl.STAGE_NAMES:
        n = sum(e["stage_name"] == name for e in revised)
        assert f'sleep_staging_epochs_revised_total{{stage="{name}"}} {float(n)}' in counted


def test_a_clock_tick_leaves_the_revisions_waiting_and_the_nights_end_gives_them(tmp_path, night_pushes,
                                                                                  lookahead_ckpt):
    """flush {"now"} is a clock tick: the last `lookahead` epochs stay provisional (GET says so, the summary
    counts their immediate stage); {"now", "revise": true} revises them from the latest window, once."""
    pushes, start, _, _ = night_pushes
    with TestClient(serve.create_app(make_service(tmp_path / "s.db", lookahead_ckpt))) as client:
        client.post("/v1/wearers/w/flush", json={"now": start})
        answers = [client.post("/v1/wearers/w/readings", json=body).json() for body in pushes[:6]]
        epochs = [e for a in answers for e in a["epochs"]]
        clock = max(r[0] for rows in pushes[5].values() for r in rows)
        tick = client.post("/v1/wearers/w/flush", json={"now": clock}).json()
        epochs += tick["epochs"]
        assert tick["revised"] == [] and len(epochs) > LOOKAHEAD + 5
        assert len([e for a in answers for e in a["revised"]]) == len(epochs) - LOOKAHEAD - len(tick["epochs"])
        stored = client.get("/v1/wearers/w/epochs").json()["epochs"]
        assert [e["revised"] for e in stored] == [True] * (len(epochs) - LOOKAHEAD) + [False] * LOOKAHEAD
        assert [e["stage"] for e in stored[-LOOKAHEAD:]] == [e["stage"] for e in epochs[-LOOKAHEAD:]]
        assert client.get("/v1/wearers/w/summary").json()["revised_epochs"] == len(epochs) - LOOKAHEAD
        end = client.post("/v1/wearers/w/flush", json={"now": clock, "revise": True}).json()
        assert end["epochs"] == [] and [e["epoch_start"] for e in end["revised"]] == \
            [e["epoch_start"] for e in epochs[-LOOKAHEAD:]]
        np.testing.assert_allclose(end["revised"][-1]["probabilities"], epochs[-1]["probabilities"], atol=1e-6)  # lag 0
        assert client.post("/v1/wearers/w/flush", json={"now": clock, "revise": True}).json()["revised"] == []
        stored = client.get("/v1/wearers/w/epochs").json()["epochs"]
        assert all(e["revised"] for e in stored) and stored[-1]["immediate_stage"] == epochs[-1]["stage"]
        # the night goes on: later epochs are revised as usual, the ones revised already are not again
        later = [client.post("/v1/wearers/w/readings", json=body).json() for body in pushes[6:9]]
        revised_later = [e["epoch_start"] for a in later for e in a["revised"]]
        assert revised_later and min(revised_later) > epochs[-1]["epoch_start"]


def test_the_live_feed_sends_revisions_beside_the_epochs(tmp_path, night_pushes, lookahead_ckpt):
    """The backlog: the stored immediate epochs, then one {"revised": [...]} message; then each push's
    epochs as before and its revisions in a {"revised": [...]} message of their own."""
    pushes, start, _, _ = night_pushes
    with TestClient(serve.create_app(make_service(tmp_path / "s.db", lookahead_ckpt))) as client:
        client.post("/v1/wearers/w/flush", json={"now": start})
        first = [client.post("/v1/wearers/w/readings", json=body).json() for body in pushes[:4]]
        with client.websocket_connect(f"/v1/wearers/w/live?since={start}") as ws:
            epochs = [e for a in first for e in a["epochs"]]
            assert [ws.receive_json() for _ in epochs] == epochs
            assert ws.receive_json() == {"revised": [e for a in first for e in a["revised"]]}
            answer = client.post("/v1/wearers/w/readings", json=pushes[4]).json()
            assert answer["epochs"] and answer["revised"]
            assert [ws.receive_json() for _ in answer["epochs"]] == answer["epochs"]
            assert ws.receive_json() == {"revised": answer["revised"]}
            end = client.post("/v1/wearers/w/flush", json={"now": answer["epochs"][-1]["epoch_start"] + 30,
                                                           "revise": True}).json()
            assert len(end["revised"]) == LOOKAHEAD and ws.receive_json() == {"revised": end["revised"]}


@pytest.mark.parametrize("which", ["lookahead_ckpt", "night_ckpt"])
def test_restart_keeps_every_revision_once(tmp_path, night_pushes, which, request):
    """In process, a restart between pushes for three wearers: one whose last epochs wait for their
    revision (revised by the next pushes), one whose night ends right after the restart (revised from
    the latest window, run again on start), one whose night was ended before the restart (nothing
    revised twice). The answers and the database equal a run without the restart: for a window model,
    and for a whole-night one, whose replay steps through every epoch again."""
    lookahead_ckpt = request.getfixturevalue(which)
    pushes, start, _, _ = night_pushes
    half = len(pushes) // 2
    clock = max(r[0] for rows in pushes[half - 1].values() for r in rows)

    def first_half(client):
        for w in ("a", "b", "c"):
            client.post(f"/v1/wearers/{w}/flush", json={"now": start})
        out = [client.post("/v1/readings", json={w: body for w in ("a", "b", "c")}).json() for body in pushes[:half]]
        out.append({"c": client.post("/v1/wearers/c/flush", json={"now": clock, "revise": True}).json()})
        return out

    def second_half(client):
        out = [{"b": client.post("/v1/wearers/b/flush", json={"now": clock, "revise": True}).json()}]
        out += [client.post("/v1/readings", json={"a": body, "c": body}).json() for body in pushes[half:half + 6]]
        return out

    runs = {}
    for restart in (False, True):
        db = tmp_path / f"{restart}.db"
        with TestClient(serve.create_app(make_service(db, lookahead_ckpt))) as client:
            answers = first_half(client)
            if not restart:
                answers += second_half(client)
        if restart:
            with TestClient(serve.create_app(make_service(db, lookahead_ckpt))) as client:
                answers += second_half(client)
        with TestClient(serve.create_app(make_service(db, lookahead_ckpt))) as client:
            stored = {w: client.get(f"/v1/wearers/{w}/epochs").json()["epochs"] for w in "abc"}
        runs[restart] = answers, stored
    for w in "abc":
        (plain, plain_stored), (restarted, restarted_stored) = (
            ([a[w] for a in answers if w in a], stored[w]) for answers, stored in (runs[False], runs[True]))
        for key in ("epochs", "revised"):
            assert [len(a[key]) for a in restarted] == [len(a[key]) for a in plain], (w, key)
            assert_same_epochs([e for a in restarted for e in a[key]], [e for a in plain for e in a[key]])
        assert [e["revised"] for e in restarted_stored] == [e["revised"] for e in plain_stored]
        assert_same_epochs(restarted_stored, plain_stored)
        revised = [e["epoch_start"] for a in restarted for e in a["revised"]]
        assert len(revised) == len(set(revised)), w
    b_end = [a["b"] for a in runs[True][0] if "b" in a][-1]
    assert len(b_end["revised"]) == LOOKAHEAD and b_end["epochs"] == []  # from the window run again on start


OLD_SCHEMA = """
CREATE TABLE events (wearer_id TEXT NOT NULL, seq INTEGER NOT NULL, kind TEXT NOT NULL, received_s REAL NOT NULL,
    data BLOB NOT NULL, PRIMARY KEY (wearer_id, seq)) WITHOUT ROWID;
CREATE TABLE wearers (wearer_id TEXT PRIMARY KEY, night_seq INTEGER NOT NULL, next_seq INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE epochs (wearer_id TEXT NOT NULL, epoch_start REAL NOT NULL, stage INTEGER NOT NULL,
    p_wake REAL, p_light REAL, p_deep REAL, p_rem REAL, PRIMARY KEY (wearer_id, epoch_start)) WITHOUT ROWID;
"""  # serve_store.py before the revised stage (schema version 0)


def test_a_database_of_the_previous_version_is_migrated_and_others_are_refused(tmp_path, night_pushes,
                                                                                 uninterrupted):
    """A database written by serve.py before the revised stage (no revision columns, user_version 0) gets
    them on start, keeps every epoch, and its streams go on as before; a newer version or another
    program's tables are refused with a message, the file left as it was."""
    pushes, start, end, _ = night_pushes
    half = len(pushes) // 2
    new = tmp_path / "new.db"
    with TestClient(serve.create_app(make_service(new))) as client:
        epochs = client.post("/v1/wearers/w1/flush", json={"now": start}).json()["epochs"]
        for body in pushes[:half]:
            epochs += client.post("/v1/wearers/w1/readings", json=body).json()["epochs"]
    old = tmp_path / "old.db"  # the same content as the previous version stored it
    with sqlite3.connect(old) as db:
        db.executescript(OLD_SCHEMA)
        db.execute("ATTACH DATABASE ? AS new", (str(new),))
        db.execute("INSERT INTO events SELECT * FROM new.events")
        db.execute("INSERT INTO wearers SELECT * FROM new.wearers")
        db.execute("INSERT INTO epochs SELECT wearer_id, epoch_start, stage, p_wake, p_light, p_deep, p_rem "
                   "FROM new.epochs")
    with TestClient(serve.create_app(make_service(old))) as client:
        assert answered(client.get("/v1/wearers/w1/epochs").json()["epochs"]) == epochs
        for body in pushes[half:]:
            epochs += client.post("/v1/wearers/w1/readings", json=body).json()["epochs"]
        epochs += client.post("/v1/wearers/w1/flush", json={"now": end}).json()["epochs"]
    assert_same_epochs(epochs, uninterrupted)
    with sqlite3.connect(old) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == serve_store.SCHEMA_VERSION == 1
        assert [r[1] for r in db.execute("PRAGMA table_info(epochs)")] == list(serve_store.COLUMNS["epochs"])
    newer = tmp_path / "newer.db"
    with sqlite3.connect(newer) as db:
        db.execute("PRAGMA user_version = 2")
    with pytest.raises(ValueError, match="schema version 2, newer than this serve.py knows"):
        serve_store.ServiceStore(newer)
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE epochs (id INTEGER PRIMARY KEY, name TEXT)")
    with pytest.raises(ValueError, match="not a serve.py database: its table epochs lacks wearer_id"):
        serve_store.ServiceStore(other)
    with sqlite3.connect(other) as db:  # left as it was: the migration is one transaction
        assert [r[1] for r in db.execute("PRAGMA table_info(epochs)")] == ["id", "name"]
        assert db.execute("SELECT name FROM sqlite_master WHERE name = 'events'").fetchall() == []
        assert db.execute("PRAGMA user_version").fetchone()[0] == 0


# ----------------------------------------------------------------------------- nothing lost

def test_restart_rebuilds_each_stream_from_the_database(tmp_path, night_pushes, uninterrupted):
    """In process: stop after some pushes (another wearer across a 7 h gap: a new night), start a new
    service on the same database, continue; the answers equal an uninterrupted run."""
    pushes, start, end, _ = night_pushes
    half = len(pushes) // 2
    db = tmp_path / "s.db"
    gap = 7 * 3600.0
    shifted = [{k: [[r[0] + gap, *r[1:]] for r in rows] for k, rows in body.items()} for body in pushes]
    with TestClient(serve.create_app(make_service(db))) as client:
        epochs = client.post("/v1/wearers/w1/flush", json={"now": start}).json()["epochs"]
        for body in pushes[:half]:
            epochs += client.post("/v1/wearers/w1/readings", json=body).json()["epochs"]
        other = []
        for body in pushes[:3] + shifted[:half]:  # a short night, 7 h off, then half of the next
            other += client.post("/v1/wearers/w2/readings", json=body).json()["epochs"]
    with TestClient(serve.create_app(make_service(db))) as client:
        assert client.get("/healthz").json()["wearers"] == 2
        for body in pushes[half:]:
            epochs += client.post("/v1/wearers/w1/readings", json=body).json()["epochs"]
        epochs += client.post("/v1/wearers/w1/flush", json={"now": end}).json()["epochs"]
        for body in shifted[half:]:
            other += client.post("/v1/wearers/w2/readings", json=body).json()["epochs"]
        stored = client.get("/v1/wearers/w1/epochs").json()["epochs"]
    assert epochs == answered(stored)
    assert_same_epochs(epochs, uninterrupted)
    with TestClient(serve.create_app(make_service(tmp_path / "fresh.db"))) as client:
        expected = []
        for body in pushes[:3] + shifted:
            expected += client.post("/v1/wearers/w2/readings", json=body).json()["epochs"]
    assert_same_epochs(other, expected)


@pytest.mark.parametrize("model", ["shipped", "lookahead"])
def test_sigkill_mid_night_loses_nothing(model, tmp_path, night_pushes, request):
    """A real server process killed with SIGKILL between pushes; the restarted one continues the night.
    With a lookahead, the epochs waiting for their revision at the kill (their windows rebuilt by the
    replay) are revised once the later epochs come: every epoch revised once, as without the kill."""
    pushes, start, end, _ = night_pushes
    if model == "shipped":
        checkpoint, reference_answers = CHECKPOINT, request.getfixturevalue("uninterrupted_answers")
    else:
        checkpoint = request.getfixturevalue("lookahead_ckpt")
        reference_answers = request.getfixturevalue("uninterrupted_revised")["answers"]
    expected = [e for a in reference_answers for e in a["epochs"]]
    expected_revised = [e for a in reference_answers for e in a["revised"]]
    db = tmp_path / "crash.db"
    kill_after = len(pushes) // 3
    server = ServerProcess(db, checkpoint=checkpoint)
    answers = []
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            answers.append(client.post("/v1/wearers/w1/flush", json={"now": start}).json())
            for body in pushes[:kill_after]:
                answers.append(client.post("/v1/wearers/w1/readings", json=body).json())
    finally:
        server.stop(signal.SIGKILL)
    assert server.process.returncode == -signal.SIGKILL
    before = len(answers)
    server = ServerProcess(db, checkpoint=checkpoint)
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            for body in pushes[kill_after:]:
                answers.append(client.post("/v1/wearers/w1/readings", json=body).json())
            answers.append(client.post("/v1/wearers/w1/flush", json={"now": end, "revise": True}).json())
            stored = client.get("/v1/wearers/w1/epochs").json()["epochs"]
    finally:
        server.stop()
    epochs = [e for a in answers for e in a["epochs"]]
    revised = [e for a in answers for e in a["revised"]]
    starts = [e["epoch_start"] for e in epochs]
    assert len(starts) == len(set(starts)) == len(expected)  # none missing, none twice
    assert_same_epochs(epochs, expected)
    assert_same_epochs(revised, expected_revised)  # none missing, none twice, in epoch order
    assert answered(stored) == epochs
    assert [{k: e[k] for k in epochs[0]} for e in stored] == latest(answers)
    if model == "lookahead":
        last_before = max(e["epoch_start"] for a in answers[:before] for e in a["epochs"])
        waiting = [e["epoch_start"] for a in answers[before:] for e in a["revised"] if e["epoch_start"] <= last_before]
        assert len(waiting) == LOOKAHEAD  # waited through the kill, revised after it
        assert all(e["revised"] for e in stored)
    assert "Traceback" not in server.log.read_text()


# ----------------------------------------------------------------------------- the live page, in a browser

CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


def css_rgb(color: str) -> str:
    """"#d62728" as a browser's computed style writes it: "rgb(214, 39, 40)"."""
    return "rgb({}, {}, {})".format(*(int(color[i:i + 2], 16) for i in (1, 3, 5)))


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium; .ci/run installs it)")
def test_live_page_shows_a_replayed_night_in_a_real_browser(tmp_path, night_pushes, lookahead_ckpt):
    """The page (token passed in the URL, no wearer named) picks the most recently active wearer and shows
    its stored epochs, "no data" for the watch-off stretch, and new epochs as they close; times in the
    browser's zone, colours of the PNG reports, no failed request (the favicon). With a model that has a
    look-ahead it draws each epoch's latest stage, redraws epochs as their revisions come, and draws the
    ones still waiting paler. An unknown wearer says so. SCREENSHOT_OUT=path saves what it shows
    (docs/img/live_page.png)."""
    from zoneinfo import ZoneInfo
    from playwright.sync_api import sync_playwright
    pushes, start, _, _ = night_pushes
    zone = "America/New_York"  # the night then starts in the evening, as it would there
    # the watch off for ~25 minutes after the first third of the night
    cut = len(pushes) // 3
    resume = next(i for i in range(cut, len(pushes))
                  if min(r[0] for rows in pushes[i].values() for r in rows) > min(
                      r[0] for rows in pushes[cut].values() for r in rows) + 1500)
    shown = pushes[:cut] + pushes[resume:resume + len(pushes) // 3]
    server = ServerProcess(tmp_path / "page.db", token="tok", checkpoint=lookahead_ckpt)
    headers = {"Authorization": "Bearer tok"}

    def shows_latest(page) -> None:
        """What the page draws is what GET .../epochs gives: each epoch's latest stage, and which are revised."""
        stored = client.get("/v1/wearers/night-1/epochs").json()["epochs"]
        n, done = len(stored), sum(e["revised"] for e in stored)
        assert done == n - LOOKAHEAD
        page.wait_for_function(f"document.getElementById('revised').textContent === '{done} of {n} epochs; "
                               f"{LOOKAHEAD} provisional (revised {LOOKAHEAD / 2:g} min later)'", timeout=30_000)
        drawn = page.evaluate("epochs.map(e => [e.epoch_start, e.stage, e.probabilities, !!e.revised])")
        assert drawn == [[e["epoch_start"], e["stage"], e["probabilities"], e["revised"]] for e in stored]

    try:
        with httpx.Client(base_url=server.url, timeout=30, headers=headers) as client:
            # an earlier wearer: the page must pick night-1, whose last epoch is later
            assert client.post("/v1/wearers/day-0/readings", json={"heart_rate": [[start - 7200, 60],
                                                                                 [start - 7000, 61]]}).json()["epochs"]
            epochs = client.post("/v1/wearers/night-1/flush", json={"now": start}).json()["epochs"]
            for body in shown:
                epochs += client.post("/v1/wearers/night-1/readings", json=body).json()["epochs"]
            n_no_data = sum(e["stage"] < 0 for e in epochs)
            assert n_no_data >= 20
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
                page = browser.new_page(viewport={"width": 1100, "height": 720}, timezone_id=zone)
                errors, failed = [], []
                page.on("pageerror", lambda error: errors.append(str(error)))
                page.on("response", lambda r: failed.append(f"{r.url}: {r.status}") if r.status >= 400 else None)
                page.goto(f"{server.url}/#token=tok")
                page.wait_for_function(f"document.getElementById('epoch-count').textContent === '{len(epochs)}'",
                                       timeout=30_000)
                assert page.inner_text("#no-data") == f"{n_no_data / 2:g} min"
                last = epochs[-1]
                assert page.inner_text("#last-stage").startswith(last["stage_name"])
                assert page.eval_on_selector("#wearer", "s => s.value") == "night-1"
                local = datetime.fromtimestamp(epochs[-1]["epoch_start"], ZoneInfo(zone))
                assert page.inner_text("#last-epoch") == local.strftime("%H:%M:%S")
                offset = datetime.now(ZoneInfo(zone)).strftime("%z")  # the zone's offset today: -0500 or -0400
                assert page.inner_text("#timezone") == f"this browser's local time, {zone} (UTC{offset[:3]}:{offset[3:]})"
                swatches = page.eval_on_selector_all(".swatch", "all => all.map(s => getComputedStyle(s).backgroundColor)")
                assert swatches == [css_rgb(c) for c in [*evaluation.STAGE_COLORS.values(), evaluation.NO_DATA_COLOR]]
                assert list(evaluation.STAGE_COLORS) == list(dl.STAGE_NAMES)  # the legend's order
                shows_latest(page)
                assert page.is_visible("#provisional-legend")
                # revised epochs in their colour, the last ones (provisional) paler: drawn at 0.35 opacity
                stored = client.get("/v1/wearers/night-1/epochs").json()["epochs"]
                first, last_shown = stored[0], stored[-1]
                assert first["revised"] and first["stage"] >= 0 and not last_shown["revised"] and last_shown["stage"] >= 0
                width, height = page.evaluate("[hypnogram.clientWidth, hypnogram.clientHeight]")
                row = (height - 34) / 4
                level = {0: 0, 3: 1, 1: 2, 2: 3}  # the page's rows top to bottom: Wake, REM, Light, Deep
                pixels = page.evaluate("""([points]) => points.map(([x, y]) => Array.from(hypnogram.getContext("2d")
                    .getImageData(Math.floor(x * devicePixelRatio), Math.floor(y * devicePixelRatio), 1, 1).data))""",
                                       [[[48.5, 10 + row * (level[first["stage"]] + 0.5)],
                                         [width - 8.5, 10 + row * (level[last_shown["stage"]] + 0.5)]]])
                colors = [css_rgb(evaluation.STAGE_COLORS[e["stage_name"]]) for e in (first, last_shown)]
                assert f"rgb({pixels[0][0]}, {pixels[0][1]}, {pixels[0][2]})" == colors[0] and pixels[0][3] == 255
                assert abs(pixels[1][3] - 0.35 * 255) < 3, pixels  # the provisional epoch: paler
                # live: the next pushes' epochs appear without a reload
                more = []
                for body in pushes[resume + len(pushes) // 3:][:4]:
                    more += client.post("/v1/wearers/night-1/readings", json=body).json()["epochs"]
                assert more
                page.wait_for_function("document.getElementById('epoch-count').textContent === "
                                       f"'{len(epochs) + len(more)}'", timeout=30_000)
                shows_latest(page)  # the revisions that came live redrew their epochs
                assert page.inner_text("#status") == "watching night-1"
                assert not errors, errors
                if os.environ.get("SCREENSHOT_OUT"):
                    page.screenshot(path=os.environ["SCREENSHOT_OUT"])
                page.evaluate("fetch('/favicon.ico')")  # what a browser asks for (headless may not)
                page.goto(f"{server.url}/?wearer=ghost#token=tok")
                page.wait_for_function("document.getElementById('status').textContent.includes('ghost')")
                assert page.inner_text("#status") == "no wearer ghost yet: waiting for its first readings"
                assert not failed, failed
                browser.close()
    finally:
        server.stop()


def test_compose_serve_service_fits_the_script():
    import yaml
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    service = compose["services"]["serve"]
    assert service["profiles"] == ["serve"]
    command = service["command"].split()
    assert command[:2] == ["python", "serve.py"]
    args = serve.build_parser().parse_args(command[2:])  # SystemExit on an unknown flag
    assert args.host == "0.0.0.0" and serve.TOKEN_ENV in service["environment"]  # so a token is required
    assert service["ports"] == [f"127.0.0.1:${{SERVE_PORT:-8000}}:{args.port}"]
    volume, target = service["volumes"][0].split(":")
    assert volume in compose["volumes"] and args.db.startswith(target + "/")
    assert f"127.0.0.1:{args.port}/healthz" in " ".join(service["healthcheck"]["test"])
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert target in dockerfile.split("VOLUME")[-1].splitlines()[0] and f"EXPOSE {args.port}" in dockerfile


def test_a_push_that_crosses_a_six_hour_gap_is_taken_in_time_order(tmp_path):
    """Grouping a push by epoch is only done where no reading can start a new night; here one can."""
    model, scaler, ckpt = load_model_from_checkpoint(CHECKPOINT)
    c = BASE_S + 10.0
    pushes = [{"heart_rate": [[c, 60.0]]},
              {"counts": [[c + 6 * 3600 - 1, 3.0]], "heart_rate": [[c + 6 * 3600 + 2, 61.0]]},  # one epoch
              {"heart_rate": [[c + 6 * 3600 + 40, 62.0]]}]
    with TestClient(serve.create_app(make_service(tmp_path / "s.db"))) as client:
        answers = [client.post("/v1/wearers/w/readings", json=body).json() for body in pushes]
    stager = realtime.StreamingStager(model, scaler, ckpt, start_s=None)
    expected = []
    for body in pushes:
        readings = {serve.SIGNALS[name][0]: np.array(rows) for name, rows in body.items()}
        for kind, rows in realtime.time_ordered_runs(readings):  # one signal run at a time, in time order
            expected += stager.push(kind, rows[:, 0], *rows[:, 1:].T)
    assert sum(a["stats"]["new_nights"] for a in answers) == stager.stats["new_nights"] == 0
    assert [e["epoch_start"] for a in answers for e in a["epochs"]] == [e.epoch_start_s for e in expected]
    assert len(expected) == 6 * 120 + 1


def test_a_storage_failure_stops_taking_readings(tmp_path, monkeypatch):
    ended = []
    service = make_service(tmp_path / "s.db", on_failure=lambda: ended.append(True))
    with TestClient(serve.create_app(service)) as client:
        assert client.post("/v1/wearers/w/readings", json={"heart_rate": [[BASE_S, 60]]}).status_code == 200

        def full(*args):
            raise sqlite3.OperationalError("database or disk is full")

        monkeypatch.setattr(service.store, "commit", full)
        response = client.post("/v1/wearers/w/readings", json={"heart_rate": [[BASE_S + 31, 60]]})
        assert response.status_code == 503 and "disk is full" in response.json()["detail"]
        assert ended == [True]
        health = client.get("/healthz")
        assert health.status_code == 503 and "disk is full" in health.json()["error"]
        response = client.post("/v1/wearers/w/readings", json={"heart_rate": [[BASE_S + 62, 60]]})
        assert response.status_code == 503 and "restart it" in response.json()["detail"]
    # what was stored before the failure is what a restart rebuilds from
    with TestClient(serve.create_app(make_service(tmp_path / "s.db"))) as client:
        answer = client.post("/v1/wearers/w/readings", json={"heart_rate": [[BASE_S + 31, 60]]}).json()
        assert [e["epoch_start"] for e in answer["epochs"]] == [BASE_S] and answer["stats"]["accepted"] == 1


def test_other_sites_and_host_names_are_refused(tmp_path):
    from starlette.websockets import WebSocketDisconnect
    service = make_service(tmp_path / "s.db")
    with TestClient(serve.create_app(service, allowed_hosts=["127.0.0.1", "localhost"])) as client:
        assert client.get("/healthz").status_code == 400  # Host: testserver (a rebound DNS name, say)
        assert client.get("http://127.0.0.1/healthz").status_code == 200
    with TestClient(serve.create_app(make_service(tmp_path / "t.db"))) as client:
        with pytest.raises(WebSocketDisconnect):
            with client.websocket_connect("/v1/wearers/w/live", headers={"Origin": "http://evil.example"}) as ws:
                ws.receive_text()
        client.post("/v1/wearers/w/readings", json={"heart_rate": [[BASE_S, 60]]})
        with client.websocket_connect("/v1/wearers/w/live", headers={"Origin": "http://testserver"}) as ws:
            client.post("/v1/wearers/w/readings", json={"heart_rate": [[BASE_S + 31, 60]]})
            assert ws.receive_json()["epoch_start"] == BASE_S
