"""`diffusion-operator` command line: `run` (the operator). The local cluster, image builds and the
demo are the developer tooling's (`diffusion-dev`, in `dev/`), not the operator's."""

from __future__ import annotations

import sys

USAGE = """usage: diffusion-operator <command> [options]

commands:
  run     run the operator (kopf) against the current kubeconfig or in-cluster config

(the local cluster, image builds and the demo: `diffusion-dev`, installed with the dev tooling)
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "run":
        from diffusion_operator.runner import main as run_main

        return run_main(rest)
    print(f"diffusion-operator: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
