"""The audit trail: records, durability, checkpoints, verification, the CLI, configuration.

Real files in temporary folders, the real pipeline in process and over a real gRPC server, a
real process for the disk-full case (RLIMIT_FSIZE). The kill -9 proof: test_audit_kill.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import random
import re
import shutil
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import grpc
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from router import cli
from router._generated.plexus.v1 import plexus_pb2 as pb
from router._generated.plexus.v1 import plexus_pb2_grpc as pb_grpc
from router.calls import RouteQuery
from router.config import AuditConfig, ConfigError, LoadedConfig, parse_config
from router.errors import PlexusError
from router.observe.audit import (
    CHECKPOINT_FILE,
    GENESIS,
    AuditDamaged,
    AuditLog,
    AuditTrail,
    AuditUnavailable,
    canonical,
    key_id,
    parse_private_key,
    parse_public_key,
    parse_time,
    public_pem,
    read_records,
    record_hash,
    segments,
    verify,
)
from router.plexus import Plexus

from .conftest import DEMO_KEY, ROOT, RunningServer, demo_config_data

EMAIL = "jane.roe@example.com"
CARD = "4111 1111 1111 1111"


def audit_data(root: Path, trained: LoadedConfig, **audit: object) -> dict:
    """The retail tenant on the session's trained model: no context sources (Orchestrate runs on
    the local backends alone), structural PII redaction, its trail under ``root``."""
    data = demo_config_data(trained.model_dir)
    del data["tenants"]["wholesale"]
    retail = data["tenants"]["retail"]
    for route in retail["routes"]:
        route.pop("context", None)
    retail.pop("collections", None)
    retail.pop("sql_mirrors", None)
    retail["governance"] = {"pii": {"learned": False}}
    retail["audit"] = dict(audit)
    data["server"]["audit_dir"] = str(root / "audit")
    return data


def write_config(root: Path, data: dict) -> LoadedConfig:
    root.mkdir(parents=True, exist_ok=True)
    path = root / "plexus.yaml"
    path.write_text(yaml.safe_dump(data))
    return parse_config(data, path)


def lines_of(folder: Path) -> list[bytes]:
    return [line for _, path in segments(folder) for line in path.read_bytes().splitlines()]


def requests_of(folder: Path) -> list[dict]:
    return [r for r in read_records(folder) if r["kind"] == "request"]


def new_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def pem_of(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def fields(i: int, **extra: object) -> dict:
    return {"kind": "request", "request_id": f"r{i}", "outcome": "OK", **extra}


def append_serially(audit: AuditLog, count: int, start: int = 0) -> None:
    async def run() -> None:
        for i in range(start, start + count):
            await audit.append(fields(i))

    asyncio.run(run())


# -- the record of a request -----------------------------------------------------------------------


async def _run_rpcs(plexus: Plexus) -> dict[str, str]:
    caller = plexus.keys.authenticate(DEMO_KEY)
    ids = {name: uuid.uuid4().hex for name in ("route", "orchestrate", "refused", "stitch")}
    text = f"my order 88123 never came, email me at {EMAIL}, card {CARD}"
    await plexus.pipeline.route(caller, RouteQuery("storefront", text, request_id=ids["route"]))
    query = RouteQuery("storefront", text, request_id=ids["orchestrate"])
    async for _ in plexus.pipeline.orchestrate(caller, query):
        pass
    await plexus.pipeline.stitch(caller, RouteQuery("storefront", text, request_id=ids["stitch"]))
    with pytest.raises(PlexusError):
        await plexus.pipeline.route(caller, RouteQuery("nope", text, request_id=ids["refused"]))
    return ids


def run_rpcs(loaded: LoadedConfig) -> dict[str, str]:
    async def run() -> dict[str, str]:
        plexus = Plexus(loaded)
        try:
            return await _run_rpcs(plexus)
        finally:
            await plexus.aclose()

    return asyncio.run(run())


def test_a_record_per_request_without_raw_pii_or_the_key(tmp_path, trained_config):
    loaded = write_config(tmp_path, audit_data(tmp_path, trained_config))
    ids = run_rpcs(loaded)
    folder = tmp_path / "audit" / "retail"
    raw = b"\n".join(lines_of(folder))
    for secret in (EMAIL, CARD, "4111", DEMO_KEY, hashlib.sha256(DEMO_KEY.encode()).hexdigest()):
        assert secret.encode() not in raw  # never a raw value, never the key or its hash
    by_id = {r["request_id"]: r for r in requests_of(folder)}
    route = by_id[ids["route"]]
    assert route["rpc"] == "Route" and route["outcome"] == "OK" and route["key_name"] == "demo"
    assert route["app"] == "storefront" and route["tenant"] == "retail"
    assert route["route"] == "order_status" and route["model_version"].startswith("v")
    assert 0 < route["confidence"] <= 1 and route["abstained"] is False
    assert {"stage": "pii", "kind": "EMAIL", "action": "redact", "count": 1} in route["findings"]
    assert {"stage": "pii", "kind": "CARD", "action": "redact", "count": 1} in route["findings"]
    assert route["answer_sha256"] is None and "prompt_text" not in route
    assert set(route["timings_us"]).issuperset({"prep", "pii", "route", "policy"})
    assert re.fullmatch(r"([0-9a-f]{32})?", route["trace_id"]) and route["time"].endswith("Z")
    prepared = "my order 88123 never came, email me at <EMAIL_1>, card <CARD_1>"
    assert route["prompt_sha256"] == hashlib.sha256(prepared.encode()).hexdigest()
    orchestrate = by_id[ids["orchestrate"]]
    assert orchestrate["rpc"] == "Orchestrate" and orchestrate["outcome"] == "OK"
    assert orchestrate["backend"] == "lookup-small" and orchestrate["attempts"] == 1
    assert orchestrate["chain"][0] == "lookup-small" and orchestrate["fallbacks"] == []
    assert orchestrate["usage"]["completion_tokens"] > 0 and orchestrate["cost"] > 0
    assert len(orchestrate["answer_sha256"]) == 64 and orchestrate["finish_reason"] == "stop"
    assert by_id[ids["stitch"]]["rpc"] == "Stitch"
    refused = by_id[ids["refused"]]
    assert refused["outcome"] == "NOT_FOUND" and refused["error"] == "NotFound"
    assert refused["route"] == "" and refused["confidence"] is None
    # one chain: seq 1.., each prev the hash before, each hash over the canonical record
    records = list(read_records(folder))
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
    assert records[0]["prev"] == GENESIS
    for before, record in zip(records, records[1:], strict=False):
        assert record["prev"] == before["hash"] and record_hash(record) == record["hash"]
    assert records[-1]["kind"] == "checkpoint"  # written when the pipeline closed
    for line in lines_of(folder):
        assert canonical(json.loads(line)) == line  # sorted keys, no spaces, UTF-8


def test_raw_text_keeps_the_redacted_prompt_and_answer(tmp_path, trained_config):
    loaded = write_config(tmp_path, audit_data(tmp_path, trained_config, raw_text=True))
    ids = run_rpcs(loaded)
    folder = tmp_path / "audit" / "retail"
    assert EMAIL.encode() not in b"\n".join(lines_of(folder))
    by_id = {r["request_id"]: r for r in requests_of(folder)}
    route = by_id[ids["route"]]
    assert route["prompt_text"] == "my order 88123 never came, email me at <EMAIL_1>, card <CARD_1>"
    assert hashlib.sha256(route["prompt_text"].encode()).hexdigest() == route["prompt_sha256"]
    orchestrate = by_id[ids["orchestrate"]]
    # the caller got the answer with its own values restored; the record keeps placeholders
    assert "<EMAIL_1>" in orchestrate["answer_text"] and "[local:" in orchestrate["answer_text"]
    released = orchestrate["answer_text"].replace("<EMAIL_1>", EMAIL).replace("<CARD_1>", CARD)
    assert hashlib.sha256(released.encode()).hexdigest() == orchestrate["answer_sha256"]
    # refused before redaction ran: no text is kept, only its hash
    assert by_id[ids["refused"]]["prompt_text"] is None


def test_disabled_audit_writes_nothing(tmp_path, trained_config):
    loaded = write_config(tmp_path, audit_data(tmp_path, trained_config, enabled=False))
    run_rpcs(loaded)
    assert not (tmp_path / "audit").exists()
    assert AuditTrail.from_config(loaded) is None


def test_over_grpc_the_record_is_there_when_the_response_is(tmp_path, trained_config):
    loaded = write_config(tmp_path, audit_data(tmp_path, trained_config))
    running = RunningServer(loaded)
    folder = tmp_path / "audit" / "retail"
    try:
        with grpc.insecure_channel(running.address) as channel:
            stub = pb_grpc.RouterStub(channel)
            meta = (("x-api-key", DEMO_KEY),)
            for i in range(20):
                request_id = f"grpc-{i}"
                request = pb.RouteRequest(
                    app="storefront", text="where is my order", request_id=request_id
                )
                stub.Route(request, metadata=meta, timeout=10)
                # read while the server runs: the response came, so the record is on disk
                assert [r["request_id"] for r in requests_of(folder)][-1] == request_id
            events = list(
                stub.Orchestrate(
                    pb.OrchestrateRequest(
                        request=pb.RouteRequest(
                            app="storefront", text="can I return headphones?", request_id="o-1"
                        )
                    ),
                    metadata=meta,
                    timeout=10,
                )
            )
            assert events[-1].WhichOneof("event") == "final"
            assert requests_of(folder)[-1]["request_id"] == "o-1"
            with pytest.raises(grpc.RpcError) as refused:
                stub.Route(
                    pb.RouteRequest(app="storefront", text="x", request_id="bad-key"),
                    metadata=(("x-api-key", "not-a-key"),),
                    timeout=10,
                )
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            # refused before the pipeline, by a known caller: audited like any request
            with pytest.raises(grpc.RpcError) as empty:
                stub.RouteBatch(pb.RouteBatchRequest(), metadata=meta, timeout=10)
            assert empty.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert requests_of(folder)[-1]["rpc"] == "RouteBatch"
            raw = channel.unary_unary("/plexus.v1.Router/Orchestrate")
            with pytest.raises(grpc.RpcError) as malformed:
                raw(b"\x0a\x02\x12\xff", metadata=meta, timeout=10)
            assert malformed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        running.stop()
    records = requests_of(folder)
    # a refused key has no tenant: counted and logged, not in a tenant's trail
    assert "bad-key" not in {r["request_id"] for r in records}
    refusals = [(r["rpc"], r["outcome"], r["error"], r["key_name"]) for r in records[-2:]]
    assert refusals == [
        ("RouteBatch", "INVALID_ARGUMENT", "InvalidArgument", "demo"),
        ("Orchestrate", "INVALID_ARGUMENT", "InvalidArgument", "demo"),
    ]
    assert verify(folder, "retail").ok


# -- the log: rotation, reopening, checkpoints -----------------------------------------------------


def test_segments_rotate_and_the_chain_runs_across_them(tmp_path):
    folder = tmp_path / "t"
    audit = AuditLog(folder, "t", AuditConfig(segment_bytes=4096))
    append_serially(audit, 60)
    audit.close()
    found = segments(folder)
    assert len(found) >= 5
    assert all(path.stat().st_size <= 4096 for _, path in found[:-1])
    first_of_second = json.loads(found[1][1].read_bytes().splitlines()[0])
    last_of_first = json.loads(found[0][1].read_bytes().splitlines()[-1])
    assert first_of_second["prev"] == last_of_first["hash"]
    assert first_of_second["seq"] == last_of_first["seq"] + 1
    result = verify(folder, "t")
    assert result.ok and result.requests == 60 and result.segments == len(found)


def test_reopening_cuts_a_torn_last_line_and_continues_the_chain(tmp_path, caplog):
    folder = tmp_path / "t"
    audit = AuditLog(folder, "t")
    append_serially(audit, 5)
    audit.close()
    ((_, last),) = segments(folder)
    complete = last.read_bytes()
    with open(last, "ab") as handle:
        handle.write(b'{"kind":"request","request_id":"torn","seq":7,"ti')
    assert not verify(folder, "t").problem  # a torn line is a crash's, not a tampering
    with caplog.at_level(logging.WARNING, logger="plexus.audit"):
        audit = AuditLog(folder, "t")
    assert "cut by a crash" in caplog.text
    assert last.read_bytes() == complete  # cut back to the last complete record
    append_serially(audit, 3, start=5)
    audit.close()
    records = list(read_records(folder))
    assert [r["request_id"] for r in records if r["kind"] == "request"] == [
        f"r{i}" for i in range(8)
    ]
    assert verify(folder, "t").ok


def test_reopening_refuses_a_damaged_last_record(tmp_path, trained_config):
    folder = tmp_path / "audit" / "retail"
    audit = AuditLog(folder, "retail")
    append_serially(audit, 3)
    audit.close()
    ((_, last),) = segments(folder)
    data = last.read_bytes().replace(b'"r2"', b'"rX"') + b'{"kind":"request"}\n'
    last.write_bytes(data)
    loaded = write_config(tmp_path, audit_data(tmp_path, trained_config))
    with pytest.raises(ConfigError, match="does not verify"):
        AuditTrail.from_config(loaded)


def test_reopening_refuses_a_trail_cut_before_its_latest_checkpoint(tmp_path):
    folder = tmp_path / "t"
    audit = AuditLog(folder, "t", signing_key=new_key())
    append_serially(audit, 5)
    audit.close()
    ((_, last),) = segments(folder)
    lines = last.read_bytes().splitlines(keepends=True)
    last.write_bytes(b"".join(lines[:-2]))
    with pytest.raises(AuditDamaged, match="it was cut"):
        AuditLog(folder, "t")


def test_reopening_restores_the_copy_of_a_checkpoint_a_crash_left_out(tmp_path):
    # the writer died after the checkpoint's fsync and before copying it into checkpoint.json
    key = new_key()
    folder = tmp_path / "t"
    audit = AuditLog(folder, "t", signing_key=key)
    append_serially(audit, 3)
    audit.close()
    stored = (folder / CHECKPOINT_FILE).read_bytes()
    (folder / CHECKPOINT_FILE).unlink()
    assert "missing" in verify(folder, "t", key.public_key()).problem.what
    AuditLog(folder, "t", signing_key=key).close()
    assert (folder / CHECKPOINT_FILE).read_bytes() == stored
    assert verify(folder, "t", key.public_key()).ok


def test_checkpoints_every_n_records_signed(tmp_path):
    key = new_key()
    folder = tmp_path / "t"
    audit = AuditLog(folder, "t", AuditConfig(checkpoint_records=10), key)
    append_serially(audit, 35)
    audit.close()
    records = list(read_records(folder))
    checkpoints = [r for r in records if r["kind"] == "checkpoint"]
    assert [c["seq"] for c in checkpoints] == [11, 22, 33, 39]  # every 10, then at close
    assert all(c["key_id"] == key_id(key.public_key()) and c["signature"] for c in checkpoints)
    stored = json.loads((folder / CHECKPOINT_FILE).read_bytes())
    assert stored == checkpoints[-1]
    result = verify(folder, "t", key.public_key())
    assert result.ok and result.signed == 4 and result.uncovered == 0 and not result.notes
    other = verify(folder, "t", new_key().public_key())
    assert other.problem is not None and "signed by key" in other.problem.what
    assert other.problem.seq == 11
    unchecked = verify(folder, "t")
    assert unchecked.ok and "signatures were not checked" in unchecked.notes[0]


def test_checkpoint_after_seconds_without_more_records(tmp_path):
    folder = tmp_path / "t"
    audit = AuditLog(folder, "t", AuditConfig(checkpoint_seconds=0.2), new_key())
    append_serially(audit, 2)
    deadline = time.monotonic() + 30
    while not (folder / CHECKPOINT_FILE).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    kinds = [r["kind"] for r in read_records(folder)]
    audit.close()
    assert kinds == ["request", "request", "checkpoint"]


def test_without_a_key_checkpoints_are_hash_only_and_verify_says_so(tmp_path):
    folder = tmp_path / "t"
    audit = AuditLog(folder, "t")
    append_serially(audit, 4)
    audit.close()
    result = verify(folder, "t")
    assert result.ok and result.checkpoints == 1 and result.signed == 0
    assert any("detecting a truncated tail" in n and "needs a key" in n for n in result.notes)
    # a key given for an unsigned trail: the latest checkpoint should have been signed
    keyed = verify(folder, "t", new_key().public_key())
    assert keyed.problem is not None and "not signed" in keyed.problem.what


def test_a_cut_tail_is_found_with_a_key_up_to_the_latest_checkpoint(tmp_path):
    key = new_key()
    folder = tmp_path / "t"
    audit = AuditLog(folder, "t", AuditConfig(checkpoint_records=5), key)
    append_serially(audit, 10)  # checkpoints at seq 6 and 12
    append_serially(audit, 2, start=10)  # seq 13 and 14: not covered yet
    ((_, last),) = segments(folder)
    lines = last.read_bytes().splitlines(keepends=True)
    assert json.loads(lines[-1])["seq"] == 14
    assert verify(folder, "t", key.public_key()).uncovered == 2
    last.write_bytes(b"".join(lines[:-2]))  # after the latest checkpoint: not detectable
    assert verify(folder, "t", key.public_key()).ok
    last.write_bytes(b"".join(lines[:-4]))  # past it: detected
    result = verify(folder, "t", key.public_key())
    assert result.problem is not None and result.problem.what.startswith("truncated")
    assert result.problem.seq == 11
    # the running writer will not build on a trail cut behind its back (nor sign the cut)
    with pytest.raises(AuditUnavailable, match="cut"):
        append_serially(audit, 1, start=20)
    audit.close()
    assert verify(folder, "t", key.public_key()).problem.what.startswith("truncated")


def _rechained(lines: list[bytes], edit_seq: int) -> list[bytes]:
    """The trail with record ``edit_seq`` edited and every hash after it recomputed, as someone
    without the signing key would (checkpoint signatures kept as they were)."""
    out, prev = [], GENESIS
    for line in lines:
        record = json.loads(line)
        if record["seq"] == edit_seq:
            record["outcome"] = "EDITED"
        record["prev"] = prev
        record["hash"] = record_hash(record)
        prev = record["hash"]
        out.append(canonical(record) + b"\n")
    return out


def test_a_rewritten_chain_is_caught_by_the_next_signed_checkpoint(tmp_path):
    key = new_key()
    folder = tmp_path / "t"
    audit = AuditLog(folder, "t", AuditConfig(checkpoint_records=5), key)
    append_serially(audit, 12)
    audit.close()
    ((_, path),) = segments(folder)
    original = path.read_bytes().splitlines()
    path.write_bytes(b"".join(_rechained(original, edit_seq=8)))
    result = verify(folder, "t", key.public_key())
    assert result.problem is not None and result.problem.what.startswith("bad signature")
    assert result.problem.seq == 12  # the first checkpoint after the edit (seq 6, 12, ...)
    # without the key the chain holds together: only the stored checkpoint disagrees
    unkeyed = verify(folder, "t")
    assert unkeyed.problem is not None and unkeyed.problem.segment == CHECKPOINT_FILE


def test_verify_reads_a_trail_while_it_is_written(tmp_path):
    key = new_key()
    folder = tmp_path / "t"
    audit = AuditLog(folder, "t", AuditConfig(checkpoint_records=7, segment_bytes=4096), key)
    stop = threading.Event()

    def write() -> None:
        async def run() -> None:
            i = 0
            while not stop.is_set():
                await asyncio.gather(*[audit.append(fields(i + j)) for j in range(3)])
                i += 3

        asyncio.run(run())

    writer = threading.Thread(target=write)
    writer.start()
    try:
        results = [verify(folder, "t", key.public_key())]
        deadline = time.monotonic() + 60
        while (len(results) < 40 or results[-1].segments < 4) and time.monotonic() < deadline:
            results.append(verify(folder, "t", key.public_key()))
    finally:
        stop.set()
        writer.join(timeout=30)
        audit.close()
    assert [str(r.problem) for r in results if r.problem] == []
    assert results[-1].requests > results[0].requests  # it was being written meanwhile
    assert verify(folder, "t", key.public_key()).ok


def test_two_writers_on_one_folder_keep_one_chain(tmp_path):
    folder = tmp_path / "t"
    first, second = AuditLog(folder, "t"), AuditLog(folder, "t")

    async def run() -> None:
        await asyncio.gather(
            *[first.append(fields(i)) for i in range(50)],
            *[second.append(fields(i + 100)) for i in range(50)],
        )

    for _ in range(3):
        asyncio.run(run())
    first.close()
    second.close()
    result = verify(folder, "t")
    assert result.ok and result.requests == 300


def test_requests_appending_together_share_one_group_commit(tmp_path):
    audit = AuditLog(tmp_path / "t", "t")
    before = audit.groups

    async def run() -> None:
        await asyncio.gather(*[audit.append(fields(i)) for i in range(64)])

    asyncio.run(run())
    assert audit.groups == before + 1  # one write and one fdatasync for all 64
    audit.close()
    assert [r["request_id"] for r in requests_of(tmp_path / "t")] == [f"r{i}" for i in range(64)]


def test_submit_from_a_thread_reports_durability(tmp_path):
    audit = AuditLog(tmp_path / "t", "t")
    done: list[object] = []
    finished = threading.Event()

    def callback(error: BaseException | None) -> None:
        done.append(error)
        if len(done) == 10:
            finished.set()

    for i in range(10):
        audit.submit(fields(i), callback)
    assert finished.wait(30)
    audit.close()
    assert done == [None] * 10
    with pytest.raises(AuditUnavailable, match="closed"):
        audit.submit(fields(11), callback)


DISK_FULL = """
import asyncio, resource, signal, sys
from pathlib import Path
from router.observe.audit import AuditLog, AuditUnavailable, verify
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
folder = Path(sys.argv[1])
audit = AuditLog(folder, "t")
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (20000, hard))
async def run():
    ok = failed = 0
    for i in range(200):
        try:
            await audit.append({"kind": "request", "request_id": f"r{i}", "pad": "x" * 200})
            ok += 1
        except AuditUnavailable as exc:
            failed += 1
            message = str(exc)
    return ok, failed, message
ok, failed, message = asyncio.run(run())
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
asyncio.run(audit.append({"kind": "request", "request_id": "after"}))  # room again: it works
audit.close()
result = verify(folder, "t")
print(ok, failed, result.ok, result.requests - 1, message)
"""


def test_a_full_disk_fails_the_request_and_keeps_the_chain(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", DISK_FULL, str(tmp_path / "t")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    ok, failed, verified, requests, message = result.stdout.split(" ", 4)
    assert int(ok) > 0 and int(failed) > 0 and int(ok) + int(failed) == 200
    assert verified == "True" and int(requests) == int(ok)  # what failed was taken back
    assert "cannot be written" in message


# -- tampering -------------------------------------------------------------------------------------


def _fuzz_trail(root: Path, key: Ed25519PrivateKey) -> Path:
    folder = root / "t"
    audit = AuditLog(folder, "t", AuditConfig(checkpoint_records=40, segment_bytes=8192), key)
    rng = random.Random(7)

    async def run() -> None:
        for i in range(150):
            extra = {"confidence": rng.random(), "text": "é" * rng.randrange(0, 40)}
            await audit.append(fields(i, **extra))

    asyncio.run(run())
    audit.close()
    return folder


def _located(problem, folder: Path) -> int:  # type: ignore[no-untyped-def]
    """The problem's position in the whole trail (0-based line index; checkpoint.json last)."""
    if problem.segment == CHECKPOINT_FILE:
        return 10**9
    index = 0
    for _, path in segments(folder):
        if path.name == problem.segment:
            return index + problem.line - 1
        index += len(path.read_bytes().splitlines())
    return index + problem.line - 1


def test_fuzz_every_tampering_is_detected_at_or_before_it(tmp_path):
    key = new_key()
    public = key.public_key()
    folder = _fuzz_trail(tmp_path, key)
    assert verify(folder, "t", public).ok
    files = [path for _, path in segments(folder)]
    originals = {path: path.read_bytes() for path in [*files, folder / CHECKPOINT_FILE]}
    rng = random.Random(20240531)
    kinds = ["flip", "delete", "duplicate", "swap", "truncate", "checkpoint"]
    seen = dict.fromkeys(kinds, 0)
    for trial in range(1000):
        kind = kinds[trial % len(kinds)]
        # the whole trail as lines; index = position of the first line tampered with
        lines = [line for path in files for line in originals[path].splitlines(keepends=True)]
        if kind == "flip":
            index = rng.randrange(len(lines))
            line = bytearray(lines[index])
            at = rng.randrange(len(line))
            line[at] ^= 1 << rng.randrange(8)
            lines[index] = bytes(line)
        elif kind == "delete":
            index = rng.randrange(len(lines))
            del lines[index]
        elif kind == "duplicate":
            index = rng.randrange(len(lines))
            lines.insert(index + 1, lines[index])
            index += 1
        elif kind == "swap":
            index = rng.randrange(len(lines) - 1)
            other = rng.randrange(index + 1, len(lines))
            lines[index], lines[other] = lines[other], lines[index]
        elif kind == "truncate":
            total = sum(map(len, lines))
            cut = rng.randrange(total)
            kept, size = [], 0
            for line in lines:
                if size + len(line) > cut:
                    kept.append(line[: cut - size])
                    break
                kept.append(line)
                size += len(line)
            index = len(kept) - 1  # the line cut short, or the first one cut away
            lines = [line for line in kept if line]
        else:  # edit the checkpoint file
            stored = bytearray(originals[folder / CHECKPOINT_FILE])
            at = rng.randrange(len(stored))
            stored[at] ^= 1 << rng.randrange(8)
            (folder / CHECKPOINT_FILE).write_bytes(bytes(stored))
            index = 10**9
        if kind != "checkpoint":  # lay the lines back into the segments, sizes as they were
            position = 0
            for path in files:
                count = len(originals[path].splitlines())
                if path is files[-1]:
                    count = len(lines)
                path.write_bytes(b"".join(lines[position : position + count]))
                position += count
        result = verify(folder, "t", public)
        assert result.problem is not None, (trial, kind)
        assert _located(result.problem, folder) <= index, (trial, kind, str(result.problem))
        seen[kind] += 1
        for path, data in originals.items():
            path.write_bytes(data)
    assert min(seen.values()) >= 160
    assert verify(folder, "t", public).ok


# -- the CLI ---------------------------------------------------------------------------------------


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture()
def served(tmp_path, trained_config) -> tuple[Path, Path, dict[str, str]]:
    """A configuration with a signing key file and a trail written by real requests."""
    key = new_key()
    (tmp_path / "audit-key.pem").write_bytes(pem_of(key))
    (tmp_path / "audit-pub.pem").write_text(public_pem(key.public_key()))
    data = audit_data(tmp_path, trained_config)
    data["server"]["audit_key_file"] = "audit-key.pem"
    loaded = write_config(tmp_path, data)
    ids = run_rpcs(loaded)
    return loaded.path, tmp_path / "audit" / "retail", ids


def test_cli_verify_show_and_export(served, capsys):
    config, folder, ids = served
    code, out, err = run_cli(capsys, "audit", "verify", str(config))
    assert code == 0, err
    assert "retail: ok: 4 requests and 1 checkpoints" in out and "signed by key" in out
    code, out, _ = run_cli(
        capsys,
        "audit",
        "verify",
        str(config),
        "--tenant",
        "retail",
        "--public-key",
        str(config.parent / "audit-pub.pem"),
    )
    assert code == 0
    code, out, _ = run_cli(capsys, "audit", "show", str(config), "--request-id", ids["route"])
    assert code == 0 and json.loads(out)["request_id"] == ids["route"]
    code, out, _ = run_cli(capsys, "audit", "export", str(config), "--since", "2000-01-01")
    exported = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [r["seq"] for r in exported] == list(range(1, 6))
    code, out, _ = run_cli(capsys, "audit", "export", str(config), "--since", "2999-01-01T00:00Z")
    assert code == 0 and out == ""
    middle = exported[2]["time"]
    code, out, _ = run_cli(capsys, "audit", "export", str(config), "--since", middle)
    assert [json.loads(line)["seq"] for line in out.splitlines()][0] <= 3


def test_cli_verify_names_the_first_bad_record_and_exits_6(served, capsys):
    config, folder, ids = served
    ((_, path),) = segments(folder)
    original = path.read_bytes().splitlines(keepends=True)
    lines = list(original)
    lines[1] = lines[1].replace(b'"outcome":"OK"', b'"outcome":"NO"')
    path.write_bytes(b"".join(lines))
    code, out, err = run_cli(capsys, "audit", "verify", str(config))
    assert code == cli.EXIT_INVALID
    assert "retail: BAD" in out
    (line,) = err.strip().splitlines()
    assert "segment-000001.jsonl line 2, seq 2: edited: its hash does not match" in line
    del lines[1]
    path.write_bytes(b"".join(lines))
    code, _, err = run_cli(capsys, "audit", "verify", str(config))
    assert code == cli.EXIT_INVALID and "line 2, seq 3: seq 2 missing (deleted)" in err
    path.write_bytes(b"".join(original[:3]))
    code, _, err = run_cli(capsys, "audit", "verify", str(config))
    assert code == cli.EXIT_INVALID and "truncated: the trail ends at seq 3" in err


def test_cli_errors_and_exit_codes(served, capsys, tmp_path):
    config, folder, _ = served
    code, _, err = run_cli(capsys, "audit", "show", str(config), "--request-id", "nope")
    assert code == cli.EXIT_NOT_FOUND and "no audit record has request id 'nope'" in err
    code, _, err = run_cli(capsys, "audit", "verify", str(config), "--tenant", "elsewhere")
    assert code == cli.EXIT_USAGE and "no tenant 'elsewhere'" in err
    code, _, err = run_cli(capsys, "audit", "export", str(config), "--since", "yesterday")
    assert code == cli.EXIT_USAGE and "--since: 'yesterday' is not an ISO-8601 time" in err
    bad = tmp_path / "bad.pem"
    bad.write_text("hello")
    code, _, err = run_cli(capsys, "audit", "verify", str(config), "--public-key", str(bad))
    assert code == cli.EXIT_USAGE and "not an Ed25519 public key" in err
    code, _, err = run_cli(capsys, "audit", "verify", str(config), "--public-key", "missing.pem")
    assert code == cli.EXIT_USAGE and "cannot read" in err
    shutil.rmtree(folder)
    code, out, err = run_cli(capsys, "audit", "verify", str(config), "--tenant", "retail")
    assert code == cli.EXIT_NOT_FOUND and "has no audit trail" in err
    code, out, _ = run_cli(capsys, "audit", "verify", str(config))
    assert code == 0 and "retail: no audit trail yet" in out
    for verb in ("verify", "show", "export"):
        result = subprocess.run(
            [sys.executable, "-m", "router.cli", "audit", verb, "--help"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )
        assert result.returncode == 0 and "usage: plexus audit" in result.stdout


# -- configuration ---------------------------------------------------------------------------------


def test_audit_defaults_are_on():
    config = AuditConfig()
    assert config.enabled and not config.raw_text
    assert (config.checkpoint_records, config.checkpoint_seconds) == (1000, 60.0)
    assert config.segment_bytes == 64 * 1024 * 1024


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"audit_key_env": "K", "audit_key_file": "k.pem"}, "not both"),
        ({"audit_key_env": "NOT A NAME"}, "environment variable name"),
    ],
)
def test_server_key_settings_are_validated(tmp_path, trained_config, change, expected):
    data = audit_data(tmp_path, trained_config)
    data["server"].update(change)
    with pytest.raises(ConfigError, match=expected) as error:
        write_config(tmp_path, data)
    assert "server" in str(error.value)


@pytest.mark.parametrize(
    ("change", "where"),
    [
        ({"segment_bytes": 100}, "tenants.retail.audit.segment_bytes"),
        ({"checkpoint_records": 0}, "tenants.retail.audit.checkpoint_records"),
        ({"checkpoint_seconds": 0}, "tenants.retail.audit.checkpoint_seconds"),
        ({"raw": True}, "tenants.retail.audit.raw"),
    ],
)
def test_tenant_audit_settings_are_validated(tmp_path, trained_config, change, where):
    with pytest.raises(ConfigError, match=where.replace(".", r"\.")):
        write_config(tmp_path, audit_data(tmp_path, trained_config, **change))


def _rsa_pem() -> bytes:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "server.audit_key_file: cannot read .*audit-key.pem: No such file"),
        (b"not a key", "server.audit_key_file: not an Ed25519 private key"),
        ("rsa", "server.audit_key_file: the PEM key is .*RSA.*not an Ed25519 key"),
    ],
)
def test_a_bad_key_file_is_a_config_error(tmp_path, trained_config, content, expected):
    data = audit_data(tmp_path, trained_config)
    data["server"]["audit_key_file"] = "audit-key.pem"
    loaded = write_config(tmp_path, data)
    if content is not None:
        (tmp_path / "audit-key.pem").write_bytes(_rsa_pem() if content == "rsa" else content)
    with pytest.raises(ConfigError, match=expected):
        AuditTrail.from_config(loaded)
    assert not (tmp_path / "audit").exists()  # nothing opened before the key was read


def test_the_key_from_the_environment(tmp_path, trained_config, monkeypatch):
    data = audit_data(tmp_path, trained_config)
    data["server"]["audit_key_env"] = "PLEXUS_TEST_AUDIT_KEY"
    loaded = write_config(tmp_path, data)
    monkeypatch.delenv("PLEXUS_TEST_AUDIT_KEY", raising=False)
    with pytest.raises(ConfigError, match="PLEXUS_TEST_AUDIT_KEY is not set"):
        AuditTrail.from_config(loaded)
    key = new_key()
    raw = key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    monkeypatch.setenv("PLEXUS_TEST_AUDIT_KEY", raw.hex())
    trail = AuditTrail.from_config(loaded)
    assert trail is not None and trail.logs["retail"].key_id == key_id(key.public_key())
    trail.close()


def test_key_forms():
    key = new_key()
    raw = key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    expected = key_id(key.public_key())
    for form in (pem_of(key), raw, raw.hex().encode(), raw.hex().encode() + b"\n"):
        assert key_id(parse_private_key(form).public_key()) == expected
    public = key.public_key()
    for form in (public_pem(public).encode(), pem_of(key)):
        assert key_id(parse_public_key(form)) == expected
    with pytest.raises(ValueError, match="not an Ed25519 private key"):
        parse_private_key(b"x" * 31)


def test_since_accepts_dates_and_offsets():
    assert parse_time("2025-01-31") == "2025-01-31T00:00:00.000000Z"
    assert parse_time("2025-01-31T12:00:00+02:00") == "2025-01-31T10:00:00.000000Z"
    assert parse_time("2025-01-31T12:00:00.5Z") == "2025-01-31T12:00:00.500000Z"
    with pytest.raises(ValueError):
        parse_time("31/01/2025")


def test_the_audit_folder_must_be_writable(tmp_path, trained_config):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    (tmp_path / "ro").mkdir()
    data = audit_data(tmp_path / "ro", trained_config)
    loaded = write_config(tmp_path, data)
    (tmp_path / "ro").chmod(0o500)
    try:
        with pytest.raises(ConfigError, match="server.audit_dir: cannot write the audit log"):
            AuditTrail.from_config(loaded)
    finally:
        (tmp_path / "ro").chmod(0o700)
