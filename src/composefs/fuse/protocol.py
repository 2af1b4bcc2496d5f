"""The FUSE kernel protocol (``<linux/fuse.h>``), the parts a read-only server speaks.

Requests are read from ``/dev/fuse`` as a fixed header and an opcode-specific body;
replies are written as one header and a body.  Every layout is one ``struct.Struct`` here,
in native byte order as the kernel uses.
"""

from __future__ import annotations

import struct

KERNEL_VERSION = 7
# 7.40 brought passthrough; older kernels get a connection without it.
KERNEL_MINOR = 40
PASSTHROUGH_MINOR = 40
ROOT_ID = 1

# opcodes
LOOKUP = 1
FORGET = 2
GETATTR = 3
SETATTR = 4
READLINK = 5
SYMLINK = 6
MKNOD = 8
MKDIR = 9
UNLINK = 10
RMDIR = 11
RENAME = 12
LINK = 13
OPEN = 14
READ = 15
WRITE = 16
STATFS = 17
RELEASE = 18
FSYNC = 20
SETXATTR = 21
GETXATTR = 22
LISTXATTR = 23
REMOVEXATTR = 24
FLUSH = 25
INIT = 26
OPENDIR = 27
READDIR = 28
RELEASEDIR = 29
FSYNCDIR = 30
ACCESS = 34
CREATE = 35
INTERRUPT = 36
DESTROY = 38
BATCH_FORGET = 42
FALLOCATE = 43
READDIRPLUS = 44
RENAME2 = 45
COPY_FILE_RANGE = 47
TMPFILE = 51

# Requests that change something: a read-only filesystem answers EROFS.
WRITING = frozenset(
    {SETATTR, SYMLINK, MKNOD, MKDIR, UNLINK, RMDIR, RENAME, LINK, WRITE, SETXATTR,
     REMOVEXATTR, CREATE, FALLOCATE, RENAME2, COPY_FILE_RANGE, TMPFILE}
)  # fmt: skip

# FUSE_INIT flags (flags2 holds bits 32 and up, shifted down)
ASYNC_READ = 1 << 0
BIG_WRITES = 1 << 5
DO_READDIRPLUS = 1 << 13
READDIRPLUS_AUTO = 1 << 14
PARALLEL_DIROPS = 1 << 18
POSIX_ACL = 1 << 20
MAX_PAGES = 1 << 22
CACHE_SYMLINKS = 1 << 23
NO_OPENDIR_SUPPORT = 1 << 24
INIT_EXT = 1 << 30
PASSTHROUGH = 1 << 37

# fuse_open_out.open_flags
FOPEN_KEEP_CACHE = 1 << 1
FOPEN_CACHE_DIR = 1 << 3
FOPEN_PASSTHROUGH = 1 << 7

# /dev/fuse ioctls: register a file the kernel reads directly for passthrough opens
DEV_IOC_BACKING_OPEN = 0x4010E501  # _IOW(229, 1, struct fuse_backing_map)
DEV_IOC_BACKING_CLOSE = 0x4004E502  # _IOW(229, 2, uint32_t)
BACKING_MAP = struct.Struct("=iIQ")

IN_HEADER = struct.Struct("=IIQQIIIHH")  # len opcode unique nodeid uid gid pid extlen pad
OUT_HEADER = struct.Struct("=IiQ")  # len error unique
INIT_IN = struct.Struct("=IIII")  # major minor max_readahead flags (then flags2 with INIT_EXT)
INIT_OUT = struct.Struct("=IIIIHHIIHHII24x")
ATTR = struct.Struct("=QQQQQQIIIIIIIIII")  # ino size blocks a/m/ctime nsec mode nlink ...
ENTRY_OUT_HEAD = struct.Struct("=QQQQII")  # nodeid generation entry/attr valid (+nsec)
ATTR_OUT_HEAD = struct.Struct("=QII")  # attr_valid attr_valid_nsec dummy
OPEN_IN = struct.Struct("=II")
OPEN_OUT = struct.Struct("=QIi")  # fh open_flags backing_id
READ_IN = struct.Struct("=QQIIQII")  # fh offset size read_flags lock_owner flags pad
RELEASE_IN = struct.Struct("=QIIQ")
GETXATTR_IN = struct.Struct("=II")
GETXATTR_OUT = struct.Struct("=II")
FORGET_ONE = struct.Struct("=QQ")
BATCH_FORGET_IN = struct.Struct("=II")
DIRENT_HEAD = struct.Struct("=QQII")  # ino off namelen type
KSTATFS = struct.Struct("=QQQQQIIII24x")

assert IN_HEADER.size == 40 and OUT_HEADER.size == 16 and INIT_OUT.size == 64
assert ATTR.size == 88 and ENTRY_OUT_HEAD.size == 40 and ATTR_OUT_HEAD.size == 16
assert READ_IN.size == 40 and KSTATFS.size == 80 and BACKING_MAP.size == 16
