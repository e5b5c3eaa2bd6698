"""``python -m vjepa_ray.data COMMAND``: ``check`` (the video doctor, `vjepa_ray.data.doctor`) and ``prepare``
(transcoding a corpus into training shards, `vjepa_ray.data.prepare`)."""

from __future__ import annotations

import sys

COMMANDS = {"check": "checks that videos decode as training will read them, and says why the others fail",
            "prepare": "transcodes videos once into tar shards that training decodes cheaply"}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        usage = "\n".join(f"  {name:8s}{text}" for name, text in COMMANDS.items())
        print(f"usage: python -m vjepa_ray.data COMMAND [args]\n\ncommands:\n{usage}", file=sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    # Imported on use: they pull in the decoder (and prepare, Ray).
    if argv[0] == "prepare":
        from vjepa_ray.data import prepare

        return prepare.main(argv[1:])
    from vjepa_ray.data import doctor

    return doctor.main(argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
