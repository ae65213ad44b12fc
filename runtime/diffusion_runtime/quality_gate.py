"""The quality gate's contract part: how a failed gate's one line starts (the pod's termination
message; the operator looks for it). The gate itself is the engine's: `engine/quality_gate.py`."""

FAILED = "quality gate failed: "
