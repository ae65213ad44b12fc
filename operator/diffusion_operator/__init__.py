"""diffusion-operator: reconciles DiffusionDeployment resources into GPU serving pods."""

__version__ = "0.1.0"
