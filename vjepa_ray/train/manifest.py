"""Per-file digests of a training checkpoint: written at every save, checked before a restart resumes from it.

Every rank lists the files of its share of the checkpoint in ``manifest/rank_XXXXX.json`` (relative path ->
bytes and SHA-256), and Ray Train merges the shares into one folder, so the manifests together name every
file; rank 0's also gives the world size, i.e. how many manifests there are. A truncated shard, a missing
``train_state.json`` or a rank whose upload never finished shows up as a difference.

Not to be confused with ``state_digest.json``: a digest of the trained values (weights and Adam moments) that a
restore with ``checkpoint.verify_restore`` compares after loading (``vjepa_ray.train.checkpoint``).
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from pathlib import Path

from vjepa_ray.runs import CHECKPOINT_MARKER

MANIFEST_DIR = "manifest"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def _manifest_path(folder: Path, rank: int) -> Path:
    return folder / MANIFEST_DIR / f"rank_{rank:05d}.json"


def write(folder: str | Path, rank: int, world_size: int) -> None:
    """Lists every file under ``folder`` (this rank's share of a checkpoint) in its manifest; call it last."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.relative_to(folder).parts[0] != MANIFEST_DIR)
    entries = {p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    out = _manifest_path(folder, rank)
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"rank": rank, "world_size": world_size, "files": entries}, indent=1))


def problems(folder: str | Path) -> list[str]:
    """What is wrong with the checkpoint in ``folder``: nothing when every file that a manifest names is there
    with its bytes. A checkpoint from before manifests has nothing to check against; a folder with neither a
    manifest nor ``train_state.json`` is not a vjepa_ray checkpoint."""
    folder = Path(folder)
    if not (folder / MANIFEST_DIR).is_dir():
        if (folder / CHECKPOINT_MARKER).is_file():
            return []
        return [f"not a vjepa_ray training checkpoint (no {CHECKPOINT_MARKER}, no {MANIFEST_DIR}/)"]
    first = _manifest_path(folder, 0)
    if not first.is_file():
        return [f"{first.relative_to(folder)} is missing"]
    # Files that several ranks write (DeepSpeed's) are whole when they match any rank's listing.
    expected: dict[str, list[dict]] = defaultdict(list)
    found = []
    for rank in range(json.loads(first.read_text())["world_size"]):
        path = _manifest_path(folder, rank)
        if not path.is_file():
            found.append(f"{path.relative_to(folder)} is missing (that rank's share never arrived)")
            continue
        for name, entry in json.loads(path.read_text())["files"].items():
            expected[name].append(entry)
    for name, entries in sorted(expected.items()):
        file = folder / name
        if not file.is_file():
            found.append(f"{name} is missing")
        elif file.stat().st_size not in {e["bytes"] for e in entries}:
            found.append(f"{name} has {file.stat().st_size} bytes, {entries[0]['bytes']} when saved")
        elif _sha256(file) not in {e["sha256"] for e in entries}:
            found.append(f"{name} differs from its digest at the save")
    return found
