"""The runtime's contract with the operator, torch-free: the runtime config (`config`: pydantic models
with bounds, defaults and descriptions, and the runtime's whole preflight), its limits, the pinned
cache-dit's facts, the parallel layouts the runtime runs, and the log lines the operator reads
(`lines`). The operator imports nothing else from the runtime."""
