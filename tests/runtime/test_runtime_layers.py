"""The runtime's layers: `engine` never imports `api` (nor the composition root, `serve`), and the
typed parameters pass through the ranks' pickles as they are."""

from __future__ import annotations

import ast
import pickle
from pathlib import Path

from diffusion_runtime.engine.distributed import Edit, Generate, Stop, Warmup
from diffusion_runtime.engine.params import DEFAULT_STRENGTH, EditParams, GenerationParams
from PIL import Image

RUNTIME = Path(__file__).resolve().parents[2] / "runtime" / "diffusion_runtime"


def _imports(path: Path) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


def test_engine_never_imports_the_api_layer():
    offenders = {}
    for path in sorted((RUNTIME / "engine").rglob("*.py")):
        bad = {
            m
            for m in _imports(path)
            if m.startswith(("diffusion_runtime.api", "diffusion_runtime.serve"))
            or m in ("fastapi", "starlette")
            or m.startswith(("fastapi.", "starlette."))
        }
        if bad:
            offenders[path.name] = sorted(bad)
    assert offenders == {}


def test_edit_params_default_strength_and_steps():
    base = GenerationParams(prompt="a cat", width=64, height=64, steps=8, seed=1)
    image = Image.new("RGB", (64, 64))
    img2img = EditParams.of(base, image, None, None)
    assert img2img.kind == "img2img" and img2img.strength == DEFAULT_STRENGTH["img2img"]
    assert img2img.run_steps == 5 and img2img.steps == 8 and img2img.prompt == "a cat"
    inpaint = EditParams.of(base, image, Image.new("L", (64, 64)), None)
    assert inpaint.kind == "inpaint" and inpaint.run_steps == 8
    tiny = EditParams.of(base, image, None, 0.01)  # raised to one step's worth
    assert tiny.strength == 1 / 8 and tiny.run_steps == 1


def test_rank_calls_pickle_with_their_parameters():
    base = GenerationParams(prompt="a cat", width=64, height=48, steps=4, seed=7, negative_prompt="dog")
    edit = EditParams.of(base, Image.new("RGB", (64, 48), (1, 2, 3)), None, 0.5)
    for call in (Generate(base), Edit(edit), Warmup(), Stop()):
        back = pickle.loads(pickle.dumps(call))
        assert type(back) is type(call) and back.name == call.name
    back_edit = pickle.loads(pickle.dumps(Edit(edit)))
    assert back_edit.params.image.getpixel((0, 0)) == (1, 2, 3) and back_edit.params.run_steps == 2
    assert pickle.loads(pickle.dumps(Generate(base))).params == base


def test_the_request_models_have_every_field_the_serving_object_reads():
    from diffusion_runtime.api.protocol import EditRequestFields, ImageRequestFields, build_protocol
    from diffusion_runtime.contract.config import RuntimeConfig

    protocol = build_protocol(RuntimeConfig())
    reads = set(ImageRequestFields.__annotations__)
    assert reads <= set(protocol.generation.model_fields)
    assert reads | set(EditRequestFields.__annotations__) <= set(protocol.edit.model_fields)
