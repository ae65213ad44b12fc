"""The host's tools the dev tooling runs, in one table: which Debian package brings each, what for.

`scripts/bootstrap.sh` installs what `diffusion-dev host-tools --missing` prints; the code
that runs a tool calls `require(...)` first, so a machine without it gets one line naming the
package instead of a FileNotFoundError from deep inside a build.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass


class ToolMissing(RuntimeError):
    """A host tool is not installed; the message names its Debian package."""


@dataclass(frozen=True)
class Tool:
    package: str  # the Debian package that installs it
    command: str  # a command name on PATH, or an absolute path
    purpose: str
    needs: str  # "cluster" (any run), "node" (the real node, root), "images" (image builds, root)


TOOLS: tuple[Tool, ...] = (
    Tool("openssl", "openssl", "the local cluster's certificates", "cluster"),
    Tool("runc", "/usr/sbin/runc", "the real node's container runtime (containerd's shim runs it)", "node"),
    Tool("containernetworking-plugins", "/usr/lib/cni/bridge", "the real node's pod network (CNI)", "node"),
    Tool("iptables", "/usr/sbin/iptables", "kube-proxy's Service rules; host-state snapshot", "node"),
    Tool("redis-server", "redis-server", "the queue tests' real Redis server (docs/queue.md)", "cluster"),
    Tool("iproute2", "ip", "the real node's bridge; host-state snapshot", "node"),
    Tool("mount", "umount", "unmounting the node's leftovers on teardown", "node"),
    Tool("buildah", "buildah", "building the Dockerfile's images", "images"),
    Tool("mmdebstrap", "mmdebstrap", "the local Debian base image", "images"),
)

GROUPS = ("cluster", "node", "images")


def found(tool: Tool) -> str | None:
    """The tool's path if installed, else None."""
    if os.path.isabs(tool.command):
        return tool.command if os.access(tool.command, os.X_OK) else None
    return shutil.which(tool.command)


def missing(*groups: str) -> list[Tool]:
    """The tools of `groups` (default: all) that are not installed."""
    wanted = groups or GROUPS
    return [t for t in TOOLS if t.needs in wanted and found(t) is None]


def message(tools: list[Tool], hint: str = "") -> str:
    names = " ".join(sorted({t.package for t in tools}))
    what = "; ".join(f"{t.command} ({t.package}: {t.purpose})" for t in tools)
    return f"missing host tool(s): {what}. Install: apt-get install {names} (scripts/bootstrap.sh does){hint}"


def require(*groups: str, hint: str = "") -> None:
    """Raise ToolMissing naming every missing tool of `groups` and its Debian package."""
    absent = missing(*groups)
    if absent:
        raise ToolMissing(message(absent, hint))


def path_of(command: str) -> str:
    """The path of one tool of the table (ToolMissing with its package if it is not installed)."""
    tool = next(t for t in TOOLS if t.command == command)
    path = found(tool)
    if path is None:
        raise ToolMissing(message([tool]))
    return path
