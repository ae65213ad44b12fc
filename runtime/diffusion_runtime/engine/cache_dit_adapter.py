"""Every call into cache-dit, and the one reach into its internals, in one module (pinned: 1.5.3).

The public API: `enable_cache` + `load_configs` (apply a YAML), `BlockAdapterRegister.is_supported`,
`strify` (the cache tag), `summary` (per-call cached/computed steps), `set_compile_configs`,
`QuantizeConfig`'s default exclusions and `ENV.CACHE_DIT_FLUX_ENABLE_DUMMY_BLOCKS`.

The internal part, `call_context`: cache-dit opens its per-call cache context in a wrapper it puts
on the *loaded* pipeline's class (`CachedAdapter.mock_blocks`'s `new_call`, whose closure holds
`context_manager`, `flatten_contexts`, `contexts_kwargs`, `cls` and `block_adapter`). An edit
variant built with `from_pipe` shares the cached transformer but not that wrapper, so it is called
inside the same context, opened here from the wrapper's closure. `tests/runtime/test_cache_dit_adapter.py`
pins this to the installed cache-dit version; a new version must pass it before the pin moves.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from collections.abc import Iterator, Mapping
from typing import Any

from diffusion_runtime.engine.errors import InvalidInput

PINNED_VERSION = "1.5.3"  # the cache-dit whose wrapper closure `call_context` reads
_CLOSURE_NAMES = ("context_manager", "flatten_contexts", "contexts_kwargs", "cls", "block_adapter")


def enable(pipe: Any, raw: dict[str, Any]) -> None:
    """Apply cache-dit's own YAML mapping (cache, parallelism, attention, quantization) to `pipe`."""
    import cache_dit

    cache_dit.enable_cache(pipe, **cache_dit.load_configs(copy.deepcopy(raw)))


def is_supported(pipe: Any) -> bool:
    import cache_dit

    return bool(cache_dit.BlockAdapterRegister.is_supported(pipe))


def flux_dummy_blocks() -> bool:
    """Whether cache-dit joins FLUX's double- and single-stream blocks into one list (the default)."""
    from cache_dit.envs import ENV

    return bool(ENV.CACHE_DIT_FLUX_ENABLE_DUMMY_BLOCKS)


def default_exclude_layers() -> list[str]:
    from cache_dit import QuantizeConfig

    return list(QuantizeConfig().exclude_layers or [])


def tune_compile() -> None:
    """cache-dit's dynamo limits (cached steps take other paths: more recompiles), without its
    descent tuning, which multiplies compile time."""
    import cache_dit

    cache_dit.set_compile_configs(descent_tuning=False)


def tag(pipe: Any) -> str:
    """`cache_dit.strify` of a cached pipeline: the cache-dit tag of the info metric."""
    import cache_dit

    try:
        return cache_dit.strify(pipe) or "none"
    except Exception:  # noqa: BLE001 - strify of an uncached pipeline is informational only
        return "none"


def step_counts(pipe: Any) -> tuple[int, int]:
    """(cached, computed) transformer steps of the last pipeline call, from cache_dit.summary."""
    import cache_dit

    stats = [s for s in cache_dit.summary(pipe, logging=False) if s.cache_options]
    if not stats:
        return 0, 0
    s = stats[0]
    cached = int(s.accumulated_cached_steps or 0)
    executed = int(s.accumulated_executed_steps or 0)
    return cached, max(executed - cached, 0)


def _wrapper_closure(pipe: Any) -> Mapping[str, Any] | None:
    """The nonlocals of the wrapper cache-dit put on the loaded pipeline's class, or None."""
    try:
        cv = inspect.getclosurevars(type(pipe).__call__).nonlocals
    except TypeError:
        return None
    return cv if all(name in cv for name in _CLOSURE_NAMES) else None


def has_call_context(pipe: Any) -> bool:
    return _wrapper_closure(pipe) is not None


@contextlib.contextmanager
def call_context(pipe: Any) -> Iterator[None]:
    """Open the loaded pipeline's cache-dit context (what its wrapped __call__ does) around a call of
    another pipeline that shares its transformer; the stats hooks run after, as in the wrapper."""
    cv = _wrapper_closure(pipe)
    if cv is None:
        raise InvalidInput(
            f"edits with cache-dit need a per-call cache context; {type(pipe).__name__} has none"
        )
    manager = cv["context_manager"]
    with contextlib.ExitStack() as stack:
        for name, kw in zip(cv["flatten_contexts"], cv["contexts_kwargs"], strict=True):
            stack.enter_context(manager.enter_context(manager.reset_context(name, **kw)))
        yield
        cv["cls"].apply_stats_hooks(cv["block_adapter"])
