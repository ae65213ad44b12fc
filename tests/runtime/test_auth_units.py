"""api.auth without a server: the key ring (what counts as a key file, reloads, refusals) and the
OpenAPI document with and without keys."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from diffusion_runtime.api.app import create_app
from diffusion_runtime.api.auth import KeyRing, bearer
from diffusion_runtime.api.state import RuntimeState
from diffusion_runtime.contract.config import ConfigError, config_errors, config_from_dict
from diffusion_runtime.metrics import RuntimeMetrics
from starlette.requests import Request


def ring(tmp_path: Path, **keys: str) -> KeyRing:
    for name, key in keys.items():
        (tmp_path / name).write_text(key)
    return KeyRing(tmp_path)


def test_key_files_names_and_contents(tmp_path):
    (tmp_path / "..data").mkdir()
    (tmp_path / "..2026_12_05").mkdir()
    (tmp_path / ".hidden").write_text("sk-hidden")
    (tmp_path / "empty").write_text("  \n")
    keys = ring(tmp_path, **{"team-a": "sk-a\n", "b.v2": "  sk-b  "})
    assert keys.names == ["b.v2", "team-a"]  # dotfiles, folders and empty files are no keys
    assert keys.match("sk-a") == "team-a" and keys.match("sk-b") == "b.v2"
    assert keys.match("sk-hidden") is None and keys.match("") is None and keys.match("sk-a\n") is None


def test_reload_on_rename_in_place_write_and_removal(tmp_path):
    keys = ring(tmp_path, k="sk-one")
    (tmp_path / "tmp").write_text("sk-two")
    os.replace(tmp_path / "tmp", tmp_path / "k")
    assert keys.match("sk-one") is None and keys.match("sk-two") == "k"
    (tmp_path / "k").write_text("sk-three-longer")
    assert keys.match("sk-three-longer") == "k"
    (tmp_path / "k2").write_text("sk-four")
    assert keys.match("sk-four") == "k2"
    (tmp_path / "k").unlink()
    assert keys.match("sk-three-longer") is None
    assert keys.reload() is False  # nothing changed since: no re-read


def test_no_key_or_no_folder_refused_at_start(tmp_path):
    with pytest.raises(ConfigError, match="server.auth_keys_dir: no key file"):
        KeyRing(tmp_path)
    with pytest.raises(ConfigError, match="server.auth_keys_dir: cannot read"):
        KeyRing(tmp_path / "missing")
    assert [
        str(e)
        for e in config_errors(config_from_dict({"model": {"uri": "x"}, "server": {"auth_keys_dir": "k"}}))
    ] == ["server.auth_keys_dir: expected an absolute path, got 'k'"]


@pytest.mark.parametrize(
    ("header", "token"),
    [
        ("Bearer sk-1", "sk-1"),
        ("bearer   sk-1 ", "sk-1"),
        ("Basic sk-1", None),
        ("Bearer ", None),
        ("", None),
    ],
)
def test_bearer_header(header, token):
    scope = {"type": "http", "headers": [(b"authorization", header.encode())] if header else []}
    assert bearer(Request(scope)) == token


def _openapi(server: dict) -> dict:
    state = RuntimeState(config_from_dict({"model": {"uri": "x"}, "server": server}), RuntimeMetrics())
    return create_app(state).openapi()


def test_openapi_declares_bearer_only_when_keys_are_on(tmp_path):
    off = _openapi({})
    assert "securitySchemes" not in off["components"]
    assert all("security" not in op for item in off["paths"].values() for op in item.values())
    (tmp_path / "k").write_text("sk-1")
    on = _openapi({"auth_keys_dir": str(tmp_path)})
    assert on["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    secured = {p for p, item in on["paths"].items() for op in item.values() if "security" in op}
    assert secured == {p for p in on["paths"] if p.startswith("/v1/")} and "/v1/models" in secured
    assert "/health" not in secured and "/metrics" not in secured
