"""Kernel-enforced confinement of file writes (Linux Landlock), for the analyst's SQL process.

`clearflow sql` already refuses every statement that is not a read and sets DuckDB's own access settings; this is
the layer under both: once `confine_writes(dir)` has run, the kernel refuses this process (and the threads and
children it starts afterwards) any file creation, write, truncation, removal or rename outside `dir`, whatever
DuckDB is asked to do. Reads are not restricted here (DuckDB's allowed_directories confine them).

Landlock needs Linux 5.13+ with Landlock enabled; elsewhere `confine_writes` returns False and the other two
layers remain. The raw system calls are used through ctypes (three calls and two structs): no library wraps them
in a maintained, stable release.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger(__name__)

# system call numbers are the same on every Linux architecture (added after the unified table)
_CREATE_RULESET, _ADD_RULE, _RESTRICT_SELF = 444, 445, 446
_CREATE_RULESET_VERSION = 1
_RULE_PATH_BENEATH = 1
_PR_SET_NO_NEW_PRIVS = 38

_WRITE_FILE = 1 << 1
_REMOVE_DIR, _REMOVE_FILE = 1 << 4, 1 << 5
_MAKE_ANY = sum(1 << bit for bit in range(6, 13))  # char, dir, reg, sock, fifo, block, symlink
_REFER = 1 << 13  # ABI 2: link or rename across directories
_TRUNCATE = 1 << 14  # ABI 3


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def _write_rights(abi: int) -> int:
    """Every right that changes the file system, as far as this kernel's Landlock knows them."""
    rights = _WRITE_FILE | _REMOVE_DIR | _REMOVE_FILE | _MAKE_ANY
    if abi >= 2:
        rights |= _REFER
    if abi >= 3:
        rights |= _TRUNCATE
    return rights


def landlock_abi() -> int:
    """The kernel's Landlock ABI version, or 0 where there is none (another OS, an old or unconfigured kernel)."""
    if not sys.platform.startswith("linux"):
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    version = libc.syscall(ctypes.c_long(_CREATE_RULESET), None, ctypes.c_size_t(0),
                           ctypes.c_uint32(_CREATE_RULESET_VERSION))
    return max(int(version), 0)


def _allow(libc: ctypes.CDLL, ruleset: int, path: Path, rights: int) -> None:
    """Allow `rights` beneath `path` (a directory) or on it (a file)."""
    fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    try:
        attr = _PathBeneathAttr(rights, fd)
        if libc.syscall(ctypes.c_long(_ADD_RULE), ctypes.c_int(ruleset), ctypes.c_int(_RULE_PATH_BENEATH),
                        ctypes.byref(attr), ctypes.c_uint32(0)) != 0:
            raise OSError(ctypes.get_errno(), f"landlock_add_rule({path})")
    finally:
        os.close(fd)


def confine_writes(writable: Path) -> bool:
    """From now on, let this process change files only beneath `writable` (and write to /dev/null). Returns
    whether the kernel enforces it; False (said at debug level) where Landlock is unavailable. Irreversible:
    call it in a process that has nothing else left to write, and before it starts the threads it will use."""
    abi = landlock_abi()
    if abi < 1:
        log.debug("sandbox: Landlock unavailable here; relying on the statement check and DuckDB's settings")
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    rights = _write_rights(abi)
    attr = _RulesetAttr(rights)
    ruleset = libc.syscall(ctypes.c_long(_CREATE_RULESET), ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)),
                           ctypes.c_uint32(0))
    if ruleset < 0:
        log.debug("sandbox: landlock_create_ruleset failed (errno %d)", ctypes.get_errno())
        return False
    try:
        _allow(libc, ruleset, Path(writable), rights)
        _allow(libc, ruleset, Path(os.devnull), _WRITE_FILE | (_TRUNCATE if abi >= 3 else 0))
        if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
        if libc.syscall(ctypes.c_long(_RESTRICT_SELF), ctypes.c_int(ruleset), ctypes.c_uint32(0)) != 0:
            raise OSError(ctypes.get_errno(), "landlock_restrict_self")
    finally:
        os.close(ruleset)
    log.debug("sandbox: writes confined to %s (Landlock ABI %d)", writable, abi)
    return True
