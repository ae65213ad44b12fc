"""The command line the generators in tools/ share: write the generated file, or `--check` it.

    main(__doc__, render, OUTPUT, "tools/gen_x.py", "module", argv)

`--check` exits 1 with `<output> is stale: run <script>` on stderr when the committed file differs
from `render()`'s text (or is missing), 0 when it is the same; without it the file is written.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path


def main(
    doc: str | None, render: Callable[[], str], output: Path, script: str, what: str, argv: list[str] | None
) -> int:
    parser = argparse.ArgumentParser(description=(doc or "").splitlines()[0])
    parser.add_argument("--check", action="store_true", help=f"fail if the committed {what} differs")
    parser.add_argument("--output", type=Path, default=output)
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.output.read_text() if args.output.exists() else ""
        if current != text:
            print(f"{args.output} is stale: run {script}", file=sys.stderr)
            return 1
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(f"wrote {args.output}")
    return 0
