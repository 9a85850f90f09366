"""shared.storage: URLs are validated (never taken as local paths), and on a real S3 server (moto's, on
127.0.0.1; see the repository's conftest.py) a shard or table appears only when complete, reads back the
same bytes as the same shard written locally, and what killed writers leave is removed."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from shared import storage
from shared.shard import ShardWriter, iter_samples, list_shards, validate_shard
from shared.storage import TMP_MARK, StorageError


@pytest.mark.parametrize("given,expected", [
    ("shards", "shards"), ("/data/shards/", "/data/shards/"), (Path("a/b"), "a/b"),
    ("file:///data/shards", "/data/shards"), ("C:/x", "C:/x"),  # one letter is no scheme
    ("s3://bucket/a/b/", "s3://bucket/a/b"), ("s3://my.bucket-1", "s3://my.bucket-1"),
    ("gs://bucket/x", "gs://bucket/x"), ("az://container/x/y", "az://container/x/y"),
])
def test_valid_locations_are_normalised(given, expected):
    assert storage.check(given) == expected


@pytest.mark.parametrize("bad,why", [
    ("s3:/bucket/shards", "not a valid s3 URL"),  # what pathlib makes of s3://bucket/shards
    ("s3:bucket/shards", "not a valid s3 URL"),
    ("s3://", "not a valid s3 URL"),
    ("s3://Bucket/x", "not a valid s3 URL"),
    ("s3://bucket//x", "not a valid s3 URL"),
    ("s3://bucket/a/../b", "not a valid s3 URL"),
    ("foo://bucket/x", "unknown URL scheme 'foo'"),
    ("http://host/x", "unknown URL scheme 'http'"),  # readable by webdataset, not a place to write
    ("file://relative/x", "file:///absolute/path"),
])
def test_malformed_or_unknown_urls_are_refused_with_the_option_named(bad, why):
    with pytest.raises(StorageError, match=why) as exc:
        storage.check(bad, "--out")
    assert "--out" in str(exc.value)


def test_a_scheme_the_caller_reads_passes_through():
    assert storage.check("https://host/x-{0..3}.tar", readers=("https",)) == "https://host/x-{0..3}.tar"
    assert list_shards("pipe:cat /x/a-{0..1}.tar") == ["pipe:cat /x/a-0.tar", "pipe:cat /x/a-1.tar"]


def s3fs():
    import fsspec

    return fsspec.filesystem("s3", use_listings_cache=False)


def test_shard_on_s3_appears_only_when_complete_and_equals_the_local_bytes(tmp_path, s3_bucket, samples):
    url = f"{s3_bucket}/shards/test-000000.tar"
    local = tmp_path / "test-000000.tar"
    with ShardWriter(local) as w:
        for s in samples:
            w.write(s)
    w = ShardWriter(url)
    for s in samples:
        w.write(s)
    assert not storage.exists(url)  # nothing under the final name while it is written
    assert w.close() == url and not storage.exists(url + TMP_MARK + "x")
    data = storage.read_bytes(url)
    assert data == local.read_bytes()
    assert s3fs().info(url)["ETag"].strip('"') == hashlib.md5(data).hexdigest()  # one whole object
    assert storage.listdir(f"{s3_bucket}/shards") == ["test-000000.tar"]  # the temporary key is gone
    assert [x.key for x in iter_samples(f"{s3_bucket}/shards/")] == [s.key for s in samples]
    assert validate_shard(url).ok and validate_shard(url).samples == len(samples)


def test_an_aborted_shard_leaves_nothing_on_s3(s3_bucket, samples):
    with pytest.raises(RuntimeError):
        with ShardWriter(f"{s3_bucket}/x/a.tar") as w:
            w.write(samples[0])
            raise RuntimeError("crash")
    assert storage.find(s3_bucket) == []


def test_a_truncated_shard_on_s3_is_reported(s3_bucket, tmp_path, samples):
    with ShardWriter(tmp_path / "a.tar") as w:
        for s in samples:
            w.write(s)
    storage.write_bytes(f"{s3_bucket}/a.tar", (tmp_path / "a.tar").read_bytes()[:40000])  # mid-member
    report = validate_shard(f"{s3_bucket}/a.tar")
    assert not report.ok and any("truncated" in e for e in report.errors)


def test_listing_reading_and_writing_on_s3(s3_bucket):
    root = f"{s3_bucket}/data"
    assert not storage.is_dir(root) and storage.listdir(root) == [] and not storage.exists(f"{root}/a.txt")
    storage.write_bytes(f"{root}/a.txt", b"one")
    storage.write_bytes(f"{root}/sub/b.txt", b"two")
    storage.write_bytes(f"{root}-other/c.txt", b"not below root")
    assert storage.is_dir(root) and storage.is_dir(f"{root}/sub") and not storage.is_dir(f"{root}/a.txt")
    assert storage.is_file(f"{root}/a.txt") and not storage.is_file(f"{root}/sub")
    assert storage.listdir(root) == ["a.txt"]  # files only, not the sub-prefix
    assert storage.find(root) == ["a.txt", "sub/b.txt"]  # not the neighbour prefix data-other/
    with storage.open_read(f"{root}/sub/b.txt") as f:
        assert f.read() == b"two"
    storage.replace(f"{root}/a.txt", f"{root}/moved.txt")
    assert storage.listdir(root) == ["moved.txt"] and storage.read_bytes(f"{root}/moved.txt") == b"one"
    storage.create_exclusive(f"{root}/lock", b"mine")
    with pytest.raises(FileExistsError):
        storage.create_exclusive(f"{root}/lock", b"theirs")
    assert storage.read_bytes(f"{root}/lock") == b"mine"
    storage.remove(f"{root}/lock")
    storage.remove(f"{root}/lock")  # missing: not an error
    assert storage.glob(f"{root}/**/*.txt") == [f"{root}/moved.txt", f"{root}/sub/b.txt"]


def test_remove_partial_deletes_temporary_keys_and_unfinished_uploads_only(s3_bucket):
    root = f"{s3_bucket}/job"
    for name in ("a.tar", f"b.tar{TMP_MARK}12", f"manifest.parquet{TMP_MARK}3", "sub/c.tar.tmp-4"):
        storage.write_bytes(f"{root}/{name}", b"x")
    fs = s3fs()
    bucket = s3_bucket.removeprefix("s3://")
    # a killed writer of a big temporary file leaves a multipart upload that was never completed
    killed = fs.call_s3("create_multipart_upload", Bucket=bucket, Key=f"job/d.tar{TMP_MARK}5")["UploadId"]
    other = fs.call_s3("create_multipart_upload", Bucket=bucket, Key="job/e.tar")["UploadId"]
    assert storage.remove_partial(root) == 3
    assert storage.find(root) == ["a.tar", "sub/c.tar.tmp-4"]  # only this folder, not below it
    left = {u["UploadId"] for u in fs.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads", [])}
    assert killed not in left and other in left


def test_atomic_table_file_on_s3(s3_bucket):
    f = storage.AtomicFile(f"{s3_bucket}/t/manifest.parquet")
    f.file.write(b"PAR1" * 1000)
    assert storage.listdir(f"{s3_bucket}/t") == []  # an upload becomes visible only when closed
    f.commit()
    assert storage.listdir(f"{s3_bucket}/t") == ["manifest.parquet"]
    g = storage.AtomicFile(f"{s3_bucket}/t/failures.parquet")
    g.file.write(b"x" * 100)
    g.abort()  # dropped, not completed (and not later, when the object is collected)
    del g
    assert storage.listdir(f"{s3_bucket}/t") == ["manifest.parquet"]


def test_a_missing_bucket_is_a_clear_error(s3_server):
    with pytest.raises(StorageError, match="bucket 'no-such-bucket' does not exist"):
        storage.makedirs("s3://no-such-bucket/shards")
