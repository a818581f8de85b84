"""dmsetup: its verbs, options and output, byte for byte (dmsetup 1.02.185).

:func:`run` takes dmsetup's argv and a *control* (:class:`dmsim.control.LocalControl`
in-process, or the daemon's socket client) and returns ``(stdout, stderr, rc)``.  This is
the one place where engine errors become dmsetup's text: ``device-mapper: <op> ioctl on
<name> <uuid><(M:m)> failed: <strerror>`` and ``Command failed.``.
"""
from __future__ import annotations

import contextlib
import errno
import os
from dataclasses import dataclass, field

from .errors import DMError
from .table import TableLine, parse_table_text

LIBRARY_VERSION = "1.02.185 (2022-05-18)"
DM_NAME_LEN = 128
DM_UUID_LEN = 129


class UsageError(Exception):
    """A command line dmsetup refuses before any ioctl (usage text, exit 1)."""


class CommandFailed(Exception):
    """The command printed its error; dmsetup adds ``Command failed.``."""


# -- name mangling (libdm's default "auto" mode) ---------------------------------------------
#: the characters udev takes in a node name; the rest is sent to the kernel as ``\\xNN``
_WHITELIST = frozenset(b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz#+-.:=@_")


class BadName(Exception):
    """A name or uuid libdm refuses before any ioctl; ``lines`` are its messages."""

    def __init__(self, *lines: str):
        super().__init__(*lines)
        self.lines = list(lines)


def _raw(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")      # argv's undecodable bytes come back


def mangle(text: str, what: str = "name", buf_len: int = DM_NAME_LEN) -> str:
    """libdm's ``mangle_string`` in auto mode: every byte off the whitelist becomes
    ``\\xNN``; an already mangled name is kept; mixing both, or a result that does not fit
    ``buf_len`` bytes with its NUL, raises :class:`BadName`."""
    if "\\x5cx" in text:
        raise BadName('The %s "%s" seems to be mangled more than once. This is not allowed in auto mode.'
                      % (what, text))
    b = _raw(text)
    out = bytearray()
    need = None                  # None: not known yet, False: kept mangled, True: mangling
    i = 0
    while i < len(b):
        if b[i] == 0x5C and b[i + 1:i + 2] == b"x":
            if len(b) - i < 4 or need is True:
                raise _mixed(what, text)
            if buf_len - len(out) < 4:
                raise _too_long(what, text)
            out += b[i:i + 4]
            i += 4
            need = False
            continue
        if b[i] in _WHITELIST:
            if buf_len - len(out) < 1:
                raise _too_long(what, text)
            out.append(b[i])
        else:
            if need is False:
                raise _mixed(what, text)
            if buf_len - len(out) < 4:
                raise _too_long(what, text)
            out += b"\\x%02x" % b[i]
            need = True
        i += 1
    if buf_len - len(out) < 1:
        raise _too_long(what, text)
    return out.decode("utf-8", "surrogateescape")


def _mixed(what: str, text: str) -> BadName:
    return BadName('The %s "%s" contains mixed mangled and unmangled characters or it\'s already mangled '
                   'improperly.' % (what, text))


def _too_long(what: str, text: str) -> BadName:
    return BadName('Mangled form of the %s too long for "%s".' % (what, text))


def unmangle(text: str) -> str:
    """A kernel name or uuid as dmsetup prints it: ``\\xNN`` decoded.  (libdm refuses a
    kernel name with bytes off the whitelist, which only a client other than dmsetup can
    make; it is shown as it is here.)"""
    if "\\x" not in text:
        return text
    b = _raw(text)
    out = bytearray()
    i = 0
    while i < len(b):
        if b[i] == 0x5C and b[i + 1:i + 2] == b"x" and _is_hex(b[i + 2:i + 4]):
            out.append(int(b[i + 2:i + 4], 16))
            i += 4
        else:
            out.append(b[i])
            i += 1
    return out.decode("utf-8", "surrogateescape")


def _is_hex(two: bytes) -> bool:
    return len(two) == 2 and all(c in b"0123456789abcdefABCDEF" for c in two)


# -- options --------------------------------------------------------------------------------
_FLAGS = {
    "-c": "columns", "-C": "columns", "--columns": "columns",
    "--noheadings": "noheadings", "-r": "readonly", "--readonly": "readonly",
    "-n": "notable", "--notable": "notable", "--inactive": "inactive",
    "--noflush": "noflush", "--nolockfs": "nolockfs", "-f": "force", "--force": "force",
    "--deferred": "deferred", "--retry": "retry", "-v": "verbose", "--verbose": "verbose",
    "--tree": "tree", "-y": "yes", "--yes": "yes", "--noudevsync": None, "--noudevrules": None,
    "--verifyudev": None, "--noopencount": None, "--unbuffered": None, "--nameprefixes": None,
    "--addnodeoncreate": None, "--addnodeonresume": None, "--showkeys": None,
    "--readonly-kernel": None, "--progress": "progress",
}
_VALUED = {
    "-o": "options", "--options": "options", "--separator": "separator",
    "-u": "uuid", "--uuid": "uuid", "--table": "table", "--target": "target",
    "--setuuid": "setuuid", "-j": "major", "--major": "major", "-m": "minor",
    "--minor": "minor", "--udevcookie": None, "--readahead": None, "-U": None, "--uid": None,
    "-G": None, "--gid": None, "-M": None, "--mode": None, "--manglename": None,
    "--sort": None, "-O": None, "--count": None, "--interval": None,
}


@dataclass
class Args:
    command: str = ""
    args: list = field(default_factory=list)
    columns: bool = False
    noheadings: bool = False
    readonly: bool = False
    notable: bool = False
    inactive: bool = False
    noflush: bool = False
    nolockfs: bool = False
    force: bool = False
    deferred: bool = False
    retry: bool = False
    verbose: int = 0
    tree: bool = False
    yes: bool = False
    progress: bool = False
    options: str | None = None
    separator: str | None = None
    uuid: str | None = None
    table: str | None = None
    target: str | None = None
    setuuid: str | None = None
    major: str | None = None
    minor: str | None = None


def parse_args(argv: list[str]) -> Args:
    """getopt_long with permutation: options may come before or after the verb, short
    options cluster (``-cv``), and anything else starting with ``-`` is refused the way
    getopt refuses it (``dmsetup: invalid option -- '1'``)."""
    a = Args()
    rest = []
    i = 0

    def flag(attr):
        if attr == "verbose":
            a.verbose += 1
        elif attr:
            setattr(a, attr, True)

    while i < len(argv):
        word = argv[i]
        i += 1
        if word == "--":
            rest.extend(argv[i:])
            break
        if word.startswith("--"):
            name, eq, value = word.partition("=")
            if name in _FLAGS and not eq:
                flag(_FLAGS[name])
            elif name in _VALUED:
                if not eq:
                    if i >= len(argv):
                        raise _bad_usage("dmsetup: option '%s' requires an argument" % name)
                    value = argv[i]
                    i += 1
                attr = _VALUED[name]
                if attr:
                    setattr(a, attr, value)
            else:
                raise _bad_usage("dmsetup: unrecognized option '%s'" % word)
        elif word.startswith("-") and word != "-":
            k = 1
            while k < len(word):
                opt = "-" + word[k]
                k += 1
                if opt in _FLAGS:
                    flag(_FLAGS[opt])
                elif opt in _VALUED:
                    if k < len(word):
                        value = word[k:]
                    elif i < len(argv):
                        value = argv[i]
                        i += 1
                    else:
                        raise _bad_usage("dmsetup: option requires an argument -- '%s'" % opt[1])
                    attr = _VALUED[opt]
                    if attr:
                        setattr(a, attr, value)
                    break
                else:
                    raise _bad_usage("dmsetup: invalid option -- '%s'" % opt[1])
        else:
            rest.append(word)
    if rest:
        a.command, a.args = rest[0], rest[1:]
    return a


def _bad_usage(message: str) -> "UsageError":
    return UsageError(message + "\nCouldn't process command line.")


def needs_stdin(argv: list[str]) -> bool:
    """Whether dmsetup would read the table from stdin for this command line."""
    try:
        a = parse_args(argv)
    except UsageError:
        return False
    if a.command == "create":
        return a.table is None and not a.notable and len(a.args) == 1
    if a.command in ("load", "reload"):
        return a.table is None and len(a.args) == 1
    return False


# -- output helpers ---------------------------------------------------------------------------
class _Stream:
    def __init__(self, chunks: list, fd: int):
        self.chunks = chunks
        self.fd = fd

    def write(self, text: str) -> None:
        self.chunks.append((self.fd, text))


class _Out:
    """stdout and stderr, kept in the order written (scenarios merge them)."""

    def __init__(self) -> None:
        self.chunks: list[tuple[int, str]] = []
        self.out = _Stream(self.chunks, 1)
        self.err = _Stream(self.chunks, 2)

    def print(self, text: str = "") -> None:
        self.out.write(text + "\n")

    def error(self, text: str) -> None:
        self.err.write(text + "\n")

    def text(self, fd: int) -> str:
        return "".join(t for f, t in self.chunks if f == fd)


def ioctl_error(op: str, name: str, e: DMError, uuid: str = "", devno: tuple | None = None) -> str:
    mm = "(%d:%d)" % devno if devno else ""
    return "device-mapper: %s ioctl on %s %s%s failed: %s" % (op, name, uuid, mm, os.strerror(e.errno))


def _state(info) -> str:
    s = "SUSPENDED" if info.suspended else "ACTIVE"
    if info.read_only:
        s += " (READ-ONLY)"
    if info.deferred_remove:
        s += " (DEFERRED REMOVE)"
    return s


def _tables(info) -> str:
    if info.live_table and info.inactive_table:
        return "LIVE & INACTIVE"
    if info.live_table:
        return "LIVE"
    if info.inactive_table:
        return "INACTIVE"
    return "None"


def format_info(info) -> str:
    """The ``dmsetup info`` block of one device (ends with an empty line)."""
    lines = [
        "Name:              %s" % unmangle(info.name),
        "State:             %s" % _state(info),
        "Read Ahead:        256",
        "Tables present:    %s" % _tables(info),
        "Open count:        %d" % info.open_count,
        "Event number:      %d" % info.event_nr,
        "Major, minor:      %d, %d" % (info.major, info.minor),
        "Number of targets: %d" % info.target_count,
    ]
    if info.uuid:
        lines.append("UUID: %s" % unmangle(info.uuid))
    return "\n".join(lines) + "\n"


def _attr(info) -> str:
    return "".join([
        "L" if info.live_table else "-",
        "I" if info.inactive_table else "-",
        "s" if info.suspended else "-",
        "r" if info.read_only else "w",
    ])


# field: (heading, min width, numeric, getter)
FIELDS = {
    "name": ("Name", 16, False, lambda i: unmangle(i.name)),
    "major": ("Maj", 3, True, lambda i: i.major),
    "minor": ("Min", 3, True, lambda i: i.minor),
    "attr": ("Stat", 4, False, _attr),
    "open": ("Open", 4, True, lambda i: i.open_count),
    "segments": ("Targ", 4, True, lambda i: i.target_count),
    "events": ("Event", 6, True, lambda i: i.event_nr),
    "uuid": ("UUID", 32, False, lambda i: unmangle(i.uuid)),
    "devno": ("DevNo", 5, False, lambda i: "%d:%d" % (i.major, i.minor)),
    "tables_loaded": ("Tables", 6, False, lambda i: {"LIVE & INACTIVE": "Both", "LIVE": "Live",
                                                     "INACTIVE": "Inactive", "None": "None"}[_tables(i)]),
    "suspended": ("Suspended", 9, False, lambda i: "Suspended" if i.suspended else "Active"),
    "readonly": ("Read-only", 9, False, lambda i: "Read-only" if i.read_only else "Writeable"),
    "blkdevname": ("BlkDevName", 16, False, lambda i: "dm-%d" % i.minor),
}
DEFAULT_FIELDS = "name,major,minor,attr,open,segments,events,uuid"


def _field_list(options: str | None) -> list[str]:
    if not options:
        return DEFAULT_FIELDS.split(",")
    if options.startswith("+"):
        options = DEFAULT_FIELDS + "," + options[1:]
    names = [f.strip() for f in options.split(",") if f.strip()]
    for n in names:
        if n not in FIELDS:
            raise UsageError("Unrecognised field: %s" % n)
    return names


def format_columns(infos, options: str | None = None, noheadings: bool = False,
                   separator: str | None = None) -> str:
    """``dmsetup info -c``: aligned columns, or ``:``-separated without headings."""
    names = _field_list(options)
    rows = [[FIELDS[n][3](i) for n in names] for i in infos]
    if noheadings or separator is not None:
        sep = ":" if separator is None else separator
        lines = [] if noheadings else [sep.join(FIELDS[n][0] for n in names)]
        lines += [sep.join(str(v) for v in row) for row in rows]
        return "".join(line + "\n" for line in lines)
    widths = []
    for k, n in enumerate(names):
        heading, minw, _, _ = FIELDS[n]
        widths.append(max([minw, len(heading)] + [len(str(r[k])) for r in rows]))
    out = [" ".join(FIELDS[n][0].ljust(w) for n, w in zip(names, widths, strict=True))]
    for row in rows:
        cells = []
        for n, w, v in zip(names, widths, row, strict=True):
            cells.append(str(v).rjust(w) if FIELDS[n][2] else str(v).ljust(w))
        out.append(" ".join(cells))
    return "".join(line + "\n" for line in out)


def _cwd() -> str | None:
    """Our working directory, sent with a table: relative device paths in it are ours,
    not the daemon's."""
    try:
        return os.getcwd()
    except OSError:
        return None


def _dep_text(dep, how: str | None) -> str:
    if how == "devname":
        return "(%s)" % unmangle(dep.name)
    if how == "blkdevname":
        return "(%s)" % dep.kname
    if dep.major is None:
        return "(%s)" % dep.ref
    return "(%d, %d)" % (dep.major, dep.minor)


# -- the commands ---------------------------------------------------------------------------
class Dmsetup:
    def __init__(self, ctl, a: Args, stdin: str | None, out: _Out):
        self.ctl = ctl
        self.a = a
        self.stdin = stdin
        self.o = out

    # table text from --table, a file, or stdin
    def _table_lines(self, file_arg: str | None) -> list[TableLine]:
        if self.a.table is not None:
            return parse_table_text(self.a.table, "")
        if file_arg is not None:
            try:
                with open(file_arg) as f:
                    text = f.read()
            except OSError as e:
                self.o.error("Couldn't open '%s' for reading." % file_arg)
                raise CommandFailed() from e
            return parse_table_text(text, file_arg)
        return parse_table_text(self.stdin or "", "on stdin")

    def _fail(self, *lines: str):
        for line in lines:
            self.o.error(line)
        raise CommandFailed()

    async def _kname(self, name: str, create: bool = False) -> str:
        """``dm_task_set_name``: the kernel's name for ``name`` (mangled), or the name of
        the device a path names (``/dev/mapper/NAME``, ``mapper/NAME``, the mount's files);
        prints libdm's message and fails otherwise."""
        if "/" in name:
            if create:
                self._fail('Name "%s" invalid. It contains "/".' % name)
            path = name
            if not path.startswith("/") and len(path) >= 3 and path.count("/") == 1:
                path = "/dev/" + path
            parent, base = os.path.split(os.path.normpath(path)) if path.startswith("/") else ("", "")
            dirs = {"/dev/mapper"}
            mount = await self.ctl.mount_dir()
            if mount:
                dirs.add(os.path.normpath(mount))
            if parent not in dirs or not base or base not in await self.ctl.names():
                self._fail("Device %s not found" % name)
            return base                          # an existing path: not mangled again
        if len(_raw(name)) >= DM_NAME_LEN:
            self._fail('Name "%s" too long.' % name)
        try:
            return mangle(name)
        except BadName as e:
            if "mangled more than once" in e.lines[0]:
                self._fail(*e.lines)
            self._fail(*e.lines, 'Failed to mangle device name "%s".' % name)
        raise AssertionError("unreachable")

    def _kuuid(self, uuid: str) -> str:
        """``dm_task_set_uuid``."""
        try:
            return mangle(uuid, "UUID", DM_UUID_LEN)
        except BadName as e:
            if "mangled more than once" in e.lines[0]:
                self._fail(*e.lines)
            self._fail(*e.lines, 'Failed to mangle device uuid "%s".' % uuid)
        raise AssertionError("unreachable")

    def _knewname(self, new: str) -> str:
        """``dm_task_set_newname``."""
        if "/" in new:
            self._fail('Name "%s" invalid. It contains "/".' % new)
        if len(_raw(new)) >= DM_NAME_LEN:
            self._fail('Name "%s" too long' % new)
        if not new:
            self._fail("Non empty new name is required.")
        try:
            return mangle(new, "new name")
        except BadName as e:
            if "mangled more than once" in e.lines[0]:
                self._fail(*e.lines)
            self._fail(*e.lines, 'Failed to mangle new device name "%s"' % new)
        raise AssertionError("unreachable")

    def _knewuuid(self, new: str) -> str:
        """``dm_task_set_newuuid``."""
        if len(_raw(new)) >= DM_UUID_LEN:
            self._fail('Uuid "%s" too long' % new)
        try:
            return mangle(new, "new UUID", DM_UUID_LEN)
        except BadName as e:
            if "mangled more than once" in e.lines[0]:
                self._fail(*e.lines)
            self._fail(*e.lines, 'Failed to mangle new device UUID "%s"' % new)
        raise AssertionError("unreachable")

    async def _kname_in_loop(self, name: str) -> str | None:
        """:meth:`_kname` for one of several devices: a refused name is reported (with
        its ``Command failed.``) and skipped."""
        try:
            return await self._kname(name)
        except CommandFailed:
            self.o.error("Command failed.")
            return None

    async def _names_or_all(self, args) -> tuple[list[str], bool]:
        """The names given, or every device's as dmsetup shows it (unmangled: each is
        mangled again for its own ioctl, as dmsetup does)."""
        if args:
            return list(args), len(args) > 1
        return [unmangle(n) for n in await self.ctl.names()], True

    # create ------------------------------------------------------------------------------
    async def create(self, args):
        if not args or len(args) > 2:
            raise UsageError("create <dev_name> [-j|--major <major> -m|--minor <minor>] [-U|--uid <uid>] "
                             "[-G|--gid <gid>] [-M|--mode <octal_mode>] [-u|--uuid <uuid>] "
                             "[--addnodeonresume|--addnodeoncreate] [--readahead {[+]<sectors>|auto|none}] "
                             "[-n|--notable|--table {<table>|<table_file>}]")
        name = args[0]
        kname = await self._kname(name, create=True)
        uuid = self.a.uuid or ""
        kuuid = self._kuuid(uuid) if uuid else ""
        lines = [] if self.a.notable else self._parse_or_fail(args[1] if len(args) > 1 else None)
        try:
            info = await self.ctl.create(kname, kuuid)
        except DMError as e:
            self.o.error(ioctl_error("create", name, e, uuid))
            raise CommandFailed() from None
        if not lines:
            return
        devno = (info.major, info.minor)
        try:
            await self.ctl.load(kname, lines, self.a.readonly, cwd=_cwd())
        except DMError as e:
            self.o.error(ioctl_error("reload", name, e, "", devno))
            with contextlib.suppress(DMError):
                await self.ctl.remove(kname)
            raise CommandFailed() from None
        try:
            await self.ctl.resume(kname)
        except DMError as e:
            self.o.error(ioctl_error("resume", name, e, "", devno))
            with contextlib.suppress(DMError):
                await self.ctl.remove(kname)
            raise CommandFailed() from None

    def _parse_or_fail(self, file_arg):
        try:
            return self._table_lines(file_arg)
        except DMError as e:
            self.o.error(e.message)
            raise CommandFailed() from None

    async def load(self, args):
        if not args or len(args) > 2:
            raise UsageError("load <device> [<table>|<table_file>]")
        name = args[0]
        kname = await self._kname(name)
        lines = self._parse_or_fail(args[1] if len(args) > 1 else None)
        await self._ioctl("reload", name, self.ctl.load(kname, lines, self.a.readonly, cwd=_cwd()))

    reload = load

    async def _ioctl(self, op: str, name: str, coro):
        try:
            return await coro
        except DMError as e:
            self.o.error(ioctl_error(op, name, e))
            raise CommandFailed() from None

    # suspend / resume / clear / remove / rename -------------------------------------------
    async def suspend(self, args):
        for name in await self._require(args, "suspend [--noflush] [--nolockfs] <device>..."):
            await self._ioctl("suspend", name, self.ctl.suspend(await self._kname(name), self.a.noflush))

    async def resume(self, args):
        for name in await self._require(args, "resume [--noflush] [--nolockfs] <device>..."):
            await self._ioctl("resume", name, self.ctl.resume(await self._kname(name), self.a.noflush))

    async def clear(self, args):
        for name in await self._require(args, "clear <device>"):
            await self._ioctl("clear", name, self.ctl.clear(await self._kname(name)))

    async def _require(self, args, usage):
        if not args:
            raise UsageError(usage)
        return args

    async def remove(self, args):
        for name in await self._require(args, "remove [--deferred] [-f|--force] [--retry] <device>..."):
            # dmsetup stops at the first device that fails (oracle: 'remove nosuch t'
            # leaves t in place)
            kname = await self._kname(name)
            if self.a.force:
                await self._force_error_table(kname)
            await self._ioctl("remove", name, self._remove_retry(kname))

    async def _remove_retry(self, name):
        tries = 25 if self.a.retry else 1
        for attempt in range(tries):
            try:
                return await self.ctl.remove(name, self.a.deferred)
            except DMError as e:
                if e.errno != errno.EBUSY or attempt == tries - 1:
                    raise
                import trio
                await trio.sleep(0.2)

    async def _force_error_table(self, name):
        try:
            info = await self.ctl.info(name)
            lines = await self.ctl.table_lines(name, "table")
        except DMError:
            return
        if not info.live_table or not lines:
            return
        size = lines[-1].start + lines[-1].length
        try:
            await self.ctl.load(name, [TableLine(0, size, "error", "")])
            await self.ctl.resume(name, True)
        except DMError:
            pass

    async def remove_all(self, args):
        if self.a.force:
            for name in await self.ctl.names():
                await self._force_error_table(name)
        await self._ioctl("remove_all", "", self.ctl.remove_all())

    async def rename(self, args):
        if self.a.setuuid is not None:
            if len(args) != 1:
                raise UsageError("rename <device> [--setuuid] <new_name_or_uuid>")
            kname = await self._kname(args[0])
            new_uuid = self._knewuuid(self.a.setuuid)
            await self._ioctl("rename", args[0], self.ctl.rename(kname, None, new_uuid))
            return
        if len(args) != 2:
            raise UsageError("rename <device> [--setuuid] <new_name_or_uuid>")
        kname = await self._kname(args[0])
        new_name = self._knewname(args[1])
        await self._ioctl("rename", args[0], self.ctl.rename(kname, new_name, None))

    # message / wait ---------------------------------------------------------------------------
    async def message(self, args):
        if len(args) < 2:
            raise UsageError("message <device> <sector> <message>")
        name, sector = args[0], args[1]
        if not sector.isdigit():
            self.o.error("Invalid sector.")
            raise CommandFailed()
        text = " ".join(args[2:])
        if not args[2:]:
            self.o.error("No message supplied.")
        kname = await self._kname(name)
        reply = await self._ioctl("message", name, self.ctl.message(kname, int(sector), text))
        if reply:
            self.o.out.write(reply if reply.endswith("\n") else reply + "\n")

    async def wait(self, args):
        if not args or len(args) > 2:
            raise UsageError("wait <device> [<event_nr>]")
        event_nr = int(args[1]) if len(args) > 1 and args[1].isdigit() else 0
        kname = await self._kname(args[0])
        info = await self._ioctl("waitevent", args[0], self.ctl.wait(kname, event_nr))
        if self.a.verbose:
            self.o.out.write(format_info(info) + "\n")

    # info / ls / status / table / deps -----------------------------------------------------------
    async def info(self, args):
        names, _ = await self._names_or_all(args)
        if not names:
            self.o.print("No devices found")
            return
        infos, failed = [], False
        for name in names:
            kname = await self._kname_in_loop(name)
            if kname is None:
                failed = True
                continue
            try:
                infos.append(await self.ctl.info(kname, self.a.inactive))
            except DMError as e:
                if e.errno != errno.ENXIO:
                    self.o.error(ioctl_error("info", name, e))
                else:
                    self.o.error("Device does not exist.")
                self.o.error("Command failed.")
                failed = True
        if self.a.columns:
            if infos:
                self.o.out.write(format_columns(infos, self.a.options, self.a.noheadings, self.a.separator))
        else:
            for info in infos:
                self.o.out.write(format_info(info) + "\n")
        if failed:
            raise _AlreadyReported()

    async def ls(self, args):
        names = await self.ctl.names()
        if not names:
            self.o.print("No devices found")
            return
        if self.a.target:
            # devices exist but none has such a target: no output at all (oracle)
            for name in names:
                lines = await self.ctl.table_lines(name, "table") or []
                if any(ln.type == self.a.target for ln in lines):
                    info = await self.ctl.info(name)
                    self.o.print("%s\t(%d, %d)" % (unmangle(name), info.major, info.minor))
            return
        if self.a.tree:
            await self._tree(names)
            return
        for name in names:
            info = await self.ctl.info(name)
            shown = unmangle(name)
            if self.a.options == "devname":
                self.o.print("%s\t(%s)" % (shown, shown))
            elif self.a.options == "blkdevname":
                self.o.print("%s\t(dm-%d)" % (shown, info.minor))
            else:
                self.o.print("%s\t(%d:%d)" % (shown, info.major, info.minor))

    async def _tree(self, names):
        """``ls --tree``: each top-level device with what it stacks on, indented."""
        deps = {n: await self.ctl.deps(n) for n in names}
        used = {d.name for ds in deps.values() for d in ds if d.major is not None and d.name in deps}
        infos = {n: await self.ctl.info(n) for n in names}

        def walk(name, prefix, last, top):
            info = infos.get(name)
            label = "%s (%d:%d)" % (unmangle(name), info.major, info.minor) if info else unmangle(name)
            self.o.print(("" if top else prefix + ("`-" if last else "|-")) + label)
            children = deps.get(name, [])
            for k, d in enumerate(children):
                child_prefix = prefix if top else prefix + ("  " if last else "| ")
                if d.name in deps:
                    walk(d.name, child_prefix, k == len(children) - 1, False)
                else:
                    ref = "%d:%d" % (d.major, d.minor) if d.major is not None else d.ref
                    self.o.print(child_prefix + ("`-" if k == len(children) - 1 else "|-") + "(%s)" % ref)

        for name in names:
            if name not in used:
                walk(name, " ", True, True)

    async def _status_or_table(self, args, kind: str, op: str):
        names, prefixed = await self._names_or_all(args)
        if not names:
            self.o.print("No devices found")
            return
        failed = False
        for name in names:
            kname = await self._kname_in_loop(name)
            if kname is None:
                failed = True
                continue
            try:
                lines = await self.ctl.table_lines(kname, kind, self.a.inactive, self.a.noflush)
            except DMError as e:
                if kind == "info" and e.errno == errno.ENXIO:
                    self.o.error("Device does not exist.")
                else:
                    self.o.error(ioctl_error(op, name, e))
                self.o.error("Command failed.")
                failed = True
                continue
            prefix = name + ": " if prefixed else ""
            if lines is None or not lines:
                self.o.print(prefix)
                continue
            for ln in lines:
                if self.a.target and ln.type != self.a.target:
                    continue
                self.o.print(prefix + "%d %d %s %s" % (ln.start, ln.length, ln.type, ln.params))
        if failed:
            raise _AlreadyReported()

    async def status(self, args):
        await self._status_or_table(args, "info", "status")

    async def table(self, args):
        await self._status_or_table(args, "table", "table")

    async def deps(self, args):
        names, prefixed = await self._names_or_all(args)
        if not names:
            self.o.print("No devices found")
            return
        failed = False
        for name in names:
            kname = await self._kname_in_loop(name)
            if kname is None:
                failed = True
                continue
            try:
                deps = await self.ctl.deps(kname, self.a.inactive)
            except DMError as e:
                self.o.error(ioctl_error("deps", name, e))
                self.o.error("Command failed.")
                failed = True
                continue
            text = "%d dependencies\t:" % len(deps)
            for d in deps:
                text += " " + _dep_text(d, self.a.options)
            self.o.print((name + ": " if prefixed else "") + text)
        if failed:
            raise _AlreadyReported()

    async def version(self, args):
        self.o.print("Library version:   " + LIBRARY_VERSION)
        driver = await self._ioctl("version", "", self.ctl.version())
        self.o.print("Driver version:    " + driver)

    async def targets(self, args):
        for name, ver in await self.ctl.versions():
            self.o.print("%-16s v%d.%d.%d" % ((name,) + tuple(ver)))

    async def mknodes(self, args):
        pass

    async def udevcomplete_all(self, args):
        pass


class _AlreadyReported(CommandFailed):
    """The per-device errors (and their ``Command failed.``) are already printed."""


COMMANDS = {
    "create": "create", "load": "load", "reload": "reload", "suspend": "suspend",
    "resume": "resume", "clear": "clear", "remove": "remove", "remove_all": "remove_all",
    "rename": "rename", "message": "message", "wait": "wait", "info": "info", "ls": "ls",
    "status": "status", "table": "table", "deps": "deps", "version": "version",
    "targets": "targets", "mknodes": "mknodes", "udevcomplete_all": "udevcomplete_all",
}


async def run(ctl, argv: list[str], stdin: str | None = None) -> tuple[str, str, int]:
    """Run one dmsetup command line against ``ctl``; return (stdout, stderr, exit status)."""
    chunks, rc = await run_chunks(ctl, argv, stdin)
    return ("".join(t for f, t in chunks if f == 1), "".join(t for f, t in chunks if f == 2), rc)


async def run_chunks(ctl, argv: list[str], stdin: str | None = None) -> tuple[list[tuple[int, str]], int]:
    """Like :func:`run`, but the output as ``(fd, text)`` pieces in the order written."""
    o = _Out()
    try:
        a = parse_args(list(argv))
        if not a.command:
            raise UsageError("Usage:\n\ndmsetup\n        [--version] [-h|--help [-c|-C|--columns]]\n"
                             "        <command> [command options] [device]...")
        method = COMMANDS.get(a.command)
        if method is None:
            raise UsageError("Unrecognised command: %s" % a.command)
        await getattr(Dmsetup(ctl, a, stdin, o), method)(a.args)
        rc = 0
    except UsageError as e:
        o.error(str(e))
        rc = 1
    except _AlreadyReported:
        rc = 1
    except CommandFailed:
        o.error("Command failed.")
        rc = 1
    return o.chunks, rc
