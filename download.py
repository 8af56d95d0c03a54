"""Fetch the PhysioNet sleep-accel release, verified against its SHA256SUMS.txt.

    from download import download_release, PHYSIONET_URL
    paths = download_release("data/physionet")

Only the standard library (urllib) and tqdm are used. Every file is streamed to
``<name>.part``, resumed with an HTTP Range request when a partial file is already
there, checked against the published SHA-256 and only then renamed onto its final
name, so an interrupted or corrupted download never looks like a finished file.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from tqdm import tqdm

PHYSIONET_URL = "https://physionet.org/files/sleep-accel/1.0.0/"
CHECKSUM_FILE = "SHA256SUMS.txt"

CHUNK_BYTES = 1 << 16
# Base of the exponential backoff between retries (seconds); module level so tests can shrink it.
RETRY_BACKOFF_S = 0.5
# The checksum list of this release is a few KB; the cap only stops a misbehaving server
# from making us buffer an arbitrarily large body in memory.
_MAX_CHECKSUM_BYTES = 16 << 20
_USER_AGENT = "sleep-staging-downloader/1.0 (python urllib)"

# PhysioNet writes "<hash> <path>" with ONE space (physionet-build, make_checksum_file);
# sha256sum writes two spaces, or " *" in binary mode. Accept exactly these separators.
_LINE_RE = re.compile(r"(?P<digest>[0-9A-Fa-f]{64})(?: \*| {1,2})(?P<path>[^ ].*)")
_DRIVE_RE = re.compile(r"[A-Za-z]:")
_CONTENT_RANGE_RE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
# 408/429 and 5xx are worth retrying; any other HTTP error (404, 403, ...) will not go away.
_TRANSIENT_HTTP = {408, 425, 429, 500, 502, 503, 504}
# Network-level failures worth a retry. Deliberately not plain OSError: a full disk or a
# permission problem while writing the .part must surface at once, not be retried.
_TRANSIENT_EXC = (
    urllib.error.URLError,
    http.client.HTTPException,
    ConnectionError,
    TimeoutError,
    ssl.SSLError,
)


class DownloadError(Exception):
    """The release could not be fetched or verified; the message names the file/URL/value."""


class _Retry(Exception):
    """Internal: a transient failure of one attempt (a short body, a bad Content-Range)."""


# --------------------------------------------------------------------------- checksums


def parse_sha256sums(text: str, source: str = CHECKSUM_FILE) -> dict[str, str]:
    """Parse sha256sum-style text into ``{relative_path: lowercase_hex_digest}``.

    Strict: any line that is neither empty nor ``<64 hex> <path>`` raises DownloadError
    naming ``source``, the line number and the line; so does a path listed twice with two
    different hashes, or a list with no files at all.
    """
    entries: dict[str, str] = {}
    # split("\n") rather than splitlines(): splitlines() also breaks on \x0b, \x1c, U+2028 ...,
    # which would silently cut a (hostile) name in two instead of rejecting it.
    for lineno, raw in enumerate(text.split("\n"), start=1):
        line = raw[:-1] if raw.endswith("\r") else raw  # tolerate CRLF files
        if line == "":
            continue
        m = _LINE_RE.fullmatch(line)
        if m is None:
            raise DownloadError(f"{source}: malformed line {lineno}: {line!r} (expected '<sha256 hex> <path>')")
        path, digest = m.group("path"), m.group("digest").lower()
        if entries.get(path, digest) != digest:
            raise DownloadError(
                f"{source}: line {lineno}: {path!r} is listed twice with different hashes "
                f"({entries[path]} and {digest})"
            )
        entries[path] = digest
    if not entries:
        raise DownloadError(f"{source} lists no files")
    return entries


def _safe_target(rel: str, dest: Path) -> Path:
    """Map a listed relative path to a file strictly inside ``dest`` (already resolved).

    The listing comes from the network, so it is treated as hostile: anything that could
    name a file outside ``dest`` is refused before a single byte is written.
    """
    if any(ord(c) < 32 or ord(c) == 127 for c in rel):
        reason = "contains a NUL byte" if "\x00" in rel else "contains a control character"
    elif "\\" in rel:
        reason = "contains a backslash"
    elif rel.startswith("/"):
        reason = "is an absolute path"
    elif _DRIVE_RE.match(rel):
        reason = "starts with a drive letter"
    elif ".." in rel.split("/"):
        reason = "contains a '..' component"
    elif any(part in ("", ".") for part in rel.split("/")):
        reason = "has an empty or '.' component"
    else:
        # resolve() follows symlinks already inside dest, so a link pointing elsewhere is caught too.
        target = dest.joinpath(*rel.split("/")).resolve()
        if target != dest and target.is_relative_to(dest):
            return target
        reason = f"resolves outside the destination ({target})"
    raise DownloadError(f"refusing to download {rel!r} listed in {CHECKSUM_FILE}: it {reason}")


def _plan(entries: dict[str, str], dest: Path) -> list[tuple[str, str, Path]]:
    """Validate every listed name up front, so one hostile line aborts before any download."""
    plan = []
    for rel, digest in entries.items():
        if rel == CHECKSUM_FILE:
            continue  # a checksum list cannot meaningfully contain its own hash
        target = _safe_target(rel, dest)
        if rel + ".part" in entries:
            raise DownloadError(f"refusing {rel!r}: {rel + '.part'!r} is also listed and would clash with the partial file")
        plan.append((rel, digest, target))
    return plan


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in chunks (the raw motion files are hundreds of MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def verify_release(dest: str | Path) -> list[str]:
    """Return the relative paths under ``dest`` that are missing or fail their SHA-256.

    Uses the SHA256SUMS.txt that :func:`download_release` saved in ``dest``; an empty list
    means the local copy is complete and intact.
    """
    dest = Path(dest).expanduser().resolve()
    sums = dest / CHECKSUM_FILE
    try:
        text = sums.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DownloadError(f"{sums} not found; run download_release() first") from None
    bad = []
    for rel, digest, target in _plan(parse_sha256sums(text, str(sums)), dest):
        if not target.is_file() or sha256_file(target) != digest:
            bad.append(rel)
    return bad


# --------------------------------------------------------------------------- HTTP


def _url_for(base_url: str, rel: str) -> str:
    # quote() keeps "/" so subfolders map onto URL path segments; other bytes get escaped.
    return base_url.rstrip("/") + "/" + urllib.parse.quote(rel)


def _open(url: str, timeout_s: float, headers: dict[str, str] | None = None) -> http.client.HTTPResponse:
    # identity: the hash is of the file as stored, so the body must not be re-encoded in transit.
    h = {"User-Agent": _USER_AGENT, "Accept-Encoding": "identity", **(headers or {})}
    return urllib.request.urlopen(urllib.request.Request(url, headers=h), timeout=timeout_s)


def _with_retries(url: str, max_retries: int, attempt_fn):
    """Run ``attempt_fn()`` up to ``1 + max_retries`` times, retrying only transient failures."""
    for attempt in range(max_retries + 1):
        try:
            return attempt_fn()
        except urllib.error.HTTPError as e:
            if e.code not in _TRANSIENT_HTTP:
                raise DownloadError(f"HTTP {e.code} {e.reason} for {url}") from e
            err: Exception = e
        except (_Retry, *_TRANSIENT_EXC) as e:
            err = e
        if attempt < max_retries:
            time.sleep(RETRY_BACKOFF_S * 2**attempt)
    reason = getattr(err, "reason", None) or err
    raise DownloadError(f"could not fetch {url} after {max_retries + 1} attempt(s): {reason}") from err


def _fetch_small(url: str, timeout_s: float, max_retries: int) -> bytes:
    def attempt() -> bytes:
        with _open(url, timeout_s) as resp:
            body = resp.read(_MAX_CHECKSUM_BYTES + 1)
            length = resp.headers.get("Content-Length")
        if len(body) > _MAX_CHECKSUM_BYTES:
            raise DownloadError(f"{url} is larger than {_MAX_CHECKSUM_BYTES} bytes; not a checksum list")
        if length is not None and length.isdigit() and len(body) < int(length):
            raise _Retry(f"connection closed after {len(body)} of {length} bytes")
        return body

    return _with_retries(url, max_retries, attempt)


def _fetch_to_part(url: str, part: Path, timeout_s: float, max_retries: int, bar: tqdm) -> bool:
    """Bring ``part`` to the full body of ``url``, resuming what is already there.

    Returns True when bytes that were already on disk were kept (a 206 resume, or a 416
    meaning the .part is already complete), so the caller knows a hash mismatch may be
    the stale prefix's fault rather than the server's.
    """

    def attempt() -> bool:
        offset = part.stat().st_size if part.exists() else 0
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        try:
            resp = _open(url, timeout_s, headers)
        except urllib.error.HTTPError as e:
            if e.code == 416 and offset:
                return True  # nothing left to send: the caller verifies what is on disk
            raise
        with resp:
            if resp.status == 206:
                m = _CONTENT_RANGE_RE.fullmatch(resp.headers.get("Content-Range", "").strip())
                if m is None or int(m.group(1)) != offset:
                    # Appending a range that does not start where the .part ends would corrupt it.
                    part.unlink(missing_ok=True)
                    raise _Retry(f"bad Content-Range {resp.headers.get('Content-Range')!r} for bytes={offset}-")
                mode, kept = "ab", offset > 0
            elif resp.status == 200:
                mode, kept = "wb", False  # server ignored Range: the body is the whole file, start over
            else:
                raise DownloadError(f"unexpected HTTP status {resp.status} for {url}")
            length_hdr = resp.headers.get("Content-Length")
            length = int(length_hdr) if length_hdr and length_hdr.isdigit() else None
            if length is not None:
                bar.total = (bar.total or 0) + length
                bar.refresh()
            received = 0
            try:
                with open(part, mode) as f:
                    while chunk := resp.read(CHUNK_BYTES):
                        f.write(chunk)
                        received += len(chunk)
                        bar.update(len(chunk))
            finally:
                if length is not None and received < length:
                    bar.total -= length - received  # the retry will announce the remainder again
            # http.client does not raise when the peer closes early; a short body must not
            # pass for a complete file (the retry resumes from what did arrive).
            if length is not None and received < length:
                raise _Retry(f"connection closed after {received} of {length} bytes")
            return kept

    return _with_retries(url, max_retries, attempt)


def _download_one(rel: str, digest: str, final: Path, url: str, timeout_s: float, max_retries: int, bar: tqdm) -> None:
    part = final.with_name(final.name + ".part")
    final.parent.mkdir(parents=True, exist_ok=True)
    # A wrong file under the final name must not survive a failed re-download.
    final.unlink(missing_ok=True)
    for _ in range(2):
        kept_old_bytes = _fetch_to_part(url, part, timeout_s, max_retries, bar)
        actual = sha256_file(part)
        if actual == digest:
            os.replace(part, final)  # atomic: the final name only ever holds a verified file
            return
        part.unlink()
        if not kept_old_bytes:
            break
        # The mismatch may come from a stale .part left by another release: one clean retry.
    raise DownloadError(f"checksum mismatch for {rel} (from {url}): expected sha256 {digest}, got {actual}")


def download_release(
    dest: str | Path,
    base_url: str = PHYSIONET_URL,
    *,
    progress: bool = True,
    timeout_s: float = 60.0,
    max_retries: int = 3,
) -> list[Path]:
    """Download every file listed in ``<base_url>/SHA256SUMS.txt`` into ``dest``.

    Files already present with the right SHA-256 are skipped, partial ``.part`` files are
    resumed, each file is verified before it takes its final name, and the checksum list
    itself is saved as ``dest/SHA256SUMS.txt`` (for :func:`verify_release`). Transient
    network errors are retried ``max_retries`` times with a short backoff; ``timeout_s``
    bounds each connect/read. Returns the final paths of the listed files, in list order.
    Raises DownloadError for a bad base_url, network failures, a malformed list, a hostile
    file name or a checksum mismatch (ValueError for a non-positive timeout_s or max_retries < 0).
    """
    # DownloadError, not ValueError: base_url comes from the user (--url) and the CLI reports DownloadError.
    if urllib.parse.urlsplit(base_url).scheme not in ("http", "https") or not urllib.parse.urlsplit(base_url).netloc:
        raise DownloadError(f"base_url must be an http(s) URL, got {base_url!r}")
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
    if max_retries < 0:
        raise ValueError(f"max_retries must be >= 0, got {max_retries!r}")

    dest = Path(dest).expanduser().resolve()
    sums_url = _url_for(base_url, CHECKSUM_FILE)
    raw = _fetch_small(sums_url, timeout_s, max_retries)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DownloadError(f"{sums_url} is not valid UTF-8: {e}") from e
    plan = _plan(parse_sha256sums(text, sums_url), dest)  # every name checked before anything is written

    dest.mkdir(parents=True, exist_ok=True)
    tmp = dest / (CHECKSUM_FILE + ".part")
    tmp.write_bytes(raw)
    os.replace(tmp, dest / CHECKSUM_FILE)

    with tqdm(total=0, unit="B", unit_scale=True, unit_divisor=1024, desc="sleep-accel", disable=not progress) as bar:
        for rel, digest, final in plan:
            if final.is_file() and sha256_file(final) == digest:
                continue
            bar.set_postfix_str(rel, refresh=False)
            _download_one(rel, digest, final, _url_for(base_url, rel), timeout_s, max_retries, bar)
    return [final for _, _, final in plan]
