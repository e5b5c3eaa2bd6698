"""The command line every command shares: ``--config FILE``, ``section.key=value`` overrides, ``--dry-run``.

A bad config or argument ends a command with one line on stderr naming the key, and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from vjepa_ray.config import SECTIONS, Config, ConfigError, builtin_config_path, load_config, to_yaml
from vjepa_ray.redaction import install_log_redaction, redact_text


class OneLineArgumentParser(argparse.ArgumentParser):
    """Bad arguments end the command like a bad config does: one line on stderr, exit 2, no usage dump."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def plain(text: str) -> str:
    """Docstring text as a terminal shows it: without the reStructuredText backticks around names."""
    return re.sub(r"``(.+?)``|`(.+?)`", lambda m: m.group(1) or m.group(2), text)


def build_arg_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The shared command line: ``--config FILE`` and ``section.key=value`` overrides."""
    parser = OneLineArgumentParser(
        prog=prog,
        description=plain(description),
        epilog="Config sections: " + ", ".join(SECTIONS)
        + ". Override any key as section.key=value (lists as key=[a,b], mask configs as mask.0.num_blocks=4).",
    )
    parser.add_argument("--config", metavar="FILE", default=None,
                        help="YAML config (default: the built-in local demo)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="dot-list overrides")
    return parser


def parse_cli(prog: str, description: str, argv: list[str] | None = None, default_config: str = "local_demo",
              check: Callable[[Config], None] | None = None) -> tuple[Config, argparse.Namespace]:
    """Parses a command line into a validated Config; on a bad config prints one line and exits 2.

    ``check`` is the command's own validation beyond the schema (raising ConfigError). With ``--dry-run``
    the resolved config is printed and the command exits 0 without starting anything.
    """
    parser = build_arg_parser(prog, description)
    parser.add_argument("--dry-run", action="store_true",
                        help="validate the config and the local data paths, print the config resolved and exit "
                             "(nothing starts)")
    parser.add_argument("--verbose", action="store_true",
                        help="print everything Ray and DeepSpeed print (same as logging.verbose=true)")
    args = parser.parse_args(argv)
    path = args.config if args.config is not None else builtin_config_path(default_config)
    overrides = [*args.overrides, *(["logging.verbose=true"] if args.verbose else [])]
    try:
        cfg = load_config(path, overrides)
        if check is not None:
            check(cfg)
    except ConfigError as err:
        exit_on_config_error(prog, err)
    if args.dry_run:
        print(to_yaml(cfg), end="")
        print(f"# {prog}: config ok", file=sys.stderr)
        raise SystemExit(0)
    return cfg, args


def exit_on_config_error(prog: str, err: ConfigError) -> NoReturn:
    """One line on stderr, exit 2: how every command reports a config it cannot run."""
    print(f"{prog}: config error: {redact_text(str(err))}", file=sys.stderr)
    raise SystemExit(2)


def run_command(prog: str, description: str, argv: list[str] | None, check: Callable[[Config], None],
                run: Callable[[Config], Any]) -> Any:
    """The life of a Ray command (pretrain, evaluate, tune): parse and check the config, log at INFO, run.

    A ConfigError that ``run`` raises (something only found once running, e.g. a manifest without labels)
    ends the command as one found at parsing does: one line, exit 2.
    """
    cfg, _ = parse_cli(prog, description, argv, check=check)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    install_log_redaction()
    try:
        return run(cfg)
    except ConfigError as err:
        exit_on_config_error(prog, err)
