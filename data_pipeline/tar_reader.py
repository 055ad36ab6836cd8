"""Stage 5 of the stream: samples at a range of positions of webdataset tar shards.

A sample is a run of consecutive regular members sharing the key before the name's first dot;
it becomes a dict of member bytes keyed by extension, plus "__key__" and "__url__".
"""
from __future__ import annotations

import os
import tarfile
from pathlib import Path

from tbps.data_pipeline.loader_state import LoaderStats, warn


def read_pieces(pieces, root: Path, stats: LoaderStats, every: int):
    """Tar reader: samples (dicts of member bytes keyed by extension) of each piece's range."""
    for name, first, end in pieces:
        try:
            yield from _read_range(root / name, first, end)
        except (tarfile.TarError, OSError, EOFError) as exc:
            warn(stats, "corrupt_shard", every, f"{name}: unreadable from some point ({exc})")


class _Samples:
    """Groups a tar's members into samples, keeping those at positions [first, end). Its state
    outlives an error, so a reader that stops knows where it stopped."""

    def __init__(self, path: Path, first: int, end: int):
        self.url, self.first, self.end = str(path), first, end
        self.group, self.key, self.position = None, None, -1

    def of(self, members):
        """members: (name, read) of each regular member in order; read() gives its bytes and is
        called only for the members kept, before the next one is asked for."""
        for name, read in members:
            k, _, ext = name.partition(".")
            if k != self.key:
                if self.group is not None:
                    yield self.group
                    self.group = None
                self.key, self.position = k, self.position + 1
                if self.position >= self.end:
                    return
                if self.position >= self.first:
                    self.group = {"__key__": k, "__url__": self.url}
            if self.group is not None:
                self.group[ext.lower()] = read()
        if self.group is not None:
            yield self.group

    def next_unread(self) -> int:
        """The position of the sample being read, or of the next one."""
        return self.position if self.group is not None else self.position + 1


def _read_range(path: Path, first: int, end: int):
    """Samples at positions [first, end) of one tar; the tar format is read here (4x faster than
    tarfile), leaving tars with extended headers (pax, GNU long names) to `_read_range_tarfile`."""
    samples = _Samples(path, first, end)
    try:
        with open(path, "rb") as fh:
            yield from samples.of(_ustar_members(fh))
    except _ExtendedHeader:
        yield from _read_range_tarfile(path, max(first, samples.next_unread()), end)


def _read_range_tarfile(path: Path, first: int, end: int):
    with open(path, "rb") as fh, tarfile.open(fileobj=fh, mode="r|") as tar:
        members = ((m.name, lambda m=m: tar.extractfile(m).read()) for m in tar if m.isreg())
        yield from _Samples(path, first, end).of(members)


class _ExtendedHeader(Exception):
    pass


_EMPTY_BLOCK = bytes(512)


def _ustar_members(fh):
    """(name, read) of each regular member, parsing the headers here; data not read is skipped."""
    size_of_file = os.fstat(fh.fileno()).st_size
    while True:
        header = fh.read(512)
        if header == _EMPTY_BLOCK:                  # the end-of-archive block
            return
        if len(header) < 512:                       # a tar always ends with that block
            raise tarfile.ReadError("unexpected end of data in a header" if header else
                                    "unexpected end of data: no end-of-archive block (the tar "
                                    "was cut at a block boundary)")
        kind = header[156:157]
        if kind in (b"x", b"g", b"L", b"K"):
            raise _ExtendedHeader
        try:
            size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
            checksum = int(header[148:156].split(b"\0", 1)[0].strip(), 8)
        except ValueError:
            raise _ExtendedHeader from None    # base-256 numbers, or not a tar: tarfile decides
        if checksum != sum(header) - sum(header[148:156]) + 256:
            raise tarfile.ReadError("bad checksum in a tar header")
        name = header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
        if header[257:262] == b"ustar" and header[345] != 0:
            name = header[345:500].split(b"\0", 1)[0].decode("utf-8", "replace") + "/" + name
        taken = []
        if kind in (b"0", b"\0", b"7"):

            def read(name=name, size=size):
                data = fh.read(size)
                if len(data) != size:
                    raise tarfile.ReadError(f"unexpected end of data in {name}")
                taken.append(True)
                return data

            yield name, read
        if taken:
            fh.seek(-size % 512, os.SEEK_CUR)
        else:
            if fh.tell() + size > size_of_file:
                raise tarfile.ReadError(f"unexpected end of data in {name}")
            fh.seek(size + -size % 512, os.SEEK_CUR)
