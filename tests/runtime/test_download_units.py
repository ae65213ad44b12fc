"""Pure parts of diffusion_runtime.download: file selection, progress lines, the completion check."""

from __future__ import annotations

import json

import pytest
from diffusion_runtime.download import (
    COMPLETE_MARKER,
    HF_LOCAL_DIR_METADATA,
    RemoteFile,
    check_complete,
    last_progress,
    parse_progress_line,
    pipeline_components,
    progress_line,
    select_files,
    verify,
)

INDEX = {
    "_class_name": "FluxPipeline",
    "_diffusers_version": "0.42.1",
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "transformer": ["diffusers", "FluxTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
    "feature_extractor": [None, None],
}

REPO = [
    "README.md",
    "model_index.json",
    "flux1-dev.safetensors",  # a single-file checkpoint at the top: not the diffusers layout
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "text_encoder/model.fp16.safetensors",
    "text_encoder/pytorch_model.bin",
    "text_encoder/flax_model.msgpack",
    "transformer/config.json",
    "transformer/diffusion_pytorch_model-00001-of-00002.safetensors",
    "transformer/diffusion_pytorch_model-00002-of-00002.safetensors",
    "transformer/diffusion_pytorch_model.safetensors.index.json",
    "transformer/diffusion_pytorch_model.fp16-00001-of-00001.safetensors",
    "transformer/diffusion_pytorch_model.safetensors.index.fp16.json",
    "vae/config.json",
    "vae/diffusion_pytorch_model.bin",  # only .bin here: that format is taken
    "vae/.gitattributes",
    "feature_extractor/preprocessor_config.json",  # null component: not loaded
    "assets/grid.png",
]


def test_components_are_the_non_null_entries():
    assert pipeline_components(INDEX) == ["scheduler", "text_encoder", "transformer", "vae"]


def test_selection_takes_one_format_no_variants_and_nothing_outside_the_components():
    assert select_files(REPO, INDEX) == [
        "model_index.json",
        "scheduler/scheduler_config.json",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "transformer/config.json",
        "transformer/diffusion_pytorch_model-00001-of-00002.safetensors",
        "transformer/diffusion_pytorch_model-00002-of-00002.safetensors",
        "transformer/diffusion_pytorch_model.safetensors.index.json",
        "vae/config.json",
        "vae/diffusion_pytorch_model.bin",
    ]


def test_a_variant_takes_its_files_and_falls_back_to_plain_weights_where_it_has_none():
    selected = select_files(REPO, INDEX, variant="fp16")
    assert "text_encoder/model.fp16.safetensors" in selected
    assert "text_encoder/model.safetensors" not in selected
    assert "transformer/diffusion_pytorch_model.fp16-00001-of-00001.safetensors" in selected
    assert "transformer/diffusion_pytorch_model.safetensors.index.fp16.json" in selected
    assert "transformer/diffusion_pytorch_model.safetensors.index.json" not in selected
    assert "vae/diffusion_pytorch_model.bin" in selected  # no fp16 in vae: plain, as diffusers does


def test_progress_lines_round_trip_and_other_lines_are_ignored():
    line = progress_line("Downloading", bytesDone=5, bytesTotal=10)
    assert parse_progress_line(line) == {"modelDownload": "Downloading", "bytesDone": 5, "bytesTotal": 10}
    for other in ("", "WARNING something", "{not json", '{"a": 1}', '{"modelDownload": "Dancing"}', "[1]"):
        assert parse_progress_line(other) is None
    text = "\n".join(["log", line, progress_line("Failed", error="x"), "Traceback ..."])
    assert last_progress(text) == {"modelDownload": "Failed", "error": "x"}
    with pytest.raises(ValueError):
        progress_line("Done")


def test_a_download_target_is_served_only_with_its_marker_and_whole_files(tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    assert check_complete(plain) is None  # a folder that was never a download target
    dest = tmp_path / "dest"
    (dest / HF_LOCAL_DIR_METADATA).mkdir(parents=True)
    (dest / "a.json").write_text("{}")
    assert "incomplete model download" in (check_complete(dest) or "")
    (dest / COMPLETE_MARKER).write_text(json.dumps({"files": {"a.json": 2}}))
    assert check_complete(dest) is None
    (dest / "a.json").write_text("{ }")
    assert "changed or vanished" in (check_complete(dest) or "")
    (dest / COMPLETE_MARKER).write_text("{broken")
    assert check_complete(dest) is not None


def test_verify_checks_sizes_sha256_and_git_blob_ids(tmp_path):
    import hashlib

    (tmp_path / "w.safetensors").write_bytes(b"weights")
    (tmp_path / "c.json").write_bytes(b"{}")
    good = {
        "w.safetensors": RemoteFile("w.safetensors", 7, None, hashlib.sha256(b"weights").hexdigest()),
        "c.json": RemoteFile("c.json", 2, hashlib.sha1(b"blob 2\0{}").hexdigest()),
    }
    assert verify(tmp_path, good) == []
    bad = {
        "w.safetensors": RemoteFile("w.safetensors", 7, None, "0" * 64),
        "c.json": RemoteFile("c.json", 2, "0" * 40),
        "gone.json": RemoteFile("gone.json", 1, "0" * 40),
    }
    problems = verify(tmp_path, bad)
    assert len(problems) == 3 and any("missing" in p for p in problems)
