"""`diffusion-operator demo`: the whole flow on this machine, no GPU and no model hub needed.

1. start the local control plane (etcd, kube-apiserver, controller manager, scheduler, kwok GPU nodes);
2. install the CRD and start the operator as a subprocess;
3. `kubectl apply` the tiny CPU sample and wait for its `Ready` condition (kwok runs the pods);
4. read back the ConfigMap the operator rendered (runtime.yaml + cache-dit.yaml) and serve it with the
   real runtime on CPU, pointed at a tiny random-weight FLUX pipeline generated locally;
5. POST one image generation over HTTP, save the PNG, print where it is and a few metrics.

Everything started here is stopped before the command returns.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "samples" / "tiny-cpu.yaml"
CRDS = REPO / "crds"
NAMESPACE = "demo"


def _step(message: str) -> None:
    print(f"==> {message}", flush=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _bin(name: str) -> str:
    """A console script of this installation (same venv as the running interpreter)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def _wait_http(
    url: str, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered:\n{tail}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not ready after {timeout:.0f}s")


def _stop(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


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


def run_demo(output: Path, keep: bool) -> Path:
    from diffusion_operator.devcluster import LocalCluster, ensure_binaries

    work = Path(tempfile.mkdtemp(prefix="diffusion-demo-"))
    operator_proc: subprocess.Popen | None = None
    runtime_proc: subprocess.Popen | None = None
    t0 = time.monotonic()
    _step("building or finding the control-plane binaries (first run: a cold Go build, ~20-40 min)")
    ensure_binaries()
    _step("starting the local control plane with fake GPU nodes")
    cluster = LocalCluster()
    cluster.start()
    try:
        print(f"    kubeconfig: {cluster.kubeconfig}  (started in {time.monotonic() - t0:.1f}s)")
        cluster.kubectl("get", "nodes", "-L", "nvidia.com/gpu.product")
        _step("installing the CRD and starting the operator")
        cluster.kubectl("apply", "--server-side", "-f", str(CRDS))
        cluster.kubectl("wait", "--for=condition=Established", "crd/diffusiondeployments.diffusion.dev")
        cluster.kubectl("create", "namespace", NAMESPACE, check=False)
        env = dict(os.environ, KUBECONFIG=str(cluster.kubeconfig))
        operator_log = work / "operator.log"
        operator_proc = subprocess.Popen(
            [_bin("diffusion-operator"), "run", "--namespace", NAMESPACE],
            env=env,
            stdout=operator_log.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        _step(f"kubectl apply -f {SAMPLE.relative_to(REPO)}")
        cluster.kubectl("apply", "-n", NAMESPACE, "-f", str(SAMPLE))
        name = yaml.safe_load(SAMPLE.read_text())["metadata"]["name"]
        dd = _wait_ready(cluster, name, timeout=120)
        print(cluster.kubectl("get", "dd", "-n", NAMESPACE).stdout, end="")
        print(
            f"    status.endpoint: {dd['status'].get('endpoint')}  configHash: {dd['status'].get('configHash')}"
        )

        _step("reading back the ConfigMap the operator rendered")
        cm = json.loads(
            cluster.kubectl("get", "configmap", f"{name}-config", "-n", NAMESPACE, "-o", "json").stdout
        )
        config_dir = work / "config"
        config_dir.mkdir()
        for key, value in cm["data"].items():
            (config_dir / key).write_text(value)
        print(
            "    cache-dit.yaml:\n"
            + "".join(f"      {line}\n" for line in cm["data"].get("cache-dit.yaml", "").splitlines())
        )

        _step("generating the tiny random-weight FLUX pipeline (no download)")
        model_dir = work / "tiny-flux"
        subprocess.run([_bin("diffusion-runtime"), "tiny-model", str(model_dir)], check=True)
        runtime_cfg = yaml.safe_load((config_dir / "runtime.yaml").read_text())
        print(f"    the pods would load {runtime_cfg['model']['uri']}; here it is {model_dir}")
        runtime_cfg["model"]["uri"] = str(model_dir)
        runtime_cfg["device"] = "cpu"
        port = _free_port()
        runtime_cfg.setdefault("server", {}).update(host="127.0.0.1", port=port, metrics_port=0)
        (config_dir / "runtime.yaml").write_text(yaml.safe_dump(runtime_cfg, sort_keys=False))

        _step("serving it with the runtime on CPU (load, cache-dit, warmup, then ready)")
        runtime_log = work / "runtime.log"
        runtime_proc = subprocess.Popen(
            [_bin("diffusion-runtime"), "serve", "--config", str(config_dir / "runtime.yaml")],
            stdout=runtime_log.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        base = f"http://127.0.0.1:{port}"
        _wait_http(f"{base}/ready", timeout=600, proc=runtime_proc, log=runtime_log)
        _step("POST /v1/images/generations")
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
        with urllib.request.urlopen(f"{base}/metrics", timeout=10) as response:
            metrics = response.read().decode()
        shown = (
            "diffusion_images_generated_total",
            "diffusion_cache_steps_total",
            "diffusion_model_load_seconds",
        )
        for line in metrics.splitlines():
            if line.startswith(shown):
                print(f"    {line}")
        print(f"\nImage written to {output.resolve()}  (total {time.monotonic() - t0:.1f}s)")
        return output
    except BaseException:
        for log in sorted(work.glob("*.log")):
            print(f"\n--- last lines of {log.name} ---\n{log.read_text()[-3000:]}", file=sys.stderr)
        raise
    finally:
        _step("stopping the runtime, the operator and the control plane")
        _stop(runtime_proc)
        _stop(operator_proc)
        cluster.stop()
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="diffusion-operator demo", description=__doc__.split("\n")[0])
    parser.add_argument("--output", type=Path, default=Path("out/demo.png"), help="where to write the image")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs, rendered config)")
    args = parser.parse_args(argv)
    try:
        run_demo(args.output, args.keep)
    except Exception as exc:  # the demo reports, it does not dump a traceback on a user
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1
    return 0
