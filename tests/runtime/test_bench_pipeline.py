"""bench/gpu_pipeline.py's CPU-sized variant (the tests' tiny FluxPipeline): the whole-pipeline bench
runs end to end, each variant in its own process through the runtime's own optimize path, and its
result file holds what the docs would quote (timings, cached steps, batched throughput, versions).
Timings are not asserted (a benchmark, not a timed test)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.runtime
REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench" / "gpu_pipeline.py"


def test_the_whole_pipeline_bench_runs_on_cpu_and_records_every_variant(tmp_path):
    import cache_dit

    cmd = [sys.executable, str(BENCH), "--small", "--device", "cpu", "--size", "64", "--steps", "8",
           "--runs", "2", "--variants", "eager,cache_static,cache_dynamic", "--batches", "1,2",
           "--batch-variants", "eager,cache_static", "--out", str(tmp_path)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_pipeline_small.json").read_text())
    rows = {r["variant"]: r for r in report["rows"]}
    assert list(rows) == ["eager", "cache_static", "cache_dynamic", "eager (again, last)"]
    for r in rows.values():
        assert len(r["samples_s"]) == 2 and all(s > 0 for s in r["samples_s"]), r
        assert r["min_s"] <= r["s_per_image"] <= r["max_s"]
    skipped = sum(1 for m in cache_dit.steps_mask(total_steps=8, mask_policy="fast") if not m)
    assert rows["cache_static"]["cached_steps_per_image"] == skipped > 0
    assert rows["eager"]["cached_steps_per_image"] == 0
    assert set(rows["cache_static"]["throughput"]) == {"1", "2"} and not rows["cache_dynamic"]["throughput"]
    assert report["eager_baseline_s"] > 0 and report["versions"]["torch"]
    assert "| cache_static |" in (tmp_path / "gpu_pipeline_small.md").read_text()


def test_the_all_variant_is_the_flux_dev_sample_as_written():
    sys.path.insert(0, str(BENCH.parent))
    try:
        import gpu_pipeline
    finally:
        sys.path.pop(0)
    spec = yaml.safe_load((REPO / "samples" / "flux-dev.yaml").read_text())["spec"]
    raw, compile_ = gpu_pipeline.variant_settings("all", 28)
    assert raw["quantize_config"] == spec["quantize"] and compile_ is spec["compile"]
    assert raw["cache_config"] == {**spec["cacheDit"]["cache_config"], "num_inference_steps": 28}


def test_an_unknown_variant_is_refused_naming_the_choices():
    proc = subprocess.run([sys.executable, str(BENCH), "--variants", "eager,turbo"], capture_output=True,
                          text=True, timeout=120, cwd=REPO)  # fmt: skip
    assert proc.returncode == 2 and "turbo" in proc.stderr and "cache_dynamic" in proc.stderr
