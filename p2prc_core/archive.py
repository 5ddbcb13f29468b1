"""The tar side of ``p2prc exec``: inputs packed into one stream, outputs unpacked safely.

Inputs (``-i LOCAL[:REMOTE]``) are checked before any container starts and streamed as one PAX
tar whose member names are the container paths. Outputs come back from a host, which may be
hostile: ``safe_extract`` reads the stream once, refuses anything that could write outside the
destination folder or past a size limit, and never follows a symlink while writing.
"""

from __future__ import annotations

import bz2
import errno
import gzip
import lzma
import os
import posixpath
import stat
import tarfile
import unicodedata
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from p2prc_core.errors import P2PRCError
from p2prc_core.text import clean

MAX_MEMBERS = 100_000
# A copy's block. Not bigger: a buffer of a MiB is handed back to the kernel once freed (glibc's
# trim and mmap thresholds), so every read of one faults its pages in again: 1 MiB blocks
# made an extraction 3 to 4 times slower than 64 KiB ones (bench/bench_exec.py, perf).
_CHUNK = 64 << 10
_READ_BLOCK = 64 << 10  # what tarfile reads at a time: far below _MAX_HEADER_GAP
_MAX_HEADER_GAP = (1 << 20) + tarfile.RECORDSIZE  # headers and padding between two members
_MAX_NAME = 4096
_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


class ArchiveError(P2PRCError):
    """An input that cannot be sent, or an output archive refused; one clear line."""


class _Refused(ArchiveError):
    """Inside ``safe_extract``: why the archive is refused, before the links are checked and
    the final message (what was removed, what stays) is made."""

    def __init__(self, why: str):
        super().__init__(f"output archive refused: {why}")
        self.why = why


# ---- inputs -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Input:
    """One ``-i LOCAL[:REMOTE]``: a file or folder here, and where it lands in the container."""

    local: Path
    remote: str


@dataclass(frozen=True)
class Output:
    """One ``-o REMOTE[:LOCAL]``: a path in the container, and the folder it lands in here."""

    remote: str
    local: Path


def _bad_text(text: str) -> str | None:
    """Why ``text`` may not be a path (a NUL, a control or bidi character), or None."""
    for char in text:
        if char == "\0":
            return "a NUL character"
        if unicodedata.category(char) == "Cc" or char in _BIDI_CONTROLS:
            return f"a control character ({char!r})"
        if "\udc80" <= char <= "\udcff":
            return "bytes that are not UTF-8"
    return None


def container_path(path: str, workdir: str = "/job", what: str = "container path") -> str:
    """``path`` as an absolute, normalised path in the container (a relative one is under
    ``workdir``); refuses '..', NUL and control characters.

    :raises ArchiveError"""
    if not path:
        raise ArchiveError(f"the {what} is empty: give an absolute path such as /job/out")
    why = _bad_text(path) or _bad_text(workdir)
    if why:
        raise ArchiveError(f"the {what} {clean(path)!r} has {why}: rename it")
    joined = posixpath.join(workdir, path)
    if not joined.startswith("/"):
        raise ArchiveError(f"the {what} {clean(joined)!r} is not absolute: start it with '/'")
    if ".." in joined.split("/"):
        raise ArchiveError(f"the {what} {clean(joined)!r} has '..': give the path without it")
    normal = posixpath.normpath(joined)
    if normal in ("/", "//"):
        raise ArchiveError(f"the {what} may not be '/': name a file or folder under it")
    return normal


def _split_input(spec: str) -> tuple[str, str | None]:
    """LOCAL and REMOTE of ``LOCAL[:REMOTE]``; a ':' inside an existing LOCAL is kept."""
    if os.path.lexists(spec) or ":" not in spec:
        return spec, None
    for index, char in enumerate(spec):
        if char == ":" and os.path.lexists(spec[:index]):
            return spec[:index], spec[index + 1:]
    local, remote = spec.split(":", 1)
    return local, remote


def parse_input(spec: str, workdir: str = "/job") -> Input:
    """'-i LOCAL[:REMOTE]': REMOTE defaults to WORKDIR/basename(LOCAL); a relative REMOTE is
    under WORKDIR. LOCAL is checked now (exists, readable, every file in a folder too), before
    any container starts.

    :raises ArchiveError"""
    local_text, remote = _split_input(spec)
    if not local_text:
        raise ArchiveError(f"-i {clean(spec)!r} names no local file: use -i LOCAL[:REMOTE]")
    local = Path(local_text)
    if not os.path.lexists(local):
        raise ArchiveError(f"input {clean(local_text)!r} does not exist: check the path")
    if not remote:
        remote = Path(os.path.abspath(local)).name
    remote = container_path(remote, workdir, f"container path of input {clean(local_text)!r}")
    check_readable(local)
    return Input(local=local, remote=remote)


def check_readable(local: Path) -> None:
    """Refuse a LOCAL that is not a file or folder, or that holds anything unreadable.

    :raises ArchiveError"""
    try:
        info = local.stat()
    except OSError as err:
        raise ArchiveError(f"cannot read input {clean(local)!r}: {err.strerror}") from None
    if not (stat.S_ISREG(info.st_mode) or stat.S_ISDIR(info.st_mode)):
        raise ArchiveError(f"input {clean(local)!r} is not a file or folder: give one")
    if stat.S_ISDIR(info.st_mode):
        for path, entry_info in _walk(local):
            _check_one_readable(path, entry_info)
    else:
        _check_one_readable(local, info)


def _check_one_readable(path: Path, info: os.stat_result) -> None:
    """Refuse a file that cannot be read, or a folder that cannot be listed."""
    if stat.S_ISDIR(info.st_mode):
        ok = os.access(path, os.R_OK | os.X_OK)
    elif stat.S_ISREG(info.st_mode):
        ok = os.access(path, os.R_OK)
    else:
        return
    if not ok:
        raise ArchiveError(f"input {clean(path)!r} is not readable: fix its permissions "
                           "(chmod u+r) or leave it out")


def _walk(top: Path) -> Iterator[tuple[Path, os.stat_result]]:
    """Every entry under the folder ``top``, sorted, without following symlinks.

    :raises ArchiveError"""
    try:
        with os.scandir(top) as listing:
            entries = sorted(listing, key=lambda entry: entry.name)
    except OSError as err:
        raise ArchiveError(f"cannot read input folder {clean(top)!r}: {err.strerror}: fix its "
                           "permissions or leave it out") from None
    for entry in entries:
        path = Path(entry.path)
        try:
            info = entry.stat(follow_symlinks=False)
        except OSError as err:
            raise ArchiveError(f"cannot read input {clean(path)!r}: {err.strerror}") from None
        yield path, info
        if stat.S_ISDIR(info.st_mode):
            yield from _walk(path)


def input_size(inputs: list[Input]) -> int:
    """Bytes of regular files in ``inputs``, to check against a host's limit before sending."""
    total = 0
    for item in inputs:
        info = item.local.stat()
        if stat.S_ISREG(info.st_mode):
            total += info.st_size
        elif stat.S_ISDIR(info.st_mode):
            total += sum(entry.st_size for _, entry in _walk(item.local)
                         if stat.S_ISREG(entry.st_mode))
    return total


class _CountingWriter:
    """A write-only file that counts what passes through to ``out``."""

    def __init__(self, out: BinaryIO):
        self.out, self.written = out, 0

    def write(self, data: bytes) -> int:
        self.out.write(data)
        self.written += len(data)
        return len(data)


def pack(inputs: list[Input], out: BinaryIO) -> int:
    """Write one PAX tar stream to ``out``, member names the REMOTE paths without the leading
    '/' (for ``tar -x -C /``); folders recursively, symlinks inside stored as links, devices,
    sockets and fifos skipped. Streams; returns the bytes written.

    :raises ArchiveError"""
    counter = _CountingWriter(out)
    # Our blocks: tarfile's own (10 KiB records, 16 KiB copies) cost a call each.
    with tarfile.open(fileobj=counter, mode="w|", format=tarfile.PAX_FORMAT,  # type: ignore[call-overload]
                      bufsize=_CHUNK, copybufsize=_CHUNK) as tar:
        for item in inputs:
            top = Path(os.path.realpath(item.local))  # the input itself is followed
            arcname = item.remote.lstrip("/")
            _add(tar, top, arcname)
            if top.is_dir():
                for path, _ in _walk(top):
                    _add(tar, path, posixpath.join(arcname, path.relative_to(top).as_posix()))
    return counter.written


def _add(tar: tarfile.TarFile, path: Path, arcname: str) -> None:
    """Add one file, folder or symlink (not followed); other kinds are skipped."""
    try:
        member = tar.gettarinfo(str(path), arcname)
    except OSError as err:
        raise ArchiveError(f"cannot read input {clean(path)!r}: {err.strerror}") from None
    if member is None or not (member.isreg() or member.isdir() or member.issym()):
        return  # a socket, device or fifo: nothing a job can use from a copy
    member.uid = member.gid = 0
    member.uname = member.gname = ""
    if not member.isreg():
        tar.addfile(member)
        return
    try:
        with open(path, "rb") as source:
            tar.addfile(member, source)
    except OSError as err:
        raise ArchiveError(f"cannot read input {clean(path)!r}: {err.strerror or err}") from None


def parse_output(spec: str, default_dir: Path, workdir: str = "/job") -> Output:
    """'-o REMOTE[:LOCAL]': LOCAL defaults to ``default_dir`` (./p2prc-out/JOB/); a relative
    REMOTE is under WORKDIR.

    :raises ArchiveError"""
    remote, _, local = spec.partition(":")
    remote = container_path(remote, workdir, f"output path in -o {clean(spec)!r}")
    return Output(remote=remote, local=Path(local) if local else default_dir)


# ---- outputs: an untrusted stream ----------------------------------------------------------


class _Readable(Protocol):
    """Anything with ``read``: a socket's file, a decompressor, a reader below."""

    def read(self, size: int = -1, /) -> bytes: ...


class _PrefixedReader:
    """A read-only file that gives ``prefix`` first, then the rest of ``source``."""

    def __init__(self, prefix: bytes, source: BinaryIO):
        self.prefix, self.source = prefix, source

    def read(self, size: int = -1) -> bytes:
        if self.prefix:
            take = self.prefix if size < 0 else self.prefix[:size]
            self.prefix = self.prefix[len(take):]
            return take
        return self.source.read(size)


class _BoundedReader:
    """The tar bytes as tarfile reads them, refused when the headers and padding between two
    members pass ``_MAX_HEADER_GAP`` (a lying PAX header cannot make tarfile read gigabytes
    into memory); content is counted by the extractor, which marks ``in_content``."""

    def __init__(self, source: _Readable):
        self.source, self.gap, self.in_content = source, 0, False

    def read(self, size: int = -1) -> bytes:
        data = self.source.read(_CHUNK if size < 0 else min(size, _CHUNK))
        if not self.in_content:
            self.gap += len(data)
            if self.gap > _MAX_HEADER_GAP:
                raise _Refused(f"it has a header over {_MAX_HEADER_GAP} bytes (the host sent "
                               "a damaged or hostile archive)")
        return data


def _decompressed(src: BinaryIO) -> _Readable:
    """``src`` decompressed as it is read, if it starts as gzip, bzip2 or xz does."""
    head = b""
    while len(head) < 6:
        more = src.read(6 - len(head))
        if not more:
            break
        head += more
    source = _PrefixedReader(head, src)
    if head.startswith(b"\x1f\x8b"):
        return gzip.GzipFile(fileobj=source, mode="rb")  # type: ignore[call-overload]
    if head.startswith(b"BZh"):
        return bz2.BZ2File(source, mode="rb")  # type: ignore[call-overload]
    if head.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMAFile(source, mode="rb")  # type: ignore[arg-type]
    return source


class _Extraction:
    """One extraction into ``dest``: what was written so far, and the bytes it took."""

    def __init__(self, dest: Path, max_bytes: int, strip_components: int,
                 only: str | None = None):
        self.dest, self.max_bytes, self.strip = dest, max_bytes, strip_components
        self.only, self.dest_fd, self.root = only, -1, ""
        self.content_bytes, self.members = 0, 0
        self.written: list[Path] = []
        self.files: set[tuple[str, ...]] = set()
        self.links: list[tuple[str, ...]] = []

    def refuse(self, why: str) -> _Refused:
        """The refusal raised inside; ``safe_extract`` says the rest once links are checked."""
        return _Refused(why)

    def message(self, why: str, removed: list[str]) -> str:
        """The one-line refusal, saying which escaping links were removed and what stays."""
        gone = (f"; symlinks that resolved outside the output folder were removed "
                f"({_names(removed)})" if removed else "")
        kept = (f"; the {len(self.written)} paths written before it stay in {clean(self.dest)}"
                if self.written else "; nothing was written")
        return f"output archive refused: {why}{gone}{kept}"

    def run(self, src: BinaryIO) -> str | None:
        """Open ``dest`` and extract every member; why it was refused, or None."""
        try:
            self.dest_fd = _open_dest(self.dest)
            self.root = os.path.realpath(self.dest)
            reader = _BoundedReader(_decompressed(src))
            # Decompressed here, not by tarfile ('r|*'), so that every byte tarfile reads is
            # counted and no header can make it read unbounded data into memory.
            with tarfile.open(fileobj=reader, mode="r|",  # type: ignore[call-overload]
                              bufsize=_READ_BLOCK) as tar:  # 10 KiB reads cost a call each
                self.extract_all(tar, reader)
        except _Refused as err:
            return err.why
        except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError,
                gzip.BadGzipFile) as err:
            return f"it is not a valid tar stream ({clean(err, 200)})"
        except OSError as err:
            return f"cannot write it: {err.strerror or clean(err, 200)}"
        return None

    def parts(self, name: str, what: str = "member") -> tuple[str, ...]:
        """The checked components of a member name, relative to ``dest``."""
        shown = clean(name, 200)
        why = _bad_text(name)
        if why:
            raise self.refuse(f"{what} {shown!r} has {why}")
        if len(name.encode("utf-8", "surrogateescape")) > _MAX_NAME:
            raise self.refuse(f"{what} name {shown!r} is over {_MAX_NAME} bytes")
        if name.startswith("/"):
            raise self.refuse(f"{what} {shown!r} is an absolute path")
        parts = tuple(part for part in name.split("/") if part not in ("", "."))
        if ".." in parts:
            raise self.refuse(f"{what} {shown!r} has a '..' component")
        return parts

    def extract_all(self, tar: tarfile.TarFile, reader: _BoundedReader) -> None:
        """Every member in turn, each checked before anything of it is written."""
        while True:
            member = tar.next()
            if member is None:
                break
            tar.members.clear()  # type: ignore[attr-defined]  # a stream keeps nothing; 100,000 members stay small
            reader.gap = 0
            self.members += 1
            if self.members > MAX_MEMBERS:
                raise self.refuse(f"it has more than {MAX_MEMBERS} members")
            self.extract_one(tar, member, reader)

    def extract_one(self, tar: tarfile.TarFile, member: tarfile.TarInfo,
                    reader: _BoundedReader) -> None:
        """Check one member and write it, or refuse."""
        parts = self.parts(member.name)[self.strip:] if self.strip else self.parts(member.name)
        shown = clean(member.name, 200)
        if self.only is not None and parts and parts[0] != self.only:
            raise self.refuse(f"member {shown!r} is not under {clean(self.only, 200)!r}, the "
                              "only path asked for")
        if member.sparse is not None or member.type == tarfile.GNUTYPE_SPARSE:
            raise self.refuse(f"member {shown!r} is a sparse file")
        if member.ischr() or member.isblk() or member.isfifo():
            raise self.refuse(f"member {shown!r} is a device or fifo")
        if not (member.isreg() or member.isdir() or member.issym() or member.islnk()):
            raise self.refuse(f"member {shown!r} has an unsupported type {member.type!r}")
        if not parts:
            if member.isdir() or self.strip:
                return  # the archive's root (dest itself), or above what is kept
            raise self.refuse(f"member {shown!r} names no file")
        with _Parent(self, parts, create=True) as parent:
            if member.isdir():
                self.write_dir(parent, parts, member)
            elif member.issym():
                self.write_symlink(parent, parts, member)
            elif member.islnk():
                self.write_hardlink(parent, parts, member)
            else:
                self.write_file(parent, parts, member, tar, reader)
        self.written.append(self.dest.joinpath(*parts))

    def write_dir(self, parent: _Parent, parts: tuple[str, ...], member: tarfile.TarInfo) -> None:
        """A folder, made (or kept) with a safe mode; a symlink in its place is refused."""
        fd = parent.open_dir(parts[-1], create=True)
        try:
            os.fchmod(fd, (member.mode & 0o755) | 0o700)
        finally:
            os.close(fd)

    def write_file(self, parent: _Parent, parts: tuple[str, ...], member: tarfile.TarInfo,
                   tar: tarfile.TarFile, reader: _BoundedReader) -> None:
        """A regular file, its bytes counted as they are read against ``max_bytes``."""
        shown = clean(member.name, 200)
        if self.content_bytes + member.size > self.max_bytes:
            raise self.refuse(f"member {shown!r} takes the outputs past {self.max_bytes} bytes")
        parent.clear_place(parts[-1])
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(parts[-1], flags, 0o600, dir_fd=parent.fd)
        try:
            os.fchmod(fd, (member.mode & 0o755) | 0o600)
            self.copy_content(fd, tar, member, reader)
            try:
                os.utime(fd, (member.mtime, member.mtime))
            except (OverflowError, OSError, ValueError):
                pass  # a peer's odd time is not worth refusing the file for
        finally:
            os.close(fd)
        self.files.add(parts)

    def copy_content(self, fd: int, tar: tarfile.TarFile, member: tarfile.TarInfo,
                     reader: _BoundedReader) -> None:
        """Copy a member's bytes to ``fd``, refusing when the total passes ``max_bytes``."""
        source = tar.extractfile(member)
        assert source is not None  # a regular file always has content
        reader.in_content = True
        try:
            while chunk := source.read(_CHUNK):
                self.content_bytes += len(chunk)
                if self.content_bytes > self.max_bytes:
                    raise self.refuse(f"the outputs pass {self.max_bytes} bytes "
                                      f"(at member {clean(member.name, 200)!r})")
                os.write(fd, chunk)
        finally:
            reader.in_content = False

    def write_symlink(self, parent: _Parent, parts: tuple[str, ...],
                      member: tarfile.TarInfo) -> None:
        """A symlink whose target stays inside ``dest``."""
        target = member.linkname
        shown = clean(member.name, 200)
        if _bad_text(target) or not target:
            raise self.refuse(f"symlink {shown!r} has an empty or unprintable target")
        if target.startswith("/"):
            raise self.refuse(f"symlink {shown!r} points at the absolute path "
                              f"{clean(target, 200)!r}")
        if not _stays_inside(parts[:-1], target):
            raise self.refuse(f"symlink {shown!r} points outside the output folder "
                              f"({clean(target, 200)!r})")
        self.refuse_escaping_link(parts, target)
        parent.clear_place(parts[-1])
        os.symlink(target, parts[-1], dir_fd=parent.fd)
        self.links.append(parts)

    def refuse_escaping_link(self, parts: tuple[str, ...], target: str) -> None:
        """Refuse a link that, through links already written, resolves outside ``dest``."""
        real = os.path.realpath(self.dest.joinpath(*parts[:-1], target))
        if not _is_within(real, self.root):
            raise self.refuse(f"symlink {clean('/'.join(parts), 200)!r} resolves outside the "
                              "output folder through other links")

    def write_hardlink(self, parent: _Parent, parts: tuple[str, ...],
                       member: tarfile.TarInfo) -> None:
        """A hard link to a regular file this same archive wrote; nothing else."""
        target = self.parts(member.linkname, "hard link target")
        target = target[self.strip:] if self.strip else target
        if target not in self.files:
            raise self.refuse(f"hard link {clean(member.name, 200)!r} points at "
                              f"{clean(member.linkname, 200)!r}, not a file this archive wrote")
        with _Parent(self, target, create=False) as source:
            info = os.stat(target[-1], dir_fd=source.fd, follow_symlinks=False)
            if not stat.S_ISREG(info.st_mode):
                raise self.refuse(f"hard link {clean(member.name, 200)!r} points at a file "
                                  "that was replaced")
            parent.clear_place(parts[-1])
            os.link(target[-1], parts[-1], src_dir_fd=source.fd, dst_dir_fd=parent.fd,
                    follow_symlinks=False)
        self.files.add(parts)

    def remove_escaping_links(self) -> list[str]:
        """Every symlink this extraction wrote that now resolves outside ``dest`` (a later
        member may have changed a path it goes through), removed; their names. Runs however
        the extraction ended, so that no link planted here is followed by a later one."""
        removed: list[str] = []
        while escaping := [parts for parts in self.links if self.escapes(parts)]:
            for parts in escaping:
                path = self.dest.joinpath(*parts)
                path.unlink()
                self.links.remove(parts)
                if path in self.written:
                    self.written.remove(path)
                removed.append("/".join(parts))
        return removed

    def escapes(self, parts: tuple[str, ...]) -> bool:
        """Whether the symlink written at ``parts`` is still one and resolves outside."""
        path = self.dest.joinpath(*parts)
        return path.is_symlink() and not _is_within(os.path.realpath(path), self.root)

    def close(self) -> list[str]:
        """Remove escaping links and close ``dest``; the names of the links removed."""
        try:
            return self.remove_escaping_links() if self.root else []
        finally:
            if self.dest_fd >= 0:
                os.close(self.dest_fd)
                self.dest_fd = -1


def _names(names: list[str]) -> str:
    """Up to five names, quoted, for a message."""
    shown = ", ".join(repr(clean(name, 200)) for name in names[:5])
    return shown + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _stays_inside(folder: tuple[str, ...], target: str) -> bool:
    """Whether ``target``, read from ``folder`` without following links, stays inside."""
    depth = len(folder)
    for part in target.split("/"):
        if part == "..":
            depth -= 1
            if depth < 0:
                return False
        elif part not in ("", "."):
            depth += 1
    return True


def _is_within(path: str, root: str) -> bool:
    """Whether the resolved ``path`` is ``root`` or under it."""
    return path == root or path.startswith(root.rstrip("/") + "/")


class _Parent:
    """The folder a member goes in, opened one component at a time from ``dest`` without
    following a symlink (each component opened with O_NOFOLLOW), made when missing."""

    def __init__(self, extraction: _Extraction, parts: tuple[str, ...], create: bool):
        self.extraction, self.parts, self.create = extraction, parts, create
        self.fd = -1

    def __enter__(self) -> _Parent:
        self.fd = os.dup(self.extraction.dest_fd)
        for part in self.parts[:-1]:
            inner = self.open_dir(part, self.create)
            os.close(self.fd)
            self.fd = inner
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd >= 0:
            os.close(self.fd)

    def open_dir(self, name: str, create: bool) -> int:
        """The folder ``name`` in this one, opened without following a symlink."""
        try:
            return _open_dir_at(self.fd, name, create)
        except FileNotFoundError:
            raise
        except OSError as err:
            raise self.not_a_folder(name, err) from None

    def not_a_folder(self, name: str, err: OSError) -> ArchiveError:
        """The refusal for a path component that is a symlink or a file."""
        where = clean("/".join(self.parts), 200)
        if err.errno in (errno.ELOOP, errno.ENOTDIR, errno.EEXIST):
            return self.extraction.refuse(f"member {where!r} would be written through "
                                          f"{clean(name)!r}, which is a symlink or a file")
        return self.extraction.refuse(f"cannot write {where!r}: {err.strerror}")

    def clear_place(self, name: str) -> None:
        """Remove a file or symlink already at ``name`` (as tar does); refuse a folder."""
        try:
            info = os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(info.st_mode):
            raise self.extraction.refuse(f"member {clean('/'.join(self.parts), 200)!r} "
                                         "replaces a folder")
        os.unlink(name, dir_fd=self.fd)


def _open_dir_at(fd: int, name: str, create: bool) -> int:
    """The folder ``name`` in the folder ``fd``, made when missing (if ``create``), opened
    without following a symlink.

    :raises OSError: ELOOP or ENOTDIR for a symlink or a file, FileNotFoundError"""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        return os.open(name, flags, dir_fd=fd)
    except FileNotFoundError:
        if not create:
            raise
    try:
        os.mkdir(name, 0o755, dir_fd=fd)
    except FileExistsError:
        pass  # a dangling symlink in the way: the open below refuses it
    return os.open(name, flags, dir_fd=fd)


def _trusted_start(absolute: str) -> str:
    """The part of the absolute ``absolute`` that it shares with the current folder: the
    user's own path, whose links are followed; below it no link is (a host wrote there)."""
    try:
        here = [os.getcwd()]
    except OSError:
        return "/"
    logical = os.environ.get("PWD", "")
    if logical.startswith("/") and os.path.realpath(logical) == here[0]:
        here.append(os.path.normpath(logical))  # the shell's path to it, through its links
    return max((os.path.commonpath([absolute, folder]) for folder in here), key=len)


def _open_dest(dest: Path) -> int:
    """``dest`` opened as a folder (made if missing), walked from the part of its path it
    shares with the current folder without following any symlink: a link that an earlier
    archive planted (in an earlier ``-o``'s LOCAL) is never followed.

    :raises _Refused"""
    absolute = os.path.abspath(dest)
    start = _trusted_start(absolute)
    fd = os.open(start, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in absolute[len(start):].split("/"):
            if part:
                inner = _open_dir_at(fd, part, create=True)
                os.close(fd)
                fd = inner
    except OSError as err:
        os.close(fd)
        if err.errno in (errno.ELOOP, errno.ENOTDIR, errno.EEXIST):
            raise _Refused(f"the output folder {clean(dest)!r} goes through {clean(part)!r}, "
                           "which is a symlink or a file: give its real path "
                           f"({clean(os.path.realpath(dest))!r}) or another folder") from None
        raise _Refused(f"cannot make the output folder {clean(dest)!r}: "
                       f"{err.strerror or clean(err, 200)}") from None
    return fd


def _check_only(only: str) -> None:
    """Refuse an ``only`` that is not one plain name (it is compared with a first component).

    :raises ArchiveError"""
    if not only or "/" in only or only in (".", "..") or _bad_text(only):
        raise ArchiveError(f"cannot fetch {clean(only)!r}: name one file or folder "
                           "(its basename), not a path")


def sweep_links(dest: Path, max_entries: int = MAX_MEMBERS) -> list[str]:
    """Remove every symlink under ``dest`` that resolves outside it, walking it without
    following links (at most ``max_entries`` entries); their paths, relative to ``dest``.
    One extraction removes the escaping links it wrote; a later extraction into the same
    folder (a job's second output) can make an earlier link escape, so a job's output
    folders are swept once all of its outputs are in."""
    root = os.path.realpath(dest)
    if not os.path.isdir(dest) or os.path.islink(dest):
        return []
    removed: list[str] = []
    seen = 0
    for folder, dirs, files in os.walk(dest, followlinks=False):
        for name in dirs + files:
            seen += 1
            if seen > max_entries:
                return removed
            path = os.path.join(folder, name)
            if os.path.islink(path) and not _is_within(os.path.realpath(path), root):
                os.unlink(path)
                removed.append(os.path.relpath(path, dest))
        dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(folder, d))]
    return removed


def safe_extract(src: BinaryIO, dest: Path, max_bytes: int,
                 strip_components: int = 0, only: str | None = None) -> list[Path]:
    """Extract an UNTRUSTED tar stream (what a host sends back, plain or gzip/bzip2/xz) into
    ``dest`` (made if missing), read once as a stream. Refuses, writing nothing outside
    ``dest``: absolute names, '..', links leaving ``dest``, hard links to anything but a file
    it wrote, devices, fifos, sparse files, NUL or control characters in names, more than
    ``max_bytes`` of content (counted as read), more than 100,000 members, and with ``only``
    any member whose first component (after ``strip_components``) is not ``only`` (what was
    asked for, so that a host cannot replace other files in ``dest``). Never writes
    through a symlink, nor opens ``dest`` through one below the current folder; modes lose
    setuid, setgid and group/world write. ``strip_components`` drops that many leading name
    components, as ``tar --strip-components`` does. However it ends (refused, cut short),
    every symlink it wrote that resolves outside ``dest`` is removed. Returns the paths
    written; on a refusal, those stay (the message says so).

    :raises ArchiveError"""
    if only is not None:
        _check_only(only)
    extraction = _Extraction(dest, max_bytes, strip_components, only)
    why: str | None = None
    try:
        why = extraction.run(src)
    finally:
        removed = extraction.close()
    if removed and why is None:
        why = (f"symlink {_names(removed)} resolves outside the output folder (removed)"
               if len(removed) == 1 else
               f"symlinks {_names(removed)} resolve outside the output folder (removed)")
        removed = []
    if why is not None:
        raise ArchiveError(extraction.message(why, removed))
    return extraction.written
