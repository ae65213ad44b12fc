"""The custom resource's group, version and names: imports nothing, so anything may import it."""

GROUP = "diffusion.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "DiffusionDeployment"
PLURAL = "diffusiondeployments"
SINGULAR = "diffusiondeployment"
SHORT_NAMES = ("dd",)
