"""`diffusion-dev demo` (what `make demo` runs): the README's quickstart on real pods, on this machine.

1. start the local cluster with its real node (containerd + kubelet + kube-proxy) and kwok GPU nodes;
2. build the Dockerfile's `operator` and `runtime` images with buildah (cached) and load them into
   the node under the names the chart and the CRD use;
3. `helm install` the chart into `diffusion-system` (PodSecurity `restricted`): the operator runs in
   the cluster with its own ServiceAccount;
4. put the tiny random-weight model on a volume (`pvc://tiny-model/tiny-flux`, the sample's source),
   `kubectl apply -f samples/tiny-cpu.yaml` into `demo` and wait for `Ready` (model loaded, warmed up);
5. `kubectl port-forward svc/tiny`, POST one generation, save the PNG, print a few metrics.

`--queue`: the chart also runs its queue server (Redis, the Dockerfile's `queue` image, its data on a
local volume), the sample gets `spec.queue: {}`, and the request goes through the front door
(`svc/tiny-frontdoor`, status.endpoint) to the runtime pod via the queue.

Everything started here is stopped before the command returns, and the host is put back.
"""

from __future__ import annotations

import argparse
import base64
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

from .build import repo_root

REPO = repo_root()
SAMPLE = REPO / "samples" / "tiny-cpu.yaml"
CRDS = REPO / "crds"
NAMESPACE = "demo"
OPERATOR_NAMESPACE = "diffusion-system"


def _step(message: str) -> None:
    print(f"==> {message}", flush=True)


def _wait_ready(cluster, name: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    last: dict = {}
    while time.monotonic() < deadline:
        out = cluster.kubectl("get", "dd", name, "-n", NAMESPACE, "-o", "json", check=False)
        if out.returncode == 0:
            last = json.loads(out.stdout)
            for cond in last.get("status", {}).get("conditions", []):
                if cond.get("type") == "Ready" and cond.get("status") == "True":
                    return last
        time.sleep(1)
    raise TimeoutError(f"DiffusionDeployment {name} not Ready after {timeout:.0f}s: {last.get('status')}")


def _port_forward(cluster, target: str, port: int) -> tuple[subprocess.Popen, int]:
    from .cluster import find_kubectl

    proc = subprocess.Popen(
        [find_kubectl(cluster.bin_dir), "--kubeconfig", str(cluster.kubeconfig), "port-forward", "-n", NAMESPACE,
         target, f":{port}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline()
    m = re.search(r"127\.0\.0\.1:(\d+)", line)
    if not m:
        proc.kill()
        raise RuntimeError(
            f"kubectl port-forward {target}: {line}{proc.stderr.read() if proc.stderr else ''}"
        )
    return proc, int(m.group(1))


def run_demo(output: Path, keep: bool, queue: bool = False) -> Path:
    from . import LocalCluster, ensure_binaries, images
    from .install import install_operator, install_with_queue, load_images, restricted
    from .workloads import model_volume, tiny_model_root, with_model_on_volume

    work = Path(tempfile.mkdtemp(prefix="diffusion-demo-"))
    forward: subprocess.Popen | None = None
    t0 = time.monotonic()
    _step("building or finding the cluster binaries (first run: a cold Go build, ~30 min)")
    ensure_binaries()
    _step("starting the local cluster: control plane, the real node, kwok GPU nodes")
    cluster = LocalCluster(real_node=True)
    cluster.start()
    timings: dict[str, float] = {"cluster": round(time.monotonic() - t0, 1)}
    try:
        assert cluster.node is not None
        print(f"    kubeconfig: {cluster.kubeconfig}  (up in {timings['cluster']:.1f}s)")
        print(cluster.kubectl("get", "nodes", "-L", "nvidia.com/gpu.product").stdout, end="")
        _step("images from the Dockerfile (buildah; cached by content hash), loaded into the node")
        t = time.monotonic()
        targets = images.TARGETS if queue else images.SERVING_TARGETS
        for image in load_images(cluster.node, targets).values():
            print(f"    {image.target}: {image.ref} ({image.size_bytes / 1e9:.2f} GB)")
        timings["images"] = round(time.monotonic() - t, 1)
        _step(f"helm install the chart into {OPERATOR_NAMESPACE} (PodSecurity restricted)")
        t = time.monotonic()
        cluster.kubectl("apply", "--server-side", "-f", str(CRDS))
        if queue:
            # the chart's queue server, its data on a local volume, its URL Secret in the demo namespace
            restricted(cluster, NAMESPACE)
            install_with_queue(cluster, OPERATOR_NAMESPACE, "diffusion-operator", [NAMESPACE])
        else:
            install_operator(cluster, OPERATOR_NAMESPACE, "diffusion-operator")
        timings["operator"] = round(time.monotonic() - t, 1)
        print(cluster.kubectl("get", "pods", "-n", OPERATOR_NAMESPACE, "-o", "wide").stdout, end="")

        _step("the tiny model on a volume: PersistentVolumeClaim tiny-model (pvc://tiny-model/tiny-flux)")
        restricted(cluster, NAMESPACE)
        cluster.apply(model_volume(NAMESPACE, tiny_model_root()))
        doc = with_model_on_volume(yaml.safe_load(SAMPLE.read_text()))
        if queue:
            doc["spec"]["queue"] = {}  # the chart's server (Secret diffusion-queue)
        _step(
            f"kubectl apply -n {NAMESPACE} -f {SAMPLE.relative_to(REPO)} (model: {doc['spec']['model']['uri']})"
        )
        t = time.monotonic()
        cluster.kubectl("apply", "-n", NAMESPACE, "-f", "-", input=yaml.safe_dump(doc))
        name = doc["metadata"]["name"]
        dd = _wait_ready(cluster, name, timeout=600)
        timings["ready"] = round(time.monotonic() - t, 1)
        print(cluster.kubectl("get", "dd,pods", "-n", NAMESPACE, "-o", "wide").stdout, end="")
        print(
            f"    status.endpoint: {dd['status'].get('endpoint')}  configHash: {dd['status'].get('configHash')}"
        )

        service = f"{name}-frontdoor" if queue else name  # status.endpoint's Service
        _step(f"kubectl port-forward svc/{service} :8000, then POST /v1/images/generations")
        forward, port = _port_forward(cluster, f"svc/{service}", 8000)
        base = f"http://127.0.0.1:{port}"
        body = json.dumps(
            {
                "prompt": "a lighthouse at dusk",
                "size": "64x64",
                "seed": 7,
                "num_inference_steps": 8,
                "response_format": "b64_json",
            }
        ).encode()
        request = urllib.request.Request(
            f"{base}/v1/images/generations", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=600) as response:
            result = json.loads(response.read())
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_bytes(base64.b64decode(result["data"][0]["b64_json"]))
        timing = {k: v for k, v in result.items() if k != "data"}
        print(f"    response (without image): {json.dumps(timing)}")
        if queue:  # the runtime pod's metrics (the front door's are the queue's)
            forward.terminate()
            forward.wait(10)
            forward, port = _port_forward(cluster, f"svc/{name}", 8000)
            base = f"http://127.0.0.1:{port}"
        with urllib.request.urlopen(f"{base}/metrics", timeout=10) as response:
            metrics = response.read().decode()
        shown = (
            "diffusion_images_generated_total",
            "diffusion_cache_steps_total",
            "diffusion_model_load_seconds",
            "diffusion_warmup_seconds",
        )
        for line in metrics.splitlines():
            if line.startswith(shown):
                print(f"    {line}")
        pod = cluster.kubectl("get", "pods", "-n", NAMESPACE, "-l",
                              f"app.kubernetes.io/name=diffusion-runtime,app.kubernetes.io/instance={name}",
                              "-o", "name").stdout.split()[0]  # fmt: skip
        print(f"    kubectl logs {pod} (last lines):")
        for line in cluster.kubectl("logs", "-n", NAMESPACE, pod, "--tail", "3").stdout.splitlines():
            print(f"      {line}")
        timings["total"] = round(time.monotonic() - t0, 1)
        print(
            f"\nImage written to {output.resolve()}  (total {timings['total']:.1f}s; {json.dumps(timings)})"
        )
        return output
    except BaseException:
        diag = cluster.kubectl("describe", "pods", "-A", check=False).stdout[-4000:]
        print(f"\n--- kubectl describe pods -A (tail) ---\n{diag}", file=sys.stderr)
        raise
    finally:
        _step("stopping the port-forward, the pods, the node and the control plane")
        if forward is not None:
            forward.terminate()
            forward.wait(10)
        cluster.stop()
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="diffusion-dev demo", description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--output", type=Path, default=Path("out/demo.png"), help="where to write the image")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument(
        "--queue",
        action="store_true",
        help="with the chart's queue server: the request goes through the front door",
    )
    args = parser.parse_args(argv)
    try:
        run_demo(args.output, args.keep, queue=args.queue)
    except Exception as exc:  # the demo reports, it does not dump a traceback on a user
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1
    return 0
