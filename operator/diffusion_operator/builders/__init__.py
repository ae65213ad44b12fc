"""Pure builders: the typed CR (`api.types.DiffusionDeployment`) in, Kubernetes object (a dict) out.
No API calls here, no validation (`diffusion_operator.validation` sits above them)."""

from __future__ import annotations

from diffusion_operator.api.types import DiffusionDeployment
from diffusion_operator.builders.common import labels, owner_reference, selector, selector_string
from diffusion_operator.builders.configmap import (
    build_configmap,
    render_cache_dit_yaml,
    render_runtime_config,
)
from diffusion_operator.builders.deployment import build_deployment
from diffusion_operator.builders.frontdoor import build_front_door
from diffusion_operator.builders.hpa import build_hpa
from diffusion_operator.builders.keda import build_scaled_object, build_trigger_authentication
from diffusion_operator.builders.modelcache import build_download_job, build_model_cache_pvc
from diffusion_operator.builders.networkpolicy import DEFAULT_NETWORK, NetworkSettings, build_network_policy
from diffusion_operator.builders.pdb import build_pdb
from diffusion_operator.builders.service import build_service, endpoint

__all__ = [
    "DEFAULT_NETWORK",
    "NetworkSettings",
    "build_all",
    "build_configmap",
    "build_deployment",
    "build_download_job",
    "build_front_door",
    "build_model_cache_pvc",
    "build_hpa",
    "build_network_policy",
    "build_pdb",
    "build_scaled_object",
    "build_trigger_authentication",
    "build_service",
    "endpoint",
    "labels",
    "owner_reference",
    "render_cache_dit_yaml",
    "render_runtime_config",
    "selector",
    "selector_string",
]


def build_all(
    dd: DiffusionDeployment,
    owner: dict,
    model_cache_ready: bool = True,
    keda_prometheus_address: str = "",
    network: NetworkSettings = DEFAULT_NETWORK,
) -> list[dict]:
    """Every child of one DiffusionDeployment, in apply order: the ConfigMap first (the pods mount it),
    then the Deployment (the slow part: scheduling, image pull, model load), then the rest; with
    spec.model.cache its claim and download Job last. Until that cache is complete
    (`model_cache_ready` False) the Deployment has 0 replicas and there is no autoscaler to scale it up.
    The autoscaler is the HPA (engine hpa) or a KEDA ScaledObject (engine keda, its Prometheus trigger
    reading `keda_prometheus_address`, or with spec.queue the queue server through a
    TriggerAuthentication), never both. With spec.queue the front door (Deployment, Service, PDB
    `<name>-frontdoor`) follows the runtime pods' children. The NetworkPolicy (unless
    spec.networkPolicy.enabled is false) follows the operator's `network` settings (monitoring namespace,
    cluster ranges)."""
    configmap = build_configmap(dd, owner)
    children = [
        configmap,
        build_deployment(dd, owner, configmap, model_cache_ready=model_cache_ready),
        build_service(dd, owner),
        build_pdb(dd, owner),
    ]
    if dd.spec.network_policy.enabled:
        children.append(build_network_policy(dd, owner, network))
    if dd.spec.queue is not None:
        children += build_front_door(dd, owner, configmap)
    if dd.spec.autoscaling is not None and model_cache_ready:
        if dd.spec.autoscaling.engine == "keda":
            if dd.spec.queue is not None:
                children.append(build_trigger_authentication(dd, owner))
            children.append(build_scaled_object(dd, owner, keda_prometheus_address))
        else:
            children.append(build_hpa(dd, owner))
    if dd.spec.model.cache is not None:
        children += [build_model_cache_pvc(dd, owner), build_download_job(dd, owner)]
    return children
