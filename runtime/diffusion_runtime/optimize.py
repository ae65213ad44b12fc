"""TEMPORARY, issue 19 merge: `cli.py` and tests/operator (other branches) still import these from
here; they live in `engine.optimize`. Delete with those imports."""

from diffusion_runtime.engine.optimize import plan_cache_dit as plan_cache_dit
from diffusion_runtime.engine.optimize import read_cache_dit_yaml as read_cache_dit_yaml
