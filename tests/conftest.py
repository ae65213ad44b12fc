"""Shared fixtures. Each concern keeps its fixtures in its own module beside this file."""

from fixtures_cluster import *  # noqa: F401,F403
from fixtures_queue import *  # noqa: F401,F403
from fixtures_runtime import *  # noqa: F401,F403
