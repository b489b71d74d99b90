"""The `plexus` command, run as a user runs it: help, errors and exit codes, train, route,
models, keys, mirror, ingest, demo, serve + signals (the --remote verbs: test_cli_remote.py)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml

from router import cli
from router._generated.plexus.v1 import plexus_pb2 as pb
from router._generated.plexus.v1 import plexus_pb2_grpc as pb_grpc
from router.config import ApiKeyConfig, LoadedConfig, hash_api_key, load_config
from router.context.collections import Collection
from router.keys import KeyRing

from .conftest import ADMIN_KEY, DEMO_KEY, KNOWLEDGE, ROOT, demo_config_data


def plexus(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "router.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


@pytest.mark.parametrize(
    "command",
    [
        [],
        ["serve"],
        ["train"],
        ["route"],
        ["models"],
        ["models", "list"],
        ["models", "load"],
        ["models", "rollback"],
        ["collections"],
        ["collections", "reload"],
        ["keys"],
        ["keys", "new"],
        ["mirror"],
        ["mirror", "load"],
        ["ingest"],
        ["bench"],
        ["bench", "latency"],
        ["bench", "decision"],
        ["bench", "accuracy"],
        ["bench", "retrieval"],
        ["bench", "orchestrate"],
        ["demo"],
    ],
)
def test_help_on_every_command(command):
    result = plexus(*command, "--help")
    assert result.returncode == 0, result.stderr
    assert "usage: plexus" in result.stdout


def one_line_error(stderr: str) -> str:
    """The command's error: exactly one line, no traceback."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert lines[0].startswith("plexus"), stderr
    return lines[0]


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``plexus ARGV`` in this process: (exit status, stdout, stderr)."""
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_train_route_and_models_on_disk(tmp_path: Path):
    data = demo_config_data(tmp_path / "models")
    del data["tenants"]["wholesale"]
    config = tmp_path / "plexus.yaml"
    config.write_text(yaml.safe_dump(data))
    trained = plexus("train", str(config), "--tenant", "retail")
    assert trained.returncode == 0, trained.stderr
    assert "retail: v0001 (fast)" in trained.stdout
    assert "inscope_accuracy=" in trained.stdout
    for stage in ("reading examples", "featurizing", "fitting", "calibrating", "exporting"):
        assert stage in trained.stderr  # progress is shown, stage by stage
    assert "a server started now serves it" in trained.stdout
    routed = plexus(
        "route",
        str(config),
        "--app",
        "storefront",
        "--text",
        "where is my order? it has not arrived",
    )
    assert routed.returncode == 0, routed.stderr
    decision = json.loads(routed.stdout)
    assert decision["model_version"] == "v0001"
    assert decision["route"] == "order_status"
    listed = plexus("models", "list", str(config))
    assert listed.returncode == 0 and "* v0001" in listed.stdout
    missing = plexus("models", "load", str(config), "v0042")
    assert missing.returncode == cli.EXIT_NOT_FOUND
    assert "no model 'v0042'" in one_line_error(missing.stderr)


def test_train_says_when_active_stays_and_activate_moves_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    data = demo_config_data(tmp_path / "models")
    del data["tenants"]["wholesale"]
    config = str(tmp_path / "plexus.yaml")
    Path(config).write_text(yaml.safe_dump(data))
    active = tmp_path / "models" / "retail" / "ACTIVE"
    assert run_cli(capsys, "train", config)[0] == 0
    assert run_cli(capsys, "train", config)[0] == 0
    # a load on disk points ACTIVE at v0001; the next training must say it is not served
    code, out, _ = run_cli(capsys, "models", "load", config, "v0001", "--force")
    assert code == 0 and json.loads(out)["active_version"] == "v0001"
    code, out, _ = run_cli(capsys, "train", config)
    assert code == 0
    assert "v0003 trained; ACTIVE stays v0001 (pass --activate to serve it" in out
    assert "plexus models load --remote ADDR --api-key ADMIN_KEY v0003" in out
    assert active.read_text().strip() == "v0001"
    code, out, _ = run_cli(capsys, "train", config, "--activate")
    assert code == 0 and "v0004 trained; a server started now serves it" in out
    assert active.read_text().strip() == "v0004"
    code, out, _ = run_cli(capsys, "models", "list", config)
    assert "* v0004" in out and "  v0003" in out


def test_invalid_config_is_a_clear_error(tmp_path: Path):
    config = tmp_path / "bad.yaml"
    config.write_text("server: {port: 1, max_batch: 0}\ntenants: {}\n")
    result = plexus("train", str(config))
    assert result.returncode == cli.EXIT_USAGE
    line = one_line_error(result.stderr)
    assert "server.port: unknown key" in line and "server.max_batch" in line
    missing = plexus("serve", str(tmp_path / "nope.yaml"))
    assert missing.returncode == cli.EXIT_USAGE
    assert "nope.yaml: cannot read" in one_line_error(missing.stderr)


def test_usage_errors_are_one_line_with_the_help_to_read(capsys: pytest.CaptureFixture[str]):
    with pytest.raises(SystemExit) as exited:
        cli.main(["route", "--text", "hello"])
    assert exited.value.code == cli.EXIT_USAGE
    line = one_line_error(capsys.readouterr().err)
    assert "--app" in line and "plexus route --help" in line
    code, _, err = run_cli(
        capsys, "models", "load", "a.yaml", "v0002", "--remote", "127.0.0.1:1", "--api-key", "k"
    )
    assert code == cli.EXIT_USAGE
    assert "with --remote give only the VERSION" in one_line_error(err)
    code, _, err = run_cli(capsys, "models", "rollback")
    assert code == cli.EXIT_USAGE and "--remote" in one_line_error(err)
    code, _, err = run_cli(capsys, "route", "--remote", "127.0.0.1:1", "--app", "a", "--text", "t")
    assert code == cli.EXIT_USAGE and "--api-key" in one_line_error(err)


def test_verbose_shows_the_detail_before_or_after_the_command(
    trained_config: LoadedConfig, capsys: pytest.CaptureFixture[str]
):
    argv = [
        "route",
        str(trained_config.path),
        "--tenant",
        "retail",
        "--app",
        "nope",
        "--text",
        "hi",
    ]
    code, _, err = run_cli(capsys, *argv)
    assert code == cli.EXIT_NOT_FOUND
    assert "has no app 'nope'" in one_line_error(err)
    for verbose in (["-v", *argv], [*argv, "-v"]):
        code, _, err = run_cli(capsys, *verbose)
        assert code == cli.EXIT_NOT_FOUND
        assert "Traceback" in err and err.strip().splitlines()[-1].startswith("plexus: error:")


def test_serve_on_a_port_in_use_fails_fast_in_one_line(
    trained_config: LoadedConfig, tmp_path: Path
):
    # No model is trained under this copy's model_dir: had serve loaded anything before
    # checking its address, it would fail on the missing model instead.
    data = yaml.safe_load(trained_config.path.read_text())
    data["server"]["model_dir"] = str(tmp_path / "no-models")
    config = tmp_path / "plexus.yaml"
    config.write_text(yaml.safe_dump(data))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        result = plexus("serve", str(config), "--address", address, timeout=60)
    assert result.returncode == cli.EXIT_ADDRESS
    line = one_line_error(result.stderr)
    assert line == (
        f"plexus: error: address {address} is in use: pass --address or stop the other server"
    )


def test_keys_new_prints_a_key_and_its_entry(capsys: pytest.CaptureFixture[str]):
    code, out, _ = run_cli(capsys, "keys", "new", "--name", "ops", "--admin", "--apps", "a,b")
    assert code == 0
    key, entry = (line for line in out.splitlines() if not line.startswith("#"))
    [parsed] = yaml.safe_load(entry)
    assert parsed == {"name": "ops", "sha256": hash_api_key(key), "admin": True, "apps": ["a", "b"]}
    ApiKeyConfig.model_validate(parsed)
    assert len(key) >= 40
    code, out, _ = run_cli(capsys, "keys", "new")
    other_key, other_entry = (line for line in out.splitlines() if not line.startswith("#"))
    assert other_key != key and "admin" not in other_entry
    assert yaml.safe_load(other_entry)[0]["name"] == f"key-{hash_api_key(other_key)[:8]}"
    code, _, err = run_cli(capsys, "keys", "new", "--apps", "ok,not ok")
    assert code == cli.EXIT_USAGE and "'not ok'" in one_line_error(err)


def test_the_example_ships_a_demo_admin_key():
    loaded = load_config(ROOT / "examples" / "retail" / "plexus.yaml")
    keys = KeyRing(loaded)
    assert keys.authenticate(ADMIN_KEY).admin
    assert not keys.authenticate(DEMO_KEY).admin
    text = (ROOT / "examples" / "retail" / "plexus.yaml").read_text()
    assert "retail-admin-key" in text and "plexus keys new" in text  # named as a demo secret


def test_mirror_load_builds_the_sqlite_file_atomically(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
):
    data = demo_config_data(tmp_path / "models")
    data["tenants"]["retail"]["sql_mirrors"]["stores"]["url"] = "sqlite:///mirrors/db/stores.db"
    config = tmp_path / "conf" / "plexus.yaml"
    config.parent.mkdir()
    config.write_text(yaml.safe_dump(data))
    script = ROOT / "examples" / "retail" / "stores.sql"
    monkeypatch.chdir(tmp_path)  # the mirror is relative to the config file, not to here
    argv = ["mirror", "load", str(config), "--tenant", "retail", "--mirror", "stores"]
    code, out, _ = run_cli(capsys, *argv, str(script))
    assert code == 0
    database = tmp_path / "conf" / "mirrors" / "db" / "stores.db"
    assert str(database) in out and "stores (30 rows)" in out
    with sqlite3.connect(database) as db:
        assert db.execute("SELECT name FROM stores WHERE store_id = '0077'").fetchone()
    before = database.read_bytes()
    broken = tmp_path / "broken.sql"
    broken.write_text("CREATE TABLE t (a);\nINSERT INTO nowhere VALUES (1);\n")
    code, _, err = run_cli(capsys, *argv, str(broken))
    assert code == cli.EXIT_INVALID and "no such table: nowhere" in one_line_error(err)
    assert database.read_bytes() == before  # the old mirror stays whole
    assert sorted(p.name for p in database.parent.iterdir()) == ["stores.db"]  # no temporaries
    code, _, err = run_cli(capsys, "mirror", "load", str(config), "--tenant", "retail", "x.sql")
    assert code == cli.EXIT_NOT_FOUND and "x.sql: cannot read" in one_line_error(err)


def test_reingesting_from_another_directory_changes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
):
    data = demo_config_data(tmp_path / "models")
    data["server"]["data_dir"] = "data"
    config = tmp_path / "demo" / "plexus.yaml"
    policies = sorted(p.name for p in KNOWLEDGE.iterdir() if p.suffix != ".jsonl")
    (config.parent / "knowledge").mkdir(parents=True)
    for name in policies:
        shutil.copy(KNOWLEDGE / name, config.parent / "knowledge" / name)
    config.write_text(yaml.safe_dump(data))
    outside = tmp_path / "elsewhere" / "notes.md"
    outside.parent.mkdir()
    outside.write_text("# Notes\n\nGift cards never expire and work in every store.")
    base = ["ingest", str(config), "--tenant", "retail", "--collection", "policies"]

    monkeypatch.chdir(config.parent)  # by folder and relative paths, from the config's folder
    code, out, _ = run_cli(capsys, *base, "knowledge", "../elsewhere/notes.md")
    assert code == 0 and f"added {len(policies) + 1}, replaced 0" in out
    monkeypatch.chdir(outside.parent)  # by file and absolute paths, from elsewhere
    files = [str(config.parent / "knowledge" / name) for name in policies]
    code, out, _ = run_cli(capsys, *base, *files, "notes.md")
    assert code == 0
    assert f"added 0, replaced 0, unchanged {len(policies) + 1}, deleted 0" in out
    assert "version v0001" in out  # nothing changed: no new version

    loaded = load_config(config)
    collection = Collection.load(
        loaded.data_dir, "retail", "policies", loaded.tenant("retail").collections["policies"]
    )
    _, ids = collection.search(np.zeros((1, collection.dim), np.float32), collection.size)
    sources = {chunk.source for chunk in collection.chunks(ids[0])}
    assert sources == {f"knowledge/{name}" for name in policies} | {str(outside.resolve())}


def test_demo_runs_from_any_directory_in_a_working_copy(tmp_path: Path):
    result = subprocess.run(
        [sys.executable, "-m", "router.cli", "demo"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    workdir = tmp_path / "plexus-demo"
    assert f"copied the retail example into {workdir}" in result.stdout
    assert "plexus serve plexus-demo/plexus.yaml" in result.stdout
    assert (workdir / "plexus.yaml").is_file() and (workdir / "models" / "retail").is_dir()
    assert (workdir / "data" / "stores.db").is_file()
    assert "final: backend" in result.stdout


def _start_server(config: Path) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "router.cli", "serve", str(config), "--address", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    line = process.stdout.readline()
    assert "plexus serving on" in line, process.stderr.read()
    return process, line.strip().rsplit(" ", 1)[1]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_drains_on_signal_and_exits_zero(trained_config: LoadedConfig, sig):
    process, address = _start_server(trained_config.path)
    results: list[str] = []
    stop = threading.Event()

    def load() -> None:
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.RouterStub(channel)
            while not stop.is_set():
                try:
                    stub.Route(
                        pb.RouteRequest(app="storefront", text="where is my order"),
                        metadata=(("x-api-key", DEMO_KEY),),
                        timeout=5,
                    )
                    results.append("OK")
                except grpc.RpcError as exc:
                    results.append(exc.code().name)
                    time.sleep(0.01)

    worker = threading.Thread(target=load)
    worker.start()
    try:
        while results.count("OK") < 50:
            time.sleep(0.01)
        with grpc.insecure_channel(address) as channel:
            admin = pb_grpc.AdminStub(channel)
            reply = admin.ListModels(
                pb.ListModelsRequest(), metadata=(("x-api-key", ADMIN_KEY),), timeout=10
            )
            assert reply.models
        process.send_signal(sig)
        assert process.wait(timeout=30) == 0
    finally:
        stop.set()
        worker.join(timeout=10)
        if process.poll() is None:
            process.kill()
    # calls either completed or were refused once shutdown began (grpc core answers those
    # CANCELLED while stopping, UNAVAILABLE once the port is closed); none failed otherwise
    assert set(results) <= {"OK", "UNAVAILABLE", "CANCELLED"}, set(results)
    assert results.count("OK") >= 50
    assert "Traceback" not in process.stderr.read()
