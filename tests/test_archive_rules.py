"""The archive rules shared by the API and the agent: each unsafe member is rejected with its rule."""

from __future__ import annotations

import io
import tarfile

import pytest

from microupdates.protocol.archives import UnsafeArchiveError, check_archive


def make_member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    member = tarfile.TarInfo(name)
    member.type = kind
    member.linkname = linkname
    return member


def pack(*members: tarfile.TarInfo) -> io.BytesIO:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for member in members:
            archive.addfile(member, io.BytesIO(b"") if member.isreg() else None)
    buffer.seek(0)
    return buffer


def test_check_archive_accepts_links_inside():
    archive = pack(
        make_member("app", tarfile.DIRTYPE),
        make_member("app/run"),
        make_member("app/current", tarfile.SYMTYPE, "run"),
        make_member("app/bin", tarfile.DIRTYPE),
        make_member("app/bin/up", tarfile.SYMTYPE, "../run"),
        make_member("app/hard", tarfile.LNKTYPE, "app/run"),
    )

    assert check_archive(archive) == 6


@pytest.mark.parametrize(
    "members, expected",
    [
        ([make_member("/etc/passwd")], "archive member '/etc/passwd' has an absolute path"),
        ([make_member("a/../../x")], "archive member 'a/../../x' contains '..'"),
        ([make_member("dev", tarfile.BLKTYPE)], "archive member 'dev' is a device file or FIFO"),
        ([make_member("up", tarfile.SYMTYPE, "..")], "archive member 'up' is a symbolic link to '..', outside the destination"),
        ([make_member("a/up", tarfile.SYMTYPE, "../../b")], "archive member 'a/up' is a symbolic link to '../../b', outside the destination"),
        ([make_member("abs", tarfile.SYMTYPE, "/")], "archive member 'abs' is a symbolic link to the absolute path '/'"),
        ([make_member("hard", tarfile.LNKTYPE, "/etc/shadow")], "archive member 'hard' is a hard link to '/etc/shadow', outside the destination"),
        (
            [make_member("self", tarfile.SYMTYPE, "."), make_member("self/x", tarfile.SYMTYPE, "../escape")],
            "archive member 'self/x' lies inside a symbolic link from the same archive",
        ),
        ([make_member("volume", b"V")], "archive member 'volume' has an unsupported type"),
    ],
)
def test_check_archive_rejects_unsafe_member(members, expected):
    with pytest.raises(UnsafeArchiveError) as raised:
        check_archive(pack(*members))

    assert str(raised.value) == expected


def test_check_archive_rejects_non_archive():
    with pytest.raises(tarfile.TarError):
        check_archive(io.BytesIO(b"plain text, not a tar archive"))
