"""The operator process stays torch-free and refuses bad invocations with a clear message."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

BIN = str(Path(sys.executable).parent / "diffusion-operator")


def test_operator_modules_never_import_torch_or_cache_dit():
    code = (
        "import sys\n"
        "import diffusion_operator.runner, diffusion_operator.handlers, diffusion_operator.builders\n"
        "import diffusion_operator.validation, diffusion_operator.kube, diffusion_operator.rbac\n"
        "bad = [m for m in ('torch', 'cache_dit', 'diffusers', 'torchao') if m in sys.modules]\n"
        "print(bad); sys.exit(1 if bad else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_run_without_namespace_scope_is_refused():
    env = {k: v for k, v in os.environ.items() if k != "WATCH_NAMESPACE"}
    result = subprocess.run([BIN, "run"], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 2
    assert "--namespace NS (repeatable) or --all-namespaces" in result.stderr


def test_run_without_credentials_fails_clearly(tmp_path):
    env = dict(os.environ, KUBECONFIG=str(tmp_path / "missing"), KUBERNETES_SERVICE_HOST="")
    result = subprocess.run(
        [BIN, "run", "--namespace", "x", "--metrics-port", "0", "--health-port", "0"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 1
    assert "cannot load Kubernetes credentials" in result.stderr


def test_leader_election_arguments(monkeypatch):
    from diffusion_operator.runner import DEFAULT_LEASE_NAME, parse_args

    monkeypatch.delenv("POD_NAMESPACE", raising=False)
    monkeypatch.delenv("POD_NAME", raising=False)
    args = parse_args(["--namespace", "a", "--namespace", "b"])
    assert args.leader_elect and args.leader_election_namespace == "a"  # the first watched namespace
    assert args.leader_election_id == DEFAULT_LEASE_NAME
    other = parse_args(["--namespace", "a"])
    assert args.leader_identity and args.leader_identity != other.leader_identity  # never shared by default
    monkeypatch.setenv("POD_NAME", "op-7f9c-x2")
    monkeypatch.setenv("POD_NAMESPACE", "ops")
    args = parse_args(["--all-namespaces"])
    assert (args.leader_identity, args.leader_election_namespace) == ("op-7f9c-x2", "ops")
    assert not parse_args(["--all-namespaces", "--no-leader-elect"]).leader_elect


def test_leader_election_misconfigurations_are_refused(monkeypatch, capsys):
    import pytest
    from diffusion_operator.runner import parse_args

    monkeypatch.delenv("POD_NAMESPACE", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--all-namespaces"])
    assert exit_info.value.code == 2 and "--leader-election-namespace" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["-n", "a", "--lease-duration", "5", "--renew-deadline", "5"])
    assert "--renew-deadline < --lease-duration" in capsys.readouterr().err
