"""`helm upgrade` from the previous chart to this one, with a CRD change: the new field reaches the cluster.

The previous chart is taken from git (PREVIOUS_CHART_REF: the last commit before spec.server.webhookAllow
and webhookSecretRef were added to the CRD). Helm installs a chart's crds/ on the first install only
and never upgrades them, so after `helm upgrade` the cluster still has the old schema (checked: the
control); the new chart's operator applies the CRD it was built with when it starts leading
(crd.py). Then a CR with the new field is accepted (kubectl's strict field validation) and the field
is kept (not pruned), and the CR created under the previous chart is still there, every field it was
written with unchanged (the new schema's defaults for the fields it did not have appear on read).

Without the real node the chart's pods are kwok fakes: the operator runs here as a subprocess with
the chart ServiceAccount's token only (what the chart's pod would hold), in the chart's election.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import time
import uuid
from pathlib import Path

import pytest
import yaml
from chartlib import CHART, REPO, forbidden_lines, run_helm
from diffusion_dev import on_fake_cpu_node

pytestmark = pytest.mark.cluster

PREVIOUS_CHART_REF = "4fedb44^"  # the chart before the webhook fields (spec.server.webhookAllow) existed
CRD_NAME = "diffusiondeployments.diffusion.dev"
NEW_FIELD = ("server", "webhookAllow")
SAMPLE = REPO / "samples" / "tiny-cpu.yaml"


def previous_chart(dest: Path) -> Path:
    """charts/diffusion-operator as of PREVIOUS_CHART_REF, extracted under `dest`."""
    proc = subprocess.run(
        ["git", "-C", str(REPO), "archive", "--format=tar", PREVIOUS_CHART_REF, "charts/diffusion-operator"],
        capture_output=True,
        timeout=60,
    )
    if proc.returncode != 0:
        pytest.fail(
            f"git archive {PREVIOUS_CHART_REF} failed (a checkout with history is needed): {proc.stderr.decode()}"
        )
    with tarfile.open(fileobj=io.BytesIO(proc.stdout)) as tar:
        tar.extractall(dest, filter="data")
    return dest / "charts" / "diffusion-operator"


def git_show(spec: str) -> str:
    proc = subprocess.run(["git", "-C", str(REPO), "show", spec], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def schema_has_new_field(crd: dict) -> bool:
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    return NEW_FIELD[1] in spec[NEW_FIELD[0]]["properties"]


def _added(before, after, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], object]]:
    """Fields of `after` that `before` lacks, as (path, value); any field of `before` changed fails."""
    if not (isinstance(before, dict) and isinstance(after, dict)):
        assert after == before, (path, before, after)
        return []
    out: list[tuple[tuple[str, ...], object]] = []
    for key in before:
        assert key in after, (path + (key,), "dropped")
        out += _added(before[key], after[key], path + (key,))
    return out + [(path + (key,), after[key]) for key in after if key not in before]


def _schema_at(schema: dict, path: tuple[str, ...]) -> dict:
    for key in path:
        schema = schema["properties"][key]
    return schema


def live_crd(cluster) -> dict:
    return json.loads(cluster.kubectl("get", "crd", CRD_NAME, "-o", "json").stdout)


def _wait(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def test_helm_upgrade_from_the_previous_chart_brings_the_new_crd_field(
    cluster, helm_bin, namespace, tmp_path, chart_operator_image
):
    old_chart = previous_chart(tmp_path / "previous")
    old_crd = old_chart / "crds" / f"diffusion.dev_{CRD_NAME.split('.')[0]}.yaml"
    assert not schema_has_new_field(yaml.safe_load(old_crd.read_text())), (
        "the previous CRD must lack the field"
    )
    assert schema_has_new_field(yaml.safe_load((CHART / "crds" / old_crd.name).read_text()))

    # the cluster as the previous chart left it: its CRD (a CRD from an earlier test in this session
    # is replaced whole; helm install skips an existing CRD exactly as it would have then)
    if cluster.kubectl("get", "crd", CRD_NAME, check=False).returncode == 0:
        cluster.kubectl("replace", "-f", str(old_crd))
    kube = ("--kubeconfig", str(cluster.kubeconfig))
    release = f"up-{uuid.uuid4().hex[:6]}"
    fullname = f"{release}-diffusion-operator"
    run_helm(
        helm_bin, "install", release, str(old_chart), "-n", namespace, *kube, "--wait", "--timeout", "120s"
    )
    try:
        assert not schema_has_new_field(live_crd(cluster))
        cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", f"crd/{CRD_NAME}")

        # a CR made under the previous chart
        old_cr = on_fake_cpu_node(yaml.safe_load(git_show(f"{PREVIOUS_CHART_REF}:samples/tiny-cpu.yaml")))
        old_cr["metadata"] = {"name": "before-upgrade"}
        _wait(
            lambda: (
                cluster.kubectl(
                    "apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(old_cr), check=False
                ).returncode
                == 0
            ),
            30,
            "the CR to be accepted",
        )
        before = json.loads(
            cluster.kubectl("get", "dd", "before-upgrade", "-n", namespace, "-o", "json").stdout
        )

        upgrade = run_helm(
            helm_bin, "upgrade", release, str(CHART), "-n", namespace, *kube, "--wait", "--timeout", "120s"
        )
        assert "STATUS: deployed" in upgrade.stdout and "REVISION: 2" in upgrade.stdout, upgrade.stdout
        if cluster.node is None:
            # the control: Helm left the old CRD (the chart's pods are kwok fakes: nobody applied it yet)
            assert not schema_has_new_field(live_crd(cluster)), (
                "helm upgrade changed crds/: the control is void"
            )

            # the new chart's operator, with the chart's token only, in the chart's election
            cluster.kubectl("scale", "deployment", fullname, "-n", namespace, "--replicas=0")
            token = cluster.token_for(namespace, fullname)
            kubeconfig = cluster.kubeconfig_for_token(token, tmp_path / "sa.kubeconfig")
            log_path = tmp_path / "operator.log"
            operator = subprocess.Popen(
                [str(Path(sys.executable).parent / "diffusion-operator"), "run", "--namespace", namespace]
                + [
                    "--health-port",
                    "0",
                    "--metrics-port",
                    "0",
                    "--log-format",
                    "plain",
                    "--resync-seconds",
                    "0",
                ]
                + ["--leader-election-id", fullname, "--leader-identity", "upgraded-operator"],
                env=dict(os.environ, KUBECONFIG=str(kubeconfig)),
                stdout=log_path.open("w"),
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        else:
            operator, log_path = None, None  # the chart's real pods run the new operator
        try:
            started = time.monotonic()
            crd = _wait(
                lambda: next((c for c in [live_crd(cluster)] if schema_has_new_field(c)), None),
                90,
                "the operator to apply its CRD",
            )
            print(f"\nCRD upgraded {time.monotonic() - started:.1f} s after the operator started")
            assert crd["metadata"]["annotations"]["diffusion.dev/operator-version"]
            cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", f"crd/{CRD_NAME}")

            # the new field: accepted by strict validation, and kept
            new_cr = on_fake_cpu_node(yaml.safe_load(SAMPLE.read_text()))
            new_cr["metadata"] = {"name": "after-upgrade"}
            new_cr["spec"].setdefault("server", {})[NEW_FIELD[1]] = ["10.0.0.0/8", "hooks.internal"]

            def accepted():
                proc = cluster.kubectl(
                    "apply", "--validate=strict", "-n", namespace, "-f", "-",
                    input=yaml.safe_dump(new_cr), check=False,
                )  # fmt: skip
                return proc.returncode == 0

            _wait(accepted, 30, "the CR with the new field to be accepted")
            stored = json.loads(
                cluster.kubectl("get", "dd", "after-upgrade", "-n", namespace, "-o", "json").stdout
            )
            assert stored["spec"]["server"][NEW_FIELD[1]] == ["10.0.0.0/8", "hooks.internal"], stored["spec"]
            # ...and still there after the operator reconciled it (a status write, a resync)
            if operator is not None:
                _wait(
                    lambda: (
                        json.loads(
                            cluster.kubectl(
                                "get", "dd", "after-upgrade", "-n", namespace, "-o", "json"
                            ).stdout
                        )
                        .get("status", {})
                        .get("observedGeneration")
                    ),
                    60,
                    "the new CR reconciled",
                )
            again = json.loads(
                cluster.kubectl("get", "dd", "after-upgrade", "-n", namespace, "-o", "json").stdout
            )
            assert again["spec"]["server"][NEW_FIELD[1]] == ["10.0.0.0/8", "hooks.internal"]

            # no CR lost: the one from before the upgrade, same object, same spec
            after = json.loads(
                cluster.kubectl("get", "dd", "before-upgrade", "-n", namespace, "-o", "json").stdout
            )
            assert after["metadata"]["uid"] == before["metadata"]["uid"]
            # every field written before is unchanged; what the API server adds on read is exactly the
            # new schema's defaults for fields the previous CRD did not have
            added = _added(before["spec"], after["spec"])
            schema = live_crd(cluster)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"][
                "spec"
            ]
            for path, value in added:
                assert _schema_at(schema, path).get("default") == value, (path, value)
            if log_path is not None:
                log = log_path.read_text()
                assert forbidden_lines(log) == [], log[-3000:]
                assert "applied (schema updated)" in log, log[-3000:]
        finally:
            if operator is not None and operator.poll() is None:
                operator.terminate()
                try:
                    operator.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    operator.kill()
                    operator.wait()
    finally:
        run_helm(helm_bin, "uninstall", release, "-n", namespace, *kube, "--wait", check=False)
