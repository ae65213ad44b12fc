"""The image API on CUDA, end to end: a real `diffusion-runtime serve` on the tiny FLUX pipeline with
cache-dit (static mask: 3 of 8 steps cached) and, by default, cache-dit's float8 quantization.

Checks output formats, edits through the img2img and inpaint variants (cached like generations,
deterministic, leaving generations unchanged), and an async job cancelled while running on the GPU.
Prints one line per check and writes summary.json; exits non-zero if any check fails.

    python bench/gpu_image_api_smoke.py --out DIR                            # on a GPU
    python bench/gpu_image_api_smoke.py --out DIR --device cpu --quant none --dtype float32
"""

from __future__ import annotations

import argparse
import base64
import importlib.metadata
import io
import json
import sys
import time
from pathlib import Path

import httpx
import yaml
from _common import Checks, free_port, start_serve, static_cache_dit, stop, tiny_model, wait_ready
from PIL import Image


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("out/gpu-image-api"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--quant", default="float8_per_row", help="quant_type, or 'none'")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    check = Checks()

    model = tiny_model(args.out / "tiny-flux")
    (args.out / "cache-dit.yaml").write_text(yaml.safe_dump(static_cache_dit(args.quant)))
    port = free_port()
    runtime = {
        "model": {"uri": str(model), "dtype": args.dtype},
        "cache_dit_config": "cache-dit.yaml",
        "device": args.device,
        "warmup": {"resolutions": ["256x256"], "steps": 8},
        "server": {"host": "127.0.0.1", "port": port, "metrics_port": 0, "max_queue": 8,
                   "max_steps": 400, "max_pixels": 1024 * 1024},
    }  # fmt: skip
    (args.out / "runtime.yaml").write_text(yaml.safe_dump(runtime))
    log = (args.out / "runtime.log").open("w")
    proc = start_serve(args.out / "runtime.yaml", log)
    base = f"http://127.0.0.1:{port}"
    c = httpx.Client(base_url=base, timeout=300)
    t = time.monotonic()
    ready = wait_ready(base, proc, timeout=300)
    summary: dict = {"device": args.device, "quant": args.quant, "ready_s": round(time.monotonic() - t, 2)}
    summary["versions"] = {
        p: importlib.metadata.version(p) for p in ("torch", "diffusers", "cache-dit", "fastapi")
    }
    if check("ready", ready, f"{summary['ready_s']}s"):
        gen = {"prompt": "a red fox in snow", "size": "256x256", "seed": 3, "num_inference_steps": 8}
        first = c.post("/v1/images/generations", json=gen).json()
        for fmt, magic in (("png", b"\x89PNG"), ("jpeg", b"\xff\xd8\xff"), ("webp", b"RIFF")):
            r = c.post("/v1/images/generations", json={**gen, "output_format": fmt})
            raw = base64.b64decode(r.json()["data"][0]["b64_json"]) if r.status_code == 200 else b""
            check(f"generate {fmt}", raw.startswith(magic), r.text[:200] if r.status_code != 200 else "")
        src = base64.b64decode(first["data"][0]["b64_json"])
        files = {"image": ("fox.png", src, "image/png")}
        form = {"prompt": "a white fox", "num_inference_steps": "8", "strength": "1.0", "seed": "5"}
        e1, e2 = (c.post("/v1/images/edits", files=files, data=form) for _ in range(2))
        check("edit img2img 200", e1.status_code == 200, "" if e1.status_code == 200 else e1.text[:300])
        if e1.status_code == 200:
            check("edit cached by cache-dit", e1.json()["cache"] == {"cached_steps": 3, "computed_steps": 5},
                  str(e1.json()["cache"]))  # fmt: skip
            check("edit deterministic", e1.json()["data"] == e2.json()["data"])
            summary["edit_inference_s"] = e1.json()["timings"]["inference_seconds"]
        mask = Image.new("RGBA", (256, 256), (0, 0, 0, 255))
        mask.paste((0, 0, 0, 0), (64, 64, 192, 192))
        buf = io.BytesIO()
        mask.save(buf, format="PNG")
        m = c.post(
            "/v1/images/edits", files={**files, "mask": ("m.png", buf.getvalue(), "image/png")}, data=form
        )
        ok = m.status_code == 200 and m.json()["cache"]["cached_steps"] == 3
        check("inpaint 200, cached", ok, "" if ok else m.text[:300])
        again = c.post("/v1/images/generations", json=gen).json()
        check("generation unchanged after edits", again["data"] == first["data"])

        long = {"prompt": "long", "size": "1024x1024", "num_inference_steps": 400, "n": 4, "seed": 1}
        a = c.post("/v1/images/generations", json=long, headers={"Prefer": "respond-async"}).json()
        t0 = time.monotonic()
        while (
            c.get(f"/v1/images/jobs/{a['id']}").json()["progress"]["step"] < 2 and time.monotonic() - t0 < 60
        ):
            time.sleep(0.01)
        short = c.post("/v1/images/generations", json=gen, headers={"Prefer": "respond-async"}).json()
        seen = c.get(f"/v1/images/jobs/{a['id']}").json()["progress"]["step"]
        d = c.delete(f"/v1/images/jobs/{a['id']}").json()
        p = d["progress"]
        ok = d["status"] == "cancelled" and p["step"] <= p["cancel_requested_at_step"] + 1 < p["total_steps"]
        check("running job cancelled at its next step", ok,
              f"step seen {seen}, DELETE at {p['cancel_requested_at_step']}, stopped at {p['step']} of {p['total_steps']}")  # fmt: skip
        t0 = time.monotonic()
        while (st := c.get(f"/v1/images/jobs/{short['id']}").json())["status"] in ("queued", "running"):
            if time.monotonic() - t0 > 60:
                break
            time.sleep(0.01)
        check(
            "next job ran",
            st["status"] == "succeeded" and st["result"]["data"] == first["data"],
            st["status"],
        )
    code = stop(proc, timeout=120)
    check("SIGTERM -> exit 0", code == 0, str(code))
    summary["checks"] = check.as_json()
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k != "checks"}))
    return 1 if check.failed else 0


if __name__ == "__main__":
    sys.exit(main())
