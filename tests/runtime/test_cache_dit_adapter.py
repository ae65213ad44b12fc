"""The cache-dit adapter (`engine/cache_dit_adapter.py`) against the installed cache-dit.

`call_context` reads the closure of the wrapper cache-dit puts on a cached pipeline's class; that is
cache-dit's internals, so it is pinned: this test fails on another cache-dit version until the
adapter is checked against it (then move `PINNED_VERSION`). It also keeps every other runtime
module off cache-dit's import path.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from diffusion_runtime.engine import cache_dit_adapter
from fixtures_runtime import STATIC_CACHE_DIT

RUNTIME = Path(__file__).resolve().parents[2] / "runtime" / "diffusion_runtime"
GENERATED = {"_cache_dit_pinned.py"}  # cache-dit's own source, copied verbatim (tools/gen_cache_dit_facts.py)


def test_installed_cache_dit_is_the_pinned_version():
    assert metadata.version("cache-dit") == cache_dit_adapter.PINNED_VERSION


def test_only_the_adapter_imports_cache_dit():
    importers = []
    for path in sorted(RUNTIME.rglob("*.py")):
        if path.name in GENERATED:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            if any(n == "cache_dit" or n.startswith("cache_dit.") for n in names):
                importers.append(str(path.relative_to(RUNTIME)))
    assert sorted(set(importers)) == ["engine/cache_dit_adapter.py"]


# In a child process: enabling cache-dit wraps the pipeline's class for the whole process.
_EDIT_THROUGH_THE_CONTEXT = """
import json, sys
import torch
from diffusers import AutoPipelineForImage2Image
from PIL import Image
from diffusion_runtime.engine import cache_dit_adapter as adapter
from diffusion_runtime.engine.errors import InvalidInput
from diffusion_runtime.tiny import build_tiny_pipeline

pipe = build_tiny_pipeline("tiny")
pipe.set_progress_bar_config(disable=True)
plain_refused = False
try:
    with adapter.call_context(pipe):
        pass
except InvalidInput:
    plain_refused = True
adapter.enable(pipe, json.loads(sys.argv[1]))
variant = AutoPipelineForImage2Image.from_pipe(pipe)
variant.set_progress_bar_config(disable=True)
with torch.inference_mode(), adapter.call_context(pipe):
    variant(prompt="a cat", image=Image.new("RGB", (64, 64), (90, 20, 20)), strength=1.0, width=64,
            height=64, num_inference_steps=8, max_sequence_length=32,
            generator=torch.Generator("cpu").manual_seed(1))
print(json.dumps({"plain_refused": plain_refused, "has_context": adapter.has_call_context(pipe),
                  "steps": adapter.step_counts(pipe), "tag": adapter.tag(pipe)}))
"""


def test_an_edit_variant_runs_inside_the_loaded_pipelines_cache_context():
    res = subprocess.run(
        [sys.executable, "-c", _EDIT_THROUGH_THE_CONTEXT, json.dumps(STATIC_CACHE_DIT)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["plain_refused"] and out["has_context"]
    # the static "fast" mask cut to 8 steps: 5 computed, 3 served from the cache
    assert out["steps"] == [3, 5], out
    assert out["tag"] != "none"
