"""The `plexus` verbs that act on a running server (--remote), against a real server on an
ephemeral port: the README's forms, one-line errors and their exit statuses, one JSON shape."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from router import cli
from router.config import LoadedConfig, parse_config

from .conftest import ADMIN_KEY, DEMO_KEY, ROOT, RunningServer
from .test_cli import one_line_error, run_cli


@pytest.fixture(scope="module")
def remote(trained_config: LoadedConfig, tmp_path_factory) -> Iterator[tuple[str, Path]]:
    """A server on a private copy of the trained registry (ACTIVE v0001, v0002 beside it):
    its address and its configuration file."""
    root = tmp_path_factory.mktemp("remote")
    shutil.copytree(trained_config.model_dir, root, dirs_exist_ok=True)
    data = yaml.safe_load(trained_config.path.read_text())
    data["server"]["model_dir"] = str(root)
    path = root / "plexus.yaml"
    path.write_text(yaml.safe_dump(data))
    (root / "retail" / "ACTIVE").write_text("v0001\n")
    running = RunningServer(parse_config(data, path))
    yield running.address, path
    running.stop()


def on(address: str, key: str = ADMIN_KEY) -> list[str]:
    return ["--remote", address, "--api-key", key]


def test_models_verbs_in_the_readme_form_load_exactly_what_was_asked(remote):
    address, _ = remote

    def plexus(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "router.cli", *args],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=ROOT,
        )

    loaded = plexus("models", "load", *on(address), "v0002", "--force")
    assert loaded.returncode == 0, loaded.stderr
    assert json.loads(loaded.stdout)["active_version"] == "v0002"
    # the version after the options, or before them: always the one asked for
    refused = plexus("models", "load", "v0001", *on(address))  # v0001 scores lower held out
    assert refused.returncode == cli.EXIT_PRECONDITION
    assert one_line_error(refused.stderr).endswith("; pass --force to load it anyway")
    again = plexus("models", "load", "v0001", *on(address), "--force")
    assert again.returncode == 0, again.stderr
    status = json.loads(again.stdout)
    assert (status["active_version"], status["previous_version"]) == ("v0001", "v0002")
    listed = plexus("models", "list", *on(address))
    assert listed.returncode == 0 and "* v0001" in listed.stdout and "  v0002" in listed.stdout
    rolled = plexus("models", "rollback", *on(address))
    assert rolled.returncode == 0, rolled.stderr
    assert json.loads(rolled.stdout)["active_version"] == "v0002"
    restored = plexus("models", "load", *on(address), "v0001", "--force")
    assert restored.returncode == 0 and json.loads(restored.stdout)["active_version"] == "v0001"


def test_route_prints_one_shape_in_process_and_remote(remote, capsys):
    address, config = remote
    text = ["--app", "storefront", "--text", "is store #77 open on sunday?"]
    code, out, _ = run_cli(capsys, "route", *on(address, DEMO_KEY), *text)
    assert code == 0
    over_grpc = json.loads(out)
    code, out, _ = run_cli(capsys, "route", str(config), "--tenant", "retail", *text)
    assert code == 0
    in_process = json.loads(out)
    assert list(over_grpc) == list(in_process)  # the same keys, in the same order
    for name in ("route", "target", "confidence", "model_version", "threshold", "extracted"):
        assert over_grpc[name] == in_process[name], name
    assert in_process["extracted"] == {"store_id": "0077"}
    assert set(in_process["timings"]) >= {"prep", "route", "policy"}
    assert all(isinstance(a["confidence"], float) for a in in_process["alternatives"])


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize(
    ("argv", "key", "code", "says"),
    [
        (
            ["route", "--app", "storefront", "--text", "hi"],
            "wrong",
            cli.EXIT_PERMISSION,
            "UNAUTHENTICATED from {address}: unknown API key; check --api-key",
        ),
        (
            ["route", "--app", "nope", "--text", "hi"],
            DEMO_KEY,
            cli.EXIT_NOT_FOUND,
            "NOT_FOUND from {address}: tenant 'retail' has no app 'nope'; check the name",
        ),
        (
            ["route", "--app", "storefront", "--text", ""],
            DEMO_KEY,
            cli.EXIT_INVALID,
            "INVALID_ARGUMENT from {address}: text is empty; fix the request",
        ),
        (
            ["models", "list"],
            DEMO_KEY,
            cli.EXIT_PERMISSION,
            "PERMISSION_DENIED from {address}: this API key is not an admin key; use a key",
        ),
        (
            ["models", "load", "v0042"],
            ADMIN_KEY,
            cli.EXIT_NOT_FOUND,
            "NOT_FOUND from {address}: tenant 'retail' has no model 'v0042'",
        ),
        (
            ["collections", "reload", "policies"],
            ADMIN_KEY,
            cli.EXIT_NOT_FOUND,
            "NOT_FOUND from {address}:",
        ),
        (
            ["route", "--app", "storefront", "--text", "hi"],
            DEMO_KEY,
            cli.EXIT_UNAVAILABLE,
            "no Plexus server answers at {down}; start one with `plexus serve CONFIG`",
        ),
    ],
    ids=["wrong-key", "unknown-app", "empty-text", "not-admin", "no-version", "collection", "down"],
)
def test_every_remote_error_is_one_line_with_its_exit_status(remote, capsys, argv, key, code, says):
    address, _ = remote
    down = f"127.0.0.1:{_free_port()}"
    target = down if "{down}" in says else address
    exit_code, _, err = run_cli(capsys, *argv, *on(target, key))
    assert exit_code == code
    line = one_line_error(err)
    assert line.startswith("plexus: error: " + says.format(address=address, down=down)), line
    # -v after the verb shows the detail; the last line is still the one-line error
    exit_code, _, err = run_cli(capsys, *argv, *on(target, key), "-v")
    assert exit_code == code and "Traceback" in err
    assert err.strip().splitlines()[-1] == line


def test_rollback_with_nothing_to_restore_is_a_failed_precondition(trained_config, capsys):
    running = RunningServer(trained_config)  # a fresh server has served one version only
    try:
        code, _, err = run_cli(capsys, "models", "rollback", *on(running.address))
    finally:
        running.stop()
    assert code == cli.EXIT_PRECONDITION
    assert one_line_error(err).startswith(
        f"plexus: error: FAILED_PRECONDITION from {running.address}"
    )
