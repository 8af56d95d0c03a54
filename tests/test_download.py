"""Tests for download.py against a local HTTP server that speaks Range/206/416."""

from __future__ import annotations

import hashlib
import random
import re
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import download
from download import CHECKSUM_FILE, DownloadError, download_release, parse_sha256sums, verify_release

LABELS = "labels/1_labeled_sleep.txt"
HR = "heart_rate/1_heartrate.txt"
MOTION = "motion/1_acceleration.txt"
EVIL_BODY = b"owned\n"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fixture_files() -> dict[str, bytes]:
    rng = random.Random(1234)
    labels = "".join(f"{30 * i} {rng.choice([0, 1, 2, 3, 5])}\n" for i in range(60)).encode()
    hr = "".join(f"{-600 + 5.5 * i:.5f},{rng.randint(48, 90)}\n" for i in range(300)).encode()
    motion_lines, size, t = [], 0, -600.0
    while size < 200_000:  # ~200 KB, big enough to span many 64 KiB chunks
        line = f"{t:.6f} {rng.uniform(-1, 1):.6f} {rng.uniform(-1, 1):.6f} {rng.uniform(-1, 1):.6f}\n"
        motion_lines.append(line)
        size += len(line)
        t += 0.02
    return {LABELS: labels, HR: hr, MOTION: "".join(motion_lines).encode()}


def _sums_text(files: dict[str, bytes]) -> str:
    # PhysioNet's own format: "<hash> <path>" with a single space.
    return "".join(f"{_sha(data)} {rel}\n" for rel, data in sorted(files.items()))


@dataclass
class Req:
    path: str
    range: str | None
    status: int
    sent: int


@dataclass
class ServerState:
    root: Path
    log: list[Req] = field(default_factory=list)
    ignore_range: bool = False
    truncate_once: set[str] = field(default_factory=set)  # first GET sends half the promised body
    fail_once: dict[str, int] = field(default_factory=dict)  # path -> HTTP error returned once
    lock: threading.Lock = field(default_factory=threading.Lock)

    def requests_for(self, path: str) -> list[Req]:
        return [r for r in self.log if r.path == path]


def _make_handler(state: ServerState):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep pytest output clean
            pass

        def do_GET(self):
            path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path).lstrip("/")
            rng = self.headers.get("Range")
            status, headers, payload = self._respond(path, rng)
            # Log before replying, so the client can never observe the reply before the log entry.
            with state.lock:
                state.log.append(Req(path, rng, status, len(payload)))
            if status >= 400 and status != 416:
                self.send_error(status)
                return
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(payload)  # short payload + HTTP/1.0 close = truncated body

        def _respond(self, path: str, rng: str | None) -> tuple[int, dict[str, str], bytes]:
            if path in state.fail_once:
                return state.fail_once.pop(path), {}, b""
            if "evil" in path:
                body = EVIL_BODY  # a naive client would happily write this wherever the name points
            else:
                f = state.root / path
                if not f.resolve().is_relative_to(state.root.resolve()) or not f.is_file():
                    return 404, {}, b""
                body = f.read_bytes()
            size, start, status = len(body), 0, 200
            if rng and not state.ignore_range:
                m = re.fullmatch(r"bytes=(\d+)-", rng)
                assert m, rng
                start = int(m.group(1))
                if start >= size:
                    return 416, {"Content-Range": f"bytes */{size}", "Content-Length": "0"}, b""
                status = 206
            payload = body[start:]
            headers = {"Content-Length": str(len(payload))}
            if status == 206:
                headers["Content-Range"] = f"bytes {start}-{size - 1}/{size}"
            if path in state.truncate_once:
                state.truncate_once.discard(path)
                payload = payload[: len(payload) // 2]  # promise the whole body, send half
            return status, headers, payload

    return Handler


@pytest.fixture(autouse=True)
def _fast_backoff(monkeypatch):
    monkeypatch.setattr(download, "RETRY_BACKOFF_S", 0.01)


@pytest.fixture
def files() -> dict[str, bytes]:
    return _fixture_files()


@pytest.fixture
def server(tmp_path, files):
    root = tmp_path / "srv"
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    (root / CHECKSUM_FILE).write_text(_sums_text(files))
    state = ServerState(root)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(state))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/", state
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


@pytest.fixture
def dest(tmp_path) -> Path:
    # dest sits in its own sandbox so "nothing outside dest" can be checked on the parent.
    (tmp_path / "sandbox").mkdir()
    return tmp_path / "sandbox" / "dest"


def _get(base_url: str, dest: Path, **kw) -> list[Path]:
    kw.setdefault("progress", False)
    kw.setdefault("timeout_s", 5.0)
    kw.setdefault("max_retries", 2)
    return download_release(dest, base_url, **kw)


def _parts(dest: Path) -> list[Path]:
    return sorted(dest.rglob("*.part")) if dest.exists() else []


# --------------------------------------------------------------------------- happy path


def test_full_download_is_byte_identical_and_second_call_downloads_nothing(server, dest, files):
    base_url, state = server
    paths = _get(base_url, dest)

    assert sorted(paths) == sorted((dest / rel).resolve() for rel in files)
    for rel, data in files.items():
        assert (dest / rel).read_bytes() == data
    assert _parts(dest) == []
    assert (dest / CHECKSUM_FILE).read_text() == _sums_text(files)
    assert sorted(r.path for r in state.log) == sorted([CHECKSUM_FILE, *files])
    assert verify_release(dest) == []

    state.log.clear()
    assert _get(base_url, dest) == paths
    assert [r.path for r in state.log] == [CHECKSUM_FILE]  # only the list is re-read


def test_corrupted_local_file_is_reported_and_replaced(server, dest, files):
    base_url, state = server
    _get(base_url, dest)
    (dest / HR).write_bytes(b"tampered\n")
    assert verify_release(dest) == [HR]

    state.log.clear()
    _get(base_url, dest)
    assert (dest / HR).read_bytes() == files[HR]
    assert sorted(r.path for r in state.log) == sorted([CHECKSUM_FILE, HR])
    assert verify_release(dest) == []


# --------------------------------------------------------------------------- resume


def test_resume_requests_only_the_remainder(server, dest, files):
    base_url, state = server
    data = files[MOTION]
    half = len(data) // 2
    (dest / "motion").mkdir(parents=True)
    (dest / (MOTION + ".part")).write_bytes(data[:half])

    _get(base_url, dest)

    reqs = state.requests_for(MOTION)
    assert len(reqs) == 1
    assert reqs[0].range == f"bytes={half}-"
    assert reqs[0].status == 206
    assert reqs[0].sent == len(data) - half
    assert (dest / MOTION).read_bytes() == data
    assert _parts(dest) == []


def test_server_ignoring_range_restarts_from_zero(server, dest, files):
    base_url, state = server
    state.ignore_range = True
    data = files[MOTION]
    (dest / "motion").mkdir(parents=True)
    (dest / (MOTION + ".part")).write_bytes(data[: len(data) // 2])

    _get(base_url, dest)

    reqs = state.requests_for(MOTION)
    # One request, answered 200 with the whole file: the client must overwrite, not append.
    assert [(r.range is not None, r.status, r.sent) for r in reqs] == [(True, 200, len(data))]
    assert (dest / MOTION).read_bytes() == data
    assert _parts(dest) == []


def test_complete_part_answered_416_is_verified_not_refetched(server, dest, files):
    base_url, state = server
    data = files[MOTION]
    (dest / "motion").mkdir(parents=True)
    (dest / (MOTION + ".part")).write_bytes(data)

    _get(base_url, dest)

    reqs = state.requests_for(MOTION)
    assert [(r.range, r.status, r.sent) for r in reqs] == [(f"bytes={len(data)}-", 416, 0)]
    assert (dest / MOTION).read_bytes() == data
    assert _parts(dest) == []


def test_stale_part_is_discarded_after_mismatch_and_fetched_fresh(server, dest, files):
    base_url, state = server
    data = files[MOTION]
    half = len(data) // 2
    (dest / "motion").mkdir(parents=True)
    (dest / (MOTION + ".part")).write_bytes(b"x" * half)  # left over from some other file

    _get(base_url, dest)

    reqs = state.requests_for(MOTION)
    assert [(r.range, r.status) for r in reqs] == [(f"bytes={half}-", 206), (None, 200)]
    assert (dest / MOTION).read_bytes() == data


def test_truncated_body_is_retried_with_range(server, dest, files):
    base_url, state = server
    data = files[MOTION]
    state.truncate_once.add(MOTION)

    _get(base_url, dest)

    reqs = state.requests_for(MOTION)
    assert len(reqs) == 2
    assert reqs[0].range is None and reqs[0].sent == len(data) // 2
    assert reqs[1].range == f"bytes={len(data) // 2}-" and reqs[1].status == 206
    assert (dest / MOTION).read_bytes() == data


def test_transient_503_is_retried(server, dest, files):
    base_url, state = server
    state.fail_once[LABELS] = 503
    _get(base_url, dest)
    assert [r.status for r in state.requests_for(LABELS)] == [503, 200]
    assert (dest / LABELS).read_bytes() == files[LABELS]


def test_http_404_is_not_retried_and_names_the_url(server, dest, files):
    base_url, state = server
    (state.root / HR).unlink()
    with pytest.raises(DownloadError, match=r"404.*heart_rate/1_heartrate\.txt"):
        _get(base_url, dest, max_retries=3)
    assert [r.status for r in state.requests_for(HR)] == [404]
    assert not (dest / HR).exists()


# --------------------------------------------------------------------------- verification


def test_checksum_mismatch_raises_and_leaves_no_file(server, dest, files):
    base_url, state = server
    wrong = "0" * 64
    actual = _sha(files[LABELS])
    (state.root / CHECKSUM_FILE).write_text(_sums_text(files).replace(actual, wrong))

    with pytest.raises(DownloadError) as exc:
        _get(base_url, dest)

    msg = str(exc.value)
    assert LABELS in msg and wrong in msg and actual in msg
    assert not (dest / LABELS).exists()
    assert _parts(dest) == []


# --------------------------------------------------------------------------- hostile listings


@pytest.mark.parametrize(
    "name",
    ["../evil.txt", "/etc/evil", "a/../../evil", "ABSOLUTE", "..\\evil.txt", "C:/evil.txt", "a/evil\x00.txt"],
)
def test_hostile_names_are_refused_before_anything_is_written(server, dest, files, name):
    base_url, state = server
    sandbox = dest.parent
    if name == "ABSOLUTE":
        name = str(sandbox / "evil_abs.txt")  # absolute path we can inspect afterwards
    etc_evil_before = Path("/etc/evil").exists()
    # A valid entry first: a lazy validator would already have downloaded it.
    lines = _sums_text(files) + f"{_sha(EVIL_BODY)} {name}\n"
    (state.root / CHECKSUM_FILE).write_text(lines)

    with pytest.raises(DownloadError) as exc:
        _get(base_url, dest)

    assert repr(name) in str(exc.value)
    assert [r.path for r in state.log] == [CHECKSUM_FILE]  # no file was requested at all
    assert sorted(p.name for p in sandbox.iterdir()) == []  # dest not even created, nothing beside it
    assert not list(sandbox.parent.rglob("*evil*"))
    if not etc_evil_before:
        assert not Path("/etc/evil").exists()


def test_symlink_inside_dest_pointing_outside_is_refused(server, dest, files):
    base_url, state = server
    outside = dest.parent / "outside"
    outside.mkdir()
    dest.mkdir()
    (dest / "link").symlink_to(outside, target_is_directory=True)
    (state.root / CHECKSUM_FILE).write_text(f"{_sha(EVIL_BODY)} link/evil.txt\n")

    with pytest.raises(DownloadError, match=r"link/evil\.txt.*outside"):
        _get(base_url, dest)
    assert list(outside.iterdir()) == []


# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    "bad",
    [
        "not-a-hash  motion/x.txt",
        "abc123  motion/x.txt",  # too short
        "g" * 64 + "  motion/x.txt",  # not hex
        "a" * 64,  # no path
        "a" * 64 + "\tmotion/x.txt",  # wrong separator
        "a" * 64 + "   motion/x.txt",  # three spaces: path would start with a space
        "   ",
    ],
)
def test_malformed_line_names_the_line_number(server, dest, files, bad):
    base_url, state = server
    good = _sums_text(files).splitlines()
    (state.root / CHECKSUM_FILE).write_text("\n".join([good[0], good[1], bad, good[2]]) + "\n")

    with pytest.raises(DownloadError, match=r"line 3\b") as exc:
        _get(base_url, dest)
    assert repr(bad) in str(exc.value)
    assert [r.path for r in state.log] == [CHECKSUM_FILE]


def test_parser_accepts_physionet_and_sha256sum_formats():
    h1, h2, h3 = "a" * 64, "B" * 64, "c" * 64
    text = f"{h1} one.txt\r\n{h2}  dir/two words.txt\n\n{h3} *three.bin\n"
    assert parse_sha256sums(text) == {"one.txt": h1, "dir/two words.txt": h2.lower(), "three.bin": h3}


def test_parser_rejects_conflicting_duplicates_and_empty_lists():
    with pytest.raises(DownloadError, match="twice"):
        parse_sha256sums(f"{'a' * 64} x.txt\n{'b' * 64} x.txt\n")
    with pytest.raises(DownloadError, match="no files"):
        parse_sha256sums("\n")


# --------------------------------------------------------------------------- network failure


def test_unreachable_server_raises_download_error_fast(dest):
    with socket.socket() as s:  # grab a free port, then close it so nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/"

    t0 = time.monotonic()
    with pytest.raises(DownloadError) as exc:
        download_release(dest, url, progress=False, timeout_s=1.0, max_retries=1)
    assert time.monotonic() - t0 < 3.0
    assert url + CHECKSUM_FILE in str(exc.value)
    assert "2 attempt" in str(exc.value)
    assert not dest.exists()


@pytest.mark.parametrize("url", ["file:///etc/", "ftp://example.org/x/", "physionet.org/files/sleep-accel/1.0.0/"])
def test_non_http_base_url_is_a_download_error(dest, url):
    with pytest.raises(DownloadError, match=re.escape(repr(url))):
        download_release(dest, url, progress=False)
    assert not dest.exists()


# --------------------------------------------------------------------------- the data_loader CLI


def test_data_loader_download_cli_fetches_then_the_release_loads(server, dest, files, capsys):
    import data_loader

    base_url, _ = server
    assert data_loader.main(["--download", "--dest", str(dest), "--url", base_url]) == 0
    assert "files verified" in capsys.readouterr().out
    assert (dest / MOTION).read_bytes() == files[MOTION]


def test_data_loader_download_cli_reports_checksum_mismatch(server, dest, files, capsys):
    import data_loader

    base_url, state = server
    (state.root / CHECKSUM_FILE).write_text(_sums_text(files).replace(_sha(files[LABELS]), "0" * 64))
    assert data_loader.main(["--download", "--dest", str(dest), "--url", base_url]) == 1
    err = capsys.readouterr().err
    assert "download failed" in err and "labels/1_labeled_sleep.txt" in err
