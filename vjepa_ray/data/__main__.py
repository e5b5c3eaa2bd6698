"""``python -m vjepa_ray.data check PATH... [--json]``: the video doctor (`vjepa_ray.data.doctor`)."""

from __future__ import annotations

import sys

COMMANDS = {"check": "checks that videos decode as training will read them, and says why the others fail"}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        usage = "\n".join(f"  {name:8s}{text}" for name, text in COMMANDS.items())
        print(f"usage: python -m vjepa_ray.data COMMAND [args]\n\ncommands:\n{usage}", file=sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    from vjepa_ray.data import doctor  # imported on use: it pulls in the decoder

    return doctor.main(argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
