"""One pod, several ranks: the runtime starts one process per device and runs cache-dit's parallelism.

`diffusion-runtime serve` stays the pod's command. When the cache-dit YAML has a `parallelism_config`,
the serve process is rank 0: it starts ranks 1..N-1 as child processes (the same command line, with
`DIFFUSION_RUNTIME_RANK` set), joins them in one `torch.distributed` process group (NCCL for CUDA
tensors plus gloo for CPU ones on GPUs, gloo on CPU) and serves HTTP. Every call that runs the pipeline
(`generate`, `edit`, `warmup`) goes through `RankedModel`, which ships the whole call (a `RankCall`:
its typed parameters, image and mask included) to every rank through the rendezvous TCPStore before
running it locally, so all ranks run the same pipeline call with the same seed; only rank 0 returns
images. `RankedModel` is an `engine.interface.Engine` like the single-process `Model`: the HTTP layer
does not know which one it serves.

Agreement between ranks:
- cancellation (timeout, client gone): at each step end rank 0 broadcasts a stop flag; every rank
  stops at the same step.
- after each call the ranks all-reduce an error flag; ranks that disagree cannot continue, so the
  failing side exits and the pod goes down.
- collectives time out (`collective_timeout`), so ranks that diverge fail instead of hanging.
- rank 0 watches its ranks: one that exits takes the pod down at once with a one-line reason on
  stderr (the container's termination message). A rank whose rank 0 is gone exits (its stdin, a pipe
  from rank 0, reaches end of file).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

from diffusion_runtime.contract.config import ConfigError, RuntimeConfig
from diffusion_runtime.contract.parallel import Layout
from diffusion_runtime.contract.pipelines import Modality
from diffusion_runtime.engine.errors import Cancelled
from diffusion_runtime.engine.params import EditParams, GenerationParams, GenerationResult, StepCallback

if TYPE_CHECKING:
    from diffusion_runtime.engine.model import Model

log = logging.getLogger("diffusion_runtime")

RANK_ENV = "DIFFUSION_RUNTIME_RANK"  # set by rank 0 on the ranks it starts
STORE_PORT_ENV = "DIFFUSION_RUNTIME_STORE_PORT"
WORLD_ENV = "DIFFUSION_RUNTIME_WORLD_SIZE"
STORE_HOST = "127.0.0.1"  # all ranks of a replica live in one pod
LOAD_TIMEOUT = datetime.timedelta(hours=1)  # joining + loading + warmup (compile) may differ a lot per rank


def worker_rank() -> int | None:
    """This process's rank when rank 0 started it, else None (this is rank 0 or a single process)."""
    value = os.environ.get(RANK_ENV)
    return int(value) if value else None


def collective_timeout(config: RuntimeConfig) -> datetime.timedelta:
    """Serving-time limit of one collective: a step never legitimately waits longer than a request."""
    return datetime.timedelta(seconds=float(config.server.request_timeout_seconds) + 60.0)


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


def _backend(device: str) -> str:
    return "cpu:gloo,cuda:nccl" if device == "cuda" else "gloo"


def _init_process_group(rank: int, world: int, device: str, store: Any) -> None:
    import torch
    import torch.distributed as dist

    if device == "cuda":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group(_backend(device), store=store, rank=rank, world_size=world, timeout=LOAD_TIMEOUT)


def check_devices(layout: Layout, device: str) -> None:
    """Enough GPUs for one rank each."""
    if device != "cuda":
        return
    import torch

    have = torch.cuda.device_count()
    if have < layout.world_size:
        raise ConfigError(
            f"parallelism_config: {layout.describe()} needs {layout.world_size} GPUs; this pod sees {have}"
        )


class _Collectives:
    """What every rank does in the same order: the per-step stop flag and the per-call error vote."""

    def stop_flag(self, stop: bool) -> bool:
        import torch
        import torch.distributed as dist

        flag = torch.tensor([1 if stop else 0], dtype=torch.int32)
        dist.broadcast(flag, src=0)
        return bool(flag.item())

    def failed_ranks(self, failed: bool) -> int:
        import torch
        import torch.distributed as dist

        count = torch.tensor([1 if failed else 0], dtype=torch.int32)
        dist.all_reduce(count)
        return int(count.item())

    def step_hook(self, cancel: threading.Event | None, on_step: StepCallback | None) -> StepCallback:
        def hook(step_index: int) -> None:
            if on_step is not None:
                on_step(step_index)
            if self.stop_flag(cancel is not None and cancel.is_set()):
                raise Cancelled()

        return hook


def collective_failure(error: BaseException | None) -> bool:
    """A collective that timed out or lost a peer: the ranks are out of step for good. gloo raises
    plain RuntimeErrors naming its transport, NCCL and the store raise torch's DistError."""
    if error is None:
        return False
    import torch.distributed as dist

    if isinstance(error, dist.DistError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(m in text for m in ("/gloo/", "NCCL", "ProcessGroup"))


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


# ---------------------------------------------------------------------- what rank 0 ships


@dataclass(frozen=True)
class Generate:
    params: GenerationParams
    name = "generate"

    def run(self, model: Model, hook: StepCallback) -> GenerationResult:
        """Cancellation is the hook's: stop only when all ranks agree."""
        return model.generate(self.params, cancel=None, on_step=hook)


@dataclass(frozen=True)
class GenerateBatch:
    batch: tuple[GenerationParams, ...]  # one batch_key (server.max_batch)
    name = "generate_batch"

    def run(self, model: Model, hook: StepCallback) -> list[GenerationResult]:
        return model.generate_batch(self.batch, cancel=None, on_step=hook)


@dataclass(frozen=True)
class Edit:
    params: EditParams  # the decoded image and mask travel with it
    name = "edit"

    def run(self, model: Model, hook: StepCallback) -> GenerationResult:
        return model.edit(self.params, cancel=None, on_step=hook)


@dataclass(frozen=True)
class Warmup:
    name = "warmup"

    def run(self, model: Model, hook: StepCallback) -> float:
        return model.warmup()


@dataclass(frozen=True)
class Stop:
    name = "stop"


RankCall = Generate | GenerateBatch | Edit | Warmup


class RankGroup:
    """Rank 0's side: the ranks it started, the rendezvous store, the watchdog."""

    def __init__(self, layout: Layout, device: str, argv: Sequence[str], config: RuntimeConfig):
        self.layout = layout
        self.world = layout.world_size
        self.device = device
        self.argv = list(argv)
        self.config = config
        self.procs: dict[int, subprocess.Popen] = {}
        self.last_line: dict[int, str] = {}
        self.stopping = False
        self.lock = threading.Lock()
        self.seq = 0
        self.store: Any = None
        self.joined = False
        self.coll = _Collectives()

    # ------------------------------------------------------------------ processes

    def start(self) -> None:
        """Open the rendezvous store and start ranks 1..N-1 (returns at once; they join in `join`)."""
        import torch.distributed as dist

        self.store = dist.TCPStore(
            STORE_HOST, 0, self.world, is_master=True, timeout=LOAD_TIMEOUT, wait_for_workers=False
        )
        env = dict(os.environ)
        env[STORE_PORT_ENV] = str(self.store.port)
        env[WORLD_ENV] = str(self.world)
        for rank in range(1, self.world):
            proc = subprocess.Popen(
                [sys.executable, "-m", "diffusion_runtime", *self.argv],
                env=dict(env, **{RANK_ENV: str(rank)}), stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            )  # fmt: skip
            self.procs[rank] = proc
            log.info("started rank %d (pid %d)", rank, proc.pid)
            threading.Thread(
                target=self._forward, args=(rank, proc), name=f"rank{rank}-log", daemon=True
            ).start()
        log.info("parallel replica: %s on %s", self.layout.describe(), self.device)
        threading.Thread(target=self._watch, name="ranks-watchdog", daemon=True).start()

    def _forward(self, rank: int, proc: subprocess.Popen) -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            if line.strip():
                self.last_line[rank] = line.strip()
            sys.stderr.write(f"[rank {rank}] {line}\n")
            sys.stderr.flush()

    def _watch(self) -> None:
        while True:
            for rank, proc in self.procs.items():
                code = proc.poll()
                if code is None or self.stopping:
                    continue
                time.sleep(0.2)  # let its last line arrive
                how = f"was killed by {_signal_name(code)}" if code < 0 else f"exited with code {code}"
                last = self.last_line.get(rank, "")
                detail = f": {last}" if code > 0 and last else ""
                self._die(
                    f"rank {rank} (pid {proc.pid}) {how}{detail}; "
                    f"a parallel replica ({self.layout.describe()}) needs every rank, stopping"
                )
            time.sleep(0.2)

    def _die(self, line: str) -> NoReturn:
        self.stopping = True
        for proc in self.procs.values():
            with contextlib.suppress(OSError):
                proc.kill()
        sys.stderr.write(f"diffusion-runtime: {line}\n")
        sys.stderr.flush()
        os._exit(1)

    # ------------------------------------------------------------------ collectives

    def join(self) -> None:
        """Rank 0 joins the process group (blocks until every rank has)."""
        _init_process_group(0, self.world, self.device, self.store)
        self.joined = True

    def serving(self) -> None:
        """Loaded and warm: from now on a collective that waits longer than a request fails."""
        import torch.distributed as dist

        dist.set_timeout(collective_timeout(self.config))

    def run(
        self,
        model: Model,
        call: RankCall,
        cancel: threading.Event | None = None,
        on_step: StepCallback | None = None,
    ) -> Any:
        """Ship the call to every rank, run it on `model` (rank 0's) too, vote on the outcome; rank 0's
        result."""
        method = call.name
        with self.lock:
            self.seq += 1
            key = f"call/{self.seq}"
            self.store.set(key, pickle.dumps(call))
            error: BaseException | None = None
            result = None
            try:
                result = call.run(model, self.coll.step_hook(cancel, on_step))
            except BaseException as e:  # noqa: BLE001 - voted on, then re-raised
                error = e
            if collective_failure(error):
                assert error is not None
                time.sleep(1.0)  # a rank that died is the better reason: let the watchdog report it first
                self._die(
                    f"a collective failed during {method} ({_first_line(error)}); ranks are out of step, stopping"
                )
            try:
                failed = self.coll.failed_ranks(error is not None and not isinstance(error, Cancelled))
            except Exception as e:  # noqa: BLE001 - a rank is gone or stuck
                self._die(f"ranks did not agree after {method} ({_first_line(e)}); stopping")
            self.store.delete_key(key)
            if failed and failed != self.world:  # some ranks failed, others did not: out of step
                mine = f", rank 0: {_first_line(error)}" if error is not None else ""
                self._die(
                    f"{failed} of {self.world} ranks failed {method}{mine}; ranks out of step, stopping"
                )
            if error is not None:  # every rank failed alike: the request's error, the ranks stay in step
                raise error
            return result

    def shutdown(self, clean: bool) -> None:
        """Stop the ranks: a `stop` call when they are in step, else kill them."""
        self.stopping = True
        if clean and self.joined and self.lock.acquire(timeout=5):
            try:
                self.seq += 1
                self.store.set(f"call/{self.seq}", pickle.dumps(Stop()))
            finally:
                self.lock.release()
            deadline = time.monotonic() + 30
            for proc in self.procs.values():
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        if clean and self.joined:
            import torch.distributed as dist

            with contextlib.suppress(Exception):
                dist.destroy_process_group()


class RankedModel:
    """Rank 0's engine (`engine.interface.Engine`): pipeline calls run on every rank; what describes
    the model is the local Model's."""

    def __init__(self, model: Model, group: RankGroup):
        self.local = model
        self.group = group

    @property
    def layout(self) -> Layout:
        return self.group.layout

    @property
    def pipeline_name(self) -> str:
        return self.local.pipeline_name

    @property
    def device(self) -> str:
        return self.local.device

    @property
    def cache_tag(self) -> str:
        return self.local.cache_tag

    @property
    def quant_type(self) -> str:
        return self.local.quant_type

    @property
    def size_multiple(self) -> int:
        return self.local.size_multiple

    @property
    def modality(self) -> Modality:
        return self.local.modality

    @property
    def frame_multiple(self) -> int:
        return self.local.frame_multiple

    def generate(
        self,
        params: GenerationParams,
        cancel: threading.Event | None = None,
        on_step: StepCallback | None = None,
    ) -> GenerationResult:
        result: GenerationResult = self.group.run(self.local, Generate(params), cancel, on_step)
        return result

    def generate_batch(
        self,
        batch: Sequence[GenerationParams],
        cancel: threading.Event | None = None,
        on_step: StepCallback | None = None,
    ) -> list[GenerationResult]:
        result: list[GenerationResult] = self.group.run(
            self.local, GenerateBatch(tuple(batch)), cancel, on_step
        )
        return result

    def prepare_edit(self, kind: str) -> None:
        """Rank 0's variant decides; the other ranks build theirs on their first edit (a rank that
        cannot fails that call on every rank alike, or takes the replica down)."""
        self.local.prepare_edit(kind)

    def edit(
        self,
        params: EditParams,
        cancel: threading.Event | None = None,
        on_step: StepCallback | None = None,
    ) -> GenerationResult:
        result: GenerationResult = self.group.run(self.local, Edit(params), cancel, on_step)
        return result

    def warmup(self) -> float:
        seconds: float = self.group.run(self.local, Warmup())
        self.local.warmup_seconds = seconds
        return seconds


# ---------------------------------------------------------------------- ranks 1..N-1


def _exit_when_rank0_is_gone(rank: int) -> None:
    """Our stdin is a pipe from rank 0: end of file means rank 0 is gone."""
    with contextlib.suppress(OSError):
        while os.read(0, 1 << 16):  # raw fd: no buffered-reader lock held at interpreter exit
            pass
    sys.stderr.write(f"diffusion-runtime: rank {rank}: rank 0 is gone, exiting\n")
    sys.stderr.flush()
    os._exit(1)


def _next_call(store: Any, key: str) -> bytes:
    import torch.distributed as dist

    while True:
        try:
            return store.get(key)  # blocks until rank 0 sets it
        except dist.DistStoreError:
            continue  # idle for longer than the store timeout: keep waiting
        except dist.DistNetworkError:
            sys.stderr.write("diffusion-runtime: rank 0 is gone (its store closed), exiting\n")
            sys.stderr.flush()
            os._exit(1)


def run_worker(config: RuntimeConfig) -> int:
    """Ranks 1..N-1: join, load the same model, then run every call rank 0 ships until `stop`."""
    import torch.distributed as dist

    from diffusion_runtime.engine.model import load_model, pick_device

    rank = worker_rank()
    assert rank is not None
    world = int(os.environ[WORLD_ENV])
    port = int(os.environ[STORE_PORT_ENV])
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)  # rank 0 drains and then stops us
    threading.Thread(target=_exit_when_rank0_is_gone, args=(rank,), name="rank0-watch", daemon=True).start()
    device = pick_device(config.device)
    store = dist.TCPStore(STORE_HOST, port, world, is_master=False, timeout=LOAD_TIMEOUT)
    _init_process_group(rank, world, device, store)
    model = load_model(config, progress=False)
    log.info("rank %d/%d loaded %s on %s", rank, world, model.pipeline_name, device)
    coll = _Collectives()
    serving = False
    seq = 0
    while True:
        seq += 1
        call = pickle.loads(_next_call(store, f"call/{seq}"))
        if isinstance(call, Stop):
            log.info("rank %d: stop", rank)
            with contextlib.suppress(Exception):
                dist.destroy_process_group()
            return 0
        error: BaseException | None = None
        try:
            call.run(model, coll.step_hook(None, None))
        except Cancelled:
            pass
        except Exception as e:  # noqa: BLE001 - voted on below
            error = e
        if collective_failure(error):
            assert error is not None
            print(
                f"diffusion-runtime: rank {rank}: a collective failed during {call.name} ({_first_line(error)})",
                file=sys.stderr,
            )
            return 1
        failed = coll.failed_ranks(error is not None)
        if failed and failed != world:
            reason = f"{type(error).__name__}: {error}" if error else "another rank failed"
            print(
                f"diffusion-runtime: rank {rank}: {call.name} failed on {failed} of {world} ranks ({reason})",
                file=sys.stderr,
            )
            return 1
        if isinstance(call, Warmup) and not serving:
            dist.set_timeout(collective_timeout(config))
            serving = True
