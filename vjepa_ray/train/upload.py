"""Checkpoint uploads that outlast an outage of the store: Ray Train's own copy, retried with bounded backoff.

In Ray 2.60 ``ray.train.report`` tries a checkpoint upload 3 times, about 1 and 2 s apart, when pyarrow
reports a retryable AWS error, and pyarrow's S3 client retries each request within seconds: together they
ride out a hiccup, not an outage of half a minute. ``persist_checkpoint`` (passed as ``checkpoint_upload_fn``)
runs Ray's own copy, ``StorageContext.persist_current_checkpoint``, and tries it again while the store is
unreachable, waiting 1, 2, 4, ... up to 30 s in between, for at most ``checkpoint.upload_retry_s``. A refusal
(HTTP 403, bad credentials) fails at once: retrying cannot fix it.
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
            if not runs.is_unreachable(err):
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
    return retry_while_unreachable(lambda: storage.persist_current_checkpoint(checkpoint, checkpoint_dir_name),
                                   f"uploading checkpoint {checkpoint_dir_name}", retry_s)
