"""Export our weights to Meta's released V-JEPA checkpoint layout or a Hugging Face folder, and import them back.

    python -m vjepa_ray.export to-official --input RUN_FOLDER --output OFFICIAL.pt [--config FILE] [key=value ...]
    python -m vjepa_ray.export from-official --input OFFICIAL.pt --output OURS.pt [--config FILE] [key=value ...]
    python -m vjepa_ray.export to-hf --input RUN_FOLDER --output HF_FOLDER [--config FILE] [key=value ...]
    python -m vjepa_ray.export from-hf --input HF_FOLDER --output OURS.pt

``--input`` of ``to-official`` and ``to-hf`` is a run folder (its checkpoint) or one ``step_*`` checkpoint folder, local
or a URI such as ``s3://bucket/runs/demo``, or a file ``from-official`` wrote. The config (model.*,
data.frames_per_clip, data.crop_size, the mask list; for a run folder by default the run's own) says which
models the weights belong to (``vjepa_ray.train.weights`` checks them against those models); ``model.family``
says whose layout: ``vjepa2`` reads the 2.0 release's files (``model.pred_num_mask_tokens=10``,
``model.pred_num_heads=12`` for its predictors) and writes without the unused sin-cos tables.
``to-hf`` writes a ``transformers.VJEPA2Model`` folder (V-JEPA 2.0's model: ``model.family=vjepa2``) of the
target encoder and the predictor; ``from-hf`` reads the models from the folder's ``config.json``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from vjepa_ray import runs
from vjepa_ray.cli import OneLineArgumentParser, build_arg_parser, exit_on_config_error, plain
from vjepa_ray.config import Config, ConfigError, builtin_config_path, load_config

PROG = "python -m vjepa_ray.export"


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(prog=PROG, description=plain(__doc__.split("\n\n")[0]),
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    helps = {"to-official": "our weights -> the released layout", "from-official": "the released layout -> ours",
             "to-hf": "our weights -> a Hugging Face VJEPA2Model folder",
             "from-hf": "a Hugging Face VJEPA2Model folder -> our weights"}
    commands = parser.add_subparsers(dest="direction", required=True, metavar="{" + ",".join(helps) + "}")
    for name, text in helps.items():
        # The config parser's own -h comes along as a parent, hence add_help=False.
        sub = commands.add_parser(name, help=text, description=text, add_help=False,
                                  parents=[build_arg_parser(f"{PROG} {name}", text)])
        sub.add_argument("--input", required=True,
                         help="file to read (to-official, to-hf: also a run folder or a step_* checkpoint "
                         "folder, local or a URI; from-hf: a folder)")
        sub.add_argument("--output", required=True, type=Path, help="file (to-hf: folder) to write")
    return parser


@contextmanager
def _local_input(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Iterator[tuple[Path, Path | None]]:
    """``--input`` as a local path, and the config file of the run it comes from (None for a weights file).
    A run's checkpoint on remote storage is copied here while the command runs."""
    from vjepa_ray.train.checkpoint import CONFIG_FILE

    source = args.input
    if args.direction in ("to-official", "to-hf") and (runs.is_uri(source) or Path(source).is_dir()):
        try:
            checkpoint = runs.find_checkpoint(source)
        except FileNotFoundError as err:
            parser.error(f"--input: {err}")
        with runs.local_copy(checkpoint) as folder:
            yield folder, folder / CONFIG_FILE  # the run's own models
        return
    if args.direction == "from-hf":
        if not Path(source).is_dir():
            parser.error(f"--input: no such folder: {source}")
    elif not Path(source).is_file():
        parser.error(f"--input: no such file: {source}")
    yield Path(source), None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    prog = f"{PROG} {args.direction}"
    # Imported once the command line is read: --help needs none of torch.
    from vjepa_ray.models.families import get_family
    from vjepa_ray.models.hf import HF_FAMILY, config_overrides, read_hf_config
    from vjepa_ray.train.weights import from_hf_folder, from_official_file, to_hf_folder, to_official_file

    with _local_input(parser, args) as (source, run_config):
        overrides = list(args.overrides)
        if args.direction == "from-hf":  # the folder says which models it holds
            try:
                hf = read_hf_config(source)
                overrides += config_overrides(hf, str(source))
            except ValueError as err:
                print(f"{prog}: error: {err}", file=sys.stderr)
                return 2
        try:
            cfg = load_config(args.config or run_config or builtin_config_path("local_demo"), overrides)
            if args.direction == "to-hf" and get_family(cfg.model.family) is not HF_FAMILY:
                raise ConfigError("model.family", f"Hugging Face's VJEPA2Model holds V-JEPA 2.0 models; these are "
                                  f"{cfg.model.family} (to-official writes them in Meta's released layout)")
        except ConfigError as err:
            exit_on_config_error(prog, err)
        convert: dict[str, Callable[[Config, Path, Path], None]] = {
            "to-official": to_official_file, "from-official": from_official_file,
            "to-hf": to_hf_folder, "from-hf": from_hf_folder}
        try:
            convert[args.direction](cfg, source, args.output)
        except (ValueError, RuntimeError) as err:  # a file that does not fit the config's models
            print(f"{prog}: error: {err}", file=sys.stderr)
            return 2
        except OSError as err:
            print(f"{prog}: error: {err}", file=sys.stderr)
            return 1
    print(f"{prog}: wrote {args.output} ({cfg.model.family} {cfg.model.name}, {cfg.data.frames_per_clip} frames, "
          f"crop {cfg.data.crop_size})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
