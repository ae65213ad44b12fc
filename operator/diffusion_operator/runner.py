"""`diffusion-operator run`: kopf underneath, standalone (no peering), JSON logs, /metrics and /healthz."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import os
import sys

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
    parser.add_argument(
        "--monitoring-namespace",
        default=os.environ.get("DIFFUSION_OPERATOR_MONITORING_NAMESPACE", ""),
        help="namespace whose pods may scrape the serving pods' metrics port (their NetworkPolicy); "
        "empty: none may",
    )
    parser.add_argument(
        "--cluster-cidr",
        action="append",
        default=[c for c in os.environ.get("DIFFUSION_OPERATOR_CLUSTER_CIDRS", "").split(",") if c.strip()],
        help="the cluster's pod or Service range (repeatable; env DIFFUSION_OPERATOR_CLUSTER_CIDRS, comma-separated): "
        "left out of the NetworkPolicies' public egress when it is a public range",
    )
    parser.add_argument("--log-format", choices=("json", "plain"), default="json")
    parser.add_argument("--verbose", "-v", action="store_true")
    args = parser.parse_args(argv)
    for cidr in args.cluster_cidr:
        try:
            ipaddress.ip_network(cidr.strip(), strict=False)
        except ValueError as error:
            parser.error(f"--cluster-cidr {cidr!r}: {error}")
    args.cluster_cidr = [c.strip() for c in args.cluster_cidr]
    if not args.namespace and not args.all_namespaces:
        env_ns = os.environ.get("WATCH_NAMESPACE", "")
        if env_ns:
            args.namespace = [n for n in env_ns.split(",") if n]
        else:
            parser.error("give --namespace NS (repeatable) or --all-namespaces")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    import kopf
    from prometheus_client import start_http_server

    from diffusion_operator import handlers  # noqa: F401  (registers the kopf handlers)
    from diffusion_operator.builders import NetworkSettings
    from diffusion_operator.controller import Reconciler
    from diffusion_operator.kube import Kube
    from diffusion_operator.metrics import OperatorMetrics

    kopf.configure(
        verbose=args.verbose,
        log_format=kopf.LogFormat.JSON if args.log_format == "json" else kopf.LogFormat.FULL,
    )
    logging.getLogger("diffusion_operator").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    if not args.verbose:  # kopf logs every handled event at INFO: keep warnings and errors only
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    try:
        metrics = OperatorMetrics(process=True)  # the registry served on --metrics-port
        client = Kube(metrics=metrics)
    except Exception as error:  # no kubeconfig, no service account
        print(f"diffusion-operator: cannot load Kubernetes credentials: {error}", file=sys.stderr)
        return 1
    import threading

    reconciler = Reconciler(
        client,
        keda_prometheus_address=args.keda_prometheus_address,
        metrics=metrics,
        network=NetworkSettings(args.monitoring_namespace, tuple(args.cluster_cidr)),
    )
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

    if args.metrics_port:
        start_http_server(args.metrics_port, addr=args.bind, registry=metrics.registry)
    liveness = f"http://{args.bind}:{args.health_port}/healthz" if args.health_port else None
    scope = "all namespaces" if args.all_namespaces else ", ".join(args.namespace)
    logging.getLogger("diffusion_operator").info(
        f"starting: watching {scope}; metrics :{args.metrics_port}, liveness {liveness}"
    )
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    kopf.run(
        loop=loop,
        standalone=True,
        clusterwide=args.all_namespaces,
        namespaces=[] if args.all_namespaces else args.namespace,
        liveness_endpoint=liveness,
        memo=kopf.Memo(reconciler=reconciler),
    )
    stop.set()
    reconciler.stop()
    return 0
