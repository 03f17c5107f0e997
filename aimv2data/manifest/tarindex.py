"""Where every member's bytes are inside a webdataset tar, grouped into samples; and DALI's .idx.

The headers are read directly (POSIX ustar, GNU long names, pax records: what tarfile, GNU tar and
webdataset's TarWriter write), one 512-byte block per member, never the data: about 10x faster than
iterating `tarfile`, which matters because indexing is a third of a header-level manifest build. The
tests check every offset against `tarfile.extractfile`. The offset of a member is where its DATA starts,
so `open(tar).seek(offset).read(size)` is the member.

A truncated tar is indexed as far as it is complete: members whose data runs past the end of the file,
and unreadable bytes after the last good header, are reported as problems instead of raising. A damaged
header in the middle does not end the index: it resynchronises on the next 512-byte block that is a
valid ustar header (magic + checksum), and the skipped byte range is reported in `damaged`; only the
members whose headers were in that range are lost. A size that is not a size (a pax `size=-1536` or
`size=12abc`, an extended header claiming more than MAX_EXTENDED_HEADER bytes) ends the index there, as
`tail_problem`: the members before it are kept, and the index only ever moves forwards.

Samples follow the webdataset/DALI convention: the key is the member path up to the first dot of its
basename, the extension is the rest (`a/b.seg.png` -> key `a/b`, ext `seg.png`).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field

from aimv2data import storage
from aimv2data.atomic import write_text_atomic

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
BLOCK = 512
_ZERO = bytes(BLOCK)
_REGULAR = (b"0", b"\0", b"7")     # regular file, old-style regular file, contiguous file


class TarUnreadable(Exception):
    """The file is not an uncompressed tar that can be indexed at all."""


@dataclass
class Member:
    name: str
    offset: int      # byte offset of the data (after the header blocks)
    size: int


@dataclass
class Sample:
    key: str
    members: dict[str, Member] = field(default_factory=dict)   # ext (lower case) -> first member
    extra: list[Member] = field(default_factory=list)          # later members with an ext already seen

    def image(self) -> tuple[str, Member] | tuple[None, None]:
        for ext in IMAGE_EXTS:
            if ext in self.members:
                return ext, self.members[ext]
        return None, None


@dataclass
class TarIndex:
    path: str
    file_size: int
    samples: list[Sample]
    truncated: list[Member]          # members whose data runs past the end of the file
    tail_problem: str | None         # why bytes after the last member could not be read, if any
    ignored: int                     # non-file entries and hidden files (no key)
    damaged: list[str] = field(default_factory=list)   # byte ranges skipped to resynchronise, described


def split_name(name: str) -> tuple[str, str]:
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1:]


class _BadHeader(ValueError):
    pass


def _number(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:              # GNU base-256 for sizes >= 8 GiB
        if field[0] == 0xFF:                       # base-256 negative: never a size or checksum
            raise _BadHeader(f"negative base-256 number {field!r}")
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise _BadHeader(f"non-octal number {field!r}") from None


def _check_header(hdr: bytes) -> None:
    stored = _number(hdr[148:156])
    unsigned = 256 + sum(hdr[:148]) + sum(hdr[156:])
    if stored != unsigned:
        signed = 256 + sum(struct.unpack_from("148b8x356b", hdr))
        if stored != signed:
            raise _BadHeader("header checksum mismatch")


def _pax_records(data: bytes) -> dict[str, str]:
    out, pos = {}, 0
    while pos < len(data):
        sp = data.find(b" ", pos)
        if sp < 0:
            break
        try:
            n = int(data[pos:sp])
        except ValueError:
            raise _BadHeader("malformed pax record") from None
        if n <= 0:
            break
        key, _, value = data[sp + 1:pos + n - 1].partition(b"=")
        out[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
        pos += n
    return out


def _pax_size(value: str) -> int:
    """A pax `size` record: plain decimal digits. Anything else (`-1536`, `12abc`, `1e9`) is not a size; a
    negative one would move the index backwards and loop forever."""
    if not (value.isascii() and value.isdigit()):
        raise _BadHeader(f"pax size {value[:40]!r} is not a size")
    return int(value)


# Extended headers (pax records, GNU long names) are read into memory: a real one is a few hundred bytes,
# one that claims more is hostile (a sparse 1 GiB header in a 12 KB tar) and ends the index.
MAX_EXTENDED_HEADER = 1 << 20

# A tar at a URL is read through fsspec in read-ahead blocks of this size: streamed, never on disk.
REMOTE_BLOCK = 16 << 20


_EXTENDED = (b"x", b"g", b"L", b"K")   # pax / global pax / GNU long name / GNU long link


class _IndexEnds(Exception):
    """The index ends before the archive's end; the message says why (TarIndex.tail_problem)."""


def index_tar(path: str) -> TarIndex:
    file_size = storage.stat(path)[0]
    with open_tar(path) as f:
        walk = _Walk(f, path, file_size)
        tail_problem = None
        try:
            while walk.step():
                pass
        except _IndexEnds as e:
            tail_problem = str(e)
    if walk.end is not None and walk.end < file_size:
        tail_problem = _tail_problem(path, walk.end, file_size)
    return TarIndex(path, file_size, list(walk.samples.values()), walk.truncated, tail_problem, walk.ignored,
                    walk.damaged)


def _padded(size: int) -> int:
    return (size + BLOCK - 1) // BLOCK * BLOCK


class _Walk:
    """One pass over the headers of an open tar, strictly forwards: `step` reads the header at `pos` and
    moves past its member; the pending pax records / GNU long name apply to the next member."""

    def __init__(self, f, path: str, file_size: int):
        self.f, self.path, self.file_size = f, path, file_size
        self.samples: dict[str, Sample] = {}
        self.truncated: list[Member] = []
        self.damaged: list[str] = []
        self.ignored, self.end = 0, None     # end: offset of the end-of-archive blocks, when met
        self.pos, self.long_name, self.pax = 0, None, {}

    def step(self) -> bool:
        """False at the end of the archive; raises _IndexEnds where the rest cannot be indexed."""
        hdr = self._header()
        if hdr is None:
            return False
        if hdr == _ZERO:
            return self._zeros()
        try:
            _check_header(hdr)
            size = _number(hdr[124:136])
        except _BadHeader as e:
            return self._bad_header(e)
        kind = hdr[156:157]
        if kind in _EXTENDED:
            self._extended(kind, size)
            return True
        return self._member(hdr, kind, size)

    def _unreadable(self, why: str) -> TarUnreadable:
        return TarUnreadable(_unreadable_reason(self.path, self.file_size, why))

    def _header(self) -> bytes | None:
        """The 512-byte block at `pos`; None at the end of the file (without end-of-archive blocks: fine)."""
        self.f.seek(self.pos)
        hdr = self.f.read(BLOCK)
        if not hdr:
            if self.pos == 0:
                raise self._unreadable("empty")
            return None
        if len(hdr) < BLOCK:
            if self.pos == 0:
                raise self._unreadable("shorter than one tar block")
            if self.pos < self.file_size:
                raise _IndexEnds(f"tar header at byte {self.pos} is cut off: truncated or damaged tar")
            return None
        return hdr

    def _resume_at(self, nxt: int, what: str) -> bool:
        self.damaged.append(what)
        self.pos, self.pax, self.long_name = nxt, {}, None
        return True

    def _zeros(self) -> bool:
        """A zero block: the end-of-archive blocks (what follows is checked by index_tar), or a zeroed range."""
        pos = self.pos
        nxt = _resync(self.f, pos + BLOCK)
        if nxt is None:
            self.end = pos
            return False
        return self._resume_at(nxt, f"bytes {pos}..{nxt} are zeros, not tar headers; resumed at the header at {nxt}")

    def _bad_header(self, e: _BadHeader) -> bool:
        pos = self.pos
        if pos == 0:
            raise self._unreadable(str(e)) from None
        nxt = _resync(self.f, pos + BLOCK)
        if nxt is None:
            raise _IndexEnds(f"tar header at byte {pos} is unreadable ({e}): truncated or damaged tar")
        return self._resume_at(nxt, f"tar header at byte {pos} is unreadable ({e}); bytes {pos}..{nxt} skipped, "
                               f"resumed at the next valid header")

    def _extended(self, kind: bytes, size: int) -> None:
        """Pax records or a GNU long name, read into memory for the next member."""
        pos, data = self.pos, self.pos + BLOCK
        if data + size > self.file_size:
            raise _IndexEnds(f"tar ends inside the extended header at byte {pos}: truncated tar")
        if size > MAX_EXTENDED_HEADER:
            raise _IndexEnds(f"extended header at byte {pos} claims {size} bytes (more than "
                             f"{MAX_EXTENDED_HEADER}): damaged or hostile tar, index ends there")
        payload = self.f.read(size)
        if kind == b"x":
            try:
                self.pax = _pax_records(payload)
            except _BadHeader as e:
                raise _IndexEnds(f"pax header at byte {pos}: {e}") from None
        elif kind == b"L":
            self.long_name = payload.rstrip(b"\0").decode("utf-8", "replace")
        self.pos = data + _padded(size)

    def _name(self, hdr: bytes) -> str:
        name = self.pax.get("path") or self.long_name
        if name is None:
            name = hdr[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
            prefix = hdr[345:500].split(b"\0", 1)[0] if hdr[257:263] == b"ustar\0" else b""
            if prefix:
                name = prefix.decode("utf-8", "replace") + "/" + name
        return name

    def _member(self, hdr: bytes, kind: bytes, size: int) -> bool:
        """A member: into its sample, or ignored (not a file, no key, hidden); False when its data is cut off."""
        pos, data = self.pos, self.pos + BLOCK
        name = self._name(hdr)
        if "size" in self.pax:
            try:
                size = _pax_size(self.pax["size"])
            except _BadHeader as e:   # the members before it are kept; where the next one is, is unknown
                raise _IndexEnds(f"pax header before byte {pos}: {e}: damaged or hostile tar, "
                                 "index ends there") from None
        self.pax, self.long_name = {}, None
        self.pos = data + _padded(size)
        key, ext = split_name(name)
        base = name[name.rfind("/") + 1:]
        if kind not in _REGULAR or not key or base.startswith("."):
            self.ignored += 1
            return True
        member = Member(name, data, size)
        if data + size > self.file_size:
            self.truncated.append(member)
            return False
        s = self.samples.setdefault(key, Sample(key))
        ext = ext.lower()
        if ext in s.members:
            s.extra.append(member)
        else:
            s.members[ext] = member
        return True


def _is_header(block: bytes) -> bool:
    if len(block) < BLOCK or block[257:262] != b"ustar":
        return False
    try:
        _check_header(block)
    except _BadHeader:
        return False
    return True


def _resync(f, start: int) -> int | None:
    """Offset of the first 512-aligned block at or after `start` that is a valid ustar header, or None.
    Member data (JPEG bytes) passing both the magic and the checksum test by chance is negligible."""
    pos = start
    while True:
        f.seek(pos)
        chunk = f.read(1 << 20)
        if len(chunk) < BLOCK:
            return None
        for i in range(0, len(chunk) - BLOCK + 1, BLOCK):
            if chunk[i + 257:i + 262] == b"ustar" and _is_header(chunk[i:i + BLOCK]):
                return pos + i
        pos += len(chunk) // BLOCK * BLOCK


def open_tar(path: str):
    """A local tar, or one at a URL read in ranged, read-ahead blocks."""
    if storage.is_url(path):
        return storage.open_file(path, "rb", block_size=REMOTE_BLOCK, cache_type="readahead")
    return open(path, "rb")


def _unreadable_reason(path: str, size: int, why: str) -> str:
    if size == 0:
        return "empty file (0 bytes)"
    with open_tar(path) as f:
        head = f.read(4)
    if head[:2] == b"\x1f\x8b" or head[:3] == b"BZh" or head == b"\xfd7zX" or head == b"\x28\xb5\x2f\xfd":
        return "compressed tar: byte offsets need an uncompressed .tar (decompress it first)"
    return f"not a tar file ({why})"


def _tail_problem(path: str, start: int, file_size: int) -> str | None:
    """Bytes after the last readable member are fine if they are the zero blocks that end an archive;
    anything else is a header that could not be parsed (a truncated or damaged tar)."""
    with open_tar(path) as f:
        f.seek(start)
        while True:
            chunk = f.read(1 << 20)
            if not chunk:
                return None
            if chunk.count(0) != len(chunk):
                return (f"{file_size - start} bytes after byte {start} are not a readable tar header: "
                        "truncated or damaged tar")


def write_dali_index(path: str, samples: list[Sample]) -> None:
    """DALI's webdataset index (what its `wds2idx` tool writes, format v1.2): a line `v1.2 N`, then one line
    per sample: `ext offset size filename` for each of its members. Offsets are data offsets. Member names
    with whitespace cannot be written in v1.2, so such an index is written as v1.1 (no filenames).
    Written to a temp file and renamed into place."""
    if not samples:
        raise ValueError("DALI rejects an index with 0 samples; write none for an empty tar")
    rows = [sorted(s.members.items(), key=lambda kv: kv[1].offset) for s in samples]
    v12 = not any(any(c.isspace() for c in m.name) for row in rows for _, m in row)
    lines = [f"{'v1.2' if v12 else 'v1.1'} {len(rows)}"]
    for row in rows:
        lines.append(" ".join(f"{ext} {m.offset} {m.size}" + (f" {m.name}" if v12 else "") for ext, m in row))
    write_text_atomic(path, "\n".join(lines) + "\n")
