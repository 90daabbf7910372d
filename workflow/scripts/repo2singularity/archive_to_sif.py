#!/usr/bin/env python3
"""Turn a saved Docker image (the tarball of `docker save`) into an Apptainer SIF, without
unpacking it.

`apptainer build x.sif docker-archive://image.tar` spends most of its time writing every layer
into a temporary tree, only to pack that tree again with mksquashfs. Here the layers are read
once from the tarball and flattened in memory (only names and a few numbers per file, never
file contents), and the resulting root file system is streamed as one tar into
`mksquashfs - SIF -tar`, which writes the squashfs straight into the SIF at the partition's
offset. Then the SIF's header and descriptors are written in front of it.

What apptainer adds to an image (/.singularity.d with its scripts, runscript, environment and
labels, the top-level links, empty /etc/hosts and /etc/resolv.conf, the SIF's deffile and JSON
descriptors) is taken from the installed apptainer itself: it builds a SIF of an empty image
with the same configuration (under a second), and its additions and descriptors are merged in,
so that they match that apptainer version exactly.

One difference is deliberate: files keep the image's own owners (apptainer 1.4 building as an
ordinary user records every file as root). Device nodes stay device nodes (apptainer building
without root turns them into empty files).

Python standard library only, so that this one file can run on a builder with python3 >= 3.11,
mksquashfs >= 4.5 (squashfs-tools) and apptainer, and nothing of this project.

    python3 archive_to_sif.py [--compression NAME] [--runtime apptainer] IMAGE.tar OUT.sif
"""

import argparse
import gzip
import hashlib
import json
import os
import posixpath
import re
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import zlib
from array import array
from base64 import b64decode
from pathlib import Path
from urllib.parse import unquote_to_bytes

BLOCK = 512
ZERO_BLOCK = bytes(BLOCK)
CHUNK = 1 << 20
MKSQUASHFS_MINIMUM = (4, 5)
MKSQUASHFS_MEMORY = "256M"


class ConversionError(Exception):
    """A conversion that cannot go on; the message is one line, for the user."""


# ------------------------------------------------------------------------------------ tar members

REGULAR, HARDLINK, SYMLINK, CHARDEV, BLOCKDEV, DIRECTORY, FIFO = b"0", b"1", b"2", b"3", b"4", b"5", b"6"
TYPE_ALIASES = {b"\0": REGULAR, b"7": REGULAR}  # old regular files, contiguous files
KNOWN_TYPES = {REGULAR, HARDLINK, SYMLINK, CHARDEV, BLOCKDEV, DIRECTORY, FIFO}


class Member:
    """One entry of a tar archive: what a header (and its extension headers) says."""

    __slots__ = ("name", "type", "mode", "uid", "gid", "size", "mtime", "linkname", "devmajor", "devminor", "xattrs", "offset")

    def __init__(self, name, type_, mode=0o644, uid=0, gid=0, size=0, mtime=0, linkname=b"", devmajor=0, devminor=0, xattrs=None, offset=0):
        self.name = name
        self.type = type_
        self.mode = mode
        self.uid = uid
        self.gid = gid
        self.size = size
        self.mtime = mtime
        self.linkname = linkname
        self.devmajor = devmajor
        self.devminor = devminor
        self.xattrs = xattrs  # [(name, value)] as bytes, or None
        self.offset = offset  # of its first header block in the archive

    @property
    def data_size(self):
        # only regular files carry data (as tar readers have it), whatever the size field says
        return self.size if self.type == REGULAR else 0

    @property
    def data_blocks(self):
        return (self.data_size + BLOCK - 1) // BLOCK * BLOCK


# name, mode, uid, gid, size, mtime, checksum, type, linkname, magic, version, uname, gname,
# devmajor, devminor, prefix
HEADER = struct.Struct("100s8s8s8s12s12s8sc100s6s2s32s32s8s8s155s12x")


def nul_terminated(field):
    return field.partition(b"\0")[0]


def tar_number(field):
    """An octal number, or GNU base-256 (first byte 0x80 or 0xff)."""
    if field[0] & 0x80:
        return int.from_bytes(field[1:], "big", signed=False) if field[0] == 0x80 else int.from_bytes(field, "big", signed=True)
    digits = nul_terminated(field).strip(b" ")
    return int(digits, 8) if digits else 0


def pax_records(data):
    """The key=value records of a pax extended header (values are bytes: xattrs are binary)."""
    records = {}
    position = 0
    while position < len(data):
        space = data.find(b" ", position)
        if space < 0:
            break
        length = int(data[position:space])
        record = data[space + 1 : position + length - 1]  # without the trailing newline
        key, _, value = record.partition(b"=")
        records[key] = value
        position += length
    return records


class TarReader:
    """Reads the members of a tar archive from a stream, in order. The caller reads or skips
    each member's data before asking for the next one."""

    def __init__(self, stream, label, check_sums=True, names_only=False):
        self.stream = stream
        self.label = label  # names the archive in error messages
        self.check_sums = check_sums  # not needed where the layer's digest is checked anyway
        self.names_only = names_only  # name, type, size and link target: all that indexing needs

    def corrupt(self, what):
        return ConversionError(f"{self.label} is corrupt or truncated: {what}")

    def read_exact(self, size):
        data = self.stream.read(size)
        if len(data) != size:
            raise self.corrupt(f"unexpected end of data at byte {self.stream.tell()}")
        return data

    def next(self):
        try:
            return self.next_member()
        except ValueError as error:  # a number field or pax record that is not one
            raise self.corrupt(f"unreadable header before byte {self.stream.tell()} ({error})") from None

    def next_member(self):
        pax = {}
        long_name = long_link = None
        offset = self.stream.tell()
        while True:
            block = self.stream.read(BLOCK)
            if len(block) == 0 and offset == 0:
                raise self.corrupt("it is empty")
            if len(block) != BLOCK:
                raise self.corrupt(f"unexpected end of data at byte {self.stream.tell()}")
            if block == ZERO_BLOCK:
                return None
            if self.check_sums:
                self.check_sum(block)
            fields = HEADER.unpack(block)
            type_ = fields[7]
            size = tar_number(fields[4])
            if type_ in (b"x", b"g", b"L", b"K"):
                if size > 1 << 24:
                    raise self.corrupt(f"an extension header of {size} bytes at byte {self.stream.tell() - BLOCK}")
                data = self.read_exact((size + BLOCK - 1) // BLOCK * BLOCK)[:size]
                if type_ == b"x":
                    pax.update(pax_records(data))
                elif type_ == b"L":
                    long_name = nul_terminated(data)
                elif type_ == b"K":
                    long_link = nul_terminated(data)
                continue  # a global header ("g") only sets defaults that docker never uses
            return self.member(fields, TYPE_ALIASES.get(type_, type_), size, pax, long_name, long_link, offset)

    def check_sum(self, block):
        try:
            stored = tar_number(block[148:156])
        except ValueError:
            stored = -1
        unsigned = sum(block[:148]) + 256 + sum(block[156:])
        if stored != unsigned and stored != sum(struct.unpack("148b8x356b", block)) + 256:
            raise self.corrupt(f"bad header checksum at byte {self.stream.tell() - BLOCK}")

    def member(self, fields, type_, size, pax, long_name, long_link, offset):
        name, mode, uid, gid, _, mtime, _, _, linkname, magic, _, _, _, devmajor, devminor, prefix = fields
        if long_name is not None:
            name = long_name
        elif magic == b"ustar\0" and prefix[0]:
            name = nul_terminated(prefix) + b"/" + nul_terminated(name)
        else:
            name = nul_terminated(name)
        linkname = long_link if long_link is not None else nul_terminated(linkname)
        if self.names_only:
            member = Member(name, type_, size=size, linkname=linkname, offset=offset)
        else:
            member = Member(name, type_, tar_number(mode) & 0o7777, tar_number(uid), tar_number(gid), size, tar_number(mtime), linkname)
            member.offset = offset
        if type_ in (CHARDEV, BLOCKDEV) and not self.names_only:
            member.devmajor = tar_number(devmajor)
            member.devminor = tar_number(devminor)
        if pax:
            self.apply_pax(member, pax)
        if member.type not in KNOWN_TYPES:
            what = "a sparse file" if member.type == b"S" else f"an entry of tar type {member.type!r}"
            raise ConversionError(f"{self.label} holds {what} ({member.name.decode(errors='replace')}), which this converter does not read")
        return member

    def apply_pax(self, member, pax):
        for key, value in pax.items():
            if key == b"path":
                member.name = value
            elif key == b"linkpath":
                member.linkname = value
            elif key in (b"size", b"uid", b"gid"):
                setattr(member, key.decode(), int(value))
            elif key == b"mtime":
                member.mtime = int(float(value))
            elif key.startswith(b"SCHILY.xattr."):
                member.xattrs = (member.xattrs or []) + [(key[len(b"SCHILY.xattr.") :], value)]
            elif key.startswith(b"LIBARCHIVE.xattr."):
                name = unquote_to_bytes(key[len(b"LIBARCHIVE.xattr.") :])
                member.xattrs = (member.xattrs or []) + [(name, b64decode(value + b"=" * (-len(value) % 4)))]
            elif key.startswith(b"GNU.sparse."):
                member.type = b"S"

    def skip(self, member):
        self.stream.skip(member.data_blocks)

    def copy(self, member, write):
        """Hand the member's data to write() in chunks, then skip its padding."""
        left = member.data_size
        while left:
            chunk = self.stream.read_view(min(left, CHUNK))
            if not chunk:
                raise self.corrupt(f"unexpected end of data at byte {self.stream.tell()}")
            write(chunk)
            left -= len(chunk)
        self.stream.skip(member.data_blocks - member.data_size)


# ------------------------------------------------------------------------------------ tar output


def pax_record(key, value):
    payload = b" " + key + b"=" + value + b"\n"
    length = len(payload) + 1
    while len(str(length).encode() + payload) != length:
        length = len(str(length).encode() + payload)
    return str(length).encode() + payload


def header_block(name, type_, size, mode=0o644, uid=0, gid=0, mtime=0, linkname=b"", devmajor=0, devminor=0):
    """A ustar header with empty user and group names (numbers count) and big numbers as 0 (the
    caller puts them in pax records). squashfs keeps 32-bit times, and mksquashfs 4.5.1 cannot
    read a pax mtime without a fraction: times are clamped instead."""
    numbers = (b"%07o\0" % mode, b"%07o\0" % (uid if uid < 8**7 else 0), b"%07o\0" % (gid if gid < 8**7 else 0))
    numbers += (b"%011o\0" % (size if size < 8**11 else 0), b"%011o\0" % min(max(int(mtime), 0), 2**32 - 1))
    devices = (b"%07o\0" % devmajor, b"%07o\0" % devminor)
    block = bytearray(HEADER.pack(name[:100], *numbers, b" " * 8, type_, linkname[:100], b"ustar\0", b"00", b"", b"", *devices, b""))
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def padded(data):
    return data + bytes(-len(data) % BLOCK)


def member_header(member, name, type_=None, linkname=None):
    """Header blocks for one member under a new name, for mksquashfs 4.5.1: numeric owners only
    (empty user and group names), pax for long names, big numbers and xattrs, and a GNU long
    link for long link targets (4.5.1 strips the leading / of a pax linkpath)."""
    type_ = type_ or member.type
    linkname = member.linkname if linkname is None else linkname
    size = member.size if type_ == REGULAR else 0
    records = []
    if len(name) > 100:
        records.append(pax_record(b"path", name))
    if size >= 8**11:
        records.append(pax_record(b"size", b"%d" % size))
    if member.uid >= 8**7:
        records.append(pax_record(b"uid", b"%d" % member.uid))
    if member.gid >= 8**7:
        records.append(pax_record(b"gid", b"%d" % member.gid))
    for key, value in member.xattrs or ():
        records.append(pax_record(b"SCHILY.xattr." + key, value))
    out = b""
    if records:
        data = b"".join(records)
        out += header_block(b"././@PaxHeader", b"x", len(data)) + padded(data)
    if len(linkname) > 100:
        out += header_block(b"././@LongLink", b"K", len(linkname) + 1) + padded(linkname + b"\0")
    out += header_block(name, type_, size, member.mode, member.uid, member.gid, member.mtime, linkname, member.devmajor, member.devminor)
    return out


class TarWriter:
    """Writes a tar stream to a pipe: small pieces are gathered, big ones go straight through."""

    def __init__(self, fd):
        self.fd = fd
        self.pending = bytearray()

    def write(self, data):
        if len(data) >= CHUNK // 4:
            self.flush()
            self.write_all(data)
        else:
            self.pending += data
            if len(self.pending) >= CHUNK:
                self.flush()

    def flush(self):
        if self.pending:
            self.write_all(self.pending)
            self.pending = bytearray()

    def write_all(self, data):
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view) :]

    def member(self, member, name, data=None, reader=None, type_=None, linkname=None):
        self.write(member_header(member, name, type_, linkname))
        if data is not None:
            self.write(padded(data))
        elif reader is not None:
            reader.copy(member, self.write)
            self.write(bytes(-member.data_size % BLOCK))

    def close(self):
        self.write(ZERO_BLOCK * 2)
        self.flush()


# ------------------------------------------------------------------------------------ byte sources


class Region:
    """A byte range [start, start + size) of an open file, read with pread (no shared position)."""

    def __init__(self, fd, start, size):
        self.fd = fd
        self.start = start
        self.size = size
        self.position = 0
        self.buffer = bytearray(CHUNK)

    def tell(self):
        return self.position

    def seek(self, position, whence=os.SEEK_SET):
        self.position = position if whence == os.SEEK_SET else (self.position + position if whence == os.SEEK_CUR else self.size + position)
        return self.position

    def read(self, size=-1):
        size = self.size - self.position if size < 0 else min(size, self.size - self.position)
        data = os.pread(self.fd, size, self.start + self.position) if size > 0 else b""
        self.position += len(data)
        return data

    def read_view(self, size):
        """Up to size bytes in a reused buffer, valid until the next call (no allocation per chunk)."""
        size = min(size, self.size - self.position, len(self.buffer))
        count = os.preadv(self.fd, [memoryview(self.buffer)[:size]], self.start + self.position) if size > 0 else 0
        self.position += count
        return memoryview(self.buffer)[:count]

    def compressed_position(self):
        return self.position


class GzipRegion:
    """A gzip-compressed Region, decompressed as it is read; broken gzip data is one line."""

    def __init__(self, region, label):
        self.region = region
        self.label = label
        self.file = gzip.GzipFile(fileobj=region, mode="rb")
        self.buffer = bytearray(CHUNK)

    def read(self, size):
        try:
            return self.file.read(size)
        except (OSError, EOFError, zlib.error) as error:
            raise ConversionError(f"{self.label}: its gzip data is corrupt or truncated ({error})") from None

    def read_view(self, size):
        view = memoryview(self.buffer)[: min(size, CHUNK)]
        try:
            return view[: self.file.readinto(view)]
        except (OSError, EOFError, zlib.error) as error:
            raise ConversionError(f"{self.label}: its gzip data is corrupt or truncated ({error})") from None

    def compressed_position(self):
        return self.region.tell()


class LayerStream:
    """A layer's uncompressed tar, read forwards. With a digest, every byte passes through the
    hash (skipping reads too), so that the layer can be checked against its diff_id at the end;
    without one, skipping a plain layer is a seek."""

    def __init__(self, source, digest=None, progress=None):
        self.source = source  # a Region or a GzipRegion
        self.hash = hashlib.sha256() if digest else None
        self.digest = digest
        self.position = 0
        self.progress = progress

    def tell(self):
        return self.position

    def read(self, size):
        data = self.source.read(size)
        self.consumed(data)
        return data

    def read_view(self, size):
        view = self.source.read_view(size)
        self.consumed(view)
        return view

    def consumed(self, data):
        self.position += len(data)
        if self.hash is not None:
            self.hash.update(data)
        if self.progress is not None:
            self.progress.advance(self.source.compressed_position())

    def skip(self, size):
        if self.hash is None and isinstance(self.source, Region):
            self.source.seek(size, os.SEEK_CUR)
            self.position += size
            return
        while size > 0:
            view = self.read_view(min(size, CHUNK))
            if not view:
                return
            size -= len(view)

    def verify(self, label):
        """Read what is left (the end-of-archive blocks and padding) and compare the digest."""
        while self.read_view(CHUNK):
            pass
        if self.hash is not None and "sha256:" + self.hash.hexdigest() != self.digest:
            raise ConversionError(f"{label} does not match its digest {self.digest}: the tarball is corrupt")


# ------------------------------------------------------------------------------------ the saved image


# Python's standard library reads gzip only (zstd comes with Python 3.14)
UNREADABLE_COMPRESSION = {b"\x28\xb5\x2f\xfd": "zstd", b"BZh": "bzip2", b"\xfd7zXZ": "xz"}


class SavedImage:
    """The tarball of `docker save`: the legacy layout (manifest.json, <id>/layer.tar) or the
    OCI layout (index.json, blobs/sha256/...), both described by manifest.json."""

    def __init__(self, path):
        self.path = Path(path)
        try:
            self.fd = os.open(self.path, os.O_RDONLY)
        except OSError as error:
            raise ConversionError(f"cannot read {path}: {error.strerror}") from None
        try:
            self.read_manifest()
        except OSError as error:
            os.close(self.fd)
            raise ConversionError(f"cannot read {path}: {error.strerror or error}") from None
        except BaseException:
            os.close(self.fd)
            raise

    def read_manifest(self):
        path = self.path
        self.size = os.fstat(self.fd).st_size
        self.members = self.index()
        if "manifest.json" not in self.members:
            raise ConversionError(f"{path} has no manifest.json: it is not the output of docker save, or it is truncated")
        manifest = self.json("manifest.json", "the manifest")
        if not isinstance(manifest, list) or not manifest:
            raise ConversionError(f"{path}: manifest.json lists no image")
        if len(manifest) > 1:
            raise ConversionError(f"{path} holds {len(manifest)} images; save one image per tarball")
        entry = manifest[0]
        self.config = self.json(entry.get("Config", ""), "the image config")
        layers = entry.get("Layers") or []
        diff_ids = (self.config.get("rootfs") or {}).get("diff_ids") or []
        if len(diff_ids) != len(layers):
            raise ConversionError(f"{path}: manifest.json lists {len(layers)} layers but the image config has {len(diff_ids)} diff_ids")
        self.layers = [self.layer(number, name, digest) for number, (name, digest) in enumerate(zip(layers, diff_ids, strict=True), 1)]

    def close(self):
        os.close(self.fd)

    def index(self):
        """name -> (data offset, size) of every member, following symbolic links (docker writes
        a link for a layer that two images share)."""
        reader = TarReader(LayerStream(Region(self.fd, 0, self.size)), str(self.path))
        members, links = {}, {}
        while True:
            member = reader.next()
            if member is None:
                break
            name = posixpath.normpath(member.name.decode(errors="surrogateescape")).lstrip("/")
            if member.type == REGULAR:
                members[name] = (reader.stream.tell(), member.size)
                if reader.stream.tell() + member.size > self.size:
                    raise reader.corrupt(f"{name} ends past the end of the file")
            elif member.type in (SYMLINK, HARDLINK):
                target = member.linkname.decode(errors="surrogateescape")
                if member.type == SYMLINK:
                    target = posixpath.join(posixpath.dirname(name), target)
                links[name] = posixpath.normpath(target).lstrip("/")
            reader.skip(member)
        for name in links:
            target = name
            for _ in range(40):
                if target not in links:
                    break
                target = links[target]
            if target in members:
                members[name] = members[target]
        return members

    def region(self, name, what):
        if name not in self.members:
            raise ConversionError(f"{self.path} lacks {name}, {what} listed in its manifest.json")
        start, size = self.members[name]
        return Region(self.fd, start, size)

    def json(self, name, what):
        data = self.region(name, what).read()
        try:
            return json.loads(data)
        except ValueError:
            raise ConversionError(f"{self.path}: {name} ({what}) is not valid JSON") from None

    def layer(self, number, name, digest):
        region = self.region(name, f"layer {number}")
        magic = region.read(6)
        unreadable = [kind for start, kind in UNREADABLE_COMPRESSION.items() if magic.startswith(start)]
        if unreadable:
            raise ConversionError(
                f"{self.path}: layer {number} ({name}) is {unreadable[0]}-compressed, which this converter cannot read; use apptainer build"
            )
        compression = "gzip" if magic.startswith(b"\x1f\x8b") else None
        return Layer(self, number, name, region.start, region.size, compression, digest)


class Layer:
    def __init__(self, image, number, name, start, size, compression, digest):
        self.image = image
        self.number = number
        self.name = name
        self.start = start
        self.size = size
        self.compression = compression
        self.digest = digest
        self.offsets = array("Q")  # header offset of each member, filled while indexing

    @property
    def label(self):
        return f"layer {self.number} ({self.name}) of {self.image.path}"

    def stream(self, verify=False, progress=None):
        source = Region(self.image.fd, self.start, self.size)
        if self.compression == "gzip":
            source = GzipRegion(source, self.label)
        return LayerStream(source, self.digest if verify else None, progress)

    def reader(self, verify=False, progress=None, names_only=False):
        return TarReader(self.stream(verify, progress), self.label, check_sums=not verify, names_only=names_only)

    def member_at(self, offset):
        """A reader positioned at the member whose headers start at offset (for a hard link whose
        first name is gone: its content is read again from where it was)."""
        reader = self.reader()
        reader.stream.skip(offset)
        return reader, reader.next()


# ------------------------------------------------------------------------------------ flattening


def path_parts(name):
    parts = []
    for part in name.split(b"/"):
        if part == b"..":
            if parts:
                parts.pop()
        elif part and part != b".":
            parts.append(part)
    return parts


class Node:
    """An entry of the flattened root file system. key says which member made it (its layer and
    position); a hard link also knows the member whose content it shares (source)."""

    __slots__ = ("children", "key", "source", "target", "parent", "name")

    def __init__(self, parent, name, key, children=None, source=None, target=None):
        self.parent = parent
        self.name = name
        self.key = key
        self.children = children  # dict for a directory
        self.source = source
        self.target = target  # a symbolic link's target


def member_key(layer_number, position):
    return layer_number << 32 | position


class RootFileSystem:
    """The layers applied in order, as apptainer's unpacker applies them: whiteouts and opaque
    directories hide what lower layers have, a later entry replaces an earlier one (a directory
    replaced by a file loses its content), hard links point to what their target was then."""

    def __init__(self):
        self.root = Node(None, b"", None, children={})
        self.root_member = None  # (layer, header offset) of the last entry for the root itself
        self.implicit = []  # directories no member made (parents missing from a layer)
        self.link_sources = set()
        self.members = {}  # layer number -> [node of each member position]

    def walk(self, parts, create=False, follow_last=False):
        """(parent directory, name, node) for a path, following symbolic links inside the root
        file system; node is None if nothing is there, parent None if a parent is missing."""
        stack = [self.root]
        todo = list(reversed(parts))
        hops = 0
        name = None
        while todo:
            name = todo.pop()
            if name == b"..":
                if len(stack) > 1:
                    stack.pop()
                continue
            if name == b".":
                continue
            directory = stack[-1]
            node = directory.children.get(name)
            last = not todo
            if node is None:
                if last:
                    return directory, name, None
                if not create:
                    return None, name, None
                node = Node(directory, name, None, children={})
                directory.children[name] = node
                self.implicit.append(node)
            if node.target is not None and (follow_last or not last):
                hops += 1
                if hops > 40:
                    return None, name, None
                if node.target.startswith(b"/"):
                    del stack[1:]
                todo.extend(reversed(path_parts(node.target)))
                continue
            if last:
                return directory, name, node
            if node.children is None:
                return None, name, None
            stack.append(node)
        return (stack[-1].parent, stack[-1].name, stack[-1]) if len(stack) > 1 else (None, name, self.root)

    def apply_layer(self, number, entries, label):
        nodes = [None] * len(entries)
        self.members[number] = nodes
        # whiteouts first: they hide lower layers only, never entries of their own layer
        for _position, parts, _type, _linkname in entries:
            if not parts or not parts[-1].startswith(b".wh."):
                continue
            if parts[-1] == b".wh..wh..opq":
                _, _, directory = self.walk(parts[:-1], follow_last=True)
                if directory is not None and directory.children is not None:
                    directory.children.clear()
            elif not parts[-1].startswith(b".wh..wh."):
                parent, hidden, node = self.walk(parts[:-1] + [parts[-1][4:]])
                if node is not None:
                    del parent.children[hidden]
        for position, parts, type_, linkname in entries:
            if parts and parts[-1].startswith(b".wh."):
                continue
            if not parts:
                continue  # the root's own entry: its attributes are kept apart (root_member)
            nodes[position] = self.add(member_key(number, position), parts, type_, linkname, label)

    def add(self, key, parts, type_, linkname, label):
        parent, name, node = self.walk(parts, create=True)
        if parent is None:
            raise ConversionError(f"{label}: {b'/'.join(parts).decode(errors='replace')} is inside something that is not a directory")
        if type_ == DIRECTORY:
            if node is not None and node.children is not None:
                node.key = key  # a directory over a directory: new attributes, same content
                return node
            node = Node(parent, name, key, children={})
        elif type_ == HARDLINK:
            _, _, target = self.walk(path_parts(linkname))
            if target is None or target.children is not None or target.key is None:
                path = b"/".join(parts).decode(errors="replace")
                raise ConversionError(
                    f"{label}: hard link {path} points to {linkname.decode(errors='replace')}, which is not a file of the image"
                )
            source = target.source if target.source is not None else target.key
            self.link_sources.add(source)
            node = Node(parent, name, key, source=source)
        elif type_ == SYMLINK:
            node = Node(parent, name, key, target=linkname)
        else:
            node = Node(parent, name, key)
        parent.children[name] = node
        return node

    def path(self, node):
        """The node's path, or None if it is no longer part of the tree."""
        parts = []
        while node.parent is not None:
            if node.parent.children.get(node.name) is not node:
                return None
            parts.append(node.name)
            node = node.parent
        return b"/".join(reversed(parts)) if node is self.root else None

    def merge_additions(self, number, additions):
        """Apptainer's additions, with its rules: folders are made where missing (through
        symbolic links), links are added where nothing is, files are overwritten."""
        nodes = [None] * len(additions)
        self.members[number] = nodes
        for position, member in enumerate(additions):
            parts = path_parts(member.name)
            key = member_key(number, position)
            if member.type == DIRECTORY:
                parent, name, node = self.walk(parts, follow_last=True)
                if node is None and parent is not None:
                    nodes[position] = parent.children[name] = Node(parent, name, key, children={})
            elif member.type == SYMLINK:
                _, _, followed = self.walk(parts, follow_last=True)
                parent, name, node = self.walk(parts)
                if followed is None and node is None and parent is not None:
                    nodes[position] = parent.children[name] = Node(parent, name, key, target=member.linkname)
            else:
                parent, name, node = self.walk(parts, follow_last=True)
                if parent is not None and (node is None or node.children is None):
                    nodes[position] = parent.children[name] = Node(parent, name, key)


# ------------------------------------------------------------------------------------ progress


class Progress:
    """Lines with a percentage of the layers' bytes read, at most every `interval` seconds."""

    def __init__(self, report, total, interval=3.0):
        self.report = report
        self.total = max(total, 1)
        self.interval = interval
        self.started = time.monotonic()
        self.last = self.started
        self.phase = ""
        self.base = 0  # bytes of the layers before the current one

    def say(self, text):
        if self.report is not None:
            self.report(text)

    def begin(self, phase):
        self.phase = phase
        self.base = 0
        self.percentage(0)

    def next_layer(self, done):
        self.base = done

    def advance(self, position):
        now = time.monotonic()
        if self.report is not None and now - self.last >= self.interval:
            self.last = now
            self.percentage(min(self.base + position, self.total))

    def percentage(self, done):
        elapsed = time.monotonic() - self.started
        self.say(f"{self.phase}: {100 * done // self.total}% ({done / 1e6:.0f} of {self.total / 1e6:.0f} MB of layers), {elapsed:.0f} s")


# ------------------------------------------------------------------------------------ SIF files

SIF_HEADER = struct.Struct("<32s10s3s3s16s8q")
SIF_DESCRIPTOR = struct.Struct("<i?IIIqqqqqqq128s384s")
SIF_PARTITION = struct.Struct("<ii3s")
SIF_PARTITION_TYPE, SIF_GENERIC_JSON = 0x4004, 0x4006
SIF_SQUASHFS, SIF_PRIMARY_SYSTEM = 1, 2
SIF_ALIGNMENT = 4096
SIF_ARCHES = {  # Go architecture -> SIF code
    **{"386": b"01\0", "amd64": b"02\0", "arm": b"03\0", "arm64": b"04\0", "ppc64": b"05\0", "ppc64le": b"06\0"},
    **{"mips": b"07\0", "mipsle": b"08\0", "mips64": b"09\0", "mips64le": b"10\0", "s390x": b"11\0", "riscv64": b"12\0"},
}


class SifObject:
    def __init__(self, data_type, data, group, link, name, extra):
        self.data_type = data_type
        self.data = data
        self.group = group
        self.link = link
        self.name = name
        self.extra = extra


class SifLayout:
    """The SIF apptainer writes (github.com/apptainer/sif: header, descriptor table, data
    objects one after the other, the partition 4096-aligned), with the header and data objects
    of a SIF the installed apptainer built, and our squashfs as the primary partition."""

    def __init__(self, probe_sif):
        data = Path(probe_sif).read_bytes()
        fields = SIF_HEADER.unpack_from(data, 0)
        self.launch, self.magic, self.version = fields[0], fields[1], fields[2]
        self.total, self.descriptors_offset, self.data_offset = fields[8], fields[9], fields[11]
        if self.magic != b"SIF_MAGIC\0":
            raise ConversionError(f"{probe_sif} made by apptainer is not a SIF file")
        self.objects = []
        self.partition = None
        for number in range(self.total):
            d = SIF_DESCRIPTOR.unpack_from(data, self.descriptors_offset + number * SIF_DESCRIPTOR.size)
            data_type, used, _, group, link, offset, size = d[:7]
            if not used:
                continue
            obj = SifObject(data_type, data[offset : offset + size], group, link, d[12], d[13])
            if data_type == SIF_PARTITION_TYPE:
                self.partition = obj
            else:
                self.objects.append(obj)
        if self.partition is None:
            raise ConversionError(f"{probe_sif} made by apptainer has no partition")

    def partition_offset(self):
        end = self.data_offset + sum(len(obj.data) for obj in self.objects)
        return -(-end // SIF_ALIGNMENT) * SIF_ALIGNMENT

    def write_front(self, fd, partition_size, arch):
        """Header, descriptors and small objects in front of the partition mksquashfs wrote."""
        now = int(time.time())
        arch_code = SIF_ARCHES.get(arch, SIF_PARTITION.unpack_from(self.partition.extra)[2])
        extra = SIF_PARTITION.pack(SIF_SQUASHFS, SIF_PRIMARY_SYSTEM, arch_code)
        partition = SifObject(SIF_PARTITION_TYPE, None, self.partition.group, self.partition.link, self.partition.name, extra)
        descriptors = bytearray(self.total * SIF_DESCRIPTOR.size)
        offset = self.data_offset
        for number, obj in enumerate(self.objects + [partition]):
            start = self.partition_offset() if obj is partition else offset
            size = partition_size if obj is partition else len(obj.data)
            fields = (obj.data_type, True, number + 1, obj.group, obj.link, start, size, start - offset + size, now, now, 0, 0)
            SIF_DESCRIPTOR.pack_into(descriptors, number * SIF_DESCRIPTOR.size, *fields, obj.name, obj.extra)
            if obj is not partition:
                os.pwrite(fd, obj.data, start)
            offset = start + size
        used = len(self.objects) + 1
        counts = (self.total - used, self.total, self.descriptors_offset, len(descriptors), self.data_offset, offset - self.data_offset)
        header = SIF_HEADER.pack(self.launch, self.magic, self.version, arch_code, uuid.uuid4().bytes, now, now, *counts)
        os.pwrite(fd, descriptors, self.descriptors_offset)
        os.pwrite(fd, header, 0)


# ------------------------------------------------------------------------------------ apptainer's additions


def go_json_string(text):
    """text as Go's encoding/json writes it inside quotes (it escapes <, > and & too)."""
    encoded = json.dumps(text, ensure_ascii=False)[1:-1]
    for plain, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        encoded = encoded.replace(plain, escaped)
    return encoded


class ApptainerProbe:
    """Apptainer's additions for this image, made by the installed apptainer: it builds a SIF of
    an image with the same configuration and one empty layer, so everything in that SIF but the
    root directory is what apptainer adds (from its own embedded scripts and the config)."""

    def __init__(self, runtime, config, reference, folder):
        self.runtime = runtime
        self.reference = reference  # the tarball as the caller named it: apptainer records it
        self.folder = Path(os.path.abspath(folder))
        self.archive = self.folder / "probe-image.tar"
        self.sif = self.folder / "probe.sif"
        self.write_archive(config)
        command = [runtime, "build", "--disable-cache", str(self.sif), f"docker-archive://{self.archive}"]
        try:
            self.process = subprocess.Popen(
                command, cwd=self.folder, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
            )
        except OSError as error:
            raise ConversionError(f"cannot run {runtime}: {error.strerror}") from None

    def write_archive(self, config):
        layer = bytes(2 * BLOCK)  # an empty tar
        probe = {key: config[key] for key in ("architecture", "os", "variant", "os.version", "config") if key in config}
        probe["rootfs"] = {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(layer).hexdigest()]}
        config_data = json.dumps(probe).encode()
        config_name = hashlib.sha256(config_data).hexdigest() + ".json"
        manifest = json.dumps([{"Config": config_name, "RepoTags": None, "Layers": ["layer/layer.tar"]}]).encode()
        with open(self.archive, "wb") as out:
            for name, data in ((config_name, config_data), ("layer/layer.tar", layer), ("manifest.json", manifest)):
                out.write(header_block(name.encode(), REGULAR, len(data)) + padded(data))
            out.write(ZERO_BLOCK * 2)

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait()

    def result(self):
        """(SifLayout, additions as [(Member, data)]) once apptainer is done."""
        output = self.process.communicate()[0].decode(errors="replace")
        if self.process.returncode != 0 or not self.sif.exists():
            lines = [line for line in output.splitlines() if line.strip()]
            raise ConversionError(
                f"{self.runtime} build of the metadata probe failed: {lines[-1] if lines else f'exit status {self.process.returncode}'}"
            )
        layout = SifLayout(self.sif)
        for obj in layout.objects:
            obj.data = self.with_reference(obj.data, json_text=obj.data_type == SIF_GENERIC_JSON)
        return layout, self.additions(layout)

    def with_reference(self, data, json_text):
        real = go_json_string(self.reference) if json_text else self.reference
        return data.replace(str(self.archive).encode(), real.encode(errors="surrogateescape"))

    def additions(self, layout):
        squashfs = self.folder / "probe.sqfs"
        squashfs.write_bytes(layout.partition.data)
        tree = self.folder / "probe-root"
        result = subprocess.run(["unsquashfs", "-no-xattrs", "-d", str(tree), str(squashfs)], capture_output=True, text=True)
        if result.returncode != 0:
            lines = (result.stderr or result.stdout).strip().splitlines()
            raise ConversionError(f"unsquashfs of the metadata probe failed: {lines[-1] if lines else result.returncode}")
        additions = []
        for folder, dirs, files in os.walk(tree):
            dirs.sort()
            for name in sorted(dirs) + sorted(files):
                path = Path(folder) / name
                info = path.lstat()
                relative = str(path.relative_to(tree)).encode(errors="surrogateescape")
                member = Member(relative, REGULAR, stat.S_IMODE(info.st_mode), mtime=int(info.st_mtime))
                data = b""
                if stat.S_ISDIR(info.st_mode):
                    member.type = DIRECTORY
                elif stat.S_ISLNK(info.st_mode):
                    member.type, member.linkname = SYMLINK, os.readlink(path).encode(errors="surrogateescape")
                else:
                    # the deffile (/.singularity.d/Singularity) and labels.json name the tarball
                    data = self.with_reference(path.read_bytes(), json_text=member.name.endswith(b".json"))
                    member.size = len(data)
                additions.append((member, data))
        return additions


# ------------------------------------------------------------------------------------ mksquashfs


def mksquashfs_version():
    try:
        result = subprocess.run(["mksquashfs", "-version"], capture_output=True, text=True)
    except OSError:
        raise ConversionError("mksquashfs not found: install squashfs-tools (4.5 or later)") from None
    found = re.search(r"version (\d+)\.(\d+)", result.stdout + result.stderr)
    if not found:
        raise ConversionError("mksquashfs -version did not say its version")
    version = (int(found.group(1)), int(found.group(2)))
    if version < MKSQUASHFS_MINIMUM:
        raise ConversionError(f"mksquashfs {version[0]}.{version[1]} cannot read a tar stream; squashfs-tools 4.5 or later is needed")
    return version


def compression_options(compression):
    """mksquashfs options for a compression name, as the project asks apptainer for it."""
    if compression is None or compression == "gzip":
        return ["-comp", "gzip"]
    if compression == "zstd":
        return ["-comp", "zstd", "-Xcompression-level", "3"]
    return ["-comp", compression]


def user_namespaces():
    try:
        return subprocess.run(["unshare", "--map-root-user", "true"], capture_output=True).returncode == 0
    except OSError:
        return False


class Squasher:
    """mksquashfs reading a tar stream on its stdin, writing the squashfs into the SIF at an offset."""

    def __init__(self, output, offset, compression, root, version):
        mode, uid, gid = root
        command = ["mksquashfs", "-", str(output), "-tar", "-noappend", "-no-progress", "-offset", str(offset)]
        command += ["-root-mode", f"{mode:o}", *compression_options(compression)]
        # mksquashfs sizes its queues from -mem (default: a quarter of the machine's memory) and
        # fills them when the stream outruns compression (1.2 GB for a 1 GB file); 256M is as fast
        command += ["-mem", MKSQUASHFS_MEMORY]
        if version >= (4, 6):
            command += ["-root-uid", str(uid), "-root-gid", str(gid)]
        elif (uid, gid) == (0, 0) and os.getuid() != 0 and user_namespaces():
            # 4.5 gives the root directory the caller's uid and gid (it ignores -root-uid):
            # in a user namespace the caller is root
            command = ["unshare", "--map-root-user", *command]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            import fcntl

            fcntl.fcntl(self.process.stdin.fileno(), fcntl.F_SETPIPE_SZ, CHUNK)
        except (OSError, AttributeError):
            pass  # a smaller pipe only costs a little speed
        self.errors = []
        self.reader = threading.Thread(target=self.collect, daemon=True)
        self.reader.start()

    def collect(self):
        for line in self.process.stderr:
            line = line.decode(errors="replace").strip()
            if line:
                self.errors = (self.errors + [line])[-20:]

    def failure(self):
        """mksquashfs's own words, in one line: the cause ("Write failed because No space left on
        device") before the consequence ("FATAL ERROR: Failed to write to output filesystem")."""
        lines = [line.replace("FATAL ERROR:", "").strip() for line in self.errors]
        causes = [line for line in lines if "because" in line]
        fatal = [line for line in lines if "fail" in line.lower() or "error" in line.lower()]
        words = (causes[-1:] + fatal[-1:]) or lines[-1:] or [f"exit status {self.process.returncode}"]
        return ConversionError(f"mksquashfs failed: {'; '.join(dict.fromkeys(words))}")

    def finish(self):
        self.process.stdin.close()
        self.process.wait()
        self.reader.join()
        if self.process.returncode != 0:
            raise self.failure()

    def stop(self):
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.reader.join()


# ------------------------------------------------------------------------------------ the conversion


class Conversion:
    def __init__(self, tarball, sif, compression, runtime, progress, tmpdir):
        self.tarball = tarball
        self.sif = Path(sif)
        self.compression = compression
        self.runtime = runtime
        self.report = progress
        self.tmpdir = tmpdir

    def run(self):
        started = time.monotonic()
        version = mksquashfs_version()
        if not self.sif.parent.is_dir():
            raise ConversionError(f"cannot write {self.sif}: {self.sif.parent} is not a folder")
        image = SavedImage(self.tarball)
        folder = tempfile.mkdtemp(prefix="archive-to-sif-", dir=self.tmpdir)
        partial = self.sif.parent / f".{self.sif.name}.{uuid.uuid4().hex[:8]}.partial"
        probe = squasher = None
        try:
            total = sum(layer.size for layer in image.layers)
            progress = Progress(self.report, total)
            progress.say(f"reading {len(image.layers)} layers ({total / 1e6:.0f} MB) of {self.tarball}")
            probe = ApptainerProbe(self.runtime, image.config, str(self.tarball), folder)
            tree = self.flatten(image, progress)
            layout, additions = probe.result()
            tree.merge_additions(len(image.layers) + 1, [member for member, _ in additions])
            fd = os.open(partial, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o755)
            os.close(fd)
            squasher = Squasher(partial, layout.partition_offset(), self.compression, self.root_attributes(tree), version)
            self.stream(image, tree, additions, squasher, progress)
            squasher.finish()
            progress.say(f"squashfs done, {time.monotonic() - started:.0f} s; writing the SIF header")
            with open(partial, "r+b") as out:
                size = os.fstat(out.fileno()).st_size - layout.partition_offset()
                layout.write_front(out.fileno(), size, image.config.get("architecture", ""))
                os.fsync(out.fileno())
            os.replace(partial, self.sif)
            progress.say(f"wrote {self.sif} ({self.sif.stat().st_size / 1e6:.0f} MB) in {time.monotonic() - started:.0f} s")
        except BrokenPipeError:
            squasher.stop()
            raise squasher.failure() from None
        except OSError as error:
            raise ConversionError(f"{error.filename or self.sif}: {error.strerror or error}") from None
        finally:
            if squasher is not None:
                squasher.stop()
            if probe is not None:
                probe.stop()
            partial.unlink(missing_ok=True)
            shutil.rmtree(folder, ignore_errors=True)
            image.close()

    def flatten(self, image, progress):
        tree = RootFileSystem()
        progress.begin("indexing")
        done = 0
        for layer in image.layers:
            progress.next_layer(done)
            reader = layer.reader(progress=progress, names_only=True)
            entries = []
            while True:
                member = reader.next()
                if member is None:
                    break
                layer.offsets.append(member.offset)
                parts = path_parts(member.name)
                entries.append((len(entries), parts, member.type, member.linkname if member.type in (HARDLINK, SYMLINK) else None))
                if not parts and member.type == DIRECTORY:
                    tree.root_member = (layer, member.offset)
                reader.skip(member)
            tree.apply_layer(layer.number, entries, layer.label)
            done += layer.size
        return tree

    @staticmethod
    def root_attributes(tree):
        if tree.root_member is None:
            return 0o755, 0, 0
        _, member = tree.root_member[0].member_at(tree.root_member[1])
        return member.mode, member.uid, member.gid

    def stream(self, image, tree, additions, squasher, progress):
        out = TarWriter(squasher.process.stdin.fileno())
        emitted = {}  # content source -> the path that carries it (for hard links)
        progress.begin("streaming")
        done = 0
        for layer in image.layers:
            progress.next_layer(done)
            reader = layer.reader(verify=True, progress=progress)
            nodes = tree.members[layer.number]
            base = member_key(layer.number, 0)
            for position in range(len(nodes)):
                member = reader.next()
                if member is None:
                    raise reader.corrupt("it ends earlier than when it was indexed")
                node = nodes[position]
                path = tree.path(node) if node is not None and node.key == base | position else None
                if path is None:
                    reader.skip(member)
                elif node.source is None:
                    out.member(member, path, reader=reader)
                    if base | position in tree.link_sources:
                        emitted[base | position] = path
                else:
                    reader.skip(member)
                    self.hard_link(image, out, node.source, path, emitted, member)
            reader.stream.verify(layer.label)
            done += layer.size
        number = len(image.layers) + 1
        for position, (member, data) in enumerate(additions):
            node = tree.members[number][position]
            path = tree.path(node) if node is not None else None
            if path is not None:
                out.member(member, path, data=data if member.type == REGULAR else None)
        now = int(time.time())
        for node in tree.implicit:
            path = tree.path(node)
            if path is not None and node.key is None:
                out.member(Member(path, DIRECTORY, 0o755, mtime=now), path)
        out.close()

    @staticmethod
    def hard_link(image, out, source, path, emitted, member):
        if source in emitted:
            out.member(member, path, type_=HARDLINK, linkname=emitted[source])
            return
        # the first name of this content is gone from the image: this name carries it now
        layer = image.layers[(source >> 32) - 1]
        reader, original = layer.member_at(layer.offsets[source & 0xFFFFFFFF])
        out.member(original, path, reader=reader)
        emitted[source] = path


def convert(tarball, sif, compression=None, runtime="apptainer", progress=None, tmpdir=None):
    """Build sif from tarball (`docker save` output) with mksquashfs, as `apptainer build sif
    docker-archive://tarball` would, but without unpacking the layers.

    compression: None (mksquashfs's gzip, apptainer's default), "zstd" (level 3) or another
    mksquashfs compressor name. runtime: the apptainer (or singularity) command whose metadata
    the SIF gets. progress: called with one line of text now and then. tmpdir: where the small
    metadata probe is made (default: TMPDIR). Raises ConversionError; the SIF appears only when
    complete, and nothing is left behind on failure."""
    Conversion(tarball, sif, compression, runtime, progress, tmpdir).run()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compression", default=None, help="mksquashfs compressor (default gzip, as apptainer); zstd means level 3")
    parser.add_argument("--runtime", default="apptainer", help="apptainer or singularity command (default apptainer)")
    parser.add_argument("--tmpdir", default=None, help="folder for the small metadata probe (default TMPDIR)")
    parser.add_argument("tarball", help="the image as `docker save` wrote it")
    parser.add_argument("sif", help="the SIF to write")
    args = parser.parse_args(argv)
    # a terminated conversion cleans up like an interrupted one
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    def report(line):
        print(f"archive_to_sif: {line}", file=sys.stderr, flush=True)

    try:
        convert(args.tarball, args.sif, args.compression, args.runtime, report, args.tmpdir)
    except ConversionError as error:
        print(f"archive_to_sif: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("archive_to_sif: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
