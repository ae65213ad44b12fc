"""The operator image has no torch: every operator module imports with torch, diffusers and cache_dit
unavailable, and the only runtime code it loads is the torch-free contract package."""

from __future__ import annotations

import subprocess
import sys

CODE = """
import importlib, importlib.abc, pkgutil, sys

class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "diffusers", "cache_dit", "torchao", "transformers"):
            raise ImportError(f"{name} is not in the operator image")
        return None

sys.meta_path.insert(0, NoTorch())
import diffusion_operator
for info in pkgutil.walk_packages(diffusion_operator.__path__, "diffusion_operator."):
    importlib.import_module(info.name)
runtime = sorted(m for m in sys.modules if m.startswith("diffusion_runtime."))
outside = [m for m in runtime if not m.startswith("diffusion_runtime.contract")]
assert runtime and not outside, outside
print(len(runtime))
"""


def test_the_operator_imports_without_torch_and_only_the_runtime_contract():
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
