"""Dispatches ``python -m vjepa_ray.bench FIGURE`` to ``vjepa_ray.bench.FIGURE``."""

from __future__ import annotations

import argparse
import ast
import importlib
import json
import logging
import pkgutil
import sys
from pathlib import Path

import vjepa_ray.bench as bench_package
from vjepa_ray.cli import exit_on_config_error, plain
from vjepa_ray.config import ConfigError


def _figures() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(bench_package.__path__) if not m.name.startswith("_"))


def _summary(figure: str) -> str:
    """The first paragraph of the figure's docstring, read without importing the module (which imports torch)."""
    source = (Path(bench_package.__path__[0]) / f"{figure}.py").read_text()
    doc = ast.get_docstring(ast.parse(source)) or ""
    return plain(" ".join(doc.split("\n\n")[0].split()))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m vjepa_ray.bench", description=plain(bench_package.__doc__),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="figure", required=True, metavar="FIGURE")
    figures = _figures()
    # Only the figure asked for is imported: the others' options are not needed to read this command line. A
    # figure's module imports torch, Ray, DeepSpeed and PyAV where it runs, not where it declares its options, so
    # that its --help is quick (tests/test_cli.py checks).
    chosen = next((arg for arg in argv if arg in figures), None)
    for name in figures:
        summary = _summary(name)
        figure_parser = sub.add_parser(name, help=summary, description=summary)
        if name == chosen:
            importlib.import_module(f"vjepa_ray.bench.{name}").add_arguments(figure_parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        result = importlib.import_module(f"vjepa_ray.bench.{args.figure}").run(args)
    except ConfigError as err:  # e.g. a model size the family cannot build: one line, as every command says it
        exit_on_config_error(f"python -m vjepa_ray.bench {args.figure}", err)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
