"""`diffusion-runtime download` against a local Hub (tests/hub_server.py) with the real huggingface_hub.

The hub serves the tiny model plus files a pipeline does not need (a README, an fp16 variant, a .bin
copy of a safetensors weight); its access log is the proof of what the real client fetched.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from diffusion_runtime.download import COMPLETE_MARKER, check_complete, last_progress, parse_progress_line
from diffusion_runtime.startup import parse_ready_line
from hub_server import HubServer

pytestmark = pytest.mark.runtime

REPO = "tiny-org/flux-tiny"
TOKEN = "hf_test_token"
TRANSFORMER = "transformer/diffusion_pytorch_model.safetensors"
BIG = "tokenizer/big_vocab.txt"  # bigger than the client's 10 MiB read chunk: a mid-file resume is visible
UNNEEDED = (
    "README.md",
    "vae/diffusion_pytorch_model.fp16.safetensors",
    "vae/diffusion_pytorch_model.bin",
)


@pytest.fixture(scope="module")
def hub_folder(tiny_model_dir, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hub") / "repo"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "README.md").write_text("# tiny flux\n")
    shutil.copy(folder / "vae/diffusion_pytorch_model.safetensors", folder / UNNEEDED[1])
    (folder / UNNEEDED[2]).write_bytes(os.urandom(4096))
    return folder


def _download(hub: HubServer, dest: Path, *extra: str, token: str | None = TOKEN, timeout: float = 300):
    env = dict(os.environ, HF_ENDPOINT=hub.url, HF_HOME=str(dest.parent / "hf-home"))
    env.pop("HF_HUB_OFFLINE", None)
    env.pop("HF_TOKEN", None)
    if token:
        env["HF_TOKEN"] = token
    return subprocess.run(
        [sys.executable, "-m", "diffusion_runtime", "download", "--model", f"hf://{REPO}", "--dest", str(dest),
         "--progress-interval", "0.2", *extra],
        capture_output=True, text=True, timeout=timeout, env=env,
    )  # fmt: skip


def _records(stdout: str) -> list[dict]:
    return [r for line in stdout.splitlines() if (r := parse_progress_line(line)) is not None]


def _generate_offline(model: Path, out: Path, endpoint: str):
    """`diffusion-runtime generate` on the folder with the hub set offline (and the hub stopped)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_ENDPOINT=endpoint)
    return subprocess.run(
        [sys.executable, "-m", "diffusion_runtime", "generate", "--model", str(model), "--prompt", "a cat",
         "--size", "64x64", "--steps", "2", "--device", "cpu", "--output", str(out)],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip


def test_download_once_second_is_a_no_op_and_the_cache_serves_offline(hub_folder, tmp_path):
    dest = tmp_path / "cache" / "model"
    hub = HubServer(hub_folder, REPO, token=TOKEN).start()
    try:
        first = _download(hub, dest)
        assert first.returncode == 0, first.stderr[-3000:]
        records = _records(first.stdout)
        final = records[-1]
        files = hub.hub.files
        needed = {p: f for p, f in files.items() if p not in UNNEEDED and p != "TINY_MODEL.json"}
        assert final["modelDownload"] == "Complete" and final["cached"] is False
        assert final["commit"] == hub.hub.commit
        assert final["bytesDone"] == final["bytesTotal"] == sum(f.size for f in needed.values())
        assert final["filesTotal"] == len(needed)
        assert [r["modelDownload"] for r in records][0] == "Resolving"
        assert any(r["modelDownload"] == "Downloading" for r in records)
        # every needed file fetched exactly once, nothing else
        fetched = sorted(a.path.split(f"/resolve/{hub.hub.commit}/", 1)[1] for a in hub.hub.file_gets())
        assert fetched == sorted(needed), fetched
        assert all(a.status == 200 for a in hub.hub.file_gets())
        marker = json.loads((dest / COMPLETE_MARKER).read_text())
        assert marker["commit"] == hub.hub.commit and set(marker["files"]) == set(needed)
        for path in needed:
            assert (dest / path).read_bytes() == (hub_folder / path).read_bytes()
        for path in UNNEEDED:
            assert not (dest / path).exists()

        before = len(hub.hub.access_log)
        second = _download(hub, dest)
        assert second.returncode == 0, second.stderr[-3000:]
        again = _records(second.stdout)
        assert again[-1]["modelDownload"] == "Complete" and again[-1]["cached"] is True
        assert len(hub.hub.access_log) == before, hub.hub.access_log[before:]  # not one request
    finally:
        hub.stop()

    # the hub is gone: the runtime loads the folder with HF_HUB_OFFLINE=1 and generates
    gen = _generate_offline(dest, tmp_path / "cat.png", hub.url)
    assert gen.returncode == 0, gen.stderr[-3000:]
    assert (tmp_path / "cat.png").stat().st_size > 0


def test_download_dropped_halfway_is_retried_and_marked_complete_only_when_whole(hub_folder, tmp_path):
    folder = tmp_path / "repo"
    shutil.copytree(hub_folder, folder)
    (folder / BIG).write_bytes(os.urandom(24 << 20))
    dest = tmp_path / "cache" / "model"
    hub = HubServer(folder, REPO, token=TOKEN).start()
    try:
        size = hub.hub.files[TRANSFORMER].size
        # the transformer's weights break halfway more often than the client retries in one process (1 + 5)
        hub.fail_file(TRANSFORMER, size // 2, times=6)
        # the big file breaks once after 12 MiB: the client resumes it with a Range request
        hub.fail_file(BIG, 12 << 20, times=1)
        first = _download(hub, dest)
        assert first.returncode == 1, first.stdout[-2000:]
        failed = _records(first.stdout)[-1]
        assert failed["modelDownload"] == "Failed" and TRANSFORMER in failed["error"]
        assert 0 < failed["bytesDone"] < failed["bytesTotal"]
        assert not (dest / COMPLETE_MARKER).exists()
        assert check_complete(dest) is not None
        gets = hub.hub.file_gets(TRANSFORMER)
        assert len(gets) == 6 and all(a.body_bytes == size // 2 for a in gets)

        # the runtime refuses the partial folder
        refused = _generate_offline(dest, tmp_path / "no.png", hub.url)
        assert refused.returncode == 2 and "incomplete model download" in refused.stderr

        # the big file resumed at the byte the client had written (10 MiB chunks), not from zero
        big = hub.hub.file_gets(BIG)
        assert [a.status for a in big] == [200, 206], big
        assert big[1].range == "bytes=10485760-" and big[0].body_bytes == 12 << 20
        assert big[1].body_bytes == (24 << 20) - (10 << 20)
        assert (dest / BIG).read_bytes() == (folder / BIG).read_bytes()

        # the retry (the Job's next pod): only the missing file is fetched, then the marker appears
        log_before = len(hub.hub.file_gets())
        second = _download(hub, dest)
        assert second.returncode == 0, second.stderr[-3000:]
        refetched = [
            a.path.rsplit("/resolve/", 1)[1].split("/", 1)[1] for a in hub.hub.file_gets()[log_before:]
        ]
        assert refetched == [TRANSFORMER]
        final = last_progress(second.stdout)
        assert final is not None and final["modelDownload"] == "Complete"
        assert final["bytesDone"] == final["bytesTotal"]
        assert check_complete(dest) is None
        assert (dest / TRANSFORMER).read_bytes() == (folder / TRANSFORMER).read_bytes()
    finally:
        hub.stop()


def test_download_without_the_token_fails_clearly_and_writes_no_marker(hub_folder, tmp_path):
    dest = tmp_path / "cache" / "model"
    term = tmp_path / "termination-log"
    with HubServer(hub_folder, REPO, token=TOKEN) as hub:
        res = _download(hub, dest, "--termination-log", str(term), token=None)
    assert res.returncode == 1
    assert "RepositoryNotFoundError" in res.stderr or "401" in res.stderr, res.stderr[-2000:]
    record = last_progress(term.read_text())
    assert record is not None and record["modelDownload"] == "Failed" and REPO in record["error"]
    assert not (dest / COMPLETE_MARKER).exists()


def test_serve_metrics_split_download_and_load_and_a_complete_copy_is_used_without_a_request(
    hub_folder, tmp_path
):
    """`serve` on hf:// (no model cache): the runtime's own download path, then the same folder again."""
    from fixtures_runtime import start_runtime
    from test_runtime_server import scrape, value

    hf_home = tmp_path / "hf-home"
    with HubServer(hub_folder, REPO, token=TOKEN) as hub:
        env = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN, "HF_HOME": str(hf_home)}
        first = start_runtime(f"hf://{REPO}", tmp_path / "first", extra_env=env)
        try:
            m = scrape(first.metrics_url)
            downloaded = value(m, "diffusion_model_download_seconds")
            assert downloaded > 0 and value(m, "diffusion_model_load_seconds") > 0
            assert value(m, "diffusion_compile_seconds") == 0  # no compile in this config
            start = parse_ready_line(first.log())  # the start line: fetched from the Hub, so cold
            assert start is not None and (start["start"], start["model"]) == ("cold", "downloaded")
            assert start["downloadSeconds"] == pytest.approx(downloaded, abs=0.01)
        finally:
            first.stop()
        fetched = sorted(a.path.split("/resolve/", 1)[1].split("/", 1)[1] for a in hub.hub.file_gets())
        assert "README.md" not in fetched and UNNEEDED[1] not in fetched  # the pipeline's files only
        assert len(fetched) == len(set(fetched))
        requests = len(hub.hub.access_log)
        # a second process (a restarted pod with the same HF_HOME): the copy is complete, no request
        second = start_runtime(f"hf://{REPO}", tmp_path / "second", extra_env=env)
        try:
            m = scrape(second.metrics_url)
            assert value(m, "diffusion_model_download_seconds") < downloaded
            start = parse_ready_line(second.log())  # the complete copy, nothing compiled: warm
            assert start is not None and (start["start"], start["model"], start["compileCache"]) == (
                "warm", "local", "off",
            )  # fmt: skip
        finally:
            second.stop()
        assert len(hub.hub.access_log) == requests, hub.hub.access_log[requests:]
