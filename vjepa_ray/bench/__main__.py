"""Dispatches ``python -m vjepa_ray.bench FIGURE`` to ``vjepa_ray.bench.FIGURE``."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import pkgutil
import sys

import vjepa_ray.bench as bench_package


def _figures() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(bench_package.__path__) if not m.name.startswith("_"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vjepa_ray.bench", description=bench_package.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="figure", required=True, metavar="FIGURE")
    modules = {}
    for name in _figures():
        module = importlib.import_module(f"vjepa_ray.bench.{name}")
        modules[name] = module
        module.add_arguments(sub.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0]))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    result = modules[args.figure].run(args)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
