"""Loading a pipeline (folder, file://, hf://) with its optimizations, and running one generation.

`load_model` does: resolve the URI -> pick device -> validate the cache-dit YAML -> from_pretrained
-> check the YAML against the pipeline -> quantize / enable cache-dit -> optional torch.compile.
`Model.generate` runs one pipeline call and reports timings, per-step durations and cache steps.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffusion_runtime.contract.config import ConfigError, RuntimeConfig, parse_size
from diffusion_runtime.contract.pipelines import WAN_FRAME_MULTIPLE, Modality, modality, takes_image
from diffusion_runtime.engine import cache_dit_adapter
from diffusion_runtime.engine.adapters import Adapters
from diffusion_runtime.engine.errors import InvalidInput
from diffusion_runtime.engine.imaging import warmup_frame
from diffusion_runtime.engine.optimize import (
    CacheDitPlan,
    apply_plan,
    check_against_pipeline,
    plan_cache_dit,
    read_cache_dit_yaml,
)
from diffusion_runtime.engine.params import (
    EditParams,
    GenerationParams,
    GenerationResult,
    StepCallback,
    VideoParams,
)
from diffusion_runtime.engine.pipelines import EditVariants, timed_batch_call, timed_call
from diffusion_runtime.engine.quality_gate import GatePlan, QualityGate

log = logging.getLogger("diffusion_runtime")


class ModelError(RuntimeError):
    """The model cannot be found or loaded; the message is one line."""


def _served_folder(uri: str, path: Path) -> Path:
    """A local folder as is, unless it is a `diffusion-runtime download` target that is not complete."""
    from diffusion_runtime.download import check_complete

    why_not = check_complete(path)
    if why_not is not None:
        raise ModelError(f"model {uri}: {why_not}")
    return path


def resolve_model(uri: str, revision: str | None = None, progress: bool = True) -> tuple[Path, bool]:
    """A local folder for the model, and whether this call fetched files from the Hub: a path /
    file:// as is (a download cache folder only when its completion marker is there); hf://org/name or
    org/name downloaded, unless a complete copy is there (HF_HUB_OFFLINE=1: never)."""
    if uri.startswith("file://"):
        path = Path(uri[len("file://") :])
        if not path.is_dir():
            raise ModelError(f"model {uri}: folder {path} does not exist")
        return _served_folder(uri, path), False
    if uri.startswith("pvc://"):
        raise ModelError(f"model {uri}: pvc:// URIs are mounted by the operator; pass the mount path instead")
    local = Path(uri)
    if local.is_dir() or uri.startswith(("/", "./", "../", "~")):
        local = local.expanduser()
        if not local.is_dir():
            raise ModelError(f"model {uri}: folder does not exist")
        return _served_folder(uri, local), False
    repo_id = uri[len("hf://") :] if uri.startswith("hf://") else uri
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ModelError(f"model {uri}: not a folder and not a Hugging Face id (org/name)")
    return _hub_model(uri, repo_id, revision, progress)


def _hub_model(uri: str, repo_id: str, revision: str | None, progress: bool) -> tuple[Path, bool]:
    """An hf:// model in this process: `diffusion-runtime download`'s own code (the pipeline's files at
    one commit, verified, a completion marker) into HF_HOME/diffusion-models/<org>--<name>/<revision>; a
    complete folder there is used without any request. Offline (HF_HUB_OFFLINE=1) and not there: the
    standard Hugging Face cache, local files only."""
    from huggingface_hub import constants, snapshot_download

    from diffusion_runtime.download import DownloadError, download, local_folder

    dest = Path(constants.HF_HOME) / "diffusion-models" / local_folder(repo_id, revision)
    last = [0.0]

    def emit(line: str) -> None:  # the progress lines, at most every 10 s, in the server's log
        now = time.monotonic()
        if progress and (now - last[0] >= 10 or '"Complete"' in line or '"Failed"' in line):
            last[0] = now
            log.info("model download: %s", line)

    try:
        record = download(uri, dest, revision, emit=emit)
        return dest, not record["cached"]
    except DownloadError as e:
        if constants.HF_HUB_OFFLINE:
            try:
                return Path(snapshot_download(repo_id, revision=revision, local_files_only=True)), False
            except Exception:  # noqa: BLE001 - not in the standard cache either: the line below
                pass
        raise ModelError(f"model {uri}: download from the Hugging Face Hub failed ({e})") from e


def pick_device(setting: str) -> str:
    import torch

    if setting == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device: cuda requested but no CUDA GPU is visible")
        return "cuda"
    if setting == "cpu":
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class Model:
    """The loaded pipeline in this process (`engine.interface.Engine`)."""

    pipe: Any
    config: RuntimeConfig
    device: str
    plan: CacheDitPlan | None
    load_seconds: float
    model_path: Path
    warmup_seconds: float = 0.0
    download_seconds: float = 0.0  # resolve_model: fetching from the Hub (not part of load_seconds)
    model_downloaded: bool = False  # this process fetched model files from the Hub
    size_multiple: int = 16
    quality_gate: QualityGate | None = None  # holds the plain pipeline's canaries until warmup ends
    adapters: Adapters = field(default_factory=lambda: Adapters(()))  # loaded LoRAs (config.adapters)
    _variants: EditVariants | None = field(default=None, repr=False)

    @property
    def pipeline_name(self) -> str:
        return type(self.pipe).__name__

    @property
    def modality(self) -> Modality:
        return modality(self.pipeline_name)

    @property
    def frame_multiple(self) -> int:
        """Valid frame counts of a video pipeline are k * this + 1 (its VAE's temporal factor)."""
        return int(getattr(self.pipe, "vae_scale_factor_temporal", None) or WAN_FRAME_MULTIPLE)

    @property
    def uses_cache_dit(self) -> bool:
        return bool(self.plan and self.plan.uses_cache_dit)

    @property
    def cache_tag(self) -> str:
        return cache_dit_adapter.tag(self.pipe) if self.uses_cache_dit else "none"

    @property
    def quant_type(self) -> str:
        return (self.plan.quant_type if self.plan else None) or "none"

    @property
    def edit_variants(self) -> EditVariants:
        if self._variants is None:
            self._variants = EditVariants(self.pipe)
        return self._variants

    def generate(
        self,
        params: GenerationParams,
        cancel: threading.Event | None = None,
        on_step: StepCallback | None = None,
    ) -> GenerationResult:
        if (self.modality == "video") != isinstance(params, VideoParams):
            wants = "a video" if isinstance(params, VideoParams) else "an image"
            raise InvalidInput(f"{wants} call on {self.pipeline_name}, a {self.modality} pipeline")
        cached = self.pipe if self.uses_cache_dit else None
        self.adapters.activate(params.adapters)
        return timed_call(self.pipe, params, self.device, cached, cancel, on_step)

    def generate_batch(
        self,
        batch: Sequence[GenerationParams],
        cancel: threading.Event | None = None,
        on_step: StepCallback | None = None,
    ) -> list[GenerationResult]:
        cached = self.pipe if self.uses_cache_dit else None
        self.adapters.activate(batch[0].adapters)  # one batch_key: the same adapters and scales
        return timed_batch_call(self.pipe, batch, self.device, cached, cancel, on_step)

    def prepare_edit(self, kind: str) -> None:
        self.edit_variants.get(kind)

    def edit(
        self,
        params: EditParams,
        cancel: threading.Event | None = None,
        on_step: StepCallback | None = None,
    ) -> GenerationResult:
        variant = self.edit_variants.get(params.kind)
        self.adapters.activate(params.adapters)  # the variant shares the adapted modules
        if not self.uses_cache_dit:
            return timed_call(variant, params, self.device, None, cancel, on_step)
        context = cache_dit_adapter.call_context(self.pipe)
        return timed_call(variant, params, self.device, self.pipe, cancel, on_step, context)

    def warmup(self) -> float:
        t0 = time.perf_counter()
        w = self.config.warmup
        for i, res in enumerate(w.resolutions, 1):
            width, height = parse_size(res)
            log.info("warmup %d/%d: %dx%d, %d steps", i, len(w.resolutions), width, height, w.steps)
            t1 = time.perf_counter()
            params = GenerationParams(prompt=w.prompt, width=width, height=height, steps=w.steps, seed=0)
            if self.modality == "video":
                params = VideoParams(
                    prompt=w.prompt, width=width, height=height, steps=w.steps, seed=0,
                    frames=w.frames, fps=self.config.server.video_fps,
                    image=warmup_frame(width, height) if takes_image(self.pipeline_name) else None,
                )  # fmt: skip
            self.generate(params, on_step=_progress_logger(w.steps))
            log.info(
                "warmup %d/%d: %dx%d done in %.2fs",
                i,
                len(w.resolutions),
                width,
                height,
                time.perf_counter() - t1,
            )
        self.warmup_seconds = time.perf_counter() - t0
        return self.warmup_seconds


def _progress_logger(total: int, every_seconds: float = 10.0) -> Callable[[int], None]:
    """A step callback that logs progress at most every `every_seconds` (long CPU warmups)."""
    last = [time.perf_counter()]

    def on_step(step_index: int) -> None:
        now = time.perf_counter()
        if now - last[0] >= every_seconds and step_index + 1 < total:
            last[0] = now
            log.info("warmup progress: step %d/%d", step_index + 1, total)

    return on_step


def check_video_settings(config: RuntimeConfig, name: str, frame_multiple: int) -> None:
    """What the config checks when `model.pipeline` names a video pipeline, for one that
    model_index.json chose: no quality gate (image canaries only), warmup.frames = k*multiple+1."""
    if config.quality_gate is not None:
        raise ConfigError(
            f"quality_gate: not supported for the video pipeline {name} (image canaries only)",
            "quality_gate",
            "Unsupported",
        )
    frames = config.warmup.frames
    if frame_multiple > 1 and (frames - 1) % frame_multiple:
        raise ConfigError(
            f"warmup.frames: {frames} is not a frame count {name} renders (k*{frame_multiple}+1)",
            "warmup.frames",
        )


def optimize_pipeline(
    pipe: Any, plan: CacheDitPlan | None, quantize_raw: dict[str, Any] | None, compile: bool
) -> None:
    """What the runtime does to a loaded pipeline (bench/gpu_pipeline.py does the same): check the
    cache-dit plan against it, quantize / enable cache-dit, then the optional regional torch.compile."""
    if plan is not None:
        check_against_pipeline(plan, pipe)
        apply_plan(pipe, plan, quantize_raw)
    if compile:
        transformer = getattr(pipe, "transformer", None)
        if transformer is None:
            raise ConfigError(f"compile: pipeline {type(pipe).__name__} has no transformer to compile")
        cache_dit_adapter.tune_compile()
        if getattr(transformer, "_repeated_blocks", None):
            transformer.compile_repeated_blocks()  # regional: one graph per block class, fast to build
        else:
            transformer.compile()


def load_model(config: RuntimeConfig, progress: bool = True) -> Model:
    """Load and optimize the pipeline named by `config` (no warmup)."""
    import torch
    from diffusers import DiffusionPipeline

    t0 = time.perf_counter()
    device = pick_device(config.device)
    capability = torch.cuda.get_device_capability() if device == "cuda" else None
    raw = read_cache_dit_yaml(config.cache_dit_config) if config.cache_dit_config else {}
    plan = plan_cache_dit(raw, device, capability) if raw else None  # validate before any heavy work
    for note in plan.notes if plan else ():
        log.warning("%s", note)
    t_resolve = time.perf_counter()
    model_path, downloaded = resolve_model(config.model.uri, config.model.revision, progress=progress)
    download_seconds = time.perf_counter() - t_resolve
    if not (model_path / "model_index.json").is_file():
        raise ModelError(
            f"model {config.model.uri}: {model_path} has no model_index.json (not a diffusers pipeline)"
        )
    dtype = getattr(torch, config.model.dtype)
    if device == "cpu" and dtype == torch.float16:
        raise ConfigError("model.dtype: float16 is not supported on cpu; use float32 or bfloat16")
    cls: Any = DiffusionPipeline
    if config.model.pipeline:
        import diffusers

        cls = getattr(diffusers, config.model.pipeline, None)
        if cls is None or not hasattr(cls, "from_pretrained"):
            raise ConfigError(f"model.pipeline: diffusers has no pipeline class {config.model.pipeline!r}")
    try:
        pipe = cls.from_pretrained(str(model_path), dtype=dtype)
    except Exception as e:  # noqa: BLE001 - one line for any loading failure
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ModelError(f"model {config.model.uri}: loading failed ({type(e).__name__}: {msg})") from e
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    # adapters before the gate's reference (each adapter's canary is rendered plain too), cache-dit,
    # quantization and compile (the compiled graphs include every adapter's layers)
    adapters = Adapters(config.adapters)
    try:
        adapters.load(pipe)
    except InvalidInput as e:
        raise ModelError(str(e)) from e
    gate = None
    gate_plan = GatePlan.from_config(config)
    if modality(type(pipe).__name__) == "video":  # model_index.json named it: the config's rules now
        check_video_settings(config, type(pipe).__name__, int(getattr(pipe, "vae_scale_factor_temporal", 1)))
    if gate_plan is not None and (plan is not None or config.compile):
        # the reference: the plain pipeline, before cache-dit, quantization and compile change it
        gate = QualityGate(gate_plan)
        plain = Model(pipe, config, device, None, 0.0, model_path, adapters=adapters)
        gate.render_reference(plain.generate)
    elif gate_plan is not None:
        log.info("quality gate: no cache-dit, quantization or compile to check; skipped")
    optimize_pipeline(pipe, plan, raw.get("quantize_config") if plan is not None else None, config.compile)
    # images: the VAE's factor; Wan: its spatial factor (patching doubles it, as for images)
    vae_scale = int(
        getattr(pipe, "vae_scale_factor", None) or getattr(pipe, "vae_scale_factor_spatial", 8) or 8
    )
    return Model(
        pipe=pipe,
        config=config,
        device=device,
        plan=plan,
        # reading + optimizing: not fetching (download_seconds), nor the gate's reference canaries
        # (the gate's cost, diffusion_quality_gate_seconds)
        load_seconds=time.perf_counter() - t0 - download_seconds - (gate.reference_seconds if gate else 0.0),
        model_path=model_path,
        download_seconds=download_seconds,
        model_downloaded=downloaded,
        size_multiple=max(16, vae_scale * 2),
        quality_gate=gate,
        adapters=adapters,
    )
