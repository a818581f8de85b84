"""Device paths in tables, resolved without ever waiting on our own FUSE mount.

The daemon serves its mount from the Trio thread.  A ``stat``, ``realpath`` or ``open`` of
a path inside the mount from that thread waits for a FUSE reply only that same thread can
give: the daemon hangs.  So a table's device paths are resolved here:

* component by component, following symlinks with ``os.readlink`` (a symlink into the
  mount, udev's ``/dev/disk/by-id/...`` links, a relative path from a client's cwd);
* a path that reaches the mount directory is recognised *lexically* (the mount directory
  is never ``lstat``-ed) or, for another way in (a bind mount), by the mount root's
  ``(st_dev, st_ino)``; the component after it names the dm device, and anything below a
  device file is ENODEV (ENOTDIR for the kernel's lookup, which dm reports as ENODEV);
* a loop device whose backing file is one of our files is that dm device;
* an NBD URI (``nbd://HOST:PORT/EXPORT``, ``nbd+unix:///EXPORT?socket=PATH``) is
  recognised lexically (:mod:`dmsim.nbd_client` connects to it); only its socket is
  ``stat``-ed, for its identity (one of our own listeners is the dm device itself);
* everything that needs a syscall runs in a worker thread with a timeout
  (:func:`resolve_all`), so an unknown path (a hung NFS mount) cannot stall the daemon.

The answer is a :class:`Resolved`: a dm device by name or minor, or a real file or block
device.  :meth:`dmsim.manager.Manager.get_device` turns it into a device.
"""
from __future__ import annotations

import errno
import os
import stat
import threading
from dataclasses import dataclass
from typing import Iterable, Mapping

import trio

from .device import DM_MAJOR
from .errors import DMError

LOOP_MAJOR = 7
#: the major of image files' device numbers (Linux's local/experimental range 240-254):
#: a manager gives each image file it opens one minor, kept for as long as it runs
IMAGE_MAJOR = 240
MAX_SYMLINKS = 40               # the kernel's MAXSYMLINKS
RESOLVE_TIMEOUT_SECONDS = 10.0


@dataclass(frozen=True)
class Resolved:
    """Where a table's device name leads.

    ``kind`` is ``"dm-name"`` (``name``), ``"dm-minor"`` (``minor``), ``"mapper"``
    (``/dev/mapper/NAME`` with no such node: our device ``name``), ``"file"`` (``path``,
    symlink-free, a regular file or a block device) or ``"nbd"`` (``path`` the URI as
    tables print it, ``name`` the export, ``socket_path`` with its ``socket_id`` or
    ``host`` and ``port``)."""

    kind: str
    name: str = ""
    minor: int = -1
    path: str = ""
    socket_path: str = ""
    socket_id: tuple[int, int] | None = None
    host: str = ""
    port: int = 0


@dataclass(frozen=True)
class Mount:
    """What a resolution needs to know about our mount: its directory as given (absolute,
    for the lexical test), the same with symlinks resolved, and its root's identity."""

    dir: str
    real_dir: str
    root_id: tuple[int, int] | None = None

    @classmethod
    def of(cls, mount_dir: str | None, root_id: tuple[int, int] | None = None) -> "Mount | None":
        if not mount_dir:
            return None
        d = os.path.abspath(mount_dir)
        return cls(d, _real_dir_lexically(d), root_id)


def _real_dir_lexically(path: str) -> str:
    """``realpath`` of ``path``'s parent joined with its last component: the mount
    directory itself is never ``lstat``-ed (once mounted that enters the mount)."""
    parent, base = os.path.split(path)
    try:
        return os.path.join(os.path.realpath(parent), base)
    except OSError:
        return path


def mount_root_id(mount_dir: str) -> tuple[int, int] | None:
    """The mount root's ``(st_dev, st_ino)``: call from a worker thread only."""
    try:
        st = os.stat(mount_dir)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def resolve(name: str, cwd: str, mount: Mount | None, images: Mapping[int, str] | None = None) -> Resolved:
    """Resolve one table device name (blocking: a worker thread, or a lexical answer).

    ``images`` maps the minors of :data:`IMAGE_MAJOR` to their files (the number printed
    for an image comes back in a table).  Raises DMError(ENODEV) when it leads nowhere,
    ENOTBLK for a directory or other non-device, ENXIO for a ``major:minor`` with no such device, EINVAL for an NBD URI
    this client cannot use."""
    from .nbd_client import looks_like_uri

    if "\0" in name:           # no path holds one (the kernel's string ends there): no device
        raise DMError(errno.ENODEV)
    if looks_like_uri(name):
        return _nbd(name, cwd, mount)
    if ":" in name and "/" not in name:
        major, _, minor = name.partition(":")
        if not (major.isascii() and major.isdigit() and minor.isascii() and minor.isdigit()):
            raise DMError(errno.ENODEV)
        if int(major) == DM_MAJOR:
            return Resolved("dm-minor", minor=int(minor))
        if int(major) == IMAGE_MAJOR:
            path = (images or {}).get(int(minor))
            if path is None:
                raise DMError(errno.ENODEV)
            return _walk(path, mount)
        link = "/sys/dev/block/%d:%d" % (int(major), int(minor))
        try:
            target = os.readlink(link)
        except OSError:
            raise DMError(errno.ENODEV) from None
        name = "/dev/" + os.path.basename(target)
    return _walk(os.path.join(cwd, name), mount)


def _walk(path: str, mount: Mount | None) -> Resolved:
    """Follow ``path`` component by component (``realpath`` done by hand), stopping at
    the mount directory without entering it."""
    todo = [c for c in path.split("/") if c]
    todo.reverse()                       # a stack: next component last
    prefix = "/"
    links = 0
    in_mount = False                     # prefix is our mount's root directory
    st: os.stat_result | None = os.lstat("/")
    while todo:
        comp = todo.pop()
        if comp == ".":
            continue
        if comp == "..":
            prefix = os.path.dirname(prefix) if prefix != "/" else "/"
            in_mount = False
            st = None
            continue
        if in_mount:
            if todo:
                raise DMError(errno.ENODEV)      # below a device file (ENOTDIR)
            return Resolved("dm-name", name=comp)
        nxt = os.path.join(prefix, comp)
        if mount is not None and nxt in (mount.dir, mount.real_dir):
            prefix, in_mount, st = nxt, True, None
            continue
        if nxt == "/dev/mapper" and mount is None and len(todo) == 1 and todo[0] not in (".", ".."):
            return Resolved("mapper", name=todo[0])   # in-process, even with no /dev/mapper here
        ours = _dm_node(nxt, bool(todo), mount)
        if ours is not None and mount is None:
            return ours                          # in-process: /dev/mapper/NAME, /dev/dm-N are ours
        try:
            st = os.lstat(nxt)
        except OSError:
            if ours is not None:
                return ours                      # no kernel node of that name: ours
            if nxt == "/dev/mapper" and len(todo) == 1 and todo[0] not in (".", ".."):
                return Resolved("mapper", name=todo[0])   # no /dev/mapper on this machine at all
            raise DMError(errno.ENODEV) from None
        if stat.S_ISLNK(st.st_mode):
            links += 1
            if links > MAX_SYMLINKS:
                raise DMError(errno.ENODEV)      # ELOOP
            try:
                target = os.readlink(nxt)
            except OSError:
                raise DMError(errno.ENODEV) from None
            parts = [c for c in target.split("/") if c]
            todo.extend(reversed(parts))
            if target.startswith("/"):
                prefix = "/"
            in_mount = False
            continue
        if mount is not None and mount.root_id is not None and (st.st_dev, st.st_ino) == mount.root_id:
            prefix, in_mount = nxt, True         # the mount reached another way (bind mount)
            continue
        if todo and not stat.S_ISDIR(st.st_mode):
            raise DMError(errno.ENODEV)          # ENOTDIR
        prefix = nxt
    if in_mount:
        raise DMError(errno.ENOTBLK)             # the mount directory itself
    if st is None:
        try:
            st = os.stat(prefix)
        except OSError:
            raise DMError(errno.ENODEV) from None
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise DMError(errno.ENOTBLK)
    if stat.S_ISBLK(st.st_mode) and os.major(st.st_rdev) == LOOP_MAJOR and mount is not None:
        onto = _loop_onto_mount(st.st_rdev, mount)
        if onto is not None:
            return onto
    return Resolved("file", path=prefix)


def _nbd(word: str, cwd: str, mount: Mount | None) -> Resolved:
    """An NBD URI.  A socket path is ``stat``-ed here, off the Trio thread, so that one
    of our own listeners can be recognised, and so that a path into our mount (which
    holds no sockets; a ``connect`` there would wait on the Trio thread) or to anything
    but a socket is ENODEV before anyone connects.  A missing socket is left to the
    connection attempt (a table already holding that export loads without one)."""
    from .nbd_client import parse_uri

    uri = parse_uri(word, cwd)
    if not uri.socket_path:
        return Resolved("nbd", name=uri.export, path=str(uri), host=uri.host, port=uri.port)
    if mount is not None and any(uri.socket_path == d or uri.socket_path.startswith(d + "/")
                                 for d in (mount.dir, mount.real_dir)):
        raise DMError(errno.ENODEV)
    socket_id = None
    try:
        st = os.stat(uri.socket_path)
    except OSError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode) or (mount is not None and mount.root_id is not None
                                             and st.st_dev == mount.root_id[0]):
            raise DMError(errno.ENODEV)
        socket_id = (st.st_dev, st.st_ino)
    return Resolved("nbd", name=uri.export, path=str(uri), socket_path=uri.socket_path,
                    socket_id=socket_id)


def _dm_node(path: str, more: bool, mount: Mount | None) -> Resolved | None:
    """What ``/dev/mapper/NAME`` or ``/dev/dm-N`` (the last component) names when our
    mount is not there: one of our devices, unless a real node of that name exists."""
    if more:
        return None
    parent, base = os.path.split(path)
    if parent == "/dev/mapper" and (mount is None or mount.dir != "/dev/mapper"):
        return Resolved("mapper", name=base)
    if parent == "/dev" and base.startswith("dm-") and base[3:].isascii() and base[3:].isdigit() and \
            (mount is None or mount.dir != "/dev"):
        return Resolved("dm-minor", minor=int(base[3:]))
    return None


def _loop_onto_mount(rdev: int, mount: Mount) -> Resolved | None:
    """A loop device whose backing file is one of our FUSE files is that dm device.

    Its I/O would otherwise leave the daemon through the loop driver and come back
    through FUSE to the same daemon, which is busy waiting for it: a deadlock.  A loop
    with an offset or size limit cannot be mapped that simply and is refused."""
    sysdir = "/sys/dev/block/%d:%d/loop" % (os.major(rdev), os.minor(rdev))
    try:
        with open(os.path.join(sysdir, "backing_file")) as f:
            backing = f.read().strip()
        with open(os.path.join(sysdir, "offset")) as f:
            offset = int(f.read())
        with open(os.path.join(sysdir, "sizelimit")) as f:
            sizelimit = int(f.read())
    except (OSError, ValueError):
        return None
    parent, name = os.path.split(backing)
    if parent not in (mount.dir, mount.real_dir):
        return None
    if offset or sizelimit:
        raise DMError(errno.EBUSY, "loop device over a dmsim file with an offset")
    return Resolved("dm-name", name=name)


async def resolve_all(names: Iterable[str], cwd: str, mount_dir: str | None,
                      root_id: tuple[int, int] | None = None, in_thread: bool = True,
                      images: Mapping[int, str] | None = None
                      ) -> tuple[dict[str, Resolved | DMError], tuple[int, int] | None]:
    """Resolve every name, each to a :class:`Resolved` or the DMError it gives, and
    return the mount root's identity too (looked up when ``root_id`` is not known).

    ``in_thread``: in a worker thread, one hand-off for a whole table, and names still
    unresolved after :data:`RESOLVE_TIMEOUT_SECONDS` of wall-clock time give ENODEV (a
    wall clock: a hung ``stat`` does not care for Trio's clock).  Without it (a manager
    with no mount: nothing can wait on us) the same work runs inline."""
    pending = list(dict.fromkeys(names))
    out: dict[str, Resolved | DMError] = {}
    ids = [root_id]

    def work() -> None:
        if ids[0] is None and mount_dir:
            ids[0] = mount_root_id(mount_dir)
        mount = Mount.of(mount_dir, ids[0])
        for name in pending:
            try:
                out[name] = resolve(name, cwd, mount, images) if images else resolve(name, cwd, mount)
            except DMError as e:
                out[name] = e

    if not in_thread:
        work()
        return out, ids[0]
    scope = trio.CancelScope()
    token = trio.lowlevel.current_trio_token()
    timer = threading.Timer(RESOLVE_TIMEOUT_SECONDS, token.run_sync_soon, (scope.cancel,))
    timer.daemon = True
    timer.start()
    try:
        with scope:
            await trio.to_thread.run_sync(work, abandon_on_cancel=True)
    finally:
        timer.cancel()
    return {name: out.get(name, DMError(errno.ENODEV)) for name in pending}, ids[0]
