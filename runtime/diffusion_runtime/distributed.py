"""TEMPORARY, issue 19 merge: `cli.py` (moving into the contract package on another branch) still
imports these from here; they live in `engine.distributed`. Delete with that import."""

from diffusion_runtime.engine.distributed import run_worker as run_worker
from diffusion_runtime.engine.distributed import worker_rank as worker_rank
