"""Checkpoint uploads that outlast an outage of the store: Ray Train's own copy, retried with bounded backoff.

``ray.train.report`` retries a checkpoint upload a few times, seconds apart, when pyarrow reports a retryable
AWS error, and pyarrow's S3 client retries each request within seconds: together they ride out a hiccup, not
an outage of half a minute. ``persist_checkpoint`` (passed as ``checkpoint_upload_fn``)
runs Ray's own copy, ``StorageContext.persist_current_checkpoint``, and tries it again while the store is
unreachable, waiting 1, 2, 4, ... up to 30 s in between, for at most ``checkpoint.upload_retry_s``. A refusal
(HTTP 403, bad credentials) fails at once: retrying cannot fix it.

A copy that returns is not taken on trust: when the store went away while pyarrow was completing a multipart
upload, the copy has been seen to return without error and without the file (pyarrow ignores an error raised
as it closes the stream). So each rank lists what reached the run folder and retries the copy, as for an
unreachable store, while any of its own files is missing or of another size.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from vjepa_ray import runs

log = logging.getLogger(__name__)

T = TypeVar("T")
MAX_WAIT_S = 30.0


class StorageRefusedError(PermissionError):
    """The store refused a write: wrong credentials or a policy that forbids it."""


class StorageUnreachableError(OSError):
    """The store stayed unreachable for as long as the upload was allowed to retry."""


class IncompleteUploadError(OSError):
    """A copy returned, but some of its files are not in the store (or not whole): worth retrying."""


def retry_while_unreachable(action: Callable[[], T], what: str, retry_s: float,
                            sleep: Callable[[float], None] = time.sleep,
                            clock: Callable[[], float] = time.monotonic) -> T:
    """``action()``, tried again while it fails because the store is unreachable, until ``retry_s`` have
    passed; raises StorageRefusedError at once on a refusal, and other errors as they are."""
    deadline = clock() + retry_s
    wait = 1.0
    while True:
        try:
            return action()
        except OSError as err:
            if runs.is_refused(err):
                raise StorageRefusedError(f"{what}: the store refused the write ({str(err).splitlines()[0]}); "
                                          "check the credentials and the bucket's policy") from err
            if not (isinstance(err, IncompleteUploadError) or runs.is_unreachable(err)):
                raise
            if clock() + wait > deadline:
                # Worded without pyarrow's error codes, which Ray Train would retry on again.
                raise StorageUnreachableError(f"{what}: the store stayed unreachable for {retry_s:.0f} s "
                                              "(checkpoint.upload_retry_s)") from err
            log.warning("%s: the store is unreachable (%s); retrying in %.0f s", what,
                        str(err).splitlines()[0][:200], wait)
            sleep(wait)
            wait = min(2 * wait, MAX_WAIT_S)


def persist_checkpoint(checkpoint, checkpoint_dir_name: str, *, retry_s: float):
    """``checkpoint_upload_fn`` for ``ray.train.report``: Ray's copy of this rank's checkpoint folder into the
    run folder, retried as ``retry_while_unreachable`` says. Returns the persisted ``ray.train.Checkpoint``."""
    import ray.train

    storage = ray.train.get_context().get_storage()

    def persist():
        persisted = storage.persist_current_checkpoint(checkpoint, checkpoint_dir_name)
        missing = missing_files(checkpoint, persisted)
        if missing:
            raise IncompleteUploadError(f"{len(missing)} file(s) missing or partial after the copy: "
                                        f"{', '.join(missing[:3])}")
        return persisted

    return retry_while_unreachable(persist, f"uploading checkpoint {checkpoint_dir_name}", retry_s)


def _file_sizes(filesystem, folder: str) -> dict[str, int]:
    """Every file under ``folder`` of a pyarrow filesystem, by its path relative to ``folder``, with its size."""
    import pyarrow.fs

    infos = filesystem.get_file_info(pyarrow.fs.FileSelector(folder, recursive=True))
    root = folder.rstrip("/") + "/"
    return {info.path.removeprefix(root): info.size for info in infos if info.type == pyarrow.fs.FileType.File}


def missing_files(source, copy) -> list[str]:
    """The files of checkpoint ``source`` that checkpoint ``copy`` (the folder they were copied into, which
    other ranks' files may share) lacks or holds at another size, by relative path."""
    copied = _file_sizes(copy.filesystem, copy.path)
    return sorted(path for path, size in _file_sizes(source.filesystem, source.path).items()
                  if copied.get(path) != size)
