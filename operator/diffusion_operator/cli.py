"""`diffusion-operator` command line: `run` (the operator) and `dev` (the local control plane)."""

from __future__ import annotations

import sys

USAGE = """usage: diffusion-operator <command> [options]

commands:
  run     run the operator (kopf) against the current kubeconfig or in-cluster config
  dev     local control plane with fake GPU nodes: dev up | dev env | dev down
  demo    run the end-to-end demo on the local control plane and the tiny CPU model
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
    if command == "dev":
        from diffusion_operator.devcluster.cli import main as dev_main

        return dev_main(rest)
    if command == "demo":
        from diffusion_operator.demo import main as demo_main

        return demo_main(rest)
    print(f"diffusion-operator: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
