"""What the engine refuses, in its own words; the HTTP layer (`api.errors`) maps each to a status."""

from __future__ import annotations


class EngineError(Exception):
    """A refusal or stop decided by the engine; the message is one line."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class Cancelled(EngineError):
    """Raised inside the pipeline's step callback to stop a generation early."""

    def __init__(self, message: str = "cancelled"):
        super().__init__(message)


class InvalidInput(EngineError):
    """The request asks for something this model or input cannot do (`param`: the field to blame)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class Unavailable(EngineError):
    """Not accepting work now (loading, warming up, draining); retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class QueueFull(EngineError):
    """The queue holds `server.max_queue` items; retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after
