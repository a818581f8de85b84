"""The ``dmsim`` command.

::

    dmsim daemon --mount DIR [--socket PATH] [--state-dir DIR] [--background]
                 [--owner USER] [--group GROUP] [--mode OCTAL]
                 [--page-cache | --direct-io] [--io-mode inline|thread]
                 [--durability fsync|process] [--resync-throttle PCT] [--nbd ADDR]...
                 [--image-paths] [--debug]
    dmsim daemon stop [--socket PATH] [--state-dir DIR] [--timeout S]
                                      stop the daemon and wait until it has exited
    dmsim [--socket PATH] dmsetup <dmsetup arguments>...
    dmsim [--socket PATH] <dmsetup command> <arguments>...     (create, ls, table, ...)
    dmsim [--socket PATH] klog        print and clear the kernel-log lines
    dmsim [--socket PATH] images      each image file's device number (240:N), its path, its devices
    dmsim [--socket PATH] progress NAME [--interval S]
                                      follow a mirror resync or snapshot merge (a bar on a tty)

The socket is ``--socket``, else ``$DMSIM_SOCKET``, else ``$XDG_RUNTIME_DIR/dmsim/control``,
else ``/run/dmsim/control`` for root (``/tmp/dmsim-<uid>/control`` otherwise).
"""
from __future__ import annotations

import argparse
import sys

import trio

from .errors import DMError


def printable(text: str) -> str:
    """``text`` safe to print (lone surrogates as backslash escapes)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")

USAGE = __doc__.split("::", 1)[1].split("The socket is", 1)[0].strip("\n")

#: dmsetup's command words (a plain ``dmsim WORD`` runs dmsetup with them)
DMSETUP_VERBS = frozenset((
    "create", "load", "reload", "suspend", "resume", "clear", "remove", "remove_all",
    "rename", "message", "wait", "info", "ls", "status", "table", "deps", "version",
    "targets", "mknodes", "udevcomplete_all", "help", "splitname", "setgeometry",
    "udevcookies", "udevcreatecookie", "udevreleasecookie", "udevflags", "wipe_table",
))


def _needs_stdin(argv: list[str]) -> bool:
    from . import dmsetup

    return dmsetup.needs_stdin(argv)


async def _dmsetup(socket: str | None, argv: list[str], stdin: str | None):
    from . import dmsetup
    from .client import RemoteControl

    async with RemoteControl(socket) as ctl:
        return await dmsetup.run_chunks(ctl, argv, stdin=stdin)


async def _progress(socket: str | None, name: str, interval: float) -> int:
    from .client import RemoteControl
    from .progress import follow

    async with RemoteControl(socket) as ctl:
        return await follow(ctl, name, interval)


async def image_lines(ctl) -> list[str]:
    """``dmsim images``: one ``NUMBER<tab>PATH<tab>DEVICES`` line per image file a live or
    inactive table holds, by number (what ``deps -o devname`` shows per device, for all of
    them at once; dmsetup's ``info`` has no place for a file name).  A number stays its
    file while the daemon runs, also after the last table using it is gone (tables may
    still name it), but only files in use are listed."""
    found: dict[tuple[int, int], tuple[str, list[str]]] = {}
    for name in await ctl.names():
        for inactive in (False, True):
            try:
                deps = await ctl.deps(name, inactive)
            except DMError:              # removed since names()
                break
            for d in deps:
                if d.path is None or d.major is None or d.minor is None:
                    continue             # a dm or block device, or an image without a number
                users = found.setdefault((d.major, d.minor), (d.path, []))[1]
                if name not in users:
                    users.append(name)
    return ["%d:%d\t%s\t%s" % (number + (printable(path), printable(",".join(users))))
            for number, (path, users) in sorted(found.items())]


async def _images(socket: str | None) -> list[str]:
    from .client import RemoteControl

    async with RemoteControl(socket) as ctl:
        return await image_lines(ctl)


async def _klog(socket: str | None) -> list[str]:
    from .client import RemoteControl

    async with RemoteControl(socket) as ctl:
        return await ctl.read_log()


def _daemon_stop(argv: list[str], socket: str | None) -> int:
    from .daemon import STOP_TIMEOUT_SECONDS, stop_daemon

    p = argparse.ArgumentParser(prog="dmsim daemon stop",
                                description="Stop the daemon (SIGTERM) and wait until it has exited.")
    p.add_argument("--socket", default=socket, help="control socket path (finds the state directory)")
    p.add_argument("--state-dir", help="the daemon's state directory (default: the socket's directory)")
    p.add_argument("--timeout", type=float, default=STOP_TIMEOUT_SECONDS, metavar="S",
                   help="seconds to wait for the daemon to exit (default %(default)g)")
    a = p.parse_args(argv)
    return stop_daemon(a.socket, a.state_dir, a.timeout)


def _daemon(argv: list[str], socket: str | None = None) -> int:
    from .daemon import DaemonOptions, run_daemon
    from .manager import image_numbers_default

    if argv[:1] == ["stop"]:
        return _daemon_stop(argv[1:], socket)
    p = argparse.ArgumentParser(prog="dmsim daemon", description="Serve dm devices as FUSE files.")
    p.add_argument("--mount", required=True,
                   help="directory where each device appears as a file (made if missing; "
                        "/dev/mapper for dmsetup's paths)")
    p.add_argument("--socket", default=socket, help="control socket path")
    p.add_argument("--state-dir", help="pid, lock and klog files (default: the socket's directory)")
    p.add_argument("--background", action="store_true", help="return once mount and socket are ready")
    p.add_argument("--owner", metavar="USER", help="owner of the device files (default: the daemon's user)")
    p.add_argument("--group", metavar="GROUP",
                   help="group of the device files (default: disk when run as root, as /dev/dm-N)")
    p.add_argument("--mode", metavar="OCTAL", help="permission bits of the device files (default: 0660)")
    p.add_argument("--page-cache", action="store_true",
                   help="every open through the kernel's FUSE page cache, written through "
                        "(default: like a block device, O_DIRECT opens direct, others buffered)")
    p.add_argument("--direct-io", action="store_true",
                   help="every open direct, O_DIRECT or not (each request reaches the daemon as issued)")
    p.add_argument("--io-mode", choices=["inline", "thread"], default="inline",
                   help="image file I/O on the Trio thread or in worker threads")
    p.add_argument("--durability", choices=["fsync", "process"], default="fsync",
                   help="fsync: a flush reaches the disk (the kernel's promise); process: flushes "
                        "are free, writes survive a killed daemon but not a power loss")
    p.add_argument("--resync-throttle", type=int, default=100, metavar="PCT",
                   help="limit mirror resync I/O to PCT%% of the time (the kernel's "
                        "raid1_resync_throttle; 100 = unlimited)")
    p.add_argument("--nbd", action="append", default=[], metavar="ADDR",
                   help="also export every device over NBD at unix:PATH or tcp:HOST:PORT (repeatable)")
    p.add_argument("--image-paths", action="store_true",
                   help="print image files by path where the kernel prints major:minor (default: "
                        "each image gets a number 240:N, as lvm2's parsers need; also "
                        "DMSIM_IMAGE_NUMBERS=0)")
    p.add_argument("--debug", action="store_true")
    a = p.parse_args(argv)
    try:
        image_numbers = False if a.image_paths else image_numbers_default()
    except ValueError as e:
        p.error(str(e))
    direct_io = False if a.page_cache else (True if a.direct_io else None)
    return run_daemon(DaemonOptions(mount=a.mount, socket=a.socket or "", state_dir=a.state_dir or "",
                                    background=a.background, direct_io=direct_io,
                                    io_mode=a.io_mode, durability=a.durability,
                                    resync_throttle=a.resync_throttle, debug=a.debug, nbd=tuple(a.nbd),
                                    owner=a.owner, group=a.group, mode=a.mode,
                                    image_numbers=image_numbers))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    socket = None
    while argv and argv[0].startswith("--socket"):
        if argv[0] == "--socket" and len(argv) > 1:
            socket = argv[1]
            del argv[:2]
        elif argv[0].startswith("--socket="):
            socket = argv.pop(0).split("=", 1)[1]
        else:
            break
    if not argv or argv[0] in ("-h", "--help"):
        print("usage:\n" + USAGE)
        return 0 if argv else 2
    cmd = argv[0]
    try:
        if cmd == "daemon":
            return _daemon(argv[1:], socket)
        if cmd == "klog":
            for line in trio.run(_klog, socket):
                print(line)
            return 0
        if cmd == "images":
            if argv[1:]:
                print("usage: dmsim images", file=sys.stderr)
                return 2
            for line in trio.run(_images, socket):
                print(line)
            return 0
        if cmd == "progress":
            p = argparse.ArgumentParser(prog="dmsim progress",
                                        description="Follow a mirror resync or a snapshot merge until it completes.")
            p.add_argument("name")
            p.add_argument("--interval", type=float, default=0.5)
            a = p.parse_args(argv[1:])
            return trio.run(_progress, socket, a.name, a.interval)
        if cmd == "dmsetup":
            dm_argv = argv[1:]
        elif cmd in DMSETUP_VERBS or cmd.startswith("-"):
            dm_argv = argv
        else:
            print("dmsim: unknown command %r\nusage:\n%s" % (cmd, USAGE), file=sys.stderr)
            return 2
        stdin = sys.stdin.read() if _needs_stdin(dm_argv) else None
        chunks, rc = trio.run(_dmsetup, socket, dm_argv, stdin)
        for fd, text in chunks:  # in the order dmsetup wrote them: scenarios merge 2>&1
            stream = sys.stdout if fd == 1 else sys.stderr
            stream.write(text)
            stream.flush()
        return rc
    except DMError as e:
        print("dmsim: %s" % printable(e.message or e.strerror), file=sys.stderr)
        return 1
    except UnicodeEncodeError as e:   # argv bytes that are not UTF-8 (surrogate escapes)
        print("dmsim: an argument is not valid UTF-8: %s" % printable(str(e.object)), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
