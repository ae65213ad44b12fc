"""What a real node changes on the host, recorded before it starts and put back after it stops.

kubelet, kube-proxy, containerd and the CNI plugins change machine-wide state: sysctls (kubelet
sets `kernel.panic`, `kernel.panic_on_oops`, `vm.overcommit_memory`, ...), iptables chains
(`KUBE-*`, including a DROP rule for non-loopback sources to 127.0.0.0/8), cgroups (`/kubepods`
below the cgroup root), mounts (pod volumes, sandbox /dev/shm, overlay root filesystems), network
namespaces and links (the bridge, veth pairs), and a few directories kubelet creates whatever its
root dir (`/var/lib/kubelet/device-plugins`, `/var/log/containers`).

`snapshot()` records all of it (only the parts these programs touch: the host's other processes
are not looked at), `diff()` compares two snapshots, and `restore()` puts a recorded snapshot back
after every node process has exited. The node writes its baseline to disk before it changes
anything, so a run killed with SIGKILL is cleaned up by the next start or `diffusion-dev down`.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

# Every sysctl kubelet (setupKernelTunables), kube-proxy (conntrack, route_localnet) or the CNI
# bridge (ip_forward) may write.
SYSCTLS = (
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "net/ipv4/ip_forward",
    "net/ipv6/conf/all/forwarding",
    "net/ipv4/conf/all/route_localnet",
    "net/bridge/bridge-nf-call-iptables",
    "net/bridge/bridge-nf-call-ip6tables",
    "net/netfilter/nf_conntrack_max",
    "net/netfilter/nf_conntrack_tcp_timeout_established",
    "net/netfilter/nf_conntrack_tcp_timeout_close_wait",
    "net/netfilter/nf_conntrack_tcp_be_liberal",
)
# Paths kubelet creates outside its root dir.
PATHS = (
    "/var/lib/kubelet",
    "/var/log/pods",
    "/var/log/containers",
    "/var/run/netns",
    "/var/lib/cni",
    "/run/containerd",
)
# Programs of a node (process names as `comm` shows them, 15 characters at most).
PROGRAMS = ("kubelet", "kube-proxy", "containerd", "containerd-shim", "runc", "pause")
IPTABLES_TABLES = ("filter", "nat", "mangle", "raw")
# Top-level cgroups a node creates: kubelet's cgroup root (node.CGROUP_ROOT), the default ones of
# kubelet and containerd should anything run without a parent.
KUBELET_CGROUP = "diffusion-dev"
NODE_CGROUPS = (KUBELET_CGROUP, "kubepods", "k8s.io")
CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass
class Snapshot:
    sysctls: dict[str, str | None] = field(default_factory=dict)
    iptables: dict[str, str] = field(default_factory=dict)  # "ipv4 nat" -> normalised rules
    links: list[str] = field(default_factory=list)
    netns: list[str] = field(default_factory=list)
    mounts: list[str] = field(default_factory=list)
    cgroups: list[str] = field(default_factory=list)
    processes: list[str] = field(default_factory=list)
    paths: dict[str, bool] = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Snapshot:
        return cls(**data)


# ---------------------------------------------------------------- recording


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _iptables_save(binary: str, table: str) -> str | None:
    exe = shutil.which(binary)
    if not exe:
        return None
    proc = subprocess.run([exe, "-t", table], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        return None
    return normalise_rules(proc.stdout)


def normalise_rules(save: str) -> str:
    """iptables-save output without comments, counters and empty tables (pure).

    An empty table (built-in chains with ACCEPT policy, no rules) reads the same as an absent one:
    nf_tables keeps a table once anything touched it.
    """
    lines = []
    for line in save.splitlines():
        if not line or line.startswith("#"):
            continue
        if line.startswith(":"):
            line = re.sub(r"\s*\[\d+:\d+\]$", "", line)
        lines.append(re.sub(r"^\[\d+:\d+\]\s*", "", line))
    custom = [ln for ln in lines if ln.startswith(":") and not re.match(r":[A-Z]+ ACCEPT$", ln)]
    rules = [ln for ln in lines if ln.startswith("-")]
    if not custom and not rules:
        return ""
    return "\n".join(lines)


def _mounts() -> list[str]:
    out = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            fields = line.split()
            out.append(fields[4].encode().decode("unicode_escape"))
    return out


def _cgroups(depth: int = 3) -> list[str]:
    """Top-level cgroups of every hierarchy, and down to `depth` below the ones a node creates.

    Deeper cgroups elsewhere belong to the machine's own agents (they come and go); what a node
    adds is a new top-level cgroup (kubelet's cgroup root, or a sandbox without a parent).
    """
    out: set[str] = set()
    if not CGROUP_ROOT.is_dir():
        return []
    for hierarchy in sorted(CGROUP_ROOT.iterdir()):
        if not hierarchy.is_dir():
            continue
        for top in sorted(p for p in hierarchy.iterdir() if p.is_dir()):
            out.add(f"{hierarchy.name}:{top.name}")
            if top.name not in NODE_CGROUPS:
                continue
            base = len(top.parts)
            for root, dirs, _files in os.walk(top):
                if len(Path(root).parts) - base >= depth:
                    dirs[:] = []
                out.add(f"{hierarchy.name}:{Path(root).relative_to(hierarchy)}")
    return sorted(out)


def _links() -> list[str]:
    proc = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, timeout=30)
    names = []
    for line in proc.stdout.splitlines():
        m = re.match(r"\d+:\s+([^:@]+)", line)
        if m:
            names.append(m.group(1))
    return sorted(names)


def _processes() -> list[str]:
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        comm = _read(Path("/proc") / pid / "comm")
        if comm and comm in PROGRAMS:
            out.append(comm)
    return sorted(out)


def snapshot() -> Snapshot:
    snap = Snapshot()
    for key in SYSCTLS:
        snap.sysctls[key] = _read(Path("/proc/sys") / key)
    for family, binary in (("ipv4", "iptables-save"), ("ipv6", "ip6tables-save")):
        for table in IPTABLES_TABLES:
            rules = _iptables_save(binary, table)
            if rules is not None:
                snap.iptables[f"{family} {table}"] = rules
    snap.links = _links()
    with contextlib.suppress(OSError):
        snap.netns = sorted(os.listdir("/var/run/netns"))
    snap.mounts = _mounts()
    snap.cgroups = _cgroups()
    snap.processes = _processes()
    snap.paths = {p: os.path.lexists(p) for p in PATHS}
    return snap


def diff(before: Snapshot, after: Snapshot) -> list[str]:
    """Human-readable differences (pure); empty when the host is as it was."""
    out = []
    for key in sorted(set(before.sysctls) | set(after.sysctls)):
        if before.sysctls.get(key) != after.sysctls.get(key):
            out.append(f"sysctl {key}: {before.sysctls.get(key)} -> {after.sysctls.get(key)}")
    for key in sorted(set(before.iptables) | set(after.iptables)):
        b, a = before.iptables.get(key, ""), after.iptables.get(key, "")
        if b != a:
            added = sorted(set(a.splitlines()) - set(b.splitlines()))
            removed = sorted(set(b.splitlines()) - set(a.splitlines()))
            out.append(f"iptables {key}: added {added[:8]}, removed {removed[:8]}")
    for name in ("links", "netns", "mounts", "cgroups"):
        was, now = set(getattr(before, name)), set(getattr(after, name))
        if now - was:
            out.append(f"{name} added: {sorted(now - was)[:10]}")
        if was - now:
            out.append(f"{name} removed: {sorted(was - now)[:10]}")
    if sorted(before.processes) != sorted(after.processes):
        out.append(f"processes: {sorted(before.processes)} -> {sorted(after.processes)}")
    for path in sorted(set(before.paths) | set(after.paths)):
        if before.paths.get(path) != after.paths.get(path):
            out.append(f"path {path}: existed {before.paths.get(path)} -> {after.paths.get(path)}")
    return out


# ---------------------------------------------------------------- restoring


def unmount_below(*roots: Path) -> list[str]:
    """Unmount everything mounted at or below the given directories, deepest first."""
    prefixes = [str(Path(r).resolve()) for r in roots]
    targets = [m for m in _mounts() if any(m == p or m.startswith(p + "/") for p in prefixes)]
    done = []
    for target in sorted(set(targets), key=lambda m: (-m.count("/"), m)):
        proc = subprocess.run(["umount", "-l", target], capture_output=True, text=True)
        if proc.returncode == 0:
            done.append(target)
    return done


def _restore_iptables(before: Snapshot, now: Snapshot, log: list[str]) -> None:
    for key, rules in now.iptables.items():
        want = before.iptables.get(key, "")
        if rules == want:
            continue
        family, table = key.split()
        restore = "iptables-restore" if family == "ipv4" else "ip6tables-restore"
        exe = shutil.which(restore)
        if not exe:
            log.append(f"cannot restore iptables {key}: {restore} missing")
            continue
        if want:
            text = want + "\n"
        else:  # the table had nothing: flush it and drop its custom chains
            text = f"*{table}\nCOMMIT\n"
        proc = subprocess.run([exe, "-w"], input=text, capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            log.append(f"iptables {key}: {restore} failed: {proc.stderr.strip()}")
            continue
        if not want:
            # an empty restore keeps custom chains in nf_tables: delete them explicitly
            binary = "iptables" if family == "ipv4" else "ip6tables"
            subprocess.run([binary, "-w", "-t", table, "-F"], capture_output=True)
            subprocess.run([binary, "-w", "-t", table, "-X"], capture_output=True)
        log.append(f"restored iptables {key}")


def restore(before: Snapshot, mount_roots: tuple[Path, ...]) -> list[str]:
    """Put back what changed since `before`. Call only once every node process has exited.

    Returns what it did (for the log). New mounts below `mount_roots` (and the netns and kubelet
    directories), network namespaces, links and cgroups that exist now but not in `before` are
    removed; sysctls, iptables tables and paths are put back.
    """
    log: list[str] = []
    now = snapshot()
    roots = [str(Path(r).resolve()) for r in (*(str(m) for m in mount_roots), *PATHS)] + ["/run/netns"]
    # mounts (pod volumes, /dev/shm of sandboxes, overlay rootfs, netns bind mounts), deepest first
    new_mounts = sorted(set(now.mounts) - set(before.mounts), key=lambda m: (-m.count("/"), m))
    for target in new_mounts:
        if not any(target == r or target.startswith(r + "/") for r in roots):
            continue
        if subprocess.run(["umount", "-l", target], capture_output=True).returncode == 0:
            log.append(f"unmounted {target}")
    for ns in sorted(set(now.netns) - set(before.netns)):
        path = Path("/var/run/netns") / ns
        subprocess.run(["umount", "-l", str(path)], capture_output=True)
        with contextlib.suppress(OSError):
            path.unlink()
        log.append(f"removed netns {ns}")
    for link in sorted(set(_links()) - set(before.links)):
        if subprocess.run(["ip", "link", "delete", link], capture_output=True).returncode == 0:
            log.append(f"deleted link {link}")
    _restore_iptables(before, snapshot_iptables(), log)
    for key, value in before.sysctls.items():
        path = Path("/proc/sys") / key
        current = _read(path)
        if value is not None and current is not None and current != value:
            try:
                path.write_text(value + "\n")
                log.append(f"sysctl {key}: {current} -> {value}")
            except OSError as exc:
                log.append(f"sysctl {key}: cannot restore {value}: {exc}")
    # cgroups: the subtrees that did not exist before, deepest first (a cgroup that still has
    # processes refuses rmdir: kept, and the caller's diff reports it)
    for entry in sorted(set(_cgroups()) - set(before.cgroups)):
        hierarchy, rel = entry.split(":", 1)
        if "/" in rel:  # removed with its top-level cgroup below
            continue
        top = CGROUP_ROOT / hierarchy / rel
        for walked, _dirs, _files in sorted(os.walk(top), key=lambda w: -len(Path(w[0]).parts)):
            with contextlib.suppress(OSError):
                Path(walked).rmdir()
                log.append(f"removed cgroup {hierarchy}:{Path(walked).relative_to(CGROUP_ROOT / hierarchy)}")
    for name, existed in before.paths.items():
        if not existed and os.path.lexists(name):
            unmount_below(Path(name))
            shutil.rmtree(name, ignore_errors=True)
            log.append(f"removed {name}")
    return log


def snapshot_iptables() -> Snapshot:
    snap = Snapshot()
    for family, binary in (("ipv4", "iptables-save"), ("ipv6", "ip6tables-save")):
        for table in IPTABLES_TABLES:
            rules = _iptables_save(binary, table)
            if rules is not None:
                snap.iptables[f"{family} {table}"] = rules
    return snap
