"""API keys: who may call the /v1 routes (issue 21, docs/security.md).

`server.auth_keys_dir` is a folder of key files: a file's name is the key's name, its content (surrounding
whitespace stripped) is the key. The operator mounts the CR's Secret keys there as a projected volume,
so editing a Secret rotates its key in the running pod: the kubelet swaps the files (its `..data`
link, which is ignored with every other name outside `API_KEY_NAME_PATTERN`) and `KeyRing` notices
on the next request (one `stat` per key file; a changed inode, mtime or size re-reads the folder).

The contract for whichever app serves the routers (this runtime, and the queue's front door):
- the routers carry `require_key` as a router-level dependency, so every route they hold is
  authenticated wherever they are mounted; the app sets `app.state.keys` (`install`), a KeyRing or
  None (no authentication); an app that never called `install` answers 500 (fail closed);
- after `require_key`, `request.state.key_name` is the caller's key name, or None when auth is off;
  jobs and url results belong to it (`api.jobs`), the request counter and log lines carry it;
- a refusal raises `Unauthorized`, an HTTPException (401, `WWW-Authenticate: Bearer`) whose `code`
  the app's HTTPException handler puts in the OpenAI error body (`invalid_api_key`; the official
  `openai` client raises AuthenticationError on any 401).
The key itself is never logged, labelled or kept anywhere but in this ring.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import threading
from pathlib import Path

from fastapi import FastAPI, Request
from starlette.exceptions import HTTPException

from diffusion_runtime.contract.config import API_KEY_NAME_PATTERN, ConfigError, ServerConfig

log = logging.getLogger("diffusion_runtime")
SCHEME = "bearerAuth"  # the OpenAPI security scheme's name
INVALID_API_KEY = "invalid_api_key"  # OpenAI's `code` for a missing or wrong key
_NAME = re.compile(API_KEY_NAME_PATTERN)
_Signature = tuple[tuple[str, int, int, int], ...]


class Unauthorized(HTTPException):
    """401 with `WWW-Authenticate: Bearer` (RFC 6750) and OpenAI's `code`."""

    def __init__(self, message: str, error: str | None = None) -> None:
        challenge = f'Bearer realm="diffusion-runtime", error="{error}"' if error else "Bearer"
        super().__init__(401, message, headers={"WWW-Authenticate": challenge})
        self.code = INVALID_API_KEY


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8")).digest()


class KeyRing:
    """The keys in a folder, re-read when a key file changes (cheap per request: one stat each)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self._lock = threading.Lock()
        self._signature: _Signature | None = None
        self._keys: dict[str, bytes] = {}  # name -> sha256 of the key
        self.reload()
        if not self._keys:
            raise ConfigError(
                f"server.auth_keys_dir: no key file in {self.folder} (one file per key: the name is the "
                "key's name, the content the key)",
                "server.auth_keys_dir",
            )

    @property
    def names(self) -> list[str]:
        return sorted(self._keys)

    def _scan(self) -> _Signature:
        out = []
        try:
            entries = sorted(os.scandir(self.folder), key=lambda e: e.name)
        except OSError as e:
            raise ConfigError(
                f"server.auth_keys_dir: cannot read {self.folder} ({e.strerror or e})", "server.auth_keys_dir"
            ) from e
        for entry in entries:
            if not _NAME.match(entry.name):
                continue
            try:
                st = entry.stat()  # follows the kubelet's links to the current ..data
            except OSError:
                continue
            if entry.is_file():
                out.append((entry.name, st.st_ino, st.st_mtime_ns, st.st_size))
        return tuple(out)

    def reload(self) -> bool:
        """Re-read the folder if a key file was added, removed or changed; True when it was."""
        signature = self._scan()
        if signature == self._signature:
            return False
        with self._lock:
            keys: dict[str, bytes] = {}
            for name, *_ in signature:
                try:
                    secret = (self.folder / name).read_text(encoding="utf-8").strip()
                except (OSError, UnicodeDecodeError) as e:
                    log.warning("api key %s: cannot read (%s); it is refused until fixed", name, e)
                    continue
                if not secret:
                    log.warning("api key %s: empty file; it is refused until it holds a key", name)
                    continue
                keys[name] = _digest(secret)
            first = self._signature is None
            self._keys, self._signature = keys, signature
        log.info(
            "api keys %s from %s: %s",
            "loaded" if first else "reloaded",
            self.folder,
            ", ".join(sorted(keys)) or "none",
        )
        return True

    def match(self, presented: str) -> str | None:
        """The name of the key `presented` is, or None. Constant time in the key: every key's digest is
        compared with `hmac.compare_digest`, none skipped."""
        try:
            self.reload()
        except ConfigError as e:  # the folder went away: keep the last keys, say so
            log.warning("%s; keeping the keys read before", e)
        digest = _digest(presented)
        found = None
        for name, key in self._keys.items():
            if hmac.compare_digest(digest, key):
                found = name
        return found


def install(app: FastAPI, server: ServerConfig) -> KeyRing | None:
    """Set `app.state.keys` from the config: a KeyRing over server.auth_keys_dir, or None (auth off).
    Raises ConfigError when the folder is unreadable or holds no key."""
    keys = KeyRing(server.auth_keys_dir) if server.auth_keys_dir else None
    app.state.keys = keys
    return keys


def bearer(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


async def require_key(request: Request) -> str | None:
    """The router-level dependency: sets and returns `request.state.key_name` (None: auth is off)."""
    if not hasattr(request.app.state, "keys"):
        raise RuntimeError("app.state.keys is not set: call diffusion_runtime.api.auth.install(app, config)")
    keys: KeyRing | None = request.app.state.keys
    if keys is None:
        request.state.key_name = None
        return None
    token = bearer(request)
    client = request.client.host if request.client else "?"
    if token is None:
        log.info("401 %s %s from %s: no API key", request.method, request.url.path, client)
        raise Unauthorized(
            "You didn't provide an API key. Send it as `Authorization: Bearer <key>` (the openai "
            "client's api_key)."
        )
    name = keys.match(token)
    if name is None:
        log.info("401 %s %s from %s: invalid API key", request.method, request.url.path, client)
        raise Unauthorized("Incorrect API key provided.", error="invalid_token")
    request.state.key_name = name
    return name


def key_name(request: Request) -> str | None:
    """The caller's key name once `require_key` ran (None: auth off)."""
    return getattr(request.state, "key_name", None)


def security_scheme() -> dict:
    return {SCHEME: {"type": "http", "scheme": "bearer", "description": "An API key (docs/security.md)."}}
