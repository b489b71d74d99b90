"""Configuration validation: every error names the file, the key path and the expectation."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from router.config import ConfigError, hash_api_key, load_config

from .conftest import DEMO_CONFIG


def write(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "plexus.yaml"
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def demo() -> dict:
    return yaml.safe_load(DEMO_CONFIG.read_text())


def test_demo_config_is_valid():
    loaded = load_config(DEMO_CONFIG)
    tenant = loaded.tenant("retail")
    assert len(tenant.routes) >= 8
    assert all(len(route.examples) >= 25 for route in tenant.routes)
    assert tenant.api_keys[0].sha256 == hash_api_key("retail-demo-key")


@pytest.mark.parametrize(
    ("mutate", "path_fragment", "expectation"),
    [
        (lambda d: d["server"].update(prot=1), "server.prot", "unknown key"),
        (lambda d: d["server"].update(max_text_chars="many"), "server.max_text_chars", "integer"),
        (lambda d: d["server"].update(max_text_chars=0), "server.max_text_chars", "greater than 0"),
        (lambda d: d["server"].update(address="nowhere"), "server.address", "HOST:PORT"),
        (
            lambda d: d["tenants"]["retail"]["model"].update(threshold=1.5),
            "tenants.retail.model.threshold",
            "[0, 1]",
        ),
        (
            lambda d: d["tenants"]["retail"]["model"].update(fallback_route="nope"),
            "tenants.retail",
            "fallback_route",
        ),
        (
            lambda d: d["tenants"]["retail"]["api_keys"][0].update(sha256="secret"),
            "tenants.retail.api_keys.0.sha256",
            "64 lowercase hex",
        ),
        (
            lambda d: d["tenants"]["retail"]["routes"][0].pop("target"),
            "tenants.retail.routes.0.target",
            "required",
        ),
        (
            lambda d: d["tenants"]["retail"]["apps"]["store_ops"].update(routes=["ghost"]),
            "tenants.retail",
            "unknown routes",
        ),
        (
            lambda d: d["tenants"]["retail"]["routes"].append(d["tenants"]["retail"]["routes"][0]),
            "tenants.retail",
            "duplicate route",
        ),
        (
            lambda d: d["tenants"]["retail"]["model"].update(family="huge"),
            "tenants.retail.model.family",
            "'fast' or 'accurate'",
        ),
    ],
)
def test_invalid_config_names_file_key_and_expectation(
    tmp_path, mutate, path_fragment, expectation
):
    data = demo()
    mutate(data)
    path = write(tmp_path, data)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message
    assert path_fragment in message
    assert expectation in message


def test_a_key_shared_by_two_tenants_is_refused(tmp_path):
    data = demo()
    other = yaml.safe_load(yaml.safe_dump(data["tenants"]["retail"]))
    data["tenants"]["copy"] = other
    with pytest.raises(ConfigError, match="also a key of tenant"):
        load_config(write(tmp_path, data))


def test_yaml_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "server: [unclosed"))
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(write(tmp_path, "- a list"))
