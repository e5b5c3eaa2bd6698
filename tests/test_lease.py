"""One driver per run folder (``vjepa_ray.train.lease``), on local disk and on S3 (moto): a live lease stops a
second driver with one line naming its owner, a lease whose owner is gone is taken over, a release removes only
the driver's own lease. The end-to-end case (a second ``pretrain`` on a live run, a killed driver's run resumed)
is in test_retention_lease_e2e.py."""

from __future__ import annotations

import dataclasses
import json
import logging
import socket
import time

import pytest

from vjepa_ray import runs
from vjepa_ray.config import ConfigError
from vjepa_ray.train.lease import LEASE_FILE, Owner, RunLease


@pytest.fixture(params=["local", "s3"])
def run_folder(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "runs" / "demo")
    bucket = request.getfixturevalue("s3_bucket")
    return f"{bucket}/runs/demo"


def _lease(folder: str) -> RunLease:
    return RunLease(folder, settle_s=0.2, heartbeat_s=0.2)


def test_a_live_lease_stops_a_second_driver_naming_its_owner_and_a_release_frees_the_folder(run_folder):
    first = _lease(run_folder)
    first.acquire()
    try:
        deadline = time.time() + 30
        while first.holder().heartbeat == first.owner.heartbeat:  # until a heartbeat renewed it
            assert time.time() < deadline, "the lease was not renewed"
            time.sleep(0.1)
        assert first.holder().token == first.owner.token
        with pytest.raises(ConfigError) as refused:
            _lease(run_folder).acquire()
        message = str(refused.value)
        assert message.startswith("meta.name: ") and "\n" not in message
        assert f"{first.owner.describe()}" in message and "heartbeat " in message
        assert first.holder().token == first.owner.token  # the refused driver left the lease alone
    finally:
        first.release()
    assert not runs.exists(runs.join(run_folder, LEASE_FILE))
    with _lease(run_folder) as second:
        assert second.holder().token == second.owner.token


def _write_lease(folder: str, **fields) -> Owner:
    now = time.time()
    owner = Owner(**{"user": "someone", "host": "elsewhere", "pid": 1, "token": "theirs", "since": now - 300,
                     "heartbeat": now, **fields})
    runs.write_bytes(runs.join(folder, LEASE_FILE), json.dumps(dataclasses.asdict(owner)).encode())
    return owner


def test_a_lease_past_its_heartbeat_or_of_a_dead_local_process_is_taken_over_and_logged(run_folder, caplog):
    _write_lease(run_folder, heartbeat=time.time() - 5)  # another machine, heartbeat 5 s ago: alive
    with pytest.raises(ConfigError, match="someone@elsewhere pid 1 .*heartbeat 5 s ago"):
        RunLease(run_folder, stale_after_s=60).acquire()
    with caplog.at_level(logging.WARNING, logger="vjepa_ray.train.lease"):
        with RunLease(run_folder, stale_after_s=4, settle_s=0.2) as lease:
            assert lease.holder().token == lease.owner.token
        # This machine, a process that no longer exists: taken over at once, whatever its heartbeat.
        _write_lease(run_folder, host=socket.gethostname(), pid=2**22 + 1)
        with _lease(run_folder) as lease:
            assert lease.holder().token == lease.owner.token
    taken = [r.getMessage() for r in caplog.records if "taking over" in r.getMessage()]
    assert len(taken) == 2 and "someone@elsewhere pid 1" in taken[0]


def test_a_driver_that_lost_its_lease_does_not_remove_the_new_owners(run_folder):
    first = _lease(run_folder)
    first.acquire()
    runs.delete_file(runs.join(run_folder, LEASE_FILE))
    theirs = _write_lease(run_folder)  # another driver took the folder over
    time.sleep(0.6)
    first.release()
    assert RunLease(run_folder).holder() == theirs


def test_a_torn_read_of_a_lease_being_rewritten_is_read_again_not_taken_for_stale(run_folder, monkeypatch, caplog):
    # The race seen on moto: pyarrow read the old object's size, then that many bytes of the rewritten one.
    theirs = _write_lease(run_folder, heartbeat=time.time())
    read_bytes, reads = runs.read_bytes, []

    def torn_once(path):
        data = read_bytes(path)
        reads.append(path)
        return data[:-7] if len(reads) == 1 else data

    monkeypatch.setattr(runs, "read_bytes", torn_once)
    with caplog.at_level(logging.WARNING, logger="vjepa_ray.train.lease"):
        assert RunLease(run_folder).holder() == theirs
    assert len(reads) == 2 and not [r for r in caplog.records if r.name == "vjepa_ray.train.lease"]
