"""``data prepare --out DEST [--overwrite]`` never deletes what it did not write: a DEST that is, contains or
lies inside a SOURCE, or that holds foreign files, is refused (exit 2, one line) before Ray starts, on local
disk and on S3 (moto); ``--overwrite`` of a preparation deletes its own files and nothing else."""

from __future__ import annotations

import json

import pytest

from vjepa_ray import runs
from vjepa_ray.data.prepare import FORMAT, MANIFEST, check_destination, main, remove_preparation

CLIP = ["data.frames_per_clip=8", "data.frame_step=2", "data.crop_size=32"]
# A preparation's own files (a finished shard, its record, an unfinished shard) and a file someone added.
PREPARATION = {MANIFEST: json.dumps({"format": FORMAT}).encode(), "shard-000000.tar": b"tar",
               "shard-000000.json": b"{}", "shard-000001.tar.partial": b"half"}


def _write(base: str, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        runs.write_bytes(runs.join(base, name), data)


def _snapshot(base: str) -> dict[str, bytes]:
    """Every file under ``base`` (a folder or URI), by path relative to it."""
    fs, root = runs.filesystem(base)
    from pyarrow.fs import FileSelector, FileType

    infos = fs.get_file_info(FileSelector(root, recursive=True, allow_not_found=True))
    out = {}
    for info in infos:
        if info.type == FileType.File:
            with fs.open_input_stream(info.path) as stream:
                out[info.path[len(root.rstrip("/")) + 1:]] = stream.readall()
    return out


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path) -> str:
    """A folder (local, or a fresh bucket on moto's S3) holding a corpus ``videos/`` (with a label manifest)
    and ``notes/``, someone's own files."""
    base = str(tmp_path) if request.param == "local" else request.getfixturevalue("s3_bucket")
    _write(base, {"videos/a.mp4": b"video a", "videos/sub/b.mp4": b"video b", "videos/train.csv": b"a.mp4 0\n",
                  "notes/todo.txt": b"keep me"})
    return base


@pytest.mark.parametrize("source, out, said", [
    ("videos", "", "contains the source"),                      # the parent of the corpus (a bucket's root)
    ("videos", "videos", "is the source"),
    ("videos/*.mp4", "videos", "is the source"),                # a glob stands for its folder
    ("videos/train.csv", "videos", "contains the source"),      # a manifest's folder
    ("videos", "videos/sub", "lies inside the source"),
    ("videos", "notes", "not a preparation"),                   # foreign files
])
def test_a_dest_that_is_near_a_source_or_foreign_exits_2_and_deletes_nothing(store, capsys, source, out, said):
    before = _snapshot(store)
    dest = runs.join(store, out) if out else store
    code = main([runs.join(store, source), "--out", dest, "--overwrite", *CLIP])
    err = capsys.readouterr().err
    assert code == 2 and said in err and err.count("\n") == 1
    assert "--overwrite" not in err  # the way out is another folder, never deleting this one
    assert _snapshot(store) == before


def test_overwrite_deletes_a_preparations_own_files_and_nothing_else(store):
    dest = runs.join(store, "prepared")
    _write(dest, {**PREPARATION, "README.txt": b"someone's"})
    check_destination(dest, [runs.join(store, "videos")])  # a preparation, apart from the source: accepted
    assert sorted(remove_preparation(dest)) == sorted(PREPARATION)
    assert _snapshot(dest) == {"README.txt": b"someone's"}
    assert len(_snapshot(store)) == 5


def test_a_manifest_of_another_format_is_foreign(tmp_path, capsys):
    dest = str(tmp_path / "out")
    _write(dest, {MANIFEST: b'{"format": "something/else"}', "shard-000000.tar": b"theirs"})
    code = main([str(tmp_path / "videos"), "--out", dest, "--overwrite", *CLIP])
    assert code == 2 and "not a preparation" in capsys.readouterr().err
    assert len(_snapshot(dest)) == 2
