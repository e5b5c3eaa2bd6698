"""The run folder: where every command keeps what it made, ``<ray.storage_path>/<meta.name>/``.

``ray.storage_path`` is a local folder or a URI that pyarrow opens (``s3://bucket/runs``, ``gs://...``);
query parameters such as ``?endpoint_override=host:port&scheme=http`` stay on every path derived from it.
One folder holds::

    step_00000010/            a training checkpoint, written by Ray Train (its files: vjepa_ray.train.checkpoint)
    summary.json              pretraining's outcome: status, steps, final_loss, restarts, checkpoint, ...
    tensorboard/              TensorBoard event files of every training report
    plots/                    the PNGs of ``python -m vjepa_ray.report``
    probe_results.json        the results of ``python -m vjepa_ray.evaluate`` (Ray's files: ``../<name>_probe/``)
    results.csv  results.json  best.json  top1_vs_*.png     a sweep's table, best trial and plots
    trial_starts/             a sweep's record of every start of a trial
    pretrain/<trial id>/      each sweep trial's own run folder (its pretraining, then its probe)

TensorBoard writes local files only. With a URI run folder the event files are written under
``~/vjepa_runs/<bucket>/<path>/tensorboard`` on the driver's machine while the run lasts (``summary.json``
names that folder) and copied into the run folder's ``tensorboard/`` when the run ends.

Run folders are read back the same way wherever they live: ``find_checkpoint`` resolves a run folder to
its checkpoint, and ``local_copy`` hands readers that need local files (DeepSpeed's) a local folder.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import tempfile
import uuid
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pyarrow.fs as pafs

from vjepa_ray.config import Config
from vjepa_ray.redaction import redact

SUMMARY_FILE = "summary.json"
TENSORBOARD_DIR = "tensorboard"
PLOTS_DIR = "plots"
PROBE_RESULTS_FILE = "probe_results.json"
TRIAL_STARTS_DIR = "trial_starts"
TRIALS_DIR = "pretrain"
CHECKPOINT_PREFIX = "step_"
# A training checkpoint is a folder with this file (its contents: vjepa_ray.train.checkpoint).
CHECKPOINT_MARKER = "train_state.json"
# Local files of runs whose folder is a URI (TensorBoard's event files while the run lasts).
LOCAL_ROOT = "~/vjepa_runs"
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")


def checkpoint_dir_name(step: int, taken: Collection[str] = ()) -> str:
    """The folder of the checkpoint taken after ``step`` steps: ``step_00000100``, or ``step_00000100_1``, ...
    when ``taken`` has that name (a damaged checkpoint a restart skipped: Ray Train still holds it and will
    delete it by its path, which must then not be the new one's)."""
    name = base = f"{CHECKPOINT_PREFIX}{step:08d}"
    redo = 0
    while name in taken:
        redo += 1
        name = f"{base}_{redo}"
    return name


def is_uri(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a location by a scheme (``s3://``, ``gs://``, ``file://``, ...) rather than a local
    path."""
    return bool(_URI.match(str(path)))


def storage_path(cfg: Config) -> str:
    """``ray.storage_path`` as Ray gets it: a URI as given, a local path absolute (workers may run elsewhere)."""
    path = cfg.ray.storage_path
    return path if is_uri(path) else str(Path(path).expanduser().resolve())


def run_dir(cfg: Config) -> str:
    """``<ray.storage_path>/<meta.name>``: a local path or a URI."""
    return join(storage_path(cfg), cfg.meta.name)


def probe_run_name(cfg: Config) -> str:
    """The name of evaluation's Ray Train run, beside the run folder whose encoder it measures."""
    return f"{cfg.meta.name}_probe"


def join(base: str, *names: str) -> str:
    """``base/name/...`` for a local path or a URI; a URI's query stays at the end."""
    path, sep, query = str(base).partition("?")
    return "/".join([path.rstrip("/"), *names]) + sep + query


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem of a local path or URI, and the path inside it."""
    if is_uri(path):
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), str(Path(path).expanduser().resolve())


def exists(path: str) -> bool:
    fs, inner = filesystem(path)
    return fs.get_file_info(inner).type != pafs.FileType.NotFound


def is_file(path: str) -> bool:
    fs, inner = filesystem(path)
    return fs.get_file_info(inner).type == pafs.FileType.File


def list_names(folder: str) -> list[str]:
    """The names of the entries directly under ``folder`` (none when it does not exist), sorted."""
    fs, inner = filesystem(folder)
    return sorted(info.base_name for info in fs.get_file_info(pafs.FileSelector(inner, allow_not_found=True)))


def delete_file(path: str) -> None:
    fs, inner = filesystem(path)
    fs.delete_file(inner)


def is_refused(err: BaseException) -> bool:
    """Whether a storage error is a refusal (HTTP 403, bad credentials, a read-only folder): retrying cannot
    help, unlike an unreachable store."""
    if isinstance(err, PermissionError):
        return True
    text = str(err)
    return any(token in text for token in ("ACCESS_DENIED", "AccessDenied", "PERMISSION_DENIED",
                                           "INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH"))


def is_unreachable(err: BaseException) -> bool:
    """Whether a storage error says the store could not be reached or asked to slow down: worth retrying."""
    if isinstance(err, (ConnectionError, TimeoutError)):
        return True
    text = str(err)
    return any(token in text for token in ("NETWORK_CONNECTION", "SERVICE_UNAVAILABLE", "SLOW_DOWN",
                                           "INTERNAL_FAILURE", "REQUEST_TIMEOUT", "Could not connect"))


def check_writable(folder: str) -> None:
    """Writes and removes a small file in ``folder`` (creating it); raises PermissionError, naming the folder,
    when the store refuses the write."""
    probe = join(folder, f".write_check_{uuid.uuid4().hex}")
    try:
        write_bytes(probe, b"")
    except OSError as err:
        if is_refused(err):
            raise PermissionError(f"{folder} refuses writes ({str(err).splitlines()[0]})") from None
        raise
    delete_file(probe)


def read_bytes(path: str) -> bytes:
    fs, inner = filesystem(path)
    with fs.open_input_stream(inner) as stream:
        return stream.readall()


def write_bytes(path: str, data: bytes) -> None:
    """Writes ``data`` to ``path``, creating its folder."""
    fs, inner = filesystem(path)
    fs.create_dir(posixpath.dirname(inner), recursive=True)
    with fs.open_output_stream(inner) as out:
        out.write(data)


def read_json(path: str) -> Any:
    return json.loads(read_bytes(path))


def write_json(path: str, value: Any) -> None:
    """Writes ``value`` as JSON, credentials masked (``vjepa_ray.redaction``): run folders are shared."""
    write_bytes(path, json.dumps(redact(value), indent=1).encode())


def write_summary(folder: str, summary: dict[str, Any]) -> str:
    """Writes ``<folder>/summary.json``; returns its path."""
    path = join(folder, SUMMARY_FILE)
    write_json(path, summary)
    return path


def read_summary(folder: str) -> dict[str, Any] | None:
    """The run's ``summary.json``, or None while the run has none (running, or never finished)."""
    path = join(folder, SUMMARY_FILE)
    return read_json(path) if is_file(path) else None


def checkpoint_path(folder: str, ray_checkpoint_path: str) -> str:
    """The path or URI of a checkpoint of the run in ``folder``, from Ray's path of it (Ray reports the path
    inside its filesystem, which for a URI has lost the scheme)."""
    return join(folder, posixpath.basename(ray_checkpoint_path.rstrip("/")))


def is_checkpoint(path: str) -> bool:
    return is_file(join(path, CHECKPOINT_MARKER))


def list_checkpoints(folder: str) -> list[str]:
    """The names of the run folder's checkpoint folders, oldest first (whole or not: see
    ``vjepa_ray.train.manifest``)."""
    return [name for name in list_names(folder) if name.startswith(CHECKPOINT_PREFIX)]


def find_checkpoint(path: str) -> str:
    """The training checkpoint at ``path``: a checkpoint folder itself, or the one a run folder's summary.json
    names (the run folder's own copy of it when the run folder moved), or else its latest ``step_*`` folder.

    Raises FileNotFoundError when there is none.
    """
    if is_checkpoint(path):
        return path
    summary = read_summary(path)
    if summary is not None:
        named = summary.get("checkpoint")
        candidates = [named, checkpoint_path(path, named)] if named else []
        for candidate in candidates:
            if is_checkpoint(candidate):
                return candidate
        raise FileNotFoundError(f"{join(path, SUMMARY_FILE)} names no checkpoint folder that exists ({named!r})")
    steps = [step for step in (join(path, name) for name in list_checkpoints(path)) if is_checkpoint(step)]
    if not steps:
        raise FileNotFoundError(f"{path} is neither a training checkpoint nor a run folder with one")
    return steps[-1]


@contextmanager
def local_copy(path: str) -> Iterator[Path]:
    """A local folder with the files under ``path``: the folder itself when it is local, else a temporary
    copy (removed on exit), for readers that open local files (DeepSpeed's zero_to_fp32, TensorBoard)."""
    if not is_uri(path):
        yield Path(path).expanduser()
        return
    fs, inner = filesystem(path)
    with tempfile.TemporaryDirectory(prefix="vjepa_run_") as local:
        pafs.copy_files(inner, local, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        yield Path(local)


@contextmanager
def tensorboard_files(folder: str) -> Iterator[Path | None]:
    """A local folder with the run's event files: where training writes them, when that is on this machine
    (``summary.json`` names it), else the run folder's ``tensorboard/`` (copied here when remote); None when
    there is neither."""
    live = (read_summary(folder) or {}).get("tensorboard")
    if live and Path(live).is_dir():
        yield Path(live)
        return
    copy = join(folder, TENSORBOARD_DIR)
    if not exists(copy):
        yield None
        return
    with local_copy(copy) as files:
        yield files


def upload(local_folder: str | Path, dest: str) -> None:
    """Copies a local folder's files into ``dest`` (a path or URI), replacing files of the same names."""
    fs, inner = filesystem(dest)
    fs.create_dir(inner, recursive=True)
    pafs.copy_files(str(Path(local_folder).resolve()), inner, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=fs)


def tensorboard_dir(cfg: Config) -> str:
    """Where training writes its event files: the run folder's ``tensorboard/`` when it is local, else a
    local folder named after the URI (see the module's docstring), copied to the run folder at the end."""
    folder = run_dir(cfg)
    if not is_uri(folder):
        return join(folder, TENSORBOARD_DIR)
    parts = urlsplit(folder)
    bucket = parts.netloc.rpartition("@")[2]  # never credentials in a local path
    return str(Path(LOCAL_ROOT).expanduser().joinpath(bucket, *parts.path.strip("/").split("/"), TENSORBOARD_DIR))
