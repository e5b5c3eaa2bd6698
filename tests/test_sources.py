"""Listing `data.paths` (every kind of entry) and weighted epoch orders. No decoding: files are bytes."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest

from vjepa_ray.config import ConfigError
from vjepa_ray.data.sources import VideoRef, epoch_order, list_videos, open_video


def _touch(path: Path, data: bytes = b"") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data or path.name.encode())
    return path


def _uris(refs: list[VideoRef]) -> list[str]:
    return [r.uri for r in refs]


def test_directory_is_searched_recursively_for_video_and_image_extensions(tmp_path):
    videos = [_touch(tmp_path / "b.mp4"), _touch(tmp_path / "a" / "c.MKV"), _touch(tmp_path / "a" / "d" / "e.webm"),
              _touch(tmp_path / "a" / "frame.jpg")]  # images are static clips
    _touch(tmp_path / "notes.md")
    refs = list_videos([str(tmp_path)])
    assert _uris(refs) == sorted(str(p) for p in videos)
    assert all(r.label is None and r.source_index == 0 and r.member == "" for r in refs)


def test_globs_and_file_uris(tmp_path):
    for name in ("x/1.mp4", "x/2.mp4", "x/3.avi", "y/4.mp4"):
        _touch(tmp_path / name)
    expected = [f"{tmp_path}/{n}" for n in ("x/1.mp4", "x/2.mp4", "y/4.mp4")]
    assert _uris(list_videos([f"{tmp_path}/**/*.mp4"])) == expected
    uri_refs = list_videos([f"file://{tmp_path}/x"])
    assert _uris(uri_refs) == [f"file://{tmp_path}/x/{n}" for n in ("1.mp4", "2.mp4", "3.avi")]
    with open_video(uri_refs[0]) as stream:  # a URI is read through pyarrow, not as a local path
        assert stream.read() == b"1.mp4"


def test_reference_manifest_space_delimited(tmp_path):
    _touch(tmp_path / "clips" / "a b.mp4")
    manifest = tmp_path / "train.csv"
    manifest.write_text(f"{tmp_path}/clips/a b.mp4 3\nclips/rel.mp4 7\n\nclips/nolabel.mp4\n")
    refs = list_videos([str(manifest)])
    assert [(r.uri, r.label) for r in refs] == [
        (f"{tmp_path}/clips/a b.mp4", 3), (f"{tmp_path}/clips/rel.mp4", 7), (f"{tmp_path}/clips/nolabel.mp4", None)]


def test_csv_with_header_and_jsonl_manifests(tmp_path):
    (tmp_path / "m.csv").write_text("label,path\n1,/v/a.mp4\nriding,v/b.mp4\n")
    (tmp_path / "m.jsonl").write_text(json.dumps({"path": "/v/c.mp4", "label": 2}) + "\n"
                                      + json.dumps({"path": "s3://bkt/d.mp4"}) + "\n")
    refs = list_videos([str(tmp_path / "m.csv"), str(tmp_path / "m.jsonl")])
    assert [(r.uri, r.label, r.source_index) for r in refs] == [
        ("/v/a.mp4", 1, 0), (f"{tmp_path}/v/b.mp4", "riding", 0), ("/v/c.mp4", 2, 1), ("s3://bkt/d.mp4", None, 1)]
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(ConfigError, match="line 1"):
        list_videos([str(tmp_path / "bad.jsonl")])


def _write_shard(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_tar_shards_are_read_in_place_by_offset(tmp_path):
    rng = np.random.default_rng(0)
    blobs = {f"s{i}.mp4": rng.bytes(3000 + 700 * i) for i in range(3)}
    for shard in range(2):
        members = {f"{shard}/{k}": v for k, v in blobs.items()}
        members[f"{shard}/s1.cls"] = b"5\n"
        members[f"{shard}/s0.json"] = b"{}"
        _write_shard(tmp_path / f"train-{shard:03d}.tar", members)
    refs = list_videos([str(tmp_path / "train-{000..001}.tar")])
    assert [(Path(r.uri).name, r.member, r.label) for r in refs] == [
        (f"train-{s:03d}.tar", f"{s}/s{i}.mp4", 5 if i == 1 else None) for s in range(2) for i in range(3)]
    for ref in refs:
        with open_video(ref) as stream:  # a seekable window on the shard, nothing extracted
            stream.seek(-10, io.SEEK_END)
            tail = stream.read()
            stream.seek(0)
            assert stream.read() == blobs[ref.member.split("/")[1]]
            assert tail == blobs[ref.member.split("/")[1]][-10:]
    assert not list((tmp_path).glob("*/*.mp4"))
    # A folder of shards lists their members too.
    assert list_videos([str(tmp_path)]) == refs


def test_compressed_shard_is_a_config_error(tmp_path):
    with tarfile.open(tmp_path / "x.tar", "w:gz") as tar:
        info = tarfile.TarInfo("a.mp4")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    with pytest.raises(ConfigError, match="uncompressed tar"):
        list_videos([str(tmp_path / "x.tar")])


def test_injected_filesystem_serves_uris(tmp_path):
    _touch(tmp_path / "bucket" / "k" / "a.mp4")
    _touch(tmp_path / "bucket" / "k" / "b.mp4")
    fs = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    refs = list_videos(["s3://bucket/k"], filesystem=fs)
    assert _uris(refs) == ["s3://bucket/k/a.mp4", "s3://bucket/k/b.mp4"]
    assert _uris(list_videos(["s3://bucket/*/b.mp4"], filesystem=fs)) == ["s3://bucket/k/b.mp4"]
    with open_video(refs[1], fs) as stream:
        assert stream.read() == b"b.mp4"


def test_entries_without_videos_are_config_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="data.paths: .*holds no videos"):
        list_videos([str(tmp_path / "empty")])
    with pytest.raises(ConfigError, match="does not exist"):
        list_videos([str(tmp_path / "missing")])
    with pytest.raises(ConfigError, match="data.weights"):
        list_videos([str(tmp_path)], weights=[1.0, 2.0])


def test_epoch_order_is_a_seeded_permutation():
    refs = [VideoRef(f"/v/{i}.mp4") for i in range(50)]
    a, b = epoch_order(refs, [], seed=1, epoch=0), epoch_order(refs, [], seed=1, epoch=0)
    assert np.array_equal(a, b) and sorted(a.tolist()) == list(range(50))
    assert not np.array_equal(a, epoch_order(refs, [], seed=1, epoch=1))
    assert not np.array_equal(a, epoch_order(refs, [], seed=2, epoch=0))


def test_weights_set_sampling_proportions(tmp_path):
    for i in range(3):
        _touch(tmp_path / "small" / f"{i}.mp4")
    for i in range(12):
        _touch(tmp_path / "big" / f"{i}.mp4")
    weights = [0.7, 0.3]
    refs = list_videos([str(tmp_path / "small"), str(tmp_path / "big")], weights)
    drawn = np.concatenate([epoch_order(refs, weights, seed=0, epoch=e) for e in range(400)])  # 6000 draws
    share = np.mean([refs[i].source_index == 0 for i in drawn])
    assert abs(share - 0.7) < 0.03  # binomial std ~0.006
    # Within an epoch a source's videos recur evenly: their draw counts differ by at most one.
    for e in range(5):
        small = Counter(refs[i].uri for i in epoch_order(refs, weights, seed=0, epoch=e) if refs[i].source_index == 0)
        assert len(small) == 3 and max(small.values()) - min(small.values()) <= 1
    # A zero weight leaves a source out of the list altogether.
    assert {r.source_index for r in list_videos([str(tmp_path / "small"), str(tmp_path / "big")], [0, 1])} == {1}


def test_relative_entries_become_absolute(tmp_path, monkeypatch):
    _touch(tmp_path / "v" / "a.mp4")
    (tmp_path / "v" / "list.txt").write_text("a.mp4 1\n")
    monkeypatch.chdir(tmp_path)
    expected = str(tmp_path / "v" / "a.mp4")  # decode tasks run in other working directories
    for entry in ("v/a.mp4", "v/*.mp4", "v", "v/list.txt"):
        assert _uris(list_videos([entry])) == [expected]


def test_data_command_dispatches_check_to_the_doctor(monkeypatch, capsys):
    from vjepa_ray.data import __main__ as cli
    from vjepa_ray.data import doctor

    seen = []
    monkeypatch.setattr(doctor, "main", lambda argv: seen.append(argv) or 0)
    assert cli.main(["check", "/v", "--json"]) == 0 and seen == [["/v", "--json"]]
    assert cli.main([]) == 2 and "check" in capsys.readouterr().err
