"""`diffusion-dev build | up | env | status | down | images | demo`."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from .build import BuildError, assets_override, build, cache_home, sync_k8s_replaces, tools_dir
from .cluster import real_node_default
from .fake_nodes import DEFAULT_POOL, REAL_NODE_POOL, parse_pool
from .real_node import NodeClient, NodeError, lock_path, recover_stale


def state_dir() -> Path:
    override = os.environ.get("DIFFUSION_OPERATOR_DEV_STATE")
    return Path(override) if override else cache_home() / "dev"


def _read_state(d: Path) -> dict | None:
    try:
        return json.loads((d / "state.json").read_text())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie still answers kill(0): check its state
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _running_state(d: Path) -> dict | None:
    st = _read_state(d)
    if st and st.get("status") == "running" and _alive(int(st["pid"])):
        return st
    return None


def _binaries(jobs: int = 2) -> tuple[Path, str]:
    """(bin dir, how it was obtained: 'built in Ns' / 'cached (...)' / 'prebuilt (...)')."""
    override = assets_override()
    if override is not None:
        return override, f"prebuilt from {override}"
    t = time.monotonic()
    bin_dir, manifest = build(progress=lambda m: print(m, file=sys.stderr, flush=True), jobs=jobs)
    elapsed = time.monotonic() - t
    if elapsed > 5:
        return bin_dir, f"built now in {elapsed:.0f}s"
    return (
        bin_dir,
        f"cached (built in {manifest.get('build_seconds', '?')}s on {manifest.get('built_at', '?')})",
    )


def cmd_build(args: argparse.Namespace) -> int:
    if args.sync_modules:
        version, replaces = sync_k8s_replaces(tools_dir() / "k8s", write=True)
        print(
            f"k8s wrapper go.mod: {len(replaces)} replace directives from k8s.io/kubernetes@{version}",
            file=sys.stderr,
        )
    bin_dir, how = _binaries(args.jobs)
    print(f"binaries: {how}", file=sys.stderr)
    print(bin_dir)
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    d = state_dir()
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    st = _running_state(d)
    if st:
        print(f"already running (pid {st['pid']}): {st['server']}")
        print(f"kubeconfig: {st['kubeconfig']}")
        return 0
    real = real_node_default() if args.real_node is None else args.real_node
    nodes = args.nodes or (REAL_NODE_POOL if real else DEFAULT_POOL)
    parse_pool(nodes)  # fail fast on a bad pool, before building anything
    if real:
        from .real_node import check_host

        check_host()
    t0 = time.monotonic()
    bin_dir, how = _binaries()
    build_s = time.monotonic() - t0
    log = d / "supervisor.log"
    with contextlib.suppress(FileNotFoundError):
        (d / "state.json").unlink()
    t1 = time.monotonic()
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "diffusion_dev.supervisor", "--state-dir", str(d),
             "--bin-dir", str(bin_dir), "--nodes", nodes, "--real-node", str(int(real)),
             "--timeout", str(args.timeout)],
            stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
            start_new_session=True,  # survives this command; `dev down` stops it
        )  # fmt: skip
    deadline = t1 + args.timeout * 3 + 30
    while True:
        st = _read_state(d)
        if st and st.get("pid") == proc.pid and st.get("status") in ("running", "failed"):
            break
        if proc.poll() is not None:
            st = _read_state(d) or {"status": "failed", "error": f"supervisor exited with {proc.returncode}"}
            break
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGTERM)
            st = {"status": "failed", "error": "timed out waiting for the cluster"}
            break
        time.sleep(0.2)
    start_s = time.monotonic() - t1
    if st.get("status") != "running":
        print(f"dev up failed: {st.get('error')}", file=sys.stderr)
        print(f"(supervisor log: {log})", file=sys.stderr)
        return 1
    t = st.get("timings", {})
    real_s = f" + real node {t.get('real-node')}s" if real else ""
    print(
        f"cluster running: {st['server']} (supervisor pid {st['pid']}, kwok nodes {nodes}"
        f"{', real node diffusion-dev-node' if real else ''})"
    )
    print(f"kubeconfig: {st['kubeconfig']}")
    if st.get("prometheus"):
        print(f"Prometheus: {st['prometheus']} (scrapes the runtime pods; prometheus-adapter serves the HPA)")
    print(f"binaries: {how} [{build_s:.1f}s in this command]")
    print(
        f"start: {start_s:.1f}s (pki {t.get('pki')}s, etcd {t.get('etcd')}s, apiserver {t.get('apiserver')}s, "
        f"controllers {t.get('controllers')}s, nodes {t.get('nodes')}s{real_s})"
    )
    print('next: eval "$(diffusion-dev env)"; kubectl get nodes; diffusion-dev down')
    return 0


def cmd_env(args: argparse.Namespace) -> int:
    st = _running_state(state_dir())
    if not st:
        print("no local cluster is running: start one with `diffusion-dev up`", file=sys.stderr)
        return 1
    path = [st["bin_dir"], str(Path(st["kubectl"]).parent)]
    print(f"export KUBECONFIG={shlex.quote(st['kubeconfig'])}")
    print(f"export PATH={':'.join(shlex.quote(p) for p in dict.fromkeys(path))}:$PATH")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    st = _running_state(state_dir())
    if not st:
        print("not running")
        return 1
    down = [n for n, c in st["components"].items() if not _alive(c["pid"])]
    print(f"running: {st['server']} kubeconfig {st['kubeconfig']}")
    for name, comp in st["components"].items():
        print(f"  {name:24} pid {comp['pid']:<8} {'EXITED' if name in down else 'up'}  log {comp['log']}")
    return 1 if down else 0


def cmd_down(args: argparse.Namespace) -> int:
    d = state_dir()
    st = _read_state(d)
    if not st or st.get("status") not in ("running", "failed"):
        print("no local cluster is running")
        return 0
    pid = int(st["pid"])
    if _alive(pid) and "diffusion_dev.supervisor" in _cmdline(pid):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + args.timeout
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
    leftovers = []
    for name, comp in (st.get("components") or {}).items():
        cpid = comp["pid"]
        # only a process still running our binary from our bin dir (not a reused pid)
        if _alive(cpid) and st["bin_dir"] in _cmdline(cpid):
            leftovers.append(name)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(cpid, signal.SIGKILL)
    _recover_node()
    final = _read_state(d) or {}
    if final.get("status") != "stopped":
        (d / "state.json").write_text(json.dumps({"status": "stopped", "pid": pid}) + "\n")
    print("stopped" + (f" (killed leftover {', '.join(leftovers)})" if leftovers else ""))
    return 0


def _recover_node() -> None:
    """A real node whose owner died without stopping it: put the host back (under the node lock)."""
    import fcntl

    path = lock_path()
    if os.geteuid() != 0 or not path.exists():
        return
    fd = os.open(path, os.O_RDWR)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return  # a live node owns it
        for line in recover_stale(lambda m: print(m, file=sys.stderr)):
            print(f"recovered: {line}", file=sys.stderr)
    finally:
        os.close(fd)


def cmd_images(args: argparse.Namespace) -> int:
    from . import images

    node = None
    st = _running_state(state_dir())
    if not args.no_import:
        if st and st.get("containerd_socket"):
            node = NodeClient(Path(st["bin_dir"]), Path(st["containerd_socket"]))
        else:
            print("no running cluster with a real node: building only (start one with `diffusion-dev up`)",
                  file=sys.stderr)  # fmt: skip
    built = images.ensure(tuple(args.target or images.TARGETS), node=node)
    for image in built.values():
        how = f"built in {image.built_seconds:.0f}s" if image.built_seconds else "cached"
        imported = (
            f", imported in {image.imported_seconds:.0f}s" if image.imported_seconds else ", in the node"
        ) if node is not None else ""  # fmt: skip
        print(f"{image.target}: {image.ref} ({how}{imported}; {image.size_bytes / 1e9:.2f} GB)")
    return 0


def cmd_host_tools(args: argparse.Namespace) -> int:
    from . import hosttools

    groups = tuple(args.groups) or hosttools.GROUPS
    unknown = sorted(set(groups) - set(hosttools.GROUPS))
    if unknown:
        print(
            f"unknown group(s) {', '.join(unknown)}: choose from {', '.join(hosttools.GROUPS)}",
            file=sys.stderr,
        )
        return 2
    tools = hosttools.missing(*groups) if args.missing else [t for t in hosttools.TOOLS if t.needs in groups]
    for tool in tools:
        print(
            tool.package
            if args.missing
            else f"{tool.needs:8} {tool.package:30} {tool.command:22} {tool.purpose}"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["demo"]:  # its own options (argparse.REMAINDER would not pass leading --flags)
        from .demo import main as demo_main

        return demo_main(argv[1:])
    ap = argparse.ArgumentParser(
        prog="diffusion-dev",
        description="local Kubernetes cluster (control plane, kwok GPU nodes, one real node), images, demo",
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build the binaries (if not cached) and print their directory")
    b.add_argument(
        "--sync-modules", action="store_true", help="regenerate the k8s wrapper's replace list first"
    )
    b.add_argument("--jobs", type=int, default=2, help="Go modules built at once (default 2; 1 saves memory)")
    b.set_defaults(func=cmd_build)
    u = sub.add_parser("up", help="start the cluster in the background; prints the kubeconfig path")
    u.add_argument(
        "--nodes",
        default=None,
        help=f"kwok node pool, profiles h100/a100/l4/cpu (default {REAL_NODE_POOL} with the real node, "
        f"{DEFAULT_POOL} without)",
    )
    u.add_argument(
        "--real-node", dest="real_node", action="store_true", default=None,
        help="one real node (containerd + kubelet + kube-proxy) that runs CPU pods for real",
    )  # fmt: skip
    u.add_argument(
        "--no-real-node", dest="real_node", action="store_false",
        help="fake nodes only (kwok): the fast path",
    )  # fmt: skip
    u.add_argument("--timeout", type=float, default=90, help="readiness timeout per component, seconds")
    u.set_defaults(func=cmd_up)
    e = sub.add_parser("env", help="print shell exports (KUBECONFIG, PATH with kubectl and helm)")
    e.set_defaults(func=cmd_env)
    s = sub.add_parser("status", help="show the running cluster's components")
    s.set_defaults(func=cmd_status)
    dn = sub.add_parser("down", help="stop the cluster and every component")
    dn.add_argument("--timeout", type=float, default=30)
    dn.set_defaults(func=cmd_down)
    im = sub.add_parser(
        "images", help="build the Dockerfile's images with buildah; import them into the node"
    )
    im.add_argument("--target", action="append", choices=("operator", "runtime"), help="default: both")
    im.add_argument("--no-import", action="store_true", help="build only")
    im.set_defaults(func=cmd_images)
    ht = sub.add_parser("host-tools", help="the host tools (Debian packages) the tooling runs, by group")
    ht.add_argument("groups", nargs="*", metavar="GROUP", help="cluster, node, images (default: all)")
    ht.add_argument(
        "--missing", action="store_true", help="print only the packages not installed, one a line"
    )
    ht.set_defaults(func=cmd_host_tools)
    sub.add_parser("demo", help="the end-to-end demo on real pods (what `make demo` runs); --output, --keep")
    args = ap.parse_args(argv)
    from .images import ImageError

    try:
        return args.func(args)
    except (BuildError, ValueError, NodeError, ImageError) as exc:
        print(f"diffusion-dev {args.cmd}: {exc}", file=sys.stderr)
        return 1
