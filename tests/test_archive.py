"""The tar side of ``p2prc exec``: inputs are checked before a container starts, and an output
archive from a host (a stranger) cannot write outside its folder, past its size, or through a
symlink. Each hostile archive is built here with tarfile, as a hostile host would send it."""

from __future__ import annotations

import gzip
import io
import os
import stat
import tarfile
from pathlib import Path

import pytest

from p2prc_core import archive
from p2prc_core.archive import (
    ArchiveError,
    Input,
    Output,
    input_size,
    pack,
    parse_input,
    parse_output,
    safe_extract,
    sweep_links,
)

Member = tuple[tarfile.TarInfo, bytes | None]


def member(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"",
           linkname: str = "", mode: int = 0o644) -> Member:
    """One member as a hostile host may write it (no checks on the name)."""
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, linkname, mode
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        info.devmajor, info.devminor = 1, 3
    return info, data if kind == tarfile.REGTYPE else None


def tar_of(*members: Member) -> io.BytesIO:
    """A PAX tar stream of ``members``, read from the start."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    out.seek(0)
    return out


@pytest.fixture
def places(tmp_path: Path) -> tuple[Path, Path]:
    """The output folder and a sibling that must stay empty, whatever the archive says."""
    outside = tmp_path / "outside"
    outside.mkdir()
    return tmp_path / "out", outside


def refused(stream: io.BytesIO | io.BufferedReader, dest: Path, outside: Path, match: str,
            max_bytes: int = 1 << 20) -> ArchiveError:
    """Extracting ``stream`` is refused with ``match``, and nothing lands outside ``dest``."""
    with pytest.raises(ArchiveError, match=match) as caught:
        safe_extract(stream, dest, max_bytes)
    assert list(outside.iterdir()) == []
    assert "\n" not in str(caught.value)
    return caught.value


# ---- hostile output archives ---------------------------------------------------------------


def test_absolute_name_is_refused(places: tuple[Path, Path]) -> None:
    dest, outside = places
    refused(tar_of(member(str(outside / "pwned"), data=b"x")), dest, outside, "absolute path")


@pytest.mark.parametrize("name", ["../outside/pwned", "a/../../outside/pwned", "./../outside/x"])
def test_dotdot_is_refused(places: tuple[Path, Path], name: str) -> None:
    dest, outside = places
    refused(tar_of(member(name, data=b"x")), dest, outside, r"'\.\.' component")


def test_symlink_to_etc_then_a_file_through_it_is_refused(places: tuple[Path, Path]) -> None:
    dest, outside = places
    stream = tar_of(member("etc", tarfile.SYMTYPE, linkname="/etc"),
                    member("etc/p2prc-pwned", data=b"x"))
    refused(stream, dest, outside, "absolute path '/etc'")
    assert not Path("/etc/p2prc-pwned").exists()
    assert not (dest / "etc").is_symlink()


@pytest.mark.parametrize("target", ["../outside", "sub/../../outside", "absolute"])
def test_symlink_leaving_dest_then_a_file_through_it_is_refused(
        places: tuple[Path, Path], target: str) -> None:
    dest, outside = places
    target = str(outside) if target == "absolute" else target
    stream = tar_of(member("link", tarfile.SYMTYPE, linkname=target),
                    member("link/pwned", data=b"x"))
    refused(stream, dest, outside, "points (at the absolute path|outside)")


def test_a_file_through_a_symlink_inside_dest_is_refused(places: tuple[Path, Path]) -> None:
    """Even a link that stays inside is never written through (check each parent)."""
    dest, outside = places
    stream = tar_of(member("sub", tarfile.DIRTYPE), member("link", tarfile.SYMTYPE, linkname="sub"),
                    member("link/file", data=b"x"))
    error = refused(stream, dest, outside, "written through 'link'")
    assert not (dest / "sub" / "file").exists()
    assert "paths written before it stay" in str(error)


def test_a_symlink_escaping_through_another_link_is_refused(places: tuple[Path, Path]) -> None:
    dest, outside = places
    stream = tar_of(member("here", tarfile.SYMTYPE, linkname="."),
                    member("sub", tarfile.DIRTYPE),
                    member("sub/up", tarfile.SYMTYPE, linkname="../here/../outside"))
    refused(stream, dest, outside, "through other links")
    assert not (dest / "sub" / "up").exists()


def test_a_symlink_made_to_escape_by_a_later_link_is_removed(places: tuple[Path, Path]) -> None:
    """``sub/up -> ../x/..`` is inside while x is missing; x -> . written later makes it
    leave dest, and the check after the last member removes it."""
    dest, outside = places
    stream = tar_of(member("sub", tarfile.DIRTYPE),
                    member("sub/up", tarfile.SYMTYPE, linkname="../x/../outside"),
                    member("x", tarfile.SYMTYPE, linkname="."))
    refused(stream, dest, outside, "resolves outside the output folder \\(removed\\)")
    assert not os.path.lexists(dest / "sub" / "up")


def escaping_links(top: Path) -> list[Path]:
    """The symlinks under ``top`` that resolve outside it."""
    root = os.path.realpath(top)
    return [path for path in top.rglob("*") if path.is_symlink()
            and not os.path.realpath(path).startswith(root + "/")
            and os.path.realpath(path) != root]


def test_escaping_links_are_removed_when_a_later_member_is_refused(
        places: tuple[Path, Path]) -> None:
    """``d/x -> y/../..`` leaves dest once ``d/y -> ..`` is written; a refusal after both
    must not leave it there for a later ``-o`` to write through."""
    dest, outside = places
    stream = tar_of(member("d/x", tarfile.SYMTYPE, linkname="y/../.."),
                    member("d/y", tarfile.SYMTYPE, linkname=".."),
                    member("/abs", data=b"z"))
    error = refused(stream, dest, outside, "absolute path")
    assert "'d/x'" in str(error) and "removed" in str(error)
    assert escaping_links(dest) == [] and not os.path.lexists(dest / "d" / "x")


def test_every_escaping_link_is_removed(places: tuple[Path, Path]) -> None:
    dest, outside = places
    stream = tar_of(member("d/x", tarfile.SYMTYPE, linkname="y/../.."),
                    member("d/z", tarfile.SYMTYPE, linkname="y/../.."),
                    member("d/y", tarfile.SYMTYPE, linkname=".."))
    error = refused(stream, dest, outside, "resolve outside the output folder \\(removed\\)")
    assert "'d/x'" in str(error) and "'d/z'" in str(error)
    assert escaping_links(dest) == []


def test_escaping_links_are_removed_when_the_stream_is_cut(places: tuple[Path, Path]) -> None:
    dest, outside = places
    whole = tar_of(member("d/x", tarfile.SYMTYPE, linkname="y/../.."),
                   member("d/y", tarfile.SYMTYPE, linkname=".."),
                   member("f", data=b"a" * 5000)).getvalue()
    refused(io.BytesIO(whole[:3072 + 700]), dest, outside, "not a valid tar stream")
    assert escaping_links(dest) == []


def test_a_second_output_cannot_write_through_a_link_the_first_planted(
        places: tuple[Path, Path]) -> None:
    """Two ``-o`` into nested LOCALs: the first plants ``a/x`` (escaping, then refused), the
    second's LOCAL is ``dest/a/x``: nothing may land outside ``dest``."""
    dest, outside = places
    first = tar_of(member("a/x", tarfile.SYMTYPE, linkname="q/../outside"),
                   member("a/q", tarfile.SYMTYPE, linkname=".."), member("/abs", data=b""))
    refused(first, dest, outside, "absolute path")
    try:
        safe_extract(tar_of(member("pwn", data=b"owned")), dest / "a" / "x", 1 << 20)
    except ArchiveError:
        pass
    assert list(outside.iterdir()) == [] and escaping_links(dest) == []


def test_an_output_folder_through_a_planted_link_is_refused(places: tuple[Path, Path]) -> None:
    """A link left in an earlier LOCAL (even one inside it) is never followed to open the
    next LOCAL: the writes would not land where the user asked."""
    dest, outside = places
    safe_extract(tar_of(member("sub", tarfile.DIRTYPE),
                        member("link", tarfile.SYMTYPE, linkname="sub")), dest, 1 << 20)
    refused(tar_of(member("f", data=b"x")), dest / "link" / "deeper", outside,
            "goes through 'link', which is a symlink")
    assert list((dest / "sub").iterdir()) == []


def test_a_member_outside_only_is_refused(places: tuple[Path, Path]) -> None:
    """``tar -c out`` was asked for: a host may not replace ``.git/hooks/...`` beside it."""
    dest, outside = places
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    for name in ("keep.txt", ".git/hooks/post-checkout", "outx/f", "./keep.txt"):
        with pytest.raises(ArchiveError, match="not under 'out'"):
            safe_extract(tar_of(member(name, data=b"evil")), dest, 1 << 20, only="out")
    assert (dest / "keep.txt").read_text() == "mine"
    assert not (dest / ".git").exists() and list(outside.iterdir()) == []
    written = safe_extract(tar_of(member("out", tarfile.DIRTYPE), member("./out/r", data=b"1")),
                           dest, 1 << 20, only="out")
    assert written == [dest / "out", dest / "out" / "r"]


@pytest.mark.parametrize("only", ["", "a/b", "..", "."])
def test_only_must_be_one_name(places: tuple[Path, Path], only: str) -> None:
    dest, _ = places
    with pytest.raises(ArchiveError, match="name one file or folder"):
        safe_extract(tar_of(member("a", data=b"x")), dest, 1 << 20, only=only)


def test_existing_symlink_in_dest_is_not_followed(places: tuple[Path, Path]) -> None:
    """A file member where a symlink already is replaces the link, never writes its target."""
    dest, outside = places
    dest.mkdir()
    (dest / "link").symlink_to(outside)
    (dest / "file").symlink_to(outside / "target")
    refused(tar_of(member("link/pwned", data=b"x")), dest, outside, "symlink or a file")
    written = safe_extract(tar_of(member("file", data=b"mine")), dest, 1 << 20)
    assert written == [dest / "file"]
    assert list(outside.iterdir()) == []
    assert not (dest / "file").is_symlink() and (dest / "file").read_bytes() == b"mine"


@pytest.mark.parametrize("target", ["/etc/passwd", "../outside/secret", "never-written"])
def test_hard_link_out_of_the_archive_is_refused(places: tuple[Path, Path], target: str) -> None:
    dest, outside = places
    nlink = os.stat("/etc/passwd").st_nlink
    stream = tar_of(member("passwd", tarfile.LNKTYPE, linkname=target))
    refused(stream, dest, outside, "(absolute path|'\\.\\.' component|not a file this archive)")
    assert not os.path.lexists(dest / "passwd")
    assert os.stat("/etc/passwd").st_nlink == nlink


def test_hard_link_to_a_file_it_wrote_is_made(places: tuple[Path, Path]) -> None:
    dest, _ = places
    safe_extract(tar_of(member("a", data=b"same"), member("b", tarfile.LNKTYPE, linkname="a")),
                 dest, 1 << 20)
    assert (dest / "b").read_bytes() == b"same"
    assert (dest / "a").stat().st_ino == (dest / "b").stat().st_ino


@pytest.mark.parametrize("kind", [tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE])
def test_devices_and_fifos_are_refused(places: tuple[Path, Path], kind: bytes) -> None:
    dest, outside = places
    refused(tar_of(member("dev", kind)), dest, outside, "device or fifo")
    assert not os.path.lexists(dest / "dev")


def test_past_max_bytes_is_refused(places: tuple[Path, Path]) -> None:
    dest, outside = places
    stream = tar_of(member("a", data=b"a" * 600), member("b", data=b"b" * 600))
    error = refused(stream, dest, outside, "past 1000 bytes", max_bytes=1000)
    assert not (dest / "b").exists()
    assert "1 paths written before it stay" in str(error)


def lying_size(data: bytes, claimed: int) -> io.BytesIO:
    """One member whose ustar header claims ``claimed`` bytes while its PAX 'size' (which
    wins) says the truth: a check of the ustar headers alone is fooled."""
    info = tarfile.TarInfo("big")
    info.size = len(data)
    info.pax_headers = {"size": str(len(data))}
    raw = bytearray(tar_of((info, data)).getvalue())
    for start in range(0, len(raw), 512):
        block = raw[start:start + 512]
        if block[:3] == b"big" and block[156:157] == tarfile.REGTYPE:
            block[124:136] = b"%011o\0" % claimed
            block[148:156] = b" " * 8
            block[148:156] = b"%06o\0 " % sum(block)
            raw[start:start + 512] = block
            return io.BytesIO(bytes(raw))
    raise AssertionError("no header found")


def test_past_max_bytes_with_lying_headers_is_refused(places: tuple[Path, Path]) -> None:
    dest, outside = places
    stream = lying_size(b"z" * 5000, claimed=10)
    with tarfile.open(fileobj=io.BytesIO(stream.getvalue())) as check:  # the lie is real
        assert check.getmembers()[0].size == 5000
    refused(stream, dest, outside, "past 1000 bytes", max_bytes=1000)


def test_compressed_bomb_is_refused_as_it_is_read(places: tuple[Path, Path]) -> None:
    """64 MiB of zeros in 64 KiB of gzip: refused at max_bytes, not after inflating it."""
    dest, outside = places
    size = 64 << 20
    raw = io.BytesIO()
    with gzip.GzipFile(fileobj=raw, mode="wb") as packed:
        with tarfile.open(fileobj=packed, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            info = tarfile.TarInfo("zeros")
            info.size = size
            tar.addfile(info, io.BytesIO(bytes(size)))
    raw.seek(0)
    refused(raw, dest, outside, "pass(es)? 1048576 bytes|past 1048576 bytes")
    assert not (dest / "zeros").exists() or (dest / "zeros").stat().st_size <= 1 << 20


def test_a_huge_pax_header_is_refused_before_it_is_read(places: tuple[Path, Path]) -> None:
    """A PAX header claiming 100 MiB would have tarfile read it all into memory."""
    dest, outside = places
    header = tarfile.TarInfo("././@PaxHeader")
    header.type, header.size = tarfile.XHDTYPE, 100 << 20
    block = header.tobuf(tarfile.USTAR_FORMAT)
    stream = io.BytesIO(gzip.compress(block + bytes(100 << 20), compresslevel=1))
    refused(stream, dest, outside, "header over")


def test_too_many_members_is_refused(places: tuple[Path, Path]) -> None:
    dest, outside = places
    root = tarfile.TarInfo(".")
    root.type = tarfile.DIRTYPE
    block = root.tobuf(tarfile.USTAR_FORMAT)
    stream = io.BytesIO(block * (archive.MAX_MEMBERS + 1) + bytes(1024))
    refused(stream, dest, outside, "more than 100000 members")


@pytest.mark.parametrize("name", ["evil\x1b[31mred", "bell\x07", "bidi\u202etxt.exe",
                                  "new\nline"])
def test_names_with_control_characters_are_refused(places: tuple[Path, Path], name: str) -> None:
    dest, outside = places
    refused(tar_of(member(name, data=b"x")), dest, outside, "control character")
    assert not dest.exists() or list(dest.iterdir()) == []


def test_a_symlink_target_with_an_escape_is_refused(places: tuple[Path, Path]) -> None:
    dest, outside = places
    stream = tar_of(member("link", tarfile.SYMTYPE, linkname="a\x1b]0;title\x07"))
    refused(stream, dest, outside, "unprintable target")


def test_a_name_with_nul_is_refused(places: tuple[Path, Path]) -> None:
    dest, outside = places
    info = tarfile.TarInfo("plain")
    info.pax_headers = {"path": "a\x00b"}
    refused(tar_of((info, b"")), dest, outside, "NUL")


def test_not_a_tar_is_refused(places: tuple[Path, Path]) -> None:
    dest, outside = places
    refused(io.BytesIO(b"<html>502 Bad Gateway</html>" * 40), dest, outside, "not a valid tar")


def test_modes_lose_setuid_and_world_write(places: tuple[Path, Path]) -> None:
    dest, _ = places
    safe_extract(tar_of(member("d", tarfile.DIRTYPE, mode=0o7777),
                        member("d/f", data=b"x", mode=0o6777)), dest, 1 << 20)
    assert stat.S_IMODE((dest / "d").stat().st_mode) == 0o755
    assert stat.S_IMODE((dest / "d" / "f").stat().st_mode) == 0o755


def test_strip_components(places: tuple[Path, Path]) -> None:
    dest, _ = places
    written = safe_extract(tar_of(member("job", tarfile.DIRTYPE), member("job/r.txt", data=b"1")),
                           dest, 1 << 20, strip_components=1)
    assert written == [dest / "r.txt"]


# ---- inputs, and the round trip ------------------------------------------------------------


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A folder with nested files and a relative symlink."""
    top = tmp_path / "data"
    (top / "sub" / "deep").mkdir(parents=True)
    (top / "a.csv").write_text("x,y\n1,2\n")
    (top / "sub" / "deep" / "b.bin").write_bytes(bytes(range(256)) * 40)
    (top / "sub" / "link").symlink_to("../a.csv")
    return top


def tree(top: Path) -> dict[str, bytes | str]:
    """A folder's content: each file's bytes, each link's target."""
    found: dict[str, bytes | str] = {}
    for path in sorted(top.rglob("*")):
        name = path.relative_to(top).as_posix()
        if path.is_symlink():
            found[name] = "-> " + os.readlink(path)
        elif path.is_file():
            found[name] = path.read_bytes()
        else:
            found[name] = "dir"
    return found


def test_round_trip_keeps_content_and_links(folder: Path, tmp_path: Path) -> None:
    stream = tmp_path / "in.tar"
    with stream.open("wb") as out:
        written = pack([parse_input(f"{folder}:/job/in")], out)
    assert written == stream.stat().st_size
    with stream.open("rb") as src:
        safe_extract(src, tmp_path / "back", 1 << 20)
    assert tree(tmp_path / "back" / "job" / "in") == tree(folder)
    assert (tmp_path / "back" / "job" / "in" / "sub" / "link").is_symlink()


def test_pack_stores_links_and_skips_fifos(folder: Path, tmp_path: Path) -> None:
    os.mkfifo(folder / "fifo")  # skipped: a copy of a fifo is no use to a job
    (folder / "etc-link").symlink_to("/etc/hostname")  # stored as a link, not followed
    out = io.BytesIO()
    pack([parse_input(f"{folder}:/job/in"), parse_input(f"{folder / 'a.csv'}:x.csv")], out)
    out.seek(0)
    with tarfile.open(fileobj=out, mode="r|") as check:
        names = {info.name: info for info in check}
    assert set(names) == {"job/in", "job/in/a.csv", "job/in/etc-link", "job/in/sub",
                          "job/in/sub/deep", "job/in/sub/deep/b.bin", "job/in/sub/link",
                          "job/x.csv"}
    assert names["job/in/etc-link"].issym() and names["job/in/etc-link"].size == 0


def test_input_size_counts_regular_files(folder: Path) -> None:
    assert input_size([parse_input(str(folder))]) == 8 + 256 * 40
    assert input_size([parse_input(str(folder / "a.csv"))]) == 8


def test_input_defaults(folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_input(str(folder)) == Input(folder, "/job/data")
    assert parse_input(f"{folder}:in/x").remote == "/job/in/x"
    assert parse_input(f"{folder}:/srv/./x/").remote == "/srv/x"
    assert parse_input(str(folder), workdir="/work").remote == "/work/data"
    monkeypatch.chdir(folder)
    assert parse_input(".") == Input(Path("."), "/job/data")


def test_a_colon_in_an_existing_local_path_is_not_a_separator(tmp_path: Path) -> None:
    odd = tmp_path / "a:b"
    odd.write_text("x")
    assert parse_input(str(odd)) == Input(odd, "/job/a:b")
    assert parse_input(f"{odd}:/in/c") == Input(odd, "/in/c")


@pytest.mark.parametrize("remote", ["/job/../etc", "../x", "/job/a\x00b", "/job/\x1b[2J", "/"])
def test_bad_remote_paths_are_refused(folder: Path, remote: str) -> None:
    with pytest.raises(ArchiveError, match="container path"):
        parse_input(f"{folder}:{remote}")


def test_missing_input_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ArchiveError, match="does not exist"):
        parse_input(str(tmp_path / "nope.csv"))
    with pytest.raises(ArchiveError, match="does not exist"):
        parse_input(f"{tmp_path / 'nope.csv'}:/job/x")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file, so nothing is unreadable")
@pytest.mark.parametrize("which", ["file", "file in folder", "folder in folder"])
def test_unreadable_input_is_refused(folder: Path, which: str) -> None:
    target = {"file": folder / "a.csv", "file in folder": folder / "sub" / "deep" / "b.bin",
              "folder in folder": folder / "sub" / "deep"}[which]
    spec = str(target) if which == "file" else str(folder)
    target.chmod(0)
    try:
        with pytest.raises(ArchiveError, match="not readable|cannot read"):
            parse_input(spec)
    finally:
        target.chmod(0o755)


def test_a_device_as_input_is_refused() -> None:
    with pytest.raises(ArchiveError, match="not a file or folder"):
        parse_input("/dev/null")


def test_parse_output(tmp_path: Path) -> None:
    default = tmp_path / "p2prc-out" / "job1"
    assert parse_output("/job/out", default) == Output("/job/out", default)
    assert parse_output("results", default) == Output("/job/results", default)
    assert parse_output("r:here", default, workdir="/w") == Output("/w/r", Path("here"))
    with pytest.raises(ArchiveError, match="'\\.\\.'"):
        parse_output("../etc", default)



def test_a_link_one_output_makes_escape_through_another_is_swept(
        places: tuple[Path, Path]) -> None:
    """Two outputs into one folder (a job's default): the first plants a link through a
    name that does not exist yet (so it resolves inside, and is kept); the second writes that
    name as a link to '.', and the first now resolves outside. The sweep once all outputs
    are in removes it."""
    dest, outside = places
    (outside / "secret").write_text("not yours")
    depth = len(dest.parts) + 2  # enough '..' to reach / once 'log.txt' means '.'
    # As written: down 'depth' names, up as many, then down to a path inside the folder.
    target = "../" + "log.txt/" * depth + "../" * depth + str(outside / "secret").lstrip("/")
    safe_extract(tar_of(member("out", tarfile.DIRTYPE),
                        member("out/l", tarfile.SYMTYPE, linkname=target)),
                 dest, 1 << 20, only="out")
    safe_extract(tar_of(member("log.txt", tarfile.SYMTYPE, linkname=".")), dest, 1 << 20,
                 only="log.txt")
    assert (dest / "out" / "l").is_symlink()  # each extraction alone let it be
    assert os.path.realpath(dest / "out" / "l") == str(outside / "secret")  # the attack
    assert sweep_links(dest) == ["out/l"]
    assert not (dest / "out" / "l").exists() and not (dest / "out" / "l").is_symlink()
    assert (dest / "log.txt").is_symlink()  # '.' stays inside: kept
    assert sweep_links(dest) == []
