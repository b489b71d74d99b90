"""The audit trail: per tenant, one hash-chained JSON line per request, durable before the answer.

Layout (``server.audit_dir``, per tenant a folder)::

    audit/retail/segment-000001.jsonl   records, one canonical JSON object a line
    audit/retail/segment-000002.jsonl   the next segment, once the last reached segment_bytes
    audit/retail/checkpoint.json        a copy of the latest checkpoint record
    audit/retail/.lock                  writers take it for each group commit

A record is canonical JSON (sorted keys, no spaces, UTF-8). ``prev`` is the previous record's
``hash`` (64 zeros for the first) and ``hash`` is the SHA-256 of the record's canonical JSON
without ``hash``, so editing, deleting, inserting or reordering any record breaks the chain at
that record. Records of kind ``request`` describe one request each (never the API key, never
raw PII values, texts only as SHA-256 unless the tenant turns ``raw_text`` on); records of kind
``checkpoint`` sign the chain so far with Ed25519 (when a key is configured) every
``checkpoint_records`` records or ``checkpoint_seconds`` seconds, at a clean close and when a
log is reopened. The latest one is also kept in ``checkpoint.json``: a log cut short before it
no longer reaches it, which is how truncation of the tail is detected.

Durability is a group commit. ``AuditLog.append`` queues a record to the log's writer thread
(the event loop never waits on the disk) and awaits it; the writer takes every record queued
meanwhile, chains them, writes them in one ``write``, makes them durable with one
``fdatasync`` and only then releases every waiting request (``call_soon_threadsafe``, once per
event loop and group). A new segment is made durable in its folder with a directory fsync. On
open, and whenever another writer moved the log, a torn last line (a write cut by a crash,
never acknowledged) is cut away with a warning and the chain continues from the last complete
record; a last complete record that does not verify stops the log instead of being built on.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import queue
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from router.config import AuditConfig, ConfigError, LoadedConfig
from router.errors import PlexusError
from router.files import atomic_write, fsync_dir

if TYPE_CHECKING:
    from router.calls import Caller
    from router.pipeline import RequestState

log = logging.getLogger("plexus.audit")

GENESIS = "0" * 64
"""The ``prev`` of a chain's first record."""
SEGMENT_PATTERN = re.compile(r"segment-(\d{6,})\.jsonl")
CHECKPOINT_FILE = "checkpoint.json"
LOCK_FILE = ".lock"
REDACTION_STAGE = "pii"
"""The guard-in stage that redacts PII (``router.governance.guards.PiiRedaction.name``): text is
kept raw in a record only once it has run."""
_HASH_FIELD = "hash"
_SIGNATURE_FIELD = "signature"
_TAIL_CHUNK = 1 << 16


class AuditUnavailable(PlexusError):
    """The audit record could not be made durable, so the request fails (fail closed)."""

    status = "UNAVAILABLE"


class AuditDamaged(Exception):
    """A log's last complete record does not verify: nothing is appended to it."""


# -- the format ---------------------------------------------------------------------------------


_ENCODER = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
)


def canonical(record: Mapping[str, Any]) -> bytes:
    """The canonical JSON of ``record``: sorted keys, no spaces, UTF-8, no NaN."""
    return _ENCODER.encode(record).encode("utf-8")


def record_hash(record: Mapping[str, Any]) -> str:
    """The SHA-256 (hex) of ``record``'s canonical JSON without its ``hash`` field."""
    body = {k: v for k, v in record.items() if k != _HASH_FIELD}
    return hashlib.sha256(canonical(body)).hexdigest()


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def utc_now() -> str:
    """Now as UTC ISO-8601 with microseconds: ``2025-01-31T12:00:00.123456Z``."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text: str) -> str:
    """An ISO-8601 date or time (naive means UTC) in the records' own form, for comparisons."""
    value = text.strip()
    if value.endswith(("Z", "z")):
        value = value[:-1] + "+00:00"
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(
            f"{text!r} is not an ISO-8601 time (e.g. 2025-01-31 or 2025-01-31T12:00:00Z)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _scrub(value: Any) -> Any:
    """``value`` with every string made encodable (lone surrogates replaced)."""
    if isinstance(value, str):
        return value.encode("utf-8", "replace").decode("utf-8")
    if isinstance(value, dict):
        return {_scrub(k): _scrub(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_scrub(v) for v in value]
    return value


def _number(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def findings_summary(findings: Sequence[Any]) -> list[dict[str, Any]]:
    """Findings as ``{stage, kind, action, count}`` (never their spans, details or values)."""
    counts = Counter((f.stage, f.kind, f.action) for f in findings)
    return [
        {"stage": stage, "kind": kind, "action": action, "count": count}
        for (stage, kind, action), count in sorted(counts.items())
    ]


def _redacted_answer(text: str, placeholders: Mapping[str, str]) -> str:
    """The released answer with every value restored from a placeholder put back behind it."""
    for placeholder, value in sorted(placeholders.items(), key=lambda kv: -len(kv[1])):
        if value:
            text = text.replace(value, placeholder)
    return text


def record_fields(state: RequestState, raw_text: bool = False) -> dict[str, Any]:
    """The audit record of one request's final state (``seq``, ``time``, ``prev`` and ``hash``
    are the writer's).

    ``prompt_sha256`` is over the text the backend got (the stitched prompt), else the prepared
    text; ``answer_sha256`` over the answer as released to the caller (null for RPCs that do not
    generate). With ``raw_text`` the prompt is kept as redacted, and only once the redaction
    stage has run; the answer is kept with restored values put back behind their placeholders.
    """
    decision = state.decision
    final = state.final
    context = state.context
    prompt = context.assembly.prompt if context is not None else state.text
    answered = state.generates and (state.final is not None or bool(state.output))
    answer = "".join(state.output) if answered else None
    fields: dict[str, Any] = {
        "kind": "request",
        "request_id": state.query.request_id,
        "trace_id": str(getattr(state, "trace_id", "") or ""),
        "rpc": state.rpc,
        "key_name": state.caller.key_name,
        "app": state.query.app,
        "user_tier": state.query.user_tier,
        "route": decision.route if decision else "",
        "model_version": decision.model_version if decision else "",
        "confidence": _number(decision.confidence) if decision else None,
        "abstained": bool(decision.abstained) if decision else None,
        "findings": findings_summary(state.findings),
        "rules_applied": list(state.rules_applied),
        "chain": list(state.chain),
        "backend": final.backend if final else "",
        "attempts": final.attempts if final else 0,
        "fallbacks": list(final.fallbacks_tried) if final else [],
        "finish_reason": final.finish_reason if final else "",
        "usage": (
            {
                "prompt_tokens": final.usage.prompt_tokens,
                "completion_tokens": final.usage.completion_tokens,
            }
            if final
            else None
        ),
        "cost": _number(final.cost) if final else None,
        "timings_us": {str(k): int(v) for k, v in state.timings_us.items()},
        "outcome": state.outcome,
        "error": type(state.error).__name__ if state.error is not None else "",
        "prompt_sha256": text_sha256(prompt) if prompt else None,
        "answer_sha256": text_sha256(answer) if answer is not None else None,
    }
    if raw_text:
        redacted = REDACTION_STAGE in state.timings_us
        fields["prompt_text"] = prompt if prompt and redacted else None
        fields["answer_text"] = (
            _redacted_answer(answer, state.placeholders) if answer is not None else None
        )
    return fields


# -- keys ----------------------------------------------------------------------------------------


KEY_FORMS = "PEM (BEGIN PRIVATE KEY), 32 raw bytes, or 64 hex digits"


def _raw_key_bytes(data: bytes) -> bytes | None:
    if len(data) == 32:
        return data
    text = data.strip()
    if re.fullmatch(rb"[0-9a-fA-F]{64}", text):
        return bytes.fromhex(text.decode("ascii"))
    return None


def parse_private_key(data: bytes) -> Ed25519PrivateKey:
    """An Ed25519 private key from PEM, 32 raw bytes or 64 hex digits (ValueError otherwise)."""
    if b"-----BEGIN" in data:
        try:
            key = serialization.load_pem_private_key(data.strip(), password=None)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"not a readable unencrypted PEM private key ({exc})") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"the PEM key is {type(key).__name__}, not an Ed25519 key")
        return key
    raw = _raw_key_bytes(data)
    if raw is None:
        raise ValueError(f"not an Ed25519 private key: expected {KEY_FORMS}")
    return Ed25519PrivateKey.from_private_bytes(raw)


def parse_public_key(data: bytes) -> Ed25519PublicKey:
    """An Ed25519 public key from PEM (public, or a private key it is derived from), 32 raw
    bytes or 64 hex digits."""
    if b"PRIVATE KEY-----" in data:
        return parse_private_key(data).public_key()
    if b"-----BEGIN" in data:
        try:
            key = serialization.load_pem_public_key(data.strip())
        except (ValueError, TypeError) as exc:
            raise ValueError(f"not a readable PEM public key ({exc})") from None
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError(f"the PEM key is {type(key).__name__}, not an Ed25519 key")
        return key
    raw = _raw_key_bytes(data)
    if raw is None:
        raise ValueError("not an Ed25519 public key: expected PEM, 32 raw bytes or 64 hex digits")
    return Ed25519PublicKey.from_public_bytes(raw)


def key_id(public_key: Ed25519PublicKey) -> str:
    """A short name of a public key: the first 16 hex digits of SHA-256 over its raw bytes."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def public_pem(public_key: Ed25519PublicKey) -> str:
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")


def load_signing_key(loaded: LoadedConfig) -> Ed25519PrivateKey | None:
    """The checkpoint signing key ``server.audit_key_file`` or ``server.audit_key_env`` names
    (None when neither does); ConfigError, naming the key path, when it cannot be read."""
    server = loaded.config.server
    if server.audit_key_file is not None:
        where = "server.audit_key_file"
        path = loaded.resolve(server.audit_key_file)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ConfigError(
                f"{loaded.path}: {where}: cannot read {path}: {exc.strerror}"
            ) from None
    elif server.audit_key_env:
        where = "server.audit_key_env"
        value = os.environ.get(server.audit_key_env, "")
        if not value.strip():
            raise ConfigError(
                f"{loaded.path}: {where}: the environment variable {server.audit_key_env} is "
                f"not set; set it to the Ed25519 signing key ({KEY_FORMS})"
            )
        data = value.encode("utf-8")
    else:
        return None
    try:
        return parse_private_key(data)
    except ValueError as exc:
        raise ConfigError(f"{loaded.path}: {where}: {exc}") from None


def signed_bytes(checkpoint: Mapping[str, Any]) -> bytes:
    """What a checkpoint's signature covers: its canonical JSON without hash and signature."""
    return canonical(
        {k: v for k, v in checkpoint.items() if k not in (_HASH_FIELD, _SIGNATURE_FIELD)}
    )


# -- segments ------------------------------------------------------------------------------------


def segment_name(number: int) -> str:
    return f"segment-{number:06d}.jsonl"


def segments(directory: Path) -> list[tuple[int, Path]]:
    """A tenant folder's segments ``(number, path)``, oldest first."""
    found = []
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(directory):
            match = SEGMENT_PATTERN.fullmatch(entry.name)
            if match and entry.is_file():
                found.append((int(match.group(1)), Path(entry.path)))
    return sorted(found)


def _last_line(handle: Any, size: int) -> tuple[int, bytes | None]:
    """``(end, line)``: the offset just past the file's last newline (0 without one) and the
    complete line before it, without its newline (None when there is none)."""
    buffer, position, chunk = b"", size, _TAIL_CHUNK
    newline = -1  # absolute offset of the last newline
    while position > 0:
        start = max(0, position - chunk)
        handle.seek(start)
        buffer = handle.read(position - start) + buffer
        position = start
        if newline < 0:
            found = buffer.rfind(b"\n")
            if found < 0:
                chunk *= 2
                continue
            newline = position + found
        before = buffer.rfind(b"\n", 0, newline - position)
        if before >= 0:
            return newline + 1, buffer[before + 1 : newline - position]
        chunk *= 2
    if newline < 0:
        return 0, None
    return newline + 1, buffer[:newline]


def _parse_line(line: bytes) -> dict[str, Any] | None:
    """The record a line holds when it parses and its hash matches its content, else None."""
    try:
        record = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get(_HASH_FIELD), str):
        return None
    try:
        return record if record_hash(record) == record[_HASH_FIELD] else None
    except (TypeError, ValueError):
        return None


# -- the writer ----------------------------------------------------------------------------------


Done = Callable[[BaseException | None], None]
_CLOSE = object()


@dataclass
class _Item:
    fields: dict[str, Any]
    loop: asyncio.AbstractEventLoop | None
    waiter: Any  # an asyncio future on ``loop``, or a Done callback when loop is None
    released: bool = False


@dataclass
class _Chain:
    """Where the chain stands: the last record's seq and hash, and where the segment ends."""

    segment: int = 0
    size: int = 0
    seq: int = 0
    prev: str = GENESIS
    uncovered: int = 0
    """Records after the latest checkpoint."""
    uncovered_since: float | None = None
    """``time.monotonic()`` of the first of them."""


def _sealed(record: dict[str, Any]) -> tuple[str, bytes]:
    """``(hash, line)`` of a record without ``hash``: the canonical JSON is made once, in two
    halves (the keys before ``hash`` and after it), so that the hashed body and the written line
    share them (a sorted object is its sorted items joined, whatever the split)."""
    before = canonical({k: v for k, v in record.items() if k < _HASH_FIELD})[1:-1]
    after = canonical({k: v for k, v in record.items() if k > _HASH_FIELD})[1:-1]
    body = b"{" + b",".join(part for part in (before, after) if part) + b"}"
    digest = hashlib.sha256(body).hexdigest()
    entry = b'"hash":"' + digest.encode("ascii") + b'"'
    return digest, b"{" + b",".join(p for p in (before, entry, after) if p) + b"}\n"


def _resolve(futures: list[asyncio.Future[None]], error: BaseException | None) -> None:
    for future in futures:
        if future.done():
            continue
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)


class AuditLog:
    """One tenant's audit trail: ``append`` (async) or ``submit`` (any thread), group-committed
    by one writer thread; ``close`` writes a final checkpoint."""

    def __init__(
        self,
        directory: Path,
        tenant: str,
        config: AuditConfig | None = None,
        signing_key: Ed25519PrivateKey | None = None,
    ):
        self.directory = directory
        self.tenant = tenant
        self.config = config or AuditConfig()
        self.signing_key = signing_key
        self.key_id = key_id(signing_key.public_key()) if signing_key else ""
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._chain = _Chain()
        self._fd = -1
        self._following: tuple[int, str] = (-1, "")
        """The segment written to, and the path of the one after it (whose existence says
        another writer rotated)."""
        self._closed = False
        self._broken: BaseException | None = None
        self._retry_at = 0.0
        self._submit_lock = threading.Lock()
        self._gathering: dict[asyncio.AbstractEventLoop, list[_Item]] = {}
        self._tail_checkpoint: bytes | None = None
        self.groups = 0
        """Group commits so far (one write and one fdatasync each)."""
        self.records = 0
        """Records written by this log (checkpoints included)."""
        missing = [d for d in (directory, *directory.parents) if not d.exists()]
        directory.mkdir(parents=True, exist_ok=True)
        for created in reversed(missing):  # each new folder made durable in the one above it
            fsync_dir(created.parent)
        self._lock_fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            with self._locked():
                self._sync(force=True)
                self._check_cut()
                if self._chain.uncovered:  # the records found on opening, signed now
                    self._write_checkpoint_file(self._commit_locked([], checkpoint=True))
                else:  # a crash between a checkpoint's fsync and its copy
                    self._refresh_checkpoint_file()
        except BaseException:
            self._close_fds()
            raise
        self._thread = threading.Thread(
            target=self._run, name=f"plexus-audit-{tenant}", daemon=True
        )
        self._thread.start()

    # -- the caller's side

    def submit(self, fields: dict[str, Any], done: Done) -> None:
        """Queue a record (from any thread); ``done(None)`` once it is durable, else
        ``done(error)`` (``done`` runs on the writer's thread)."""
        self._put([_Item(fields, None, done)])

    async def append(self, fields: dict[str, Any]) -> None:
        """Queue a record and return once it is durable (AuditUnavailable when it cannot be).

        The records a loop appends in one turn go to the writer together, at the end of the
        turn: requests resumed together stay one group, instead of the first one waking the
        writer for a group of its own.
        """
        self._check()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        gathering = self._gathering.get(loop)
        if gathering is None:
            gathering = self._gathering[loop] = []
            loop.call_soon(self._hand_over, loop)
        gathering.append(_Item(fields, loop, future))
        await future

    def _hand_over(self, loop: asyncio.AbstractEventLoop) -> None:
        items = self._gathering.pop(loop, [])
        try:
            self._put(items)
        except AuditUnavailable as exc:
            _resolve([item.waiter for item in items], exc)

    def _check(self) -> None:
        if self._broken is not None:
            raise AuditUnavailable(f"the audit log of {self.tenant!r} failed: {self._broken}")
        if self._closed:
            raise AuditUnavailable(f"the audit log of {self.tenant!r} is closed")

    def _put(self, items: list[_Item]) -> None:
        with self._submit_lock:
            self._check()
            self._queue.put(items)

    def close(self, timeout: float | None = 30.0) -> None:
        """Write what is queued and a final checkpoint, stop the writer, release the files."""
        with self._submit_lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(_CLOSE)
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self._close_fds()

    def _close_fds(self) -> None:
        for fd in (self._fd, self._lock_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._fd = self._lock_fd = -1

    # -- the writer thread

    def _run(self) -> None:
        items: list[_Item] = []
        try:
            closing = False
            while not closing:
                wait = self._checkpoint_wait()
                try:
                    first = self._queue.get(timeout=wait)
                except queue.Empty:
                    first = None
                items = []
                for batch in self._drain(first):
                    if batch is _CLOSE:
                        closing = True
                    else:
                        items += batch
                self._commit(items, closing)
                items = []
        except BaseException as exc:  # noqa: BLE001 - every waiter must hear of it
            log.exception("the audit writer of %r stopped", self.tenant)
            with self._submit_lock:
                self._broken = exc
            self._release(items, AuditUnavailable(f"the audit log failed: {exc}"))
            while True:  # fail whatever was queued meanwhile
                try:
                    batch = self._queue.get_nowait()
                except queue.Empty:
                    break
                if batch is not _CLOSE:
                    self._release(batch, AuditUnavailable(f"the audit log failed: {exc}"))

    def _drain(self, first: Any) -> Iterator[Any]:
        if first is None:
            return
        yield first
        while True:
            try:
                yield self._queue.get_nowait()
            except queue.Empty:
                return

    def _checkpoint_wait(self) -> float | None:
        since = self._chain.uncovered_since
        if since is None:
            return None
        due = max(since + self.config.checkpoint_seconds, self._retry_at)
        return max(due - time.monotonic(), 0.0)

    def _checkpoint_due(self, adding: int) -> bool:
        chain = self._chain
        if chain.uncovered + adding >= self.config.checkpoint_records:
            return True
        since = chain.uncovered_since
        return since is not None and time.monotonic() - since >= self.config.checkpoint_seconds

    def _commit(self, items: list[_Item], closing: bool) -> None:
        error: BaseException | None = None
        if self._broken is not None:
            self._release(items, AuditUnavailable(f"the audit log failed: {self._broken}"))
            return
        try:
            with self._locked():
                self._sync()
                due = closing or self._checkpoint_due(len(items))
                checkpoint = self._commit_locked(items, due)
                self._release(items, None)
                if checkpoint is not None:
                    self._write_checkpoint_file(checkpoint)
        except AuditDamaged as exc:
            with self._submit_lock:
                self._broken = exc  # nothing more is built on it until it is reopened
            error = AuditUnavailable(f"the audit log cannot be continued: {exc}")
        except OSError as exc:
            error = AuditUnavailable(f"the audit log cannot be written: {exc}")
        if error is not None:
            log.error("audit %s: %s", self.tenant, error)
            self._retry_at = time.monotonic() + 1.0  # a failing disk is not retried in a loop
            self._release(items, error)

    def _release(self, items: list[_Item], error: BaseException | None) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Future[None]]] = {}
        for item in items:
            if item.released:
                continue
            item.released = True
            if item.loop is None:
                try:
                    item.waiter(error)
                except Exception:  # noqa: BLE001 - one caller's callback must not stop the writer
                    log.exception("an audit callback failed")
            else:
                by_loop.setdefault(item.loop, []).append(item.waiter)
        for loop, futures in by_loop.items():
            with contextlib.suppress(RuntimeError):  # that loop is closed: no one waits
                loop.call_soon_threadsafe(_resolve, futures, error)

    def _commit_locked(self, items: list[_Item], checkpoint: bool) -> bytes | None:
        """Chain, write and fdatasync ``items`` (plus a checkpoint when asked and something is
        uncovered); the chain moves only once the data is durable. The checkpoint's line, if
        one was written."""
        chain = self._chain
        seq, prev = chain.seq, chain.prev
        now = utc_now()
        lines = []
        for item in items:
            seq += 1
            record = {**item.fields, "tenant": self.tenant, "seq": seq, "time": now, "prev": prev}
            prev, line = self._seal(record)
            lines.append(line)
        uncovered = chain.uncovered + len(items)
        checkpoint = checkpoint and uncovered > 0
        if checkpoint:
            seq += 1
            record = {
                "kind": "checkpoint",
                "tenant": self.tenant,
                "seq": seq,
                "time": now,
                "prev": prev,
                "key_id": self.key_id,
            }
            if self.signing_key is not None:
                signature = self.signing_key.sign(signed_bytes(record))
                record[_SIGNATURE_FIELD] = base64.b64encode(signature).decode("ascii")
            else:
                record[_SIGNATURE_FIELD] = ""
            prev, line = self._seal(record)
            lines.append(line)
        if not lines:
            return None
        data = b"".join(lines)
        if chain.size > 0 and chain.size + len(data) > self.config.segment_bytes:
            self._rotate()
        self._write(data)
        chain.seq, chain.prev = seq, prev
        chain.size += len(data)
        if checkpoint:
            chain.uncovered, chain.uncovered_since = 0, None
        else:
            if chain.uncovered == 0:
                chain.uncovered_since = time.monotonic()
            chain.uncovered = uncovered
        self.groups += 1
        self.records += len(lines)
        return lines[-1] if checkpoint else None

    def _seal(self, record: dict[str, Any]) -> tuple[str, bytes]:
        """``record`` with its hash, as a line: (hash, line)."""
        try:
            return _sealed(record)
        except (UnicodeEncodeError, ValueError):
            return _sealed(_scrub(record))

    def _write(self, data: bytes) -> None:
        fd, start = self._fd, self._chain.size
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(fd, view) :]
            os.fdatasync(fd)
        except OSError:
            try:  # take the group back so the chain on disk stays where it was
                os.ftruncate(fd, start)
                os.fsync(fd)
            except OSError as exc:
                with self._submit_lock:
                    self._broken = exc
            raise

    def _write_checkpoint_file(self, line: bytes | None) -> None:
        if line is not None:
            atomic_write(self.directory / CHECKPOINT_FILE, line)

    def _stored_seq(self) -> int | None:
        try:
            stored = json.loads((self.directory / CHECKPOINT_FILE).read_bytes())
        except (OSError, ValueError, UnicodeDecodeError):
            return None
        seq = stored.get("seq") if isinstance(stored, dict) else None
        return seq if isinstance(seq, int) else None

    def _check_cut(self) -> None:
        """Refuse a trail that ends before its latest checkpoint (cut while no writer ran)."""
        seq = self._stored_seq()
        if seq is not None and seq > self._chain.seq:
            raise AuditDamaged(
                f"{self.directory}: the trail ends at seq {self._chain.seq} but its latest "
                f"checkpoint covers seq {seq}: it was cut; run `plexus audit verify`"
            )

    def _refresh_checkpoint_file(self) -> None:
        """Copy the trail's last record, a checkpoint, into checkpoint.json unless it is there."""
        line = self._tail_checkpoint
        if line is not None and self._stored_seq() != self._chain.seq:
            log.warning("audit %s: checkpoint.json restored from the trail's end", self.tenant)
            self._write_checkpoint_file(line)

    # -- the files, under the lock

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _open_segment(self, number: int, create: bool) -> None:
        path = self.directory / segment_name(number)
        flags = os.O_WRONLY | os.O_APPEND | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(path, flags, 0o600)
        if create:
            fsync_dir(self.directory)
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = fd
        self._chain.segment = number

    def _rotate(self) -> None:
        self._open_segment(self._chain.segment + 1, create=True)
        self._chain.size = 0

    def _sync(self, force: bool = False) -> None:
        """Catch up with the files: another writer (another process, or a Plexus built on the
        same folder) may have appended, rotated or died mid-write since this one last wrote."""
        chain = self._chain
        moved = force
        following = self._following
        if following[0] != chain.segment:  # one path made per segment, not per commit
            following = self._following = (
                chain.segment,
                os.fspath(self.directory / segment_name(chain.segment + 1)),
            )
        if chain.segment == 0 or os.path.exists(following[1]):
            found = segments(self.directory)
            if not found:
                self._open_segment(1, create=True)
                chain.size = 0
                return
            newest = found[-1][0]
            if newest != chain.segment or self._fd < 0:
                self._open_segment(newest, create=False)
                moved = True
        size = os.fstat(self._fd).st_size
        if not moved and size == chain.size:
            return
        self._read_tail()

    def _read_tail(self) -> None:
        """Set the chain from the newest complete record, cutting a torn last line."""
        chain = self._chain
        number = chain.segment
        path = self.directory / segment_name(number)
        with open(path, "rb") as handle:
            size = handle.seek(0, os.SEEK_END)
            end, line = _last_line(handle, size)
        if end < size:
            log.warning(
                "audit %s: %s ends with %d bytes of a record cut by a crash (never "
                "acknowledged); cutting them, the chain continues from the last complete record",
                self.tenant,
                path,
                size - end,
            )
            os.ftruncate(self._fd, end)
            os.fsync(self._fd)
        chain.size = end
        while line is None and number > 1:  # an empty newest segment: the chain ends earlier
            number -= 1
            earlier = self.directory / segment_name(number)
            if not earlier.exists():
                break
            with open(earlier, "rb") as handle:
                _, line = _last_line(handle, handle.seek(0, os.SEEK_END))
            path = earlier
        if line is None:
            if number > 1 or chain.segment > 1:
                raise AuditDamaged(
                    f"{self.directory}: the segments before {segment_name(chain.segment)} are "
                    "missing or empty; run `plexus audit verify` and move the folder aside to "
                    "start a new chain"
                )
            chain.seq, chain.prev, chain.uncovered, chain.uncovered_since = 0, GENESIS, 0, None
            return
        record = _parse_line(line)
        if record is None or not isinstance(record.get("seq"), int):
            raise AuditDamaged(
                f"{path}: the last complete record does not verify (edited or damaged); run "
                "`plexus audit verify` and move the folder aside to start a new chain"
            )
        if record["seq"] < chain.seq:  # writers only append: this trail was cut
            raise AuditDamaged(
                f"{path}: the trail was cut behind this writer's back (it ends at seq "
                f"{record['seq']}, this writer had written seq {chain.seq}); run `plexus audit "
                "verify`"
            )
        chain.seq, chain.prev = record["seq"], record[_HASH_FIELD]
        self._tail_checkpoint = line + b"\n" if record.get("kind") == "checkpoint" else None
        if record.get("kind") == "checkpoint":
            chain.uncovered, chain.uncovered_since = 0, None
        else:  # how many precede it uncovered is unknown: checkpoint within the period
            chain.uncovered = max(chain.uncovered, 1)
            chain.uncovered_since = chain.uncovered_since or time.monotonic()


# -- the recorder --------------------------------------------------------------------------------


class AuditTrail:
    """The pipeline's audit recorder: one ``AuditLog`` per auditing tenant."""

    def __init__(self, logs: Mapping[str, AuditLog], raw_text: Mapping[str, bool]):
        self.logs = dict(logs)
        self.raw_text = dict(raw_text)

    @classmethod
    def from_config(cls, loaded: LoadedConfig) -> AuditTrail | None:
        """The trail of every tenant with ``audit.enabled`` (None when no tenant audits)."""
        tenants = {n: t.audit for n, t in loaded.config.tenants.items() if t.audit.enabled}
        if not tenants:
            return None
        key = load_signing_key(loaded)
        root = loaded.resolve(loaded.config.server.audit_dir)
        logs: dict[str, AuditLog] = {}
        try:
            for name, config in tenants.items():
                try:
                    logs[name] = AuditLog(root / name, name, config, key)
                except OSError as exc:
                    raise ConfigError(
                        f"{loaded.path}: server.audit_dir: cannot write the audit log of "
                        f"{name!r} in {root / name}: {exc.strerror or exc}"
                    ) from None
                except AuditDamaged as exc:
                    raise ConfigError(f"{loaded.path}: tenants.{name}.audit: {exc}") from None
        except BaseException:
            for opened in logs.values():
                opened.close()
            raise
        return cls(logs, {name: config.raw_text for name, config in tenants.items()})

    async def record(self, state: RequestState) -> None:
        """Append the request's record and return once it is durable."""
        tenant = state.caller.tenant
        audit = self.logs.get(tenant)
        if audit is not None:
            await audit.append(record_fields(state, self.raw_text[tenant]))

    async def record_admin(
        self, caller: Caller, rpc: str, error: BaseException | None = None, **target: str
    ) -> None:
        """Append an Admin call's record (a model load or rollback, a reload) and return once
        it is durable: who did what to which version or collection, and whether it took."""
        audit = self.logs.get(caller.tenant)
        if audit is not None:
            await audit.append(
                {
                    "kind": "admin",
                    "rpc": rpc,
                    "key_name": caller.key_name,
                    **{name: str(value)[:256] for name, value in sorted(target.items())},
                    "outcome": getattr(error, "status", "INTERNAL") if error else "OK",
                    "error": type(error).__name__ if error is not None else "",
                }
            )

    def close(self) -> None:
        for audit in self.logs.values():
            audit.close()


# -- reading and verifying -----------------------------------------------------------------------


@dataclass(frozen=True)
class Location:
    segment: str
    line: int


@dataclass
class Line:
    """One line of a segment: where it is, its bytes, and the record when it parsed."""

    location: Location
    data: bytes
    record: dict[str, Any] | None
    complete: bool


def snapshot(directory: Path) -> tuple[bytes | None, dict[str, int]]:
    """``checkpoint.json``'s bytes (None without one) and every segment's size, taken together
    under the writers' lock (shared, held for a moment): a writer updates both under it, so the
    segments up to those sizes hold every record the checkpoint names, even on a live trail."""
    try:
        fd = os.open(directory / LOCK_FILE, os.O_RDONLY)
    except OSError:  # a copy without the lock file: no writer to wait for
        fd = -1
    try:
        if fd >= 0:
            fcntl.flock(fd, fcntl.LOCK_SH)
        try:
            stored: bytes | None = (directory / CHECKPOINT_FILE).read_bytes()
        except FileNotFoundError:
            stored = None
        sizes = {path.name: path.stat().st_size for _, path in segments(directory)}
    finally:
        if fd >= 0:
            os.close(fd)
    return stored, sizes


def read_lines(directory: Path, sizes: Mapping[str, int] | None = None) -> Iterator[Line]:
    """Every line of every segment, oldest first (a last line without newline: incomplete);
    with ``sizes`` (see snapshot), only those segments and only that far into each."""
    for _, path in segments(directory):
        if sizes is not None and path.name not in sizes:
            continue
        left = sizes[path.name] if sizes is not None else -1
        with open(path, "rb") as handle:
            for number, read in enumerate(handle, start=1):
                data = read if left < 0 else read[:left]
                if not data:
                    break
                left -= len(data) if left >= 0 else 0
                complete = data.endswith(b"\n")
                body = data[:-1] if complete else data
                try:
                    record = json.loads(body)
                except (ValueError, UnicodeDecodeError):
                    record = None
                yield Line(
                    Location(path.name, number),
                    body,
                    record if isinstance(record, dict) else None,
                    complete,
                )


def read_records(directory: Path) -> Iterator[dict[str, Any]]:
    """The complete records of a tenant folder, in chain order (unparsable lines skipped)."""
    for line in read_lines(directory):
        if line.complete and line.record is not None:
            yield line.record


def find_request(directory: Path, request_id: str) -> list[dict[str, Any]]:
    """Every request record with ``request_id``."""
    return [
        r
        for r in read_records(directory)
        if r.get("kind") == "request" and r.get("request_id") == request_id
    ]


def _first_time(path: Path) -> str | None:
    with open(path, "rb") as handle:
        first = handle.readline()
    try:
        value = json.loads(first).get("time")
    except (ValueError, UnicodeDecodeError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def records_since(directory: Path, since: str) -> Iterator[dict[str, Any]]:
    """Records whose ``time`` is at or after ``since`` (records' own form, see parse_time),
    skipping whole segments that end before it."""
    found = segments(directory)
    start = 0
    for index in range(1, len(found)):
        first = _first_time(found[index][1])
        if first is not None and first < since:
            start = index  # everything before that segment is older still
    for _, path in found[start:]:
        with open(path, "rb") as handle:
            for data in handle:
                if not data.endswith(b"\n"):
                    break
                try:
                    record = json.loads(data)
                except (ValueError, UnicodeDecodeError):
                    continue
                if isinstance(record, dict) and str(record.get("time", "")) >= since:
                    yield record


@dataclass(frozen=True)
class Problem:
    """The first bad record: where it is and what is wrong."""

    segment: str
    line: int
    seq: int | None
    what: str

    def __str__(self) -> str:
        seq = f", seq {self.seq}" if self.seq is not None else ""
        return f"{self.segment} line {self.line}{seq}: {self.what}"


@dataclass
class Verification:
    """What ``verify`` found in one tenant's trail."""

    tenant: str
    directory: Path
    segments: int = 0
    requests: int = 0
    checkpoints: int = 0
    signed: int = 0
    last_seq: int = 0
    latest_checkpoint: dict[str, Any] | None = None
    uncovered: int = 0
    """Records after the latest checkpoint."""
    problem: Problem | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.problem is None

    def summary(self) -> str:
        head = (
            f"{self.tenant}: {'ok' if self.ok else 'BAD'}: {self.requests} requests and "
            f"{self.checkpoints} checkpoints in {self.segments} segments (seq 1..{self.last_seq})"
        )
        checkpoint = self.latest_checkpoint
        if checkpoint is not None:
            head += (
                f"; latest checkpoint seq {checkpoint['seq']} at {checkpoint['time']}"
                f"{' signed by key ' + checkpoint['key_id'] if checkpoint.get('signature') else ''}"
                f"; {self.uncovered} records after it"
            )
        return head


_REQUIRED = {"kind": str, "tenant": str, "seq": int, "time": str, "prev": str}


def _shape_error(record: dict[str, Any] | None) -> str | None:
    if record is None:
        return "not a JSON object (edited or damaged)"
    for name, kind in _REQUIRED.items():
        value = record.get(name)
        if not isinstance(value, kind) or isinstance(value, bool):
            return f"not a valid record: field {name!r} is missing or not a {kind.__name__}"
    if not isinstance(record.get(_HASH_FIELD), str):
        return "not a valid record: no hash"
    if record["kind"] not in ("request", "admin", "checkpoint"):
        return f"not a valid record: unknown kind {record['kind']!r}"
    return None


class _Verifier:
    def __init__(self, directory: Path, tenant: str, public_key: Ed25519PublicKey | None):
        self.directory = directory
        self.tenant = tenant
        self.public_key = public_key
        self.expected_key = key_id(public_key) if public_key else ""
        self.result = Verification(tenant, directory)
        self.seen_signed = False
        self.sizes: dict[str, int] = {}

    def _checkpoint_problem(self, record: dict[str, Any]) -> str | None:
        signature = record.get(_SIGNATURE_FIELD)
        if not isinstance(signature, str) or not isinstance(record.get("key_id"), str):
            return "not a valid checkpoint: no signature or key_id field"
        if not signature:
            if self.public_key is not None and self.seen_signed:
                return "an unsigned checkpoint after signed ones (forged, or the key was dropped)"
            return None
        self.seen_signed = True
        if self.public_key is None:
            return None
        if record["key_id"] != self.expected_key:
            return (
                f"bad signature: signed by key {record['key_id']}, not by the key given "
                f"({self.expected_key})"
            )
        try:
            self.public_key.verify(base64.b64decode(signature, validate=True), signed_bytes(record))
        except (InvalidSignature, ValueError):
            return "bad signature: the checkpoint was edited or forged"
        return None

    def _record_problem(self, line: Line) -> str | None:
        record = line.record
        shape = _shape_error(record)
        if shape is not None:
            return shape
        assert record is not None
        if record["tenant"] != self.tenant:
            return f"a record of tenant {record['tenant']!r} (moved from another trail)"
        try:
            digest = record_hash(record)
        except ValueError:
            return "not a valid record (edited)"
        if digest != record[_HASH_FIELD]:
            return "edited: its hash does not match its content"
        if canonical(record) != line.data:
            return "edited: not in canonical form (the bytes were rewritten)"
        return None

    def _later(self, after: Location) -> Iterator[Line]:
        passed = False
        for line in read_lines(self.directory, self.sizes):
            if passed:
                yield line
            elif line.location == after:
                passed = True

    def _earlier(self, before: Location) -> Iterator[Line]:
        for line in read_lines(self.directory, self.sizes):
            if line.location == before:
                return
            yield line

    def _chain_problem(self, line: Line, expected: int, prev: str) -> str:
        record = line.record
        assert record is not None
        seq = record["seq"]
        if seq == expected:
            if expected == 1:
                return "chain broken: the first record does not start the chain"
            return (
                f"chain broken: prev is not the hash of seq {expected - 1} (that record was "
                "replaced, or this one was inserted)"
            )
        if seq > expected:
            for later in self._later(line.location):
                if later.record is not None and later.record.get("seq") == expected:
                    where = later.location
                    return (
                        f"out of order: seq {expected} belongs here but is at {where.segment} "
                        f"line {where.line} (reordered)"
                    )
            missing = f"seq {expected}" if seq == expected + 1 else f"seq {expected}..{seq - 1}"
            return f"{missing} missing (deleted) before this record"
        for earlier in self._earlier(line.location):
            if earlier.record is not None and earlier.record.get("seq") == seq:
                where = earlier.location
                if earlier.data == line.data:
                    return (
                        f"a copy of seq {seq} ({where.segment} line {where.line}): duplicated "
                        "or inserted"
                    )
                return f"seq {seq} again ({where.segment} line {where.line}): inserted"
        return f"out of order: seq {seq} after seq {expected - 1} (reordered or inserted)"

    def run(self) -> Verification:
        result = self.result
        stored_bytes, self.sizes = snapshot(self.directory)
        stored = self._stored_checkpoint(stored_bytes)
        found = [(n, p) for n, p in segments(self.directory) if p.name in self.sizes]
        result.segments = len(found)
        numbers = [n for n, _ in found]
        if numbers and numbers != list(range(numbers[0], numbers[0] + len(numbers))):
            gaps = sorted(set(range(numbers[0], numbers[-1] + 1)) - set(numbers))
            result.notes.append(f"segments missing: {[segment_name(n) for n in gaps]}")
        expected, prev = 1, GENESIS
        last: Location | None = None
        stored_hash_in_chain: str | None = None
        last_segment = found[-1][1].name if found else ""
        for line in read_lines(self.directory, self.sizes):
            if not line.complete:
                if line.location.segment == last_segment:
                    result.notes.append(
                        f"{line.location.segment} line {line.location.line} is incomplete: a "
                        "write cut by a crash (never acknowledged) or in progress; the server "
                        "cuts it when it next opens the log"
                    )
                    break
                return self._fail(line, None, "incomplete line inside the trail (damaged)")
            what = self._record_problem(line)
            record = line.record
            seq = record.get("seq") if record is not None else None
            if what is None:
                assert record is not None
                if record["seq"] != expected or record["prev"] != prev:
                    what = self._chain_problem(line, expected, prev)
                elif record["kind"] == "checkpoint":
                    what = self._checkpoint_problem(record)
            if what is not None:
                return self._fail(line, seq if isinstance(seq, int) else None, what)
            assert record is not None
            if record["kind"] == "checkpoint":
                result.checkpoints += 1
                result.signed += bool(record[_SIGNATURE_FIELD])
                result.uncovered = 0
            else:
                result.requests += 1
                result.uncovered += 1
            if stored is not None and record["seq"] == stored.get("seq"):
                stored_hash_in_chain = record[_HASH_FIELD]
            prev, expected, last = record[_HASH_FIELD], record["seq"] + 1, line.location
            result.last_seq = record["seq"]
        self._check_stored(stored, stored_hash_in_chain, last)
        self._notes()
        return result

    def _fail(self, line: Line, seq: int | None, what: str) -> Verification:
        self.result.problem = Problem(line.location.segment, line.location.line, seq, what)
        return self.result

    @staticmethod
    def _stored_checkpoint(data: bytes | None) -> dict[str, Any] | None:
        if data is None:
            return None
        record = None
        with contextlib.suppress(ValueError, UnicodeDecodeError):
            record = json.loads(data)
        return record if isinstance(record, dict) else {"_unreadable": True}

    def _check_stored(
        self, stored: dict[str, Any] | None, in_chain: str | None, last: Location | None
    ) -> None:
        result = self.result
        if result.problem is not None:
            return
        where = CHECKPOINT_FILE
        if stored is None:
            if result.checkpoints:
                result.problem = Problem(
                    where,
                    1,
                    None,
                    "missing: the latest checkpoint was deleted, so a truncated "
                    "tail cannot be ruled out",
                )
            return
        what = None
        if stored.get("_unreadable") or _shape_error(stored) or stored.get("kind") != "checkpoint":
            what = "not a valid checkpoint record (edited or damaged)"
        elif stored["tenant"] != self.tenant:
            what = f"a checkpoint of tenant {stored['tenant']!r}"
        elif record_hash(stored) != stored[_HASH_FIELD]:
            what = "edited: its hash does not match its content"
        else:
            what = self._checkpoint_problem(stored)
            if what is None and self.public_key is not None and not stored[_SIGNATURE_FIELD]:
                what = "the latest checkpoint is not signed, but a key was given"
        if what is not None:
            result.problem = Problem(where, 1, stored.get("seq"), what)
            return
        result.latest_checkpoint = stored
        seq = stored["seq"]
        if seq > result.last_seq:
            segment, line = (last.segment, last.line + 1) if last else ("(no segment)", 1)
            result.problem = Problem(
                segment,
                line,
                result.last_seq + 1,
                f"truncated: the trail ends at seq {result.last_seq} but the checkpoint of "
                f"{stored['time']} covers seq {seq} ({seq - result.last_seq} records cut)",
            )
        elif in_chain != stored[_HASH_FIELD]:
            result.problem = Problem(
                where, 1, seq, f"the record at seq {seq} is not the one this checkpoint names"
            )

    def _notes(self) -> None:
        result = self.result
        if self.public_key is None:
            if result.signed:
                result.notes.append(
                    "checkpoints are signed but no public key was given: signatures were not "
                    "checked (pass --public-key, or configure the signing key)"
                )
            else:
                result.notes.append(
                    "checkpoints are hash-only (no signing key): edits, deletions and reorders "
                    "are detected, but detecting a truncated tail (or a rewritten chain) needs "
                    "a key: set server.audit_key_file or server.audit_key_env"
                )
        if result.uncovered:
            result.notes.append(
                f"{result.uncovered} records after the latest checkpoint are not covered by one "
                "yet: cutting them from the end would not be detected"
            )


def verify(
    directory: Path, tenant: str, public_key: Ed25519PublicKey | None = None
) -> Verification:
    """Check one tenant's trail: every record's hash, the chain, every checkpoint's signature
    (with ``public_key``) and that the trail still reaches ``checkpoint.json``."""
    return _Verifier(directory, tenant, public_key).run()
