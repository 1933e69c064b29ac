"""S3 conditional writes under a real race: a second writer lands between our check and our PUT.

moto answers the conditional PUTs as S3 does (412 on a failed ``If-None-Match: *`` or ``If-Match``).
The rival is a second, independent store object on the same bucket; it writes at the one moment that
matters (after our existence check or our read, before our PUT), which no timing-based test could hit
reliably.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import IO, Any

import pytest

from shardstore.errors import ConflictError
from shardstore.format.digest import digest
from shardstore.repo.refs import parse_ref
from shardstore.repo.repository import Repository, manifest_key
from shardstore.store import open_store
from shardstore.store.s3 import S3Store


class RacedS3Store(S3Store):
    """An S3 store that lets ``rival`` write just before its next conditional PUT."""

    rival: Callable[[], None] | None = None
    conditions_sent: list[dict[str, str]]

    def _put_object(self, key: str, data: bytes | memoryview | IO[bytes], **conditions: str) -> bool:
        if conditions:
            self.conditions_sent.append(conditions)
            if self.rival is not None:
                rival, self.rival = self.rival, None
                rival()
        return super()._put_object(key, data, **conditions)


def _stores(bucket: str) -> tuple[RacedS3Store, Any]:
    ours = RacedS3Store(f"s3://{bucket}/models")
    ours.conditions_sent = []
    return ours, open_store(f"s3://{bucket}/models")


def test_if_none_match_keeps_the_first_writer_when_a_second_lands_after_the_check(s3_bucket: str) -> None:
    ours, theirs = _stores(s3_bucket)
    key = "blobs/aa/aa"
    ours.rival = lambda: theirs.put(key, b"theirs")
    assert ours.put_if_absent(key, b"ours!!") is False  # same size: had ours overwritten, the bytes would say
    assert ours.conditions_sent == [{"IfNoneMatch": "*"}]
    assert theirs.get(key) == b"theirs"


def test_if_match_refuses_a_compare_and_set_when_the_object_moved_after_the_read(s3_bucket: str) -> None:
    ours, theirs = _stores(s3_bucket)
    key = "refs/m/@v1"
    theirs.put(key, b"one")
    ours.rival = lambda: theirs.put(key, b"two")
    assert ours.compare_and_set(key, b"one", b"ours") is False
    assert [set(c) for c in ours.conditions_sent] == [{"IfMatch"}]
    assert theirs.get(key) == b"two"
    assert ours.compare_and_set(key, b"two", b"ours") is True  # no rival now: the same call goes through
    assert theirs.get(key) == b"ours"


def test_a_ref_moved_by_another_pusher_is_a_conflict_not_a_lost_update(s3_bucket: str) -> None:
    ours, theirs = _stores(s3_bucket)
    repo, rival_repo = Repository(ours), Repository(theirs)
    ids = []
    for body in (b'{"a": 1}', b'{"a": 2}', b'{"a": 3}'):  # three manifests' worth of ids (content not parsed)
        theirs.put(manifest_key(digest(body)), body)
        ids.append(digest(body))
    ref = parse_ref("m:v1")
    rival_repo.set_ref(ref, ids[0])
    ours.rival = lambda: rival_repo.set_ref(ref, ids[1])
    with pytest.raises(ConflictError, match="changed meanwhile"):
        repo.compare_and_set_ref(ref, ids[2], ids[0])
    assert rival_repo.resolve(ref) == ids[1]
