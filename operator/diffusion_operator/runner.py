"""`diffusion-operator run`: kopf underneath, standalone (no kopf peering), JSON logs, /metrics and
/healthz, leader election on a Lease (leader.py): a standby serves /healthz and /metrics and waits;
only the leader applies its CRD (crd.py), starts the reconciler and kopf's watches. On losing the
lease the process stops writing at once (the write fence) and exits, to come back as a standby."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import socket
import sys
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from diffusion_operator.leader import LEASE_DURATION, RENEW_DEADLINE, RETRY_PERIOD, LeaderElector

EXIT_LEASE_LOST = 3  # the process exits with this when it loses the lease (the kubelet restarts it)
DEFAULT_LEASE_NAME = "diffusion-operator"

HELP = "run the DiffusionDeployment operator against the current kubeconfig or in-cluster config"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="diffusion-operator run", description=HELP)
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument(
        "--namespace", "-n", action="append", default=[], help="namespace to watch (repeatable)"
    )
    scope.add_argument(
        "--all-namespaces", "-A", action="store_true", help="watch every namespace (cluster-wide RBAC)"
    )
    parser.add_argument(
        "--metrics-port", type=int, default=int(os.environ.get("DIFFUSION_OPERATOR_METRICS_PORT", 9090))
    )
    parser.add_argument(
        "--health-port", type=int, default=int(os.environ.get("DIFFUSION_OPERATOR_HEALTH_PORT", 8080))
    )
    parser.add_argument("--bind", default="0.0.0.0", help="address of the metrics and health listeners")
    parser.add_argument(
        "--resync-seconds", type=float, default=300.0, help="periodic level-triggered resync (0 = off)"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=16,
        help="threads running reconciles (one object never runs twice at once)",
    )
    parser.add_argument(
        "--keda-prometheus-address",
        default=os.environ.get("DIFFUSION_OPERATOR_KEDA_PROMETHEUS_ADDRESS", ""),
        help="Prometheus URL the KEDA ScaledObjects' triggers query (spec.autoscaling.engine keda); "
        "empty: engine keda is refused with ConfigValid=False",
    )
    parser.add_argument("--log-format", choices=("json", "plain"), default="json")
    parser.add_argument("--verbose", "-v", action="store_true")
    election = parser.add_argument_group("leader election (a coordination.k8s.io Lease)")
    election.add_argument(
        "--leader-elect",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="reconcile only while holding the Lease (default on); --no-leader-elect: one instance only",
    )
    election.add_argument(
        "--leader-election-namespace",
        default=os.environ.get("POD_NAMESPACE", ""),
        help="namespace of the Lease (default $POD_NAMESPACE, else the first --namespace)",
    )
    election.add_argument(
        "--leader-election-id",
        default=os.environ.get("DIFFUSION_OPERATOR_LEASE", DEFAULT_LEASE_NAME),
        help="name of the Lease",
    )
    election.add_argument(
        "--leader-identity",
        default=os.environ.get("POD_NAME", ""),
        help="this instance's holder identity (default $POD_NAME, else hostname_random)",
    )
    election.add_argument("--lease-duration", type=float, default=LEASE_DURATION)
    election.add_argument("--renew-deadline", type=float, default=RENEW_DEADLINE)
    election.add_argument("--retry-period", type=float, default=RETRY_PERIOD)
    parser.add_argument(
        "--apply-crd",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="apply the operator's own CRD when it starts leading (Helm never upgrades crds/)",
    )
    args = parser.parse_args(argv)
    if not args.namespace and not args.all_namespaces:
        env_ns = os.environ.get("WATCH_NAMESPACE", "")
        if env_ns:
            args.namespace = [n for n in env_ns.split(",") if n]
        else:
            parser.error("give --namespace NS (repeatable) or --all-namespaces")
    if args.leader_elect and not args.leader_election_namespace:
        if args.all_namespaces:
            parser.error("give --leader-election-namespace NS (or $POD_NAMESPACE) with --all-namespaces")
        args.leader_election_namespace = args.namespace[0]
    if not args.leader_identity:
        args.leader_identity = f"{socket.gethostname()}_{uuid.uuid4().hex[:8]}"
    if args.leader_elect and not 0 < args.retry_period < args.renew_deadline < args.lease_duration:
        parser.error("leader election needs 0 < --retry-period < --renew-deadline < --lease-duration")
    return args


class Health:
    """/healthz on --health-port: 200 while this instance works (the standby's election loop alive; the
    leader's kopf event loop answering), with the leader state as JSON."""

    def __init__(self, identity: str, lease: str) -> None:
        self.identity = identity
        self.lease = lease
        self.elector: LeaderElector | None = None  # None: no election
        self.election_thread: threading.Thread | None = None
        self.loop: asyncio.AbstractEventLoop | None = None  # kopf's, once leading

    def state(self) -> tuple[bool, dict]:
        leader = self.elector.is_leader() if self.elector is not None else self.loop is not None
        body = {"identity": self.identity, "leader": leader, "lease": self.lease}
        if self.elector is not None:
            body["holder"] = self.elector.holder
        ok = True
        if self.election_thread is not None and not self.election_thread.is_alive():
            ok, body["error"] = False, "the leader election loop stopped"
        if self.loop is not None:
            try:
                asyncio.run_coroutine_threadsafe(asyncio.sleep(0), self.loop).result(timeout=5)
            except Exception:
                ok, body["error"] = False, "kopf's event loop does not answer"
        return ok, body

    def serve(self, bind: str, port: int) -> ThreadingHTTPServer:
        health = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                if self.path.split("?")[0] != "/healthz":
                    self.send_error(404)
                    return
                ok, body = health.state()
                data = json.dumps(body).encode()
                self.send_response(200 if ok else 500)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:  # probes every few seconds: not logged
                pass

        server = ThreadingHTTPServer((bind, port), Handler)
        threading.Thread(target=server.serve_forever, name="healthz", daemon=True).start()
        return server


def wait_for_lease(elector, acquired: threading.Event) -> bool:
    """Block (a standby) until the lease is ours; False when SIGTERM/SIGINT came first."""
    stopping = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stopping.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while not acquired.wait(0.2):
            if stopping.is_set():
                return False
        return True
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    import kopf
    from prometheus_client import start_http_server

    from diffusion_operator import handlers  # noqa: F401  (registers the kopf handlers)
    from diffusion_operator.controller import Reconciler
    from diffusion_operator.crd import apply_crd
    from diffusion_operator.kube import Kube
    from diffusion_operator.leader import LeaseConfig
    from diffusion_operator.metrics import OperatorMetrics

    kopf.configure(
        verbose=args.verbose,
        log_format=kopf.LogFormat.JSON if args.log_format == "json" else kopf.LogFormat.FULL,
    )
    logging.getLogger("diffusion_operator").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    if not args.verbose:  # kopf logs every handled event at INFO: keep warnings and errors only
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    log = logging.getLogger("diffusion_operator")
    identity = args.leader_identity
    elector: LeaderElector | None = None

    def may_write() -> bool:  # the leader fence, checked before every write the operator sends
        return elector is None or elector.is_leader()

    try:
        metrics = OperatorMetrics(process=True)  # the registry served on --metrics-port
        client = Kube(
            metrics=metrics, write_guard=may_write if args.leader_elect else None, instance=identity
        )
    except Exception as error:  # no kubeconfig, no service account
        print(f"diffusion-operator: cannot load Kubernetes credentials: {error}", file=sys.stderr)
        return 1
    lease = f"{args.leader_election_namespace}/{args.leader_election_id}" if args.leader_elect else ""
    health = Health(identity, lease)
    if args.health_port:
        health.serve(args.bind, args.health_port)
    if args.metrics_port:
        start_http_server(args.metrics_port, addr=args.bind, registry=metrics.registry)
    scope = "all namespaces" if args.all_namespaces else ", ".join(args.namespace)
    log.info(
        f"starting {identity}: watching {scope}; metrics :{args.metrics_port}, /healthz :{args.health_port}"
        + (f"; leader election on Lease {lease}" if lease else "; no leader election")
    )

    if args.leader_elect:
        acquired = threading.Event()

        def lost() -> None:
            # the fence already refuses every write; exit at once so that the kubelet restarts this
            # instance as a standby (client-go's controllers do the same)
            log.error(f"{identity}: leader lease lost: stopping (exit {EXIT_LEASE_LOST})")
            logging.shutdown()
            os._exit(EXIT_LEASE_LOST)

        # the lease's own reads and writes are not the operator's work: not in its write counter
        elector = LeaderElector(
            Kube(configuration=client.configuration, metrics=OperatorMetrics()),
            LeaseConfig(
                args.leader_election_namespace,
                args.leader_election_id,
                identity,
                args.lease_duration,
                args.renew_deadline,
                args.retry_period,
            ),
            on_started=acquired.set,
            on_stopped=lost,
            on_change=lambda leading: metrics.leader.set(1 if leading else 0),
        )
        health.elector = elector
        metrics.leader.set(0)
        health.election_thread = elector.start()
        if not wait_for_lease(elector, acquired):
            elector.stop()
            log.info(f"{identity}: stopped while standing by")
            return 0
    else:
        metrics.leader.set(1)
    if args.apply_crd:
        apply_crd(client)

    reconciler = Reconciler(client, keda_prometheus_address=args.keda_prometheus_address, metrics=metrics)
    reconciler.start(args.workers)
    stop = threading.Event()
    reconciler.start_resync(None if args.all_namespaces else args.namespace, args.resync_seconds, stop)

    @kopf.on.startup()
    def configure(settings: kopf.OperatorSettings, **_):
        settings.posting.enabled = False  # events are posted by the handlers, only on real problems
        settings.execution.max_workers = 4  # the handlers only queue; the reconciler's workers work
        settings.watching.server_timeout = 600
        # namespaced mode needs no cluster-scoped read: no namespace or CRD scanning (the CRD must exist
        # when the operator starts, as the chart and the tests ensure); cluster-wide mode keeps it
        settings.scanning.disabled = not args.all_namespaces
        settings.batching.batch_window = 0.005  # react fast: the reconciler's queue coalesces
        settings.networking.request_timeout = 60
        settings.persistence.finalizer = "diffusion.dev/kopf-finalizer"  # unused: no on.delete handlers

    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    health.loop = loop
    kopf.run(
        loop=loop,
        standalone=True,  # no kopf peering: the Lease above decides who runs
        clusterwide=args.all_namespaces,
        namespaces=[] if args.all_namespaces else args.namespace,
        memo=kopf.Memo(reconciler=reconciler),
    )
    stop.set()
    reconciler.stop()
    if elector is not None:  # release (writes are fenced from here on): a standby takes over at once
        elector.stop()
        if health.election_thread is not None:
            health.election_thread.join(timeout=10)
    return 0
