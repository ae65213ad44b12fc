"""Video on real pods (real node, in-cluster operator from the chart, the runtime image): a tiny-Wan
DiffusionDeployment (the tiny random-weight WanPipeline on its own `local` volume, `pvc://` model
source) with the chart's queue server. The official `openai` client makes a clip through the front
door's Service and reads it back from the other front-door pod; a clip asked of the runtime pods'
own Service (their direct API) comes back too. PyAV reads both MP4s as asked (H.264, frames, size)."""

from __future__ import annotations

import io
import time

import av
import httpx
import openai
import pytest
import yaml
from diffusion_dev import wait_for
from diffusion_dev.workloads import WAN_CLAIM, WAN_FOLDER, model_volume, tiny_wan_root
from test_cluster_queue_realpods import _front_door_pods, _ready, _runtime_pods, queue_release  # noqa: F401
from test_cluster_realpods import _diagnose, _sample

pytestmark = [pytest.mark.cluster, pytest.mark.filterwarnings("ignore:The Sora API:DeprecationWarning")]
FPS = 8  # 1 s -> 8 frames -> 9 (Wan renders 4k+1)


def _read_mp4(data: bytes) -> tuple[str, int, int, int]:
    with av.open(io.BytesIO(data)) as c:
        frames = list(c.decode(video=0))
        return c.streams.video[0].codec_context.name, len(frames), frames[0].width, frames[0].height


def _clip(client: openai.OpenAI, reader: openai.OpenAI, timeout: float = 300) -> bytes:
    video = client.videos.create(prompt="a red ball", size="64x64", seconds="1")  # type: ignore[arg-type]
    deadline = time.monotonic() + timeout
    while (v := reader.videos.retrieve(video.id)).status in ("queued", "in_progress"):
        assert time.monotonic() < deadline, v
        time.sleep(0.5)
    assert v.status == "completed", v
    return reader.videos.download_content(video.id).read()


@pytest.mark.timeout(1800)
def test_a_tiny_wan_deployment_serves_clips_through_the_front_door_and_its_runtime_service(
    cluster,
    node,
    queue_release,  # noqa: F811 - the fixture imported above
):
    ns = queue_release["namespace"]
    wan = model_volume(ns, tiny_wan_root(), claim=WAN_CLAIM)
    cluster.apply(wan)
    doc = _sample()
    name = "tiny-wan"
    doc["metadata"]["name"] = name
    doc["spec"]["model"].update(uri=f"pvc://{WAN_CLAIM}/{WAN_FOLDER}", pipeline="WanPipeline")
    doc["spec"].pop("cacheDit")  # the sample's mask is FLUX's; Wan's cache-dit is tested on CPU
    doc["spec"]["warmup"] = {"resolutions": ["64x64"], "steps": 4, "frames": 9}
    doc["spec"]["server"].update(videoFps=FPS, maxFrames=33, requestTimeoutSeconds=300)
    doc["spec"]["queue"] = {}  # the chart's Secret (diffusion-queue)
    try:
        cluster.kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump(doc))
        try:
            wait_for(
                lambda: (
                    len([p for p in _front_door_pods(cluster, ns, name) if _ready(p)]) == 2
                    and any(_ready(p) for p in _runtime_pods(cluster, ns, name))
                ),
                600,
                "the front door's 2 pods and the runtime pod Ready",
                interval=2,
            )
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\n{_diagnose(cluster, ns)}") from None
        front = cluster.service_url(ns, f"{name}-frontdoor", ready=2)
        doors = [f"http://{p['status']['podIP']}:8000" for p in _front_door_pods(cluster, ns, name)]

        def client(base: str) -> openai.OpenAI:
            return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)

        # through the front door's Service, read back from a front-door pod
        t = time.monotonic()
        mp4 = _clip(client(front), client(doors[1]))
        print(f"clip through the front door: {time.monotonic() - t:.1f}s, {len(mp4)} bytes")
        assert _read_mp4(mp4) == ("h264", 9, 64, 64)
        # the runtime pods' own Service (their direct API, the pod's own clip store)
        runtime = cluster.service_url(ns, name)
        mp4 = _clip(client(runtime), client(runtime))
        assert _read_mp4(mp4) == ("h264", 9, 64, 64)
        # the image API of a video deployment says where to go, on both
        for base in (front, runtime):
            r = httpx.post(f"{base}/v1/images/generations", json={"prompt": "x"}, timeout=30)
            assert r.status_code == 400 and "use POST /v1/videos" in r.json()["error"]["message"], r.text
    finally:
        cluster.kubectl("delete", "dd", name, "-n", ns, "--wait=true", "--timeout=60s", check=False)
        cluster.kubectl("delete", "pv", wan[0]["metadata"]["name"], "--wait=false", check=False)
