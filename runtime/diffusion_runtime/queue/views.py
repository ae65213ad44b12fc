"""What the front door answers about a queued job, read from its hash in Redis (`queue.store`): an
image job's `JobStatus` and a video job's `VideoObject`, the same models a runtime pod answers with."""

from __future__ import annotations

import json
from typing import Any, Literal, cast

from diffusion_runtime.api.protocol import ErrorDetail, ImagesResponse, JobProgress, JobStatus
from diffusion_runtime.api.videos.protocol import VideoError, VideoObject

VideoStatus = Literal["queued", "in_progress", "completed", "failed"]
# a queue job's status -> the videos API's (a cancelled clip is `failed` with the code `cancelled`)
VIDEO_STATUS: dict[str, VideoStatus] = {
    "queued": "queued", "running": "in_progress", "succeeded": "completed", "failed": "failed",
    "cancelled": "failed",
}  # fmt: skip


def _num(h: dict[str, Any], k: str) -> float | None:
    v = h.get(k)
    return float(v) if v not in (None, "") else None


def job_view(job_id: str, h: dict[str, Any], position: int | None) -> JobStatus:
    cancel_step = h.get("cancel_step")
    return JobStatus(
        id=job_id,
        endpoint=cast(Any, h["endpoint"]),
        status=cast(Any, h["status"]),
        created_at=_num(h, "created_at") or 0.0,
        started_at=_num(h, "started_at"),
        finished_at=_num(h, "finished_at"),
        queue_position=position,
        progress=JobProgress(
            step=int(h.get("step") or 0),
            total_steps=int(h.get("total_steps") or 0),
            cancel_requested_at_step=int(cancel_step) if cancel_step not in (None, "") else None,
        ),  # fmt: skip
        cancel_requested=h.get("cancel_requested") == "1",
        result=ImagesResponse.model_validate_json(h["result"]) if h.get("result") else None,
        error=ErrorDetail.model_validate_json(h["error"]) if h.get("error") else None,
    )


def video_view(video_id: str, h: dict[str, Any], position: int | None, ttl: float) -> VideoObject:
    """A video job's `VideoObject` from its hash: the request from its spec, the outcome from its result
    (JSON: bytes, cached_steps) or error; progress is 99 from the last step until the clip is stored."""
    spec = json.loads(h["spec"])
    p = spec["params"]
    status = VIDEO_STATUS.get(h["status"], "failed")
    step, total = int(h.get("step") or 0), int(h.get("total_steps") or 0)
    result = json.loads(h["result"]) if h.get("result") else {}
    finished = _num(h, "finished_at")
    error = None
    if status == "failed":
        detail = ErrorDetail.model_validate_json(h["error"]) if h.get("error") else None
        if h["status"] == "cancelled":
            code = "cancelled"
        elif int(h.get("error_status") or 500) == 400:
            code = "invalid_request"
        else:
            code = "generation_failed"
        error = VideoError(code=code, message=detail.message if detail else f"job {h['status']}")
    return VideoObject(
        id=video_id, model=spec["model"], status=status,
        progress=100 if status == "completed" else min(99, 100 * step // max(1, total)),
        created_at=int(_num(h, "created_at") or 0),
        completed_at=int(finished) if status == "completed" and finished else None,
        expires_at=int(finished + ttl) if finished else None,
        prompt=p["prompt"], seconds=spec["seconds"], size=f"{p['width']}x{p['height']}", error=error,
        frames=p["frames"], fps=p["fps"], num_inference_steps=p["steps"], step=step,
        queue_position=position if status == "queued" else None, seed=p["seed"],
        bytes=result.get("bytes"), cached_steps=result.get("cached_steps"),
    )  # fmt: skip
