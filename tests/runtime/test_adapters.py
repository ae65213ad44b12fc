"""LoRA adapters per request, on the tiny model with small LoRAs made here with `peft` (non-zero
random weights, saved by diffusers' `save_lora_weights`; no downloads).

The engine in this process (`load_model`, the serve path's own loader): an adapter's image equals
the pipeline with that adapter loaded and fused; no adapters equals the base pipeline; A, B, none, A
in sequence (with cache-dit on) equal each alone; under `compile: true` switching adapters causes no
recompilation, counted by torch's own counters. Then a real `diffusion-runtime serve`: unknown
adapter -> 400 listing the known ones, the official `openai` client's `extra_body`, GET /v1/models,
metrics by adapter, and an edit naming an adapter.
"""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import torch
import yaml
from diffusion_runtime.contract.config import ConfigError, config_from_dict, validate
from diffusion_runtime.engine.model import Model, ModelError, load_model
from diffusion_runtime.engine.params import GenerationParams
from diffusion_runtime.tiny import LORA_WEIGHT_NAME, write_tiny_lora
from fixtures_runtime import STATIC_CACHE_DIT
from PIL import Image
from test_runtime_server import generate, png_of, scrape, value

SIZE = 64
STEPS = 8  # STATIC_CACHE_DIT's mask length


@pytest.fixture(scope="session")
def loras(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """Two LoRAs of different ranks: `a` as a file path, `b` as a folder (both forms of `path`)."""
    root = tmp_path_factory.mktemp("loras")
    a = write_tiny_lora(tiny_model_dir, root / "a", seed=1, rank=4)
    write_tiny_lora(tiny_model_dir, root / "b", seed=2, rank=8)
    return {"a": a, "b": root / "b"}


def _config(model_dir: Path, loras: dict[str, Path] | None, workdir: Path | None = None, **top) -> dict:
    cfg = {
        "model": {"uri": str(model_dir), "dtype": "float32"},
        "device": "cpu",
        "warmup": {"resolutions": [f"{SIZE}x{SIZE}"], "steps": STEPS},
        **top,
    }
    if loras:
        cfg["adapters"] = [
            {"name": "a", "path": str(loras["a"])},
            {"name": "b", "path": str(loras["b"]), "scale": 0.7},
        ]
    if top.get("cache_dit_config") is not None:
        assert workdir is not None
        (workdir / "cache-dit.yaml").write_text(yaml.safe_dump(top["cache_dit_config"]))
        cfg["cache_dit_config"] = str(workdir / "cache-dit.yaml")
    return cfg


def _load(model_dir, loras, workdir=None, **top) -> Model:
    return load_model(validate(config_from_dict(_config(model_dir, loras, workdir, **top))), progress=False)


def _pixels(model: Model, adapters=(), seed: int = 3) -> np.ndarray:
    params = GenerationParams(
        prompt="a photo of a cat", width=SIZE, height=SIZE, steps=STEPS, seed=seed, adapters=tuple(adapters)
    )
    return np.asarray(model.generate(params).images[0], dtype=np.int16)


def _fused(model_dir: Path, loras: dict[str, Path], weights: dict[str, float]) -> Model:
    """The plain diffusers pipeline with `weights`' adapters loaded and fused into its weights."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(str(model_dir), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    for name in weights:
        path = loras[name]
        folder, weight_name = (path.parent, path.name) if path.is_file() else (path, LORA_WEIGHT_NAME)
        pipe.load_lora_weights(str(folder), weight_name=weight_name, adapter_name=name)
    pipe.set_adapters(list(weights), adapter_weights=list(weights.values()))
    pipe.fuse_lora(adapter_names=list(weights))
    pipe.unload_lora_weights()  # the LoRA layers go; the fused weights stay
    cfg = validate(config_from_dict(_config(model_dir, None)))
    return Model(pipe, cfg, "cpu", None, 0.0, model_dir)


def _close(got: np.ndarray, want: np.ndarray) -> None:
    """Equal within float tolerance after 8-bit rounding: at most 2 levels anywhere, mean < 0.1."""
    diff = np.abs(got - want)
    assert diff.max() <= 2 and diff.mean() < 0.1, (diff.max(), diff.mean())


def _differs(x: np.ndarray, y: np.ndarray) -> None:
    assert np.abs(x - y).mean() > 1.0, np.abs(x - y).mean()


# ---------------------------------------------------------------- the engine


def test_an_adapter_equals_the_fused_pipeline_and_none_equals_the_base(tiny_model_dir, loras):
    model = _load(tiny_model_dir, loras)
    base = _pixels(_load(tiny_model_dir, None))
    none = _pixels(model)
    assert np.array_equal(none, base)  # unrequested adapters add exact zeros
    a = _pixels(model, [("a", 0.8)])
    _close(a, _pixels(_fused(tiny_model_dir, loras, {"a": 0.8})))
    _differs(a, base)
    ab = _pixels(model, [("a", 0.8), ("b", 0.5)])
    _close(ab, _pixels(_fused(tiny_model_dir, loras, {"a": 0.8, "b": 0.5})))
    _differs(ab, a)


def test_a_then_b_then_none_then_a_equal_each_alone_with_cache_dit(tiny_model_dir, loras, tmp_path):
    """cache-dit's context is reset by its own wrapper at every call: no adapter's residuals leak."""
    seq = [[("a", 1.0)], [("b", 0.7)], [], [("a", 1.0)]]
    model = _load(tiny_model_dir, loras, tmp_path, cache_dit_config=STATIC_CACHE_DIT)
    assert model.uses_cache_dit
    together = [_pixels(model, ads) for ads in seq]
    for ads, got in zip(seq, together, strict=True):
        alone = _pixels(_load(tiny_model_dir, loras, tmp_path, cache_dit_config=STATIC_CACHE_DIT), ads)
        assert np.array_equal(got, alone), ads
    _differs(together[0], together[1])
    _differs(together[0], together[2])


def test_switching_adapters_under_compile_recompiles_nothing(tiny_model_dir, loras):
    from torch._dynamo.utils import counters

    eager = _load(tiny_model_dir, loras)
    model = _load(tiny_model_dir, loras, compile=True)
    model.warmup()  # the base model: every adapter's layers at scale 0
    for ads in ([("a", 1.0)], [("b", 0.7)]):  # warm: the first call with non-zero scales
        _pixels(model, ads)
    frames, graphs = counters["frames"]["ok"], counters["stats"]["unique_graphs"]
    assert frames > 0, dict(counters["frames"])  # it did compile
    cycle = [[("a", 1.0)], [("b", 0.7)], [], [("a", 0.3), ("b", 1.5)], [("b", -0.5)]]
    images = [_pixels(model, cycle[i % len(cycle)]) for i in range(20)]
    assert counters["frames"]["ok"] == frames, dict(counters["frames"])
    assert counters["stats"]["unique_graphs"] == graphs, dict(counters["stats"])
    # the compiled graphs read the scales written in place (not constants baked in at compile time)
    for i, ads in enumerate(cycle):
        _close(images[i], _pixels(eager, ads))
        assert np.array_equal(images[i], images[i + len(cycle)])


def test_bad_declarations_are_refused_naming_the_setting(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"adapters\[0\]: unknown key\(s\) uri"):
        config_from_dict({"model": {"uri": "x"}, "adapters": [{"name": "a", "uri": "hf://x/y"}]})
    raw = {"model": {"uri": "x"}, "adapters": [{"name": "a", "path": "/x"}, {"name": "a", "path": "/y"}]}
    with pytest.raises(ConfigError, match=r"^adapters\[1\].name: 'a' is declared more than once"):
        validate(config_from_dict(raw))
    with pytest.raises(ConfigError, match=r"^adapters.name: string should match pattern"):
        validate(config_from_dict({"model": {"uri": "x"}, "adapters": [{"name": "A B", "path": "/x"}]}))
    with pytest.raises(ConfigError, match=r"^adapters.path: expected an absolute path"):
        validate(config_from_dict({"model": {"uri": "x"}, "adapters": [{"name": "a", "path": "rel"}]}))
    not_a_lora = tmp_path / "junk.safetensors"
    not_a_lora.write_bytes(b"not safetensors")
    cfg = _config(tiny_model_dir, None)
    cfg["adapters"] = [{"name": "junk", "path": str(not_a_lora)}]
    with pytest.raises(ModelError, match=r"adapters: 'junk' .* cannot be loaded into FluxPipeline"):
        load_model(validate(config_from_dict(cfg)), progress=False)


# ---------------------------------------------------------------- a real server


@pytest.fixture(scope="module")
def server(tiny_model_dir, loras, tmp_path_factory):
    from fixtures_runtime import start_runtime

    adapters = [{"name": "a", "path": str(loras["a"])}, {"name": "b", "path": str(loras["b"]), "scale": 0.7}]
    rp = start_runtime(tiny_model_dir, tmp_path_factory.mktemp("adapters-server"), adapters=adapters)
    yield rp
    rp.stop()


BODY = {"size": f"{SIZE}x{SIZE}", "num_inference_steps": 4, "seed": 11}


def _image(r: httpx.Response) -> np.ndarray:
    assert r.status_code == 200, r.text
    return np.asarray(png_of(r.json()["data"][0])[1], dtype=np.int16)


@pytest.mark.runtime
def test_unknown_adapter_is_a_400_listing_the_known_ones(server):
    r = generate(server.url, **BODY, adapters=[{"name": "nope"}])
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["message"] == "adapters: unknown adapter 'nope'; known: a, b"
    assert err["param"] == "adapters"
    r = generate(server.url, **BODY, adapters=[{"name": "a"}, {"name": "a", "scale": 2}])
    assert r.status_code == 400 and "named more than once" in r.text, r.text
    r = generate(server.url, **BODY, adapters=[{"name": "a", "scale": 11}])
    assert r.status_code == 400 and "adapters" in r.text, r.text


@pytest.mark.runtime
def test_openai_client_extra_body_models_and_metrics_by_adapter(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    extra = {"num_inference_steps": BODY["num_inference_steps"], "seed": BODY["seed"]}
    before = scrape(server.metrics_url)
    out = client.images.generate(
        prompt="a photo of a cat", size=BODY["size"], extra_body={**extra, "adapters": [{"name": "b"}]}
    )
    via_client = np.asarray(Image.open(io.BytesIO(base64.b64decode(out.data[0].b64_json))), dtype=np.int16)
    declared_scale = _image(generate(server.url, **BODY, adapters=[{"name": "b", "scale": 0.7}]))
    assert np.array_equal(via_client, declared_scale)  # no scale: the declared one (0.7)
    by_model = client.images.generate(
        prompt="a photo of a cat", model="b", size=BODY["size"], extra_body=extra
    )
    assert by_model.data[0].b64_json == out.data[0].b64_json  # an adapter's id as `model`: that adapter
    base = _image(generate(server.url, **BODY))
    _differs(via_client, base)
    both = _image(generate(server.url, **BODY, adapters=[{"name": "a", "scale": 1}, {"name": "b"}]))
    _differs(both, via_client)
    assert np.array_equal(_image(generate(server.url, **BODY)), base)  # after both: base again

    models = client.models.list()
    cards = {m.id: m.model_dump() for m in models.data}
    base_id = next(i for i, c in cards.items() if c.get("parent") is None)
    assert cards["a"]["parent"] == base_id and cards["a"]["scale"] == 1.0
    assert cards["b"]["parent"] == base_id and cards["b"]["scale"] == 0.7
    assert len(cards) == 3
    assert client.models.retrieve("b").id == "b"

    after = scrape(server.metrics_url)

    def grew(name: str, adapter: str) -> float:
        old = [v for lab, v in before.get(name, []) if lab.get("adapter") == adapter]
        return value(after, name, adapter=adapter) - (old[0] if old else 0.0)

    assert grew("diffusion_adapter_requests_total", "b") == 4
    assert grew("diffusion_adapter_requests_total", "a") == 1
    assert grew("diffusion_adapter_requests_total", "base") == 2
    assert grew("diffusion_adapter_inference_duration_seconds_count", "b") == 4


@pytest.mark.runtime
def test_an_edit_names_adapters_in_its_form_field(server):
    src = Image.fromarray(np.full((SIZE, SIZE, 3), 128, dtype=np.uint8))
    buf = io.BytesIO()
    src.save(buf, format="PNG")

    def edit(adapters: str | None) -> httpx.Response:
        data = {"prompt": "a photo of a cat", "num_inference_steps": "4", "seed": "5"}
        if adapters is not None:
            data["adapters"] = adapters
        files = {"image": ("in.png", buf.getvalue(), "image/png")}
        return httpx.post(server.url + "/v1/images/edits", data=data, files=files, timeout=120)

    plain = _image(edit(None))
    assert np.array_equal(_image(edit("")), plain)  # empty: the base model
    styled = _image(edit("a:2.0"))
    _differs(styled, plain)
    assert np.array_equal(_image(edit("a:1.0,b:0.0")), _image(edit("a")))  # b at 0 adds nothing
    r = edit("zzz")
    assert r.status_code == 400 and "known: a, b" in r.text, r.text
    r = edit("a:lots")
    assert r.status_code == 400 and "is not name or name:scale" in r.text, r.text
    pattern = httpx.get(server.url + "/openapi.json").json()["paths"]["/v1/images/edits"]["post"][
        "requestBody"
    ]
    form = pattern["content"]["multipart/form-data"]["schema"]["properties"]["adapters"]
    assert re.fullmatch(form["pattern"], "a:0.5,b") and not re.fullmatch(form["pattern"], "zzz")


# ---------------------------------------------------------------- fetched once from a Hub


@pytest.mark.runtime
def test_hub_adapters_are_downloaded_once_beside_the_model_and_served_offline(
    tiny_model_dir, loras, tmp_path
):
    """The download Job's command (`diffusion-runtime download --adapter ...`) against the local Hub:
    the model and two LoRA files of the same repo, each verified with its own marker; a second run
    asks the Hub nothing; a server on the downloaded files, offline, lists and applies both."""
    import os
    import shutil
    import subprocess
    import sys

    from diffusion_runtime.download import COMPLETE_MARKER, parse_progress_line
    from fixtures_runtime import start_runtime
    from hub_server import HubServer

    repo = "tiny-org/flux-tiny-styles"
    folder = tmp_path / "hub" / "repo"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "loras").mkdir()
    shutil.copy(loras["a"], folder / "loras" / "a.safetensors")
    shutil.copy(loras["b"] / LORA_WEIGHT_NAME, folder / "loras" / "b.safetensors")
    cache = tmp_path / "cache"
    model, dest_a, dest_b = cache / "model", cache / "adapters" / "a", cache / "adapters" / "b"
    hub = HubServer(folder, repo).start()

    def download() -> list[dict]:
        env = dict(os.environ, HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf-home"))
        env.pop("HF_HUB_OFFLINE", None)
        res = subprocess.run(
            [sys.executable, "-m", "diffusion_runtime", "download", "--model", f"hf://{repo}", "--dest", str(model),
             "--adapter", f"hf://{repo}", "main", "loras/a.safetensors", str(dest_a),
             "--adapter", f"hf://{repo}", "main", "loras/b.safetensors", str(dest_b)],
            capture_output=True, text=True, timeout=300, env=env,
        )  # fmt: skip
        assert res.returncode == 0, res.stderr[-3000:]
        return [r for line in res.stdout.splitlines() if (r := parse_progress_line(line)) is not None]

    try:
        first = download()
        lora_bytes = sum((folder / "loras" / f).stat().st_size for f in ("a.safetensors", "b.safetensors"))
        model_marker = json.loads((model / COMPLETE_MARKER).read_text())
        assert not any(p.startswith("loras/") for p in model_marker["files"])  # not a pipeline file
        final = first[-1]
        assert final["modelDownload"] == "Complete" and final["cached"] is False and final["adapters"] == 2
        assert final["bytesTotal"] == model_marker["bytes"] + lora_bytes == final["bytesDone"]
        for dest, name in ((dest_a, "a"), (dest_b, "b")):
            marker = json.loads((dest / COMPLETE_MARKER).read_text())
            assert list(marker["files"]) == [f"loras/{name}.safetensors"]
            assert (dest / "loras" / f"{name}.safetensors").read_bytes() == (
                folder / "loras" / f"{name}.safetensors"
            ).read_bytes()
        fetched = [a.path for a in hub.hub.file_gets() if "/loras/" in a.path]
        assert len(fetched) == 2, fetched
        before = len(hub.hub.access_log)
        again = download()
        assert again[-1]["cached"] is True
        assert len(hub.hub.access_log) == before, hub.hub.access_log[before:]  # downloaded once
    finally:
        hub.stop()

    adapters = [
        {"name": "a", "path": str(dest_a / "loras" / "a.safetensors")},
        {"name": "b", "path": str(dest_b / "loras" / "b.safetensors"), "scale": 0.7},
    ]
    rp = start_runtime(model, tmp_path / "served", adapters=adapters)  # HF_HUB_OFFLINE=1, the hub is gone
    try:
        ids = [m["id"] for m in httpx.get(rp.url + "/v1/models", timeout=10).json()["data"]]
        assert ids[1:] == ["a", "b"], ids
        base = _image(generate(rp.url, **BODY))
        _differs(_image(generate(rp.url, **BODY, adapters=[{"name": "a"}])), base)
        _differs(_image(generate(rp.url, **BODY, adapters=[{"name": "b"}])), base)
    finally:
        rp.stop()


@pytest.mark.runtime
def test_the_quality_gate_checks_one_canary_per_adapter(runtime_server_factory, loras):
    """Base canaries (prompts x seeds) plus one per adapter (first prompt and seed, declared scale),
    each plain vs optimized (cache-dit)."""

    gate = {"prompts": ["a photo of a cat", "a red car"], "seeds": [0], "min_psnr": 30.0, "min_ssim": 0.9}
    adapters = [{"name": "a", "path": str(loras["a"])}, {"name": "b", "path": str(loras["b"]), "scale": 0.7}]
    rp = runtime_server_factory("gate", cache_dit=STATIC_CACHE_DIT, quality_gate=gate, adapters=adapters)
    log = rp.log()
    lines = re.findall(
        r"quality gate: '([^']*)' seed (\d+)(, adapter \S+ x[\d.]+)?: PSNR ([\d.]+|inf) dB", log
    )
    assert [(p, s, a) for p, s, a, _ in lines] == [
        ("a photo of a cat", "0", ""),
        ("a red car", "0", ""),
        ("a photo of a cat", "0", ", adapter a x1"),
        ("a photo of a cat", "0", ", adapter b x0.7"),
    ], log[-3000:]
    assert all(psnr != "inf" for *_, psnr in lines)  # cached images really differ from the plain ones
    assert "quality gate passed" in log and "(worst of 4 canaries" in log
    m = scrape(rp.metrics_url)
    assert value(m, "diffusion_quality_gate", diffusion_quality_gate="passed") == 1
