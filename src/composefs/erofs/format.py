"""On-disk structures of composefs images: the composefs header and the EROFS subset it uses.

Field names follow the kernel's ``fs/erofs/erofs_fs.h`` and libcomposefs' ``lcfs-erofs.h``;
every layout is declared once here as a :class:`struct.Struct` with its size asserted.
The rules for *what* goes into the fields are in the writer (``docs/format.md`` §10).
"""

from __future__ import annotations

import struct

# -- composefs header (offset 0) ------------------------------------------------------------

COMPOSEFS_MAGIC = 0xD078629A
COMPOSEFS_HEADER_VERSION = 1  # the container version; readers refuse any other
COMPOSEFS_FLAGS_HAS_ACL = 1 << 0
COMPOSEFS_VERSION_MAX = 1  # highest composefs_version (writer rules) we produce
# magic, version, flags, composefs_version, unused[4]
COMPOSEFS_HEADER = struct.Struct("<IIII16x")
assert COMPOSEFS_HEADER.size == 32

# -- EROFS geometry ---------------------------------------------------------------------------

BLOCK_SIZE = 4096
BLOCK_BITS = 12
SLOT_SIZE = 32  # inodes sit on 32-byte slots: nid = offset / 32
EROFS_SUPER_OFFSET = 1024
EROFS_SUPER_MAGIC_V1 = 0xE0F5E1E2
EROFS_FEATURE_COMPAT_SB_CHKSUM = 0x1
EROFS_FEATURE_COMPAT_MTIME = 0x2
EROFS_FEATURE_COMPAT_XATTR_FILTER = 0x4
EROFS_NULL_ADDR = 0xFFFFFFFF

# struct erofs_super_block
SUPERBLOCK = struct.Struct(
    "<"
    "I"  # magic
    "I"  # checksum
    "I"  # feature_compat
    "B"  # blkszbits
    "B"  # sb_extslots
    "H"  # root_nid
    "Q"  # inos
    "q"  # build_time (seconds, signed here: composefs stores the minimum mtime)
    "I"  # build_time_nsec
    "I"  # blocks
    "I"  # meta_blkaddr
    "I"  # xattr_blkaddr
    "16s"  # uuid
    "16s"  # volume_name
    "I"  # feature_incompat
    "H"  # available_compr_algs / lz4_max_distance
    "H"  # extra_devices
    "H"  # devt_slotoff
    "B"  # dirblkbits
    "B"  # xattr_prefix_count
    "I"  # xattr_prefix_start
    "Q"  # packed_nid
    "B"  # xattr_filter_reserved
    "23x"  # reserved2
)
assert SUPERBLOCK.size == 128
SUPERBLOCK_END = EROFS_SUPER_OFFSET + SUPERBLOCK.size  # where the inode area starts

# -- inodes -----------------------------------------------------------------------------------

# i_format: bit 0 = extended, bits 1-3 = data layout
EROFS_INODE_LAYOUT_COMPACT = 0
EROFS_INODE_LAYOUT_EXTENDED = 1
EROFS_INODE_FLAT_PLAIN = 0
EROFS_INODE_FLAT_COMPRESSION_LEGACY = 1
EROFS_INODE_FLAT_INLINE = 2
EROFS_INODE_FLAT_COMPRESSION = 3
EROFS_INODE_CHUNK_BASED = 4
EROFS_I_VERSION_MASK = 0x01
EROFS_I_DATALAYOUT_BIT = 1
EROFS_I_DATALAYOUT_MASK = 0x07
EROFS_I_ALL = 0x0F  # bits of i_format with a meaning

# chunk format stored in i_u for CHUNK_BASED inodes
EROFS_CHUNK_FORMAT_BLKBITS_MASK = 0x001F
EROFS_CHUNK_FORMAT_INDEXES = 0x0020

# struct erofs_inode_compact: i_format, i_xattr_icount, i_mode, i_nlink, i_size,
# i_reserved, i_u, i_ino, i_uid, i_gid, i_reserved2
INODE_COMPACT = struct.Struct("<HHHHIIIIHHI")
assert INODE_COMPACT.size == 32
# struct erofs_inode_extended: i_format, i_xattr_icount, i_mode, i_reserved, i_size, i_u,
# i_ino, i_uid, i_gid, i_mtime, i_mtime_nsec, i_nlink, i_reserved2[16]
INODE_EXTENDED = struct.Struct("<HHHHQIIIIqII16x")
assert INODE_EXTENDED.size == 64

# -- xattrs -----------------------------------------------------------------------------------

# struct erofs_xattr_ibody_header: h_name_filter, h_shared_count, h_reserved2[7]
XATTR_IBODY_HEADER = struct.Struct("<IB7x")
assert XATTR_IBODY_HEADER.size == 12
# struct erofs_xattr_entry: e_name_len, e_name_index, e_value_size (then name, value)
XATTR_ENTRY = struct.Struct("<BBH")
assert XATTR_ENTRY.size == 4
XATTR_SHARED_REF = struct.Struct("<I")
EROFS_XATTR_FILTER_SEED = 0x25BBE08F
EROFS_XATTR_FILTER_BITS = 32
MAX_SHARED_XATTRS_PER_INODE = 128  # the reference's limit, not the format's

EROFS_XATTR_INDEX_USER = 1
EROFS_XATTR_INDEX_POSIX_ACL_ACCESS = 2
EROFS_XATTR_INDEX_POSIX_ACL_DEFAULT = 3
EROFS_XATTR_INDEX_TRUSTED = 4
EROFS_XATTR_INDEX_LUSTRE = 5
EROFS_XATTR_INDEX_SECURITY = 6

# The prefixes a writer tries, in this order (lustre is decoded but never chosen).
XATTR_WRITE_PREFIXES: tuple[tuple[bytes, int], ...] = (
    (b"user.", EROFS_XATTR_INDEX_USER),
    (b"system.posix_acl_access", EROFS_XATTR_INDEX_POSIX_ACL_ACCESS),
    (b"system.posix_acl_default", EROFS_XATTR_INDEX_POSIX_ACL_DEFAULT),
    (b"trusted.", EROFS_XATTR_INDEX_TRUSTED),
    (b"security.", EROFS_XATTR_INDEX_SECURITY),
)
XATTR_INDEX_PREFIXES: dict[int, bytes] = {
    0: b"",
    EROFS_XATTR_INDEX_USER: b"user.",
    EROFS_XATTR_INDEX_POSIX_ACL_ACCESS: b"system.posix_acl_access",
    EROFS_XATTR_INDEX_POSIX_ACL_DEFAULT: b"system.posix_acl_default",
    EROFS_XATTR_INDEX_TRUSTED: b"trusted.",
    EROFS_XATTR_INDEX_LUSTRE: b"lustre.",
    EROFS_XATTR_INDEX_SECURITY: b"security.",
}

# -- directories ------------------------------------------------------------------------------

# struct erofs_dirent: nid, nameoff, file_type, reserved
DIRENT = struct.Struct("<QHBB")
assert DIRENT.size == 12
EROFS_FT_UNKNOWN = 0
EROFS_FT_REG_FILE = 1
EROFS_FT_DIR = 2
EROFS_FT_CHRDEV = 3
EROFS_FT_BLKDEV = 4
EROFS_FT_FIFO = 5
EROFS_FT_SOCK = 6
EROFS_FT_SYMLINK = 7

# -- overlayfs xattrs that composefs images carry ---------------------------------------------

OVERLAY_PREFIX = b"trusted.overlay."
OVERLAY_ESCAPED_PREFIX = b"trusted.overlay.overlay."
OVERLAY_METACOPY = b"trusted.overlay.metacopy"
OVERLAY_REDIRECT = b"trusted.overlay.redirect"
OVERLAY_OPAQUE = b"trusted.overlay.opaque"
OVERLAY_ESCAPED_WHITEOUT = b"trusted.overlay.overlay.whiteout"
OVERLAY_ESCAPED_WHITEOUTS = b"trusted.overlay.overlay.whiteouts"
OVERLAY_ESCAPED_OPAQUE = b"trusted.overlay.overlay.opaque"
USER_OVERLAY_WHITEOUT = b"user.overlay.whiteout"
USER_OVERLAY_WHITEOUTS = b"user.overlay.whiteouts"
USER_OVERLAY_OPAQUE = b"user.overlay.opaque"
# struct ovl_metacopy: version, len, flags, digest_algo, digest[32]
METACOPY_HEADER = struct.Struct("<BBBB")
METACOPY_SIZE = 36
FS_VERITY_HASH_ALG_SHA256 = 1


def round_up(value: int, align: int) -> int:
    return -(-value // align) * align
