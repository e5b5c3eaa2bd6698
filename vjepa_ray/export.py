"""Export our weights to Meta's released V-JEPA checkpoint layout, and import them back.

    python -m vjepa_ray.export to-official --input RUN_FOLDER --output OFFICIAL.pt [--config FILE] [key=value ...]
    python -m vjepa_ray.export from-official --input OFFICIAL.pt --output OURS.pt [--config FILE] [key=value ...]

``--input`` of ``to-official`` is a run folder (its checkpoint) or one ``step_*`` checkpoint folder, local
or a URI such as ``s3://bucket/runs/demo``, or a file ``from-official`` wrote. The config (model.*,
data.frames_per_clip, data.crop_size, the mask list; for a run folder by default the run's own) says which
models the weights belong to; both directions load them strictly into those models before writing, so a file
that does not fit fails here, listing the keys, rather than in whoever reads it next.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch

from vjepa_ray import runs
from vjepa_ray.cli import OneLineArgumentParser, build_arg_parser, exit_on_config_error
from vjepa_ray.config import Config, ConfigError, builtin_config_path, load_config
from vjepa_ray.models import build_models
from vjepa_ray.models.pretrained import (
    MODEL_KEYS,
    StateDict,
    build_empty,
    load_state_checked,
    official_checkpoint,
    read_checkpoint,
    state_from_checkpoint,
)
from vjepa_ray.train.checkpoint import CONFIG_FILE, read_model_weights

PROG = "python -m vjepa_ray.export"


def read_training_weights(path: str | os.PathLike) -> dict[str, dict[str, torch.Tensor]]:
    """The encoder, predictor and target-encoder state dicts of our weights: a local run folder or one of its
    training checkpoints (``step_*``), or a file ``from-official`` wrote
    (``{"encoder": sd, "predictor": sd, "target_encoder": sd}``)."""
    if Path(path).is_dir():
        return read_model_weights(runs.find_checkpoint(str(path)))
    checkpoint = read_checkpoint(path)
    return {key: state_from_checkpoint(checkpoint, key, str(path)) for key in MODEL_KEYS}


def write_training_weights(path: str | os.PathLike, weights: Mapping[str, StateDict]) -> None:
    """The inverse of ``read_training_weights``."""
    torch.save({key: dict(weights[key]) for key in MODEL_KEYS}, path)


def verified_weights(cfg: Config, weights: Mapping[str, StateDict], source: str) -> dict[str, dict[str, torch.Tensor]]:
    """Loads each state dict into the config's model (strictly) and returns the models' state dicts.

    A position table of another clip size is replaced by the config's (see models.pretrained).
    """
    encoder, predictor = build_empty(build_models, cfg)
    models = {"encoder": encoder, "predictor": predictor, "target_encoder": copy.deepcopy(encoder)}
    for key, model in models.items():
        load_state_checked(model, weights[key], f"{source}[{key}]")
    return {key: model.state_dict() for key, model in models.items()}


def to_official_file(cfg: Config, source: str | os.PathLike, dest: str | os.PathLike) -> None:
    weights = verified_weights(cfg, read_training_weights(source), str(source))
    torch.save(official_checkpoint(**weights), dest)


def from_official_file(cfg: Config, source: str | os.PathLike, dest: str | os.PathLike) -> None:
    checkpoint = read_checkpoint(source)
    weights = {key: state_from_checkpoint(checkpoint, key, str(source)) for key in MODEL_KEYS}
    write_training_weights(dest, verified_weights(cfg, weights, str(source)))


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="direction", required=True, metavar="{to-official,from-official}")
    helps = {"to-official": "our weights -> the released layout", "from-official": "the released layout -> ours"}
    for name, text in helps.items():
        # The config parser's own -h comes along as a parent, hence add_help=False.
        sub = commands.add_parser(name, help=text, description=text, add_help=False,
                                  parents=[build_arg_parser(f"{PROG} {name}", text)])
        sub.add_argument("--input", required=True,
                         help="file to read (to-official: also a run folder or a step_* checkpoint folder, "
                         "local or a URI)")
        sub.add_argument("--output", required=True, type=Path, help="file to write")
    return parser


@contextmanager
def _local_input(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Iterator[tuple[Path, Path | None]]:
    """``--input`` as a local path, and the config file of the run it comes from (None for a weights file).
    A run's checkpoint on remote storage is copied here while the command runs."""
    source = args.input
    if args.direction == "to-official" and (runs.is_uri(source) or Path(source).is_dir()):
        try:
            checkpoint = runs.find_checkpoint(source)
        except FileNotFoundError as err:
            parser.error(f"--input: {err}")
        with runs.local_copy(checkpoint) as folder:
            yield folder, folder / CONFIG_FILE  # the run's own models
        return
    if not Path(source).is_file():
        parser.error(f"--input: no such file: {source}")
    yield Path(source), None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    prog = f"{PROG} {args.direction}"
    with _local_input(parser, args) as (source, run_config):
        try:
            cfg = load_config(args.config or run_config or builtin_config_path("local_demo"), args.overrides)
        except ConfigError as err:
            exit_on_config_error(prog, err)
        convert: dict[str, Callable[[Config, Path, Path], None]] = {
            "to-official": to_official_file, "from-official": from_official_file}
        try:
            convert[args.direction](cfg, source, args.output)
        except (ValueError, RuntimeError, OSError) as err:  # a file that does not fit the config's models
            print(f"{prog}: error: {err}", file=sys.stderr)
            return 1
    print(f"{prog}: wrote {args.output} ({cfg.model.name}, {cfg.data.frames_per_clip} frames, "
          f"crop {cfg.data.crop_size})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
