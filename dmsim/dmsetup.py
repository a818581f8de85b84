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
import re
from dataclasses import dataclass, field
from typing import Any

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
    "--readonly-kernel": None, "--progress": "progress", "--setuuid": "setuuid",
    "-h": "help", "--help": "help", "--version": "version", "--concise": None, "--checks": None,
}
_VALUED = {
    "-o": "options", "--options": "options", "--separator": "separator",
    "-u": "uuid", "--uuid": "uuid", "--table": "table", "--target": "target",
    "-j": "major", "--major": "major", "-m": "minor",
    "--minor": "minor", "--udevcookie": None, "--readahead": None, "-U": None, "--uid": None,
    "-G": None, "--gid": None, "-M": None, "--mode": None, "--manglename": None,
    "--sort": "sort", "-O": "sort", "--count": None, "--interval": None, "-S": None,
    "--select": None, "--exec": None,
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
    setuuid: bool = False
    help: bool = False
    version: bool = False
    sort: str | None = None
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
    if (a.major is None) != (a.minor is None):
        raise _bad_usage("Please specify both major number and minor number.")
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
    """The ``dmsetup info`` block of one device (ends with an empty line).  A device that
    never had a table has no block device yet: no ``Read Ahead:`` line (dmsetup could not
    open its node; :meth:`Dmsetup.info` prints that failure)."""
    lines = [
        "Name:              %s" % unmangle(info.name),
        "State:             %s" % _state(info),
    ]
    if getattr(info, "has_disk", True):
        lines.append("Read Ahead:        %d" % READ_AHEAD_SECTORS)
    lines += [
        "Tables present:    %s" % _tables(info),
        "Open count:        %d" % info.open_count,
        "Event number:      %d" % info.event_nr,
        "Major, minor:      %d, %d" % (info.major, info.minor),
        "Number of targets: %d" % info.target_count,
    ]
    if info.uuid:
        lines.append("UUID: %s" % unmangle(info.uuid))
    return "\n".join(lines) + "\n"


#: what BLKRAGET gives for a dm device (the block layer's default, in sectors)
READ_AHEAD_SECTORS = 256


def _attr(info) -> str:
    return "".join([
        "L" if info.live_table else "-",
        "I" if info.inactive_table else "-",
        "s" if info.suspended else "-",
        "r" if info.read_only else "w",
    ])


@dataclass
class Row:
    """One device of an ``info -c`` report: its info, and (when a field needs them) what it
    uses and which dm devices use it."""

    info: Any
    deps: list = field(default_factory=list)
    users: list = field(default_factory=list)        # infos of the dm devices using this one


def _split_name(row: Row) -> tuple[str, str, str, str]:
    """(subsystem, vg, lv, layer): the uuid's prefix up to ``-``; for ``LVM`` the name split
    as ``dm_split_lvm_name`` does (``--`` is an escaped ``-``)."""
    uuid = unmangle(row.info.uuid)
    subsystem = uuid[:uuid.index("-")] if "-" in uuid else ""
    if subsystem != "LVM":
        return subsystem, "", "", ""
    parts, cur, name, i = [], "", unmangle(row.info.name), 0
    while i < len(name):
        if name[i] == "-":
            if name[i + 1:i + 2] == "-":
                cur += "-"
                i += 2
                continue
            parts.append(cur)
            cur = ""
        else:
            cur += name[i]
        i += 1
    parts.append(cur)
    vg = parts[0]
    lv = parts[1] if len(parts) > 1 else ""
    layer = "-".join(parts[2:])
    return subsystem, vg, lv, layer


def _dep_name(d) -> str:
    return unmangle(d.name)


def _devno(major, minor) -> str:
    return "%d:%d" % (major, minor)


# field: (heading, min width, numeric, getter of a Row, needs deps/users)
FIELDS: dict[str, tuple] = {
    "name": ("Name", 16, False, lambda r: unmangle(r.info.name), False),
    "mangled_name": ("MangledName", 16, False, lambda r: r.info.name, False),
    "unmangled_name": ("UnmangledName", 16, False, lambda r: unmangle(r.info.name), False),
    "uuid": ("UUID", 32, False, lambda r: unmangle(r.info.uuid), False),
    "mangled_uuid": ("MangledUUID", 32, False, lambda r: r.info.uuid, False),
    "unmangled_uuid": ("UnmangledUUID", 32, False, lambda r: unmangle(r.info.uuid), False),
    "read_ahead": ("RAhead", 6, True, lambda r: READ_AHEAD_SECTORS, False),
    "blkdevname": ("BlkDevName", 16, False, lambda r: "dm-%d" % r.info.minor, False),
    "attr": ("Stat", 4, False, lambda r: _attr(r.info), False),
    "tables_loaded": ("Tables", 6, False, lambda r: {"LIVE & INACTIVE": "Both", "LIVE": "Live",
                                                     "INACTIVE": "Inactive", "None": "None"}[_tables(r.info)],
                      False),
    "suspended": ("Suspended", 9, False, lambda r: "Suspended" if r.info.suspended else "Active", False),
    "readonly": ("Read-only", 9, False, lambda r: "Read-only" if r.info.read_only else "Writeable", False),
    "devno": ("DevNo", 5, False, lambda r: _devno(r.info.major, r.info.minor), False),
    "major": ("Maj", 3, True, lambda r: r.info.major, False),
    "minor": ("Min", 3, True, lambda r: r.info.minor, False),
    "open": ("Open", 4, True, lambda r: r.info.open_count, False),
    "segments": ("Targ", 4, True, lambda r: r.info.target_count, False),
    "events": ("Event", 6, True, lambda r: r.info.event_nr, False),
    "device_count": ("#Devs", 5, True, lambda r: len(r.deps), True),
    "devs_used": ("DevNamesUsed", 16, False, lambda r: ",".join(_dep_name(d) for d in r.deps), True),
    "devnos_used": ("DevNosUsed", 16, False,
                    lambda r: ",".join(_devno(d.major, d.minor) if d.major is not None else d.ref
                                       for d in r.deps), True),
    "blkdevs_used": ("BlkDevNamesUsed", 16, False, lambda r: ",".join(d.kname for d in r.deps), True),
    "device_ref_count": ("#Refs", 5, True, lambda r: len(r.users), True),
    "names_using_dev": ("RefNames", 8, False, lambda r: ",".join(unmangle(u.name) for u in r.users), True),
    "devnos_using_dev": ("RefDevNos", 9, False,
                         lambda r: ",".join(_devno(u.major, u.minor) for u in r.users), True),
    "subsystem": ("Subsys", 6, False, lambda r: _split_name(r)[0], False),
    "vg_name": ("VG", 4, False, lambda r: _split_name(r)[1], False),
    "lv_name": ("LV", 4, False, lambda r: _split_name(r)[2], False),
    "lv_layer": ("LVLayer", 7, False, lambda r: _split_name(r)[3], False),
}
DEFAULT_FIELDS = "name,major,minor,attr,open,segments,events,uuid"

#: the field help dmsetup 1.02.185 prints for ``-o help`` or an unknown field: its sections
#: and their fields (the statistics ones belong to ``dmstats`` reports, listed only)
FIELD_HELP_SECTIONS = [
    ("Mapped Device Name", "name", ["name", "mangled_name", "unmangled_name", "uuid", "mangled_uuid",
                                    "unmangled_uuid", "read_ahead"]),
    ("Mapped Device Information", "info", ["blkdevname", "attr", "tables_loaded", "suspended", "readonly",
                                           "devno", "major", "minor", "open", "segments", "events"]),
    ("Mapped Device Relationship Information", "deps", ["device_count", "devs_used", "devnos_used",
                                                        "blkdevs_used", "device_ref_count", "names_using_dev",
                                                        "devnos_using_dev"]),
    ("Mapped Device Name Components", "splitname", ["subsystem", "vg_name", "lv_name", "lv_layer"]),
    ("Mapped Device Statistics", "stats", []),
    ("Mapped Device Statistics Region Information", "region", []),
]
FIELD_DESCRIPTIONS = {
    "name": "Name of mapped device.",
    "mangled_name": "Mangled name of mapped device.",
    "unmangled_name": "Unmangled name of mapped device.",
    "uuid": "Unique (optional) identifier for mapped device.",
    "mangled_uuid": "Mangled unique (optional) identifier for mapped device.",
    "unmangled_uuid": "Unmangled unique (optional) identifier for mapped device.",
    "read_ahead": "Read ahead value.",
    "blkdevname": "Name of block device.",
    "attr": "(L)ive, (I)nactive, (s)uspended, (r)ead-only, read-(w)rite.",
    "tables_loaded": "Which of the live and inactive table slots are filled.",
    "suspended": "Whether the device is suspended.",
    "readonly": "Whether the device is read-only or writeable.",
    "devno": "Device major and minor numbers",
    "major": "Block device major number.",
    "minor": "Block device minor number.",
    "open": "Number of references to open device, if requested.",
    "segments": "Number of segments in live table, if present.",
    "events": "Number of most recent event.",
    "device_count": "Number of devices used by this one.",
    "devs_used": "List of names of mapped devices used by this one.",
    "devnos_used": "List of device numbers of devices used by this one.",
    "blkdevs_used": "List of names of block devices used by this one.",
    "device_ref_count": "Number of mapped devices referencing this one.",
    "names_using_dev": "List of names of mapped devices using this one.",
    "devnos_using_dev": "List of device numbers of mapped devices using this one.",
    "subsystem": "Userspace subsystem responsible for this device.",
    "vg_name": "LVM Volume Group name.",
    "lv_name": "LVM Logical Volume name.",
    "lv_layer": "LVM device layer.",
}
STATS_FIELD_HELP = [
    ("stats", [
        ("read_count", "Count of reads completed."),
        ("reads_merged_count", "Count of read requests merged."),
        ("read_sector_count", "Count of sectors read."),
        ("read_time", "Accumulated duration of all read requests (ns)."),
        ("write_count", "Count of writes completed."),
        ("writes_merged_count", "Count of write requests merged."),
        ("write_sector_count", "Count of sectors written."),
        ("write_time", "Accumulated duration of all writes (ns)."),
        ("in_progress_count", "Count of requests currently in progress."),
        ("io_ticks", "Nanoseconds spent servicing requests."),
        ("queue_ticks", "Total nanoseconds spent in queue."),
        ("read_ticks", "Nanoseconds spent servicing reads."),
        ("write_ticks", "Nanoseconds spent servicing writes."),
        ("reads_merged_per_sec", "Read requests merged per second."),
        ("writes_merged_per_sec", "Write requests merged per second."),
        ("reads_per_sec", "Reads per second."),
        ("writes_per_sec", "Writes per second."),
        ("read_size_per_sec", "Size of data read per second."),
        ("write_size_per_sec", "Size of data written per second."),
        ("avg_request_size", "Average request size."),
        ("queue_size", "Average queue size."),
        ("await", "Averate wait time."),
        ("read_await", "Averate read wait time."),
        ("write_await", "Averate write wait time."),
        ("throughput", "Throughput."),
        ("service_time", "Service time."),
        ("util", "Utilization."),
        ("hist_count", "Latency histogram counts."),
        ("hist_count_bounds", "Latency histogram counts with bin boundaries."),
        ("hist_count_ranges", "Latency histogram counts with bin ranges."),
        ("hist_percent", "Relative latency histogram."),
        ("hist_percent_bounds", "Relative latency histogram with bin boundaries."),
        ("hist_percent_ranges", "Relative latency histogram with bin ranges."),
        ("interval_ns", "Sampling interval in nanoseconds."),
        ("interval", "Sampling interval."),
    ]),
    ("region", [
        ("region_id", "Region ID."),
        ("region_start", "Region start."),
        ("region_len", "Region length."),
        ("area_id", "Area ID."),
        ("area_start", "Area offset from start of device."),
        ("area_len", "Area length."),
        ("area_offset", "Area offset from start of region."),
        ("area_count", "Area count."),
        ("group_id", "Group ID."),
        ("program_id", "Program ID."),
        ("user_data", "Auxiliary data."),
        ("precise", "Set if nanosecond precision counters are enabled."),
        ("hist_bins", "The number of histogram bins configured."),
        ("hist_bounds", "Latency histogram bin boundaries."),
        ("hist_ranges", "Latency histogram bin ranges."),
        ("stats_name", "Stats name of current object."),
        ("obj_type", "Type of stats object being reported."),
    ]),
]


def field_help() -> str:
    """libdm's report field help: each section, its ``<type>_all`` entry and fields, ids
    padded to the longest id of all."""
    stats = dict(STATS_FIELD_HELP)
    sections = []
    for title, prefix, names in FIELD_HELP_SECTIONS:
        entries = [(prefix + "_all", "All fields in this section.")]
        entries += [(n, FIELD_DESCRIPTIONS[n]) for n in names] if names else stats[prefix]
        sections.append((title, entries))
    sections.append(("Special", [("selected", "Set if item passes selection criteria."),
                                 ("help", "Show help."), ("?", "Show help.")]))
    width = max(len(n) for _, entries in sections for n, _ in entries)
    out = []
    for title, entries in sections:
        heading = title + " Fields"
        out += [heading, "-" * len(heading)]
        out += ["  %-*s - %s" % (width, n, d) for n, d in entries]
        out.append(" ")
    return "".join(line + "\n" for line in out)


class FieldHelp(Exception):
    """``-o help`` or an unknown field: the field help is printed; ``unknown`` is the field
    dmsetup did not recognise (exit 1), or None for a request for help (exit 0)."""

    def __init__(self, unknown: str | None):
        super().__init__(unknown)
        self.unknown = unknown


#: ``<type>_all``: the fields of that report type (the tree-based relationship fields,
#: listed in the same help section, are another type: deps_all leaves them out)
_ALL_FIELDS = {
    "nameall": ["name", "mangled_name", "unmangled_name", "uuid", "mangled_uuid", "unmangled_uuid",
                "read_ahead"],
    "infoall": ["blkdevname", "attr", "tables_loaded", "suspended", "readonly", "devno", "major", "minor",
                "open", "segments", "events"],
    "depsall": ["device_count", "devnos_used", "blkdevs_used"],
    "splitnameall": ["subsystem", "vg_name", "lv_name", "lv_layer"],
}


def _find_field(word: str) -> list[str]:
    """A field id as libdm matches it: case and ``_`` ignored; ``<section>_all``."""
    key = word.replace("_", "").lower()
    if key in _ALL_FIELDS:
        return list(_ALL_FIELDS[key])
    for name in FIELDS:
        if name.replace("_", "") == key:
            return [name]
    raise FieldHelp(None if key in ("help", "?") else word)


def _field_list(options: str | None) -> list[str]:
    if not options:
        return DEFAULT_FIELDS.split(",")
    if options.startswith("+"):
        options = DEFAULT_FIELDS + "," + options[1:]
    names: list[str] = []
    for word in options.split(","):
        if word.strip():
            names += _find_field(word.strip())
    return names


def _sort_keys(sort: str | None) -> list[tuple[str, bool]]:
    """``-O``/``--sort``: fields, each optionally ``+`` (ascending) or ``-`` (descending)."""
    keys = []
    for word in (sort or "").split(","):
        word = word.strip()
        if not word:
            continue
        descending = word.startswith("-")
        if word[0] in "+-":
            word = word[1:]
        for name in _find_field(word):
            keys.append((name, descending))
    return keys


def _sorted_rows(rows: list, keys: list[tuple[str, bool]]) -> list:
    for name, descending in reversed(keys):        # stable sorts, last key first
        getter = FIELDS[name][3]
        rows = sorted(rows, key=getter, reverse=descending)
    return rows


def needs_relations(options: str | None, sort: str | None = None) -> bool:
    """Whether the fields asked for need each device's deps and users."""
    names = _field_list(options) + [n for n, _ in _sort_keys(sort)]
    return any(FIELDS[n][4] for n in names)


def format_columns(infos, options: str | None = None, noheadings: bool = False,
                   separator: str | None = None, sort: str | None = None) -> str:
    """``dmsetup info -c``: aligned columns, or ``:``-separated without headings.  ``infos``
    are :class:`Row` s or plain infos."""
    names = _field_list(options)
    keys = _sort_keys(sort)
    rows = [i if isinstance(i, Row) else Row(i) for i in infos]
    rows = _sorted_rows(rows, keys)
    values = [[FIELDS[n][3](r) for n in names] for r in rows]
    if noheadings or separator is not None:
        sep = ":" if separator is None else separator
        lines = [] if noheadings else [sep.join(FIELDS[n][0] for n in names)]
        lines += [sep.join(str(v) for v in row) for row in values]
        return "".join(line + "\n" for line in lines)
    widths = []
    for k, n in enumerate(names):
        heading, minw = FIELDS[n][0], FIELDS[n][1]
        widths.append(max([minw, len(heading)] + [len(str(r[k])) for r in values]))
    out = [" ".join(FIELDS[n][0].ljust(w) for n, w in zip(names, widths, strict=True))]
    for row in values:
        cells = []
        for n, w, v in zip(names, widths, row, strict=True):
            cells.append(str(v).rjust(w) if FIELDS[n][2] else str(v).ljust(w))
        out.append(" ".join(cells))
    return "".join(line + "\n" for line in out)


# -- ls --tree: libdm's dependency tree and dmsetup's drawing of it ---------------------------
class _TreeNode:
    __slots__ = ("key", "name", "uuid", "info", "kname", "dm", "uses", "used_by")

    def __init__(self, key, name="", uuid="", info=None, kname="", dm=False):
        self.key = key
        self.name = name
        self.uuid = uuid
        self.info = info
        self.kname = kname
        self.dm = dm
        self.uses: list[_TreeNode] = []
        self.used_by: list[_TreeNode] = []


class DepTree:
    """``struct dm_tree`` as ``dm_tree_add_dev`` builds it: nodes linked both ways, the
    root's ``uses`` holding the top-level devices and its ``used_by`` the bottom-level
    ones (libdm-deptree.c's rules, followed exactly: the drawing depends on them)."""

    def __init__(self):
        self.root = _TreeNode((0, 0))
        self.nodes: dict[tuple[int, int], _TreeNode] = {}

    @staticmethod
    def _link(parent: _TreeNode, child: _TreeNode) -> None:
        if child not in parent.uses:
            parent.uses.append(child)
            child.used_by.append(parent)

    @staticmethod
    def _unlink(parent: _TreeNode, child: _TreeNode) -> None:
        if child in parent.uses:
            parent.uses.remove(child)
            child.used_by.remove(parent)

    def num_children(self, node: _TreeNode, inverted: bool) -> int:
        if inverted:
            return 0 if node in self.root.uses else len(node.used_by)
        return 0 if self.root in node.uses else len(node.uses)

    def _link_tree_nodes(self, parent: _TreeNode, child: _TreeNode) -> None:
        if parent is self.root:
            if self.num_children(child, True):
                return
        else:
            self._unlink(self.root, child)
        if child is self.root:
            if self.num_children(parent, False):
                return
        else:
            self._unlink(parent, self.root)
        self._link(parent, child)

    def add(self, key, lookup, parent: _TreeNode | None = None) -> None:
        """``_add_dev``; ``lookup(key)`` gives (name, uuid, info, kname, is_dm, dep keys)."""
        parent = parent or self.root
        node = self.nodes.get(key)
        new = node is None
        if node is None:
            name, uuid, info, kname, is_dm, deps = lookup(key)
            node = self.nodes[key] = _TreeNode(key, name, uuid, info, kname, is_dm)
        else:
            deps = []
        self._link_tree_nodes(parent, node)
        if not new:
            return
        if not node.dm or not deps:
            self._link(node, self.root)            # _add_to_bottomlevel
            return
        for dep in deps:
            self.add(dep, lookup, node)


class TreeOptions:
    """``ls --tree -o``: what each node shows and how the tree is drawn."""

    WORDS = ("device", "blkdevname", "nodevice", "status", "table", "active", "open", "uuid", "rw",
             "utf", "vt100", "ascii", "inverted", "compact", "notrunc")

    def __init__(self, options: str | None, utf: bool = False):
        self.device, self.blkdevname, self.truncate = True, False, True
        self.active = self.rw = self.opencount = self.uuid = False
        self.status = self.table = False
        self.inverted = self.compact = False
        self.symbols = _TREE_UTF if utf else _TREE_ASCII
        if not options:
            return
        rest = options
        while rest:
            word, comma, after = rest.partition(",")
            # dmsetup compares with strncmp(s, option, len): a prefix of an option matches
            match = next((w for w in self.WORDS if w.startswith(word)), None) if word else "device"
            if match is None:
                raise _bad_usage("Tree options not recognised: %s." % rest)
            if match == "nodevice":
                self.device = False
            elif match == "utf":
                self.symbols = _TREE_UTF
            elif match == "vt100":
                self.symbols = _TREE_VT100
            elif match == "ascii":
                self.symbols = _TREE_ASCII
            elif match == "notrunc":
                self.truncate = False
            elif match == "open":
                self.opencount = True
            elif match == "inverted":
                self.inverted = True
            else:
                setattr(self, match, True)
            if not comma:
                break
            rest = after

    @property
    def attributes(self) -> bool:
        return self.active or self.rw or self.opencount or self.uuid

    @property
    def print_compact(self) -> bool:
        return self.compact and not self.attributes and not (self.table or self.status)


# (empty_2, branch_2, vert_2, last_2, single_3, first_3), as dmsetup's _tsym_* sets
_TREE_ASCII = ("  ", "|-", "| ", "`-", "---", "-+-")
_TREE_UTF = ("  ", "\u251c\u2500", "\u2502 ", "\u2514\u2500", "\u2500\u2500\u2500", "\u2500\u252c\u2500")
_TREE_VT100 = ("  ", "\x1b(0\x0ftq\x1b(B", "\x1b(0\x0fx\x1b(B ", "\x1b(0\x0fmq\x1b(B",
               "\x1b(0\x0fqqq\x1b(B", "\x1b(0\x0fqwq\x1b(B")


class TreeDrawer:
    """dmsetup's pstree-style output: a column counter, truncation at the terminal width
    (80 when stdout is no terminal), ``_tree_width``/``_tree_more`` per depth."""

    MAX_DEPTH = 100

    def __init__(self, tree: DepTree, opts: TreeOptions, termwidth: int = 80):
        self.tree = tree
        self.o = opts
        self.width = [0] * self.MAX_DEPTH
        self.more = [0] * self.MAX_DEPTH
        self.termwidth = termwidth
        self.cur_x = 1
        self.last_char = ""
        self.out: list[str] = []

    def _char(self, c: str) -> None:
        self.cur_x += 1
        if not self.o.truncate:
            self.out.append(c)
            return
        if self.cur_x <= self.termwidth:
            self.out.append(c)
        if self.cur_x == self.termwidth + 1:
            if self.last_char or ord(c) >= 0x80:
                self.out.append("...")
            else:
                self.last_char = c
                self.cur_x -= 1

    def _string(self, text: str) -> None:
        for c in text:
            self._char(c)

    def _newline(self) -> None:
        if self.last_char and self.cur_x == self.termwidth:
            self.out.append(self.last_char)
        self.last_char = ""
        self.out.append("\n")
        self.cur_x = 1

    def _prefix(self, depth: int) -> None:
        sym = self.o.symbols
        for d in range(depth):
            self._string(" " * (self.width[d] + 1))
            if d == depth - 1:
                self._string(sym[1] if self.more[depth] else sym[3])
            else:
                self._string(sym[2] if self.more[d + 1] else sym[0])

    def _node(self, node: _TreeNode, depth: int, last_child: bool, has_children: bool) -> None:
        if depth + 2 > self.MAX_DEPTH:
            return
        name = unmangle(node.name) if node.name else ""
        if not name and not self.o.device and not self.o.blkdevname:
            return
        self.more[depth] = 0 if last_child else 1
        self.width[depth] = 0
        first_on_line = self.cur_x == 1
        compact = self.o.print_compact
        if not compact or first_on_line:
            self._prefix(depth)
        offset = self.cur_x
        if compact and not first_on_line:
            self._string(self.o.symbols[5] if self.more[depth] else self.o.symbols[4])
        self._string(name)
        major, minor = node.key
        if self.o.blkdevname and node.kname:
            self._string(" <" if node.name is not None else "<")
            self._string(node.kname)
            self._char(">")
        if self.o.device:
            self._string(" (" if node.name is not None else "(")
            self._string("%d:%d" % (major, minor))
            self._char(")")
        if self.o.attributes and node.info is not None:
            info = node.info
            parts = []
            if self.o.active:
                parts.append("SUSPENDED" if info.suspended else "ACTIVE")
            if self.o.rw:
                parts.append("RO" if info.read_only else "RW")
            if self.o.opencount:
                parts.append(str(info.open_count))
            if self.o.uuid:
                parts.append(unmangle(info.uuid) if info.uuid else "")
            self._string(" [" + ", ".join(parts) + "]")
        if compact:
            self.width[depth] = self.cur_x - offset
        if not compact or not has_children:
            self._newline()

    def walk(self, node: _TreeNode | None = None, depth: int = 0) -> None:
        node = node or self.tree.root
        inv = self.o.inverted
        children = node.used_by if inv else node.uses
        for k, child in enumerate(list(children)):
            has_children = bool(self.tree.num_children(child, inv))
            self._node(child, depth, k == len(children) - 1, has_children)
            if has_children:
                self.walk(child, depth + 1)

    def text(self) -> str:
        self.walk()
        return "".join(self.out)


def _cwd() -> str | None:
    """Our working directory, sent with a table: relative device paths in it are ours,
    not the daemon's."""
    try:
        return os.getcwd()
    except OSError:
        return None


def _dep_text(dep, how: str | None) -> str:
    """One ``deps`` entry: ``(major, minor)``, or with ``-o devname`` the dm name (an
    image file: its path, which is what its number stands for), ``-o blkdevname`` the
    kernel name (an image: its file name)."""
    if how == "devname":
        return "(%s)" % (getattr(dep, "path", None) or unmangle(dep.name))
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

    # devices: by name, or (one device) by -u UUID or -j MAJOR -m MINOR -------------------
    async def _select(self, name: str | None) -> "Selected":
        """``_set_task_device``: the device an ioctl is for; "No device specified." when
        there is neither a name nor ``-u`` / ``-j -m``."""
        if name is not None:
            return Selected(await self._kname(name), name)
        if self.a.uuid is not None:
            kuuid = self._kuuid(self.a.uuid)
            for n in await self.ctl.names():
                if (await self.ctl.info(n)).uuid == kuuid:
                    return Selected(n, "", kuuid)
            return Selected(None, "", kuuid)
        if self.a.major is not None and self.a.minor is not None:
            devno = (_atoi(self.a.major), _atoi(self.a.minor))
            for n in await self.ctl.names():
                info = await self.ctl.info(n)
                if (info.major, info.minor) == devno:
                    return Selected(n, "", "", devno)
            return Selected(None, "", "", devno)
        self._fail("No device specified.")
        raise AssertionError("unreachable")

    @property
    def _by_id(self) -> bool:
        return self.a.uuid is not None or self.a.major is not None

    async def _on(self, op: str, sel: "Selected", call):
        """Run ``call(kname)`` as ioctl ``op`` on ``sel``, its failure printed as libdm does."""
        try:
            if sel.kname is None:
                raise DMError(errno.ENXIO)
            return await call(sel.kname)
        except DMError as e:
            self.o.error(ioctl_error(op, sel.shown, e, sel.uuid, sel.devno))
            raise CommandFailed() from None

    def _each(self, args) -> list:
        """The devices of a repeatable command: each name, or one selected by ``-u``/``-j``."""
        return list(args) if args else [None]

    # create ------------------------------------------------------------------------------
    async def create(self, args):
        if not args:
            self._fail("Please provide a name for the new device.")
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
        if self.a.notable:
            self._fail("--notable only available when creating new device.")
        name = None
        if not self._by_id:
            if not args:
                self._fail("Please specify device.")
            name, args = args[0], args[1:]
        elif len(args) > 1:
            self._fail("Too many command line arguments.")
        sel = await self._select(name)
        lines = self._parse_or_fail(args[0] if args else None)
        await self._on("reload", sel, lambda k: self.ctl.load(k, lines, self.a.readonly, cwd=_cwd()))

    reload = load

    async def _ioctl(self, op: str, name: str, coro):
        try:
            return await coro
        except DMError as e:
            self.o.error(ioctl_error(op, name, e))
            raise CommandFailed() from None

    # suspend / resume / clear / remove / rename -------------------------------------------
    async def _simple(self, op: str, args, call, display: bool = True):
        """dmsetup's ``_simple`` for each device in turn; the first failure ends the command."""
        for name in self._each(args):
            sel = await self._select(name)
            await self._on(op, sel, call)
            if display and self.a.verbose:
                info = await self._on("info", sel, lambda k: self.ctl.info(k))
                self.o.out.write(format_info(info) + "\n")

    async def suspend(self, args):
        await self._simple("suspend", args, lambda k: self.ctl.suspend(k, self.a.noflush))

    async def resume(self, args):
        await self._simple("resume", args, lambda k: self.ctl.resume(k, self.a.noflush))

    async def clear(self, args):
        await self._simple("clear", args, lambda k: self.ctl.clear(k))

    async def remove(self, args):
        # dmsetup stops at the first device that fails (oracle: 'remove nosuch t'
        # leaves t in place)
        async def call(kname):
            if self.a.force:
                await self._force_error_table(kname)
            return await self._remove_retry(kname)
        await self._simple("remove", args, call, display=False)

    async def wipe_table(self, args):
        async def call(kname):
            info = await self.ctl.info(kname)
            lines = await self.ctl.table_lines(kname, "table")
            size = lines[-1].start + lines[-1].length if lines else 0
            await self.ctl.load(kname, [TableLine(0, size, "error", "")] if size else [])
            if info.live_table:
                await self.ctl.resume(kname, self.a.noflush)
        await self._simple("reload", args, call)

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
        name = args[0] if len(args) == 2 else None
        sel = await self._select(name)
        if self.a.setuuid:
            new_uuid = self._knewuuid(args[-1])
            await self._on("rename", sel, lambda k: self.ctl.rename(k, None, new_uuid))
            return
        new_name = self._knewname(args[-1])
        await self._on("rename", sel, lambda k: self.ctl.rename(k, new_name, None))

    async def setgeometry(self, args):
        if self._by_id:
            sel, geometry = await self._select(None), args[0:4]
        else:
            sel, geometry = await self._select(args[0]), args[1:5]
        text = " ".join(geometry)
        await self._on("setgeometry", sel, lambda k: self.ctl.set_geometry(k, text))

    # message / wait ---------------------------------------------------------------------------
    async def message(self, args):
        if self._by_id:
            sel = await self._select(None)
        else:
            sel, args = await self._select(args[0]), args[1:]
        sector = args[0] if args else ""
        if not (sector.isascii() and sector.isdigit()):
            self._fail("Invalid sector.")
        text = " ".join(args[1:])
        if not args[1:]:
            self.o.error("No message supplied.")
        reply = await self._on("message", sel, lambda k: self.ctl.message(k, int(sector), text))
        if reply:
            self.o.out.write(reply if reply.endswith("\n") else reply + "\n")

    async def wait(self, args):
        name = None
        if not self._by_id:
            if not args:
                self._fail("No device specified.")
            name, args = args[0], args[1:]
        event_nr = _atoi(args[-1]) if args else 0
        sel = await self._select(name)
        info = await self._on("waitevent", sel, lambda k: self.ctl.wait(k, event_nr))
        if self.a.verbose:
            self.o.out.write(format_info(info) + "\n")

    # info / ls / status / table / deps -----------------------------------------------------------
    async def _devices(self, args) -> tuple[list, bool]:
        """The devices a report command goes over: every device (listed in the kernel's
        order), or those named, or the one ``-u``/``-j`` selects; and whether dmsetup
        prefixes each output line with the name."""
        if not args and not self._by_id:
            return [unmangle(n) for n in await self.ctl.names()], True
        return self._each(args), len(args) > 1

    async def info(self, args):
        names, _ = await self._devices(args)
        if not names:
            self.o.print("No devices found")
            return
        if self.a.columns:
            _field_list(self.a.options)        # an unknown field: the help, before any ioctl
            _sort_keys(self.a.sort)
        rows = []
        try:
            for name in names:
                sel = await self._select(name)
                try:
                    if sel.kname is None:
                        raise DMError(errno.ENXIO)
                    info = await self.ctl.info(sel.kname, self.a.inactive)
                except DMError as e:
                    if e.errno != errno.ENXIO:
                        self.o.error(ioctl_error("info", sel.shown, e, sel.uuid, sel.devno))
                    else:
                        self.o.error("Device does not exist.")
                    raise CommandFailed() from None
                if self.a.columns:
                    rows.append(Row(info))
                else:
                    if not getattr(info, "has_disk", True):
                        self.o.error("/dev/mapper/%s: open failed: No such file or directory" % unmangle(info.name))
                    self.o.out.write(format_info(info) + "\n")
        finally:
            if rows:
                if needs_relations(self.a.options, self.a.sort):
                    await self._relations(rows)
                self.o.out.write(format_columns(rows, self.a.options, self.a.noheadings, self.a.separator,
                                                self.a.sort))

    async def _relations(self, rows: list) -> None:
        """Each row's deps, and the dm devices whose tables use it."""
        everyone = await self.ctl.names()
        deps = {n: await self.ctl.deps(n, self.a.inactive) for n in everyone}
        infos = {n: await self.ctl.info(n) for n in everyone}
        for row in rows:
            row.deps = deps.get(row.info.name, [])
            row.users = [infos[n] for n in everyone
                         if any(d.major == row.info.major and d.minor == row.info.minor for d in deps[n])]

    async def ls(self, args):
        tree_opts = None
        if self.a.tree:
            tree_opts = TreeOptions(self.a.options, _utf_locale())
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
        if tree_opts is not None:
            await self._tree(names, tree_opts)
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

    async def _tree(self, names, opts: TreeOptions):
        """``ls --tree``: libdm's tree of every device (added in the kernel's list order)
        drawn as dmsetup draws it."""
        by_devno = {}
        for n in names:
            info = await self.ctl.info(n)
            by_devno[(info.major, info.minor)] = (n, info)
        leaves: dict = {}

        async def lookup_deps(n):
            out = []
            for d in await self.ctl.deps(n):
                key = (d.major, d.minor) if d.major is not None else (-1, len(leaves))
                leaves.setdefault(key, d.kname)
                out.append(key)
            return out

        deps = {}
        for n in names:
            deps[n] = await lookup_deps(n)

        def lookup(key):
            if key in by_devno:
                n, info = by_devno[key]
                return n, info.uuid, info, "dm-%d" % info.minor, True, deps[n]
            return "", "", None, leaves.get(key, ""), False, []

        key_of = {n: key for key, (n, _) in by_devno.items()}
        tree = DepTree()
        for n in names:
            tree.add(key_of[n], lookup)
        self.o.out.write(TreeDrawer(tree, opts, _term_width()).text())

    async def _status_or_table(self, args, kind: str, op: str):
        names, prefixed = await self._devices(args)
        if not names:
            self.o.print("No devices found")
            return
        for name in names:
            sel = await self._select(name)
            try:
                if sel.kname is None:
                    raise DMError(errno.ENXIO)
                lines = await self.ctl.table_lines(sel.kname, kind, self.a.inactive, self.a.noflush)
            except DMError as e:
                if kind == "info" and e.errno == errno.ENXIO:
                    self.o.error("Device does not exist.")
                else:
                    self.o.error(ioctl_error(op, sel.shown, e, sel.uuid, sel.devno))
                raise CommandFailed() from None
            prefix = name + ": " if prefixed else ""
            if lines is None or not lines:
                self.o.print(prefix)
                continue
            for ln in lines:
                if self.a.target and ln.type != self.a.target:
                    continue
                self.o.print(prefix + "%d %d %s %s" % (ln.start, ln.length, ln.type, ln.params))

    async def status(self, args):
        await self._status_or_table(args, "info", "status")

    async def table(self, args):
        await self._status_or_table(args, "table", "table")

    async def deps(self, args):
        names, prefixed = await self._devices(args)
        if not names:
            self.o.print("No devices found")
            return
        for name in names:
            sel = await self._select(name)
            deps = await self._on("deps", sel, lambda k: self.ctl.deps(k, self.a.inactive))
            text = "%d dependencies\t:" % len(deps)
            for d in deps:
                text += " " + _dep_text(d, self.a.options)
            self.o.print((name + ": " if prefixed else "") + text)

    async def version(self, args):
        self.o.print("Library version:   " + LIBRARY_VERSION)
        driver = await self._ioctl("version", "", self.ctl.version())
        self.o.print("Driver version:    " + driver)

    async def targets(self, args):
        for name, ver in await self.ctl.versions():
            self.o.print("%-16s v%d.%d.%d" % ((name,) + tuple(ver)))

    async def help(self, args):
        self.o.err.write(USAGE)
        if self.a.columns:
            self.o.err.write(field_help())

    async def target_version(self, args):
        versions = dict(await self.ctl.versions())
        for name in args:
            if name not in versions:
                self.o.error(ioctl_error("target-version", name, DMError(errno.EINVAL)))
                raise CommandFailed()
            self.o.print("%-16s v%d.%d.%d" % ((name,) + tuple(versions[name])))

    async def splitname(self, args):
        """A report of the name's LVM parts (``-c`` implied; default fields VG, LV, layer)."""
        subsystem = args[1] if len(args) > 1 else "LVM"
        info = SplitNameInfo(args[0], subsystem + "-" if subsystem else "")
        options = self.a.options or "vg_name,lv_name,lv_layer"
        self.o.out.write(format_columns([Row(info)], options, self.a.noheadings, self.a.separator,
                                        self.a.sort))

    async def mangle(self, args):
        """dmsetup's ``mangle`` (auto mode): names and uuids dmsim keeps are always in the
        mangled form, so each device is reported as already correct."""
        names, _ = await self._devices(args)
        if not names:
            self.o.print("No devices found")
        for name in names:
            sel = await self._select(name)
            try:
                if sel.kname is None:
                    raise DMError(errno.ENXIO)
                info = await self.ctl.info(sel.kname)
            except DMError:
                raise CommandFailed() from None
            self.o.print("%s: %s: name %salready in correct form"
                         % (info.name, info.uuid or "[no UUID]", "and UUID " if info.uuid else ""))

    async def mknodes(self, args):
        pass

    async def udevcomplete_all(self, args):
        pass


@dataclass
class SplitNameInfo:
    """What ``splitname`` reports on: a name and a uuid prefix, no device."""

    name: str
    uuid: str


@dataclass
class Selected:
    """A device one ioctl is for: its kernel name (None: no such device), and how libdm
    names it in an error (the name given, or the uuid, or ``(major:minor)``)."""

    kname: str | None
    shown: str
    uuid: str = ""
    devno: tuple | None = None


def _atoi(text: str) -> int:
    """C's ``atoi``: leading digits (after blanks and a sign), else 0."""
    m = re.match(r"\s*([+-]?\d+)", text)
    return int(m.group(1)) if m else 0


def _utf_locale() -> bool:
    """Whether dmsetup would draw trees with UTF-8 (``nl_langinfo(CODESET)``)."""
    for var in ("LC_ALL", "LC_CTYPE", "LANG"):
        value = os.environ.get(var)
        if value:
            return value.lower().replace("-", "").endswith("utf8") or ".utf8" in value.lower().replace("-", "")
    return False


def _term_width() -> int:
    """dmsetup's truncation width: the terminal's columns - 3, else 80."""
    try:
        cols = os.get_terminal_size(1).columns
    except OSError:
        return 80
    return cols - 3 if cols > 3 else 80


class _AlreadyReported(CommandFailed):
    """The per-device errors (and their ``Command failed.``) are already printed."""


# name, help, min args, max args (-1: any), method (None: dmsim does not do it)
COMMAND_TABLE: list[tuple[str, str, int, int, str | None]] = [
    ("help", "[-c|-C|--columns]", 0, 0, "help"),
    ("create", "<dev_name>\n"
     "\t    [-j|--major <major> -m|--minor <minor>]\n"
     "\t    [-U|--uid <uid>] [-G|--gid <gid>] [-M|--mode <octal_mode>]\n"
     "\t    [-u|--uuid <uuid>] [--addnodeonresume|--addnodeoncreate]\n"
     "\t    [--readahead {[+]<sectors>|auto|none}]\n"
     "\t    [-n|--notable|--table {<table>|<table_file>}]\n"
     "\tcreate --concise [<concise_device_spec_list>]", 0, 2, "create"),
    ("remove", "[--deferred] [-f|--force] [--retry] <device>...", 0, -1, "remove"),
    ("remove_all", "[-f|--force]", 0, 0, "remove_all"),
    ("suspend", "[--noflush] [--nolockfs] <device>...", 0, -1, "suspend"),
    ("resume", "[--noflush] [--nolockfs] <device>...\n"
     "\t       [--addnodeonresume|--addnodeoncreate]\n"
     "\t       [--readahead {[+]<sectors>|auto|none}]", 0, -1, "resume"),
    ("load", "<device> [<table>|<table_file>]", 0, 2, "load"),
    ("clear", "<device>", 0, -1, "clear"),
    ("reload", "<device> [<table>|<table_file>]", 0, 2, "load"),
    ("wipe_table", "[-f|--force] [--noflush] [--nolockfs] <device>...", 0, -1, "wipe_table"),
    ("rename", "<device> [--setuuid] <new_name_or_uuid>", 1, 2, "rename"),
    ("measure", "[<device>...]", 0, -1, None),
    ("message", "<device> <sector> <message>", 2, -1, "message"),
    ("ls", "[--target <target_type>] [--exec <command>] [-o <options>] [--tree]", 0, 0, "ls"),
    ("info", "[<device>...]", 0, -1, "info"),
    ("deps", "[-o <options>] [<device>...]", 0, -1, "deps"),
    ("stats", "<command> [<options>] [<device>...]", 1, -1, None),
    ("status", "[<device>...] [--noflush] [--target <target_type>]", 0, -1, "status"),
    ("table", "[<device>...] [--concise] [--target <target_type>] [--showkeys]", 0, -1, "table"),
    ("wait", "<device> [<event_nr>] [--noflush]", 0, 2, "wait"),
    ("mknodes", "[<device>...]", 0, -1, "mknodes"),
    ("mangle", "[<device>...]", 0, -1, "mangle"),
    ("udevcreatecookie", "", 0, 0, None),
    ("udevreleasecookie", "[<cookie>]", 0, 1, None),
    ("udevflags", "<cookie>", 1, 1, None),
    ("udevcomplete", "<cookie>", 1, 1, None),
    ("udevcomplete_all", "[<age_in_minutes>]", 0, 1, "udevcomplete_all"),
    ("udevcookies", "", 0, 0, None),
    ("target-version", "[<target>...]", 1, -1, "target_version"),
    ("targets", "", 0, 0, "targets"),
    ("version", "", 0, 0, "version"),
    ("setgeometry", "<device> <cyl> <head> <sect> <start>", 5, 5, "setgeometry"),
    ("splitname", "<device> [<subsystem>]", 1, 2, "splitname"),
]
COMMANDS = {name: method for name, _, _, _, method in COMMAND_TABLE if method}

USAGE = ("Usage:\n\n"
         "dmsetup\n"
         "        [--version] [-h|--help [-c|-C|--columns]]\n"
         "        [-v|--verbose [-v|--verbose ...]] [-f|--force]\n"
         "        [--checks] [--manglename {none|hex|auto}]\n"
         "        [-r|--readonly] [--noopencount] [--noflush] [--nolockfs] [--inactive]\n"
         "        [--udevcookie <cookie>] [--noudevrules] [--noudevsync] [--verifyudev]\n"
         "        [-y|--yes] [--readahead {[+]<sectors>|auto|none}] [--retry]\n"
         "        [-c|-C|--columns] [-o <fields>] [-O|--sort <sort_fields>]\n"
         "        [-S|--select <selection>] [--nameprefixes] [--noheadings]\n"
         "        [--separator <separator>]\n\n"
         + "".join("\t%s %s\n" % (name, text) for name, text, _, _, _ in COMMAND_TABLE)
         + "\n<device> may be device name or (if only one) -u <uuid> or -j <major> -m <minor>\n"
         "<mangling_mode> is one of 'none', 'auto' and 'hex'.\n"
         "<fields> are comma-separated.  Use 'help -c' for list.\n"
         "<concise_device_specification> has single-device entries separated by semi-colons:\n"
         "    <name>,<uuid>,<minor>,<flags>,<table>\n"
         "        where <flags> is 'ro' or 'rw' (the default) and any of <uuid>, <minor>\n"
         "        and <flags> may be empty. Separate extra table lines with commas.\n"
         "    E.g.: dev1,,,,0 100 linear 253:1 0,100 100 error;dev2,,,ro,0 1 error\n"
         "Table_file contents may be supplied on stdin.\n"
         "Options are: devno, devname, blkdevname.\n"
         "Tree specific options are: ascii, utf, vt100; compact, inverted, notrunc;\n"
         "                           blkdevname, [no]device, active, open, rw and uuid.\n\n")

#: stdout's buffer when it is no terminal (glibc: st_blksize); stderr is unbuffered
STDOUT_BUFFER_BYTES = 4096


async def run(ctl, argv: list[str], stdin: str | None = None) -> tuple[str, str, int]:
    """Run one dmsetup command line against ``ctl``; return (stdout, stderr, exit status)."""
    chunks, rc = await run_chunks(ctl, argv, stdin)
    return ("".join(t for f, t in chunks if f == 1), "".join(t for f, t in chunks if f == 2), rc)


def _command_for(a: Args) -> tuple[str, str | None]:
    """(dmsetup's command name, our method) for a parsed command line; raises the usage
    error dmsetup prints for a missing or unknown command or a wrong argument count."""
    if a.help:
        return "help", "help"
    if a.version:
        return "version", "version"
    if not a.command:
        raise UsageError(USAGE)
    entry = next((c for c in COMMAND_TABLE if c[0] == a.command), None)
    if entry is None:
        raise UsageError("Unknown command.\n" + USAGE)
    name, _, lo, hi, method = entry
    if len(a.args) < lo or (hi >= 0 and len(a.args) > hi):
        raise UsageError("Incorrect number of arguments.\n" + USAGE)
    if a.notable and a.table is not None:
        raise _bad_usage("--table and --notable are incompatible.")
    return name, method


async def run_chunks(ctl, argv: list[str], stdin: str | None = None,
                     stdout_tty: bool | None = None) -> tuple[list[tuple[int, str]], int]:
    """Like :func:`run`, but the output as ``(fd, text)`` pieces in the order a terminal
    or a file would get them: stdout that is no terminal (``stdout_tty``, default: whether
    fd 1 is one) is block-buffered as dmsetup's stdio is, so its text comes after the
    errors printed meanwhile, as in a recorded ``2>&1``."""
    o = _Out()
    rc = 1
    try:
        a = parse_args(list(argv))
        name, method = _command_for(a)
        if method is None:
            o.error("dmsim: dmsetup %s is not supported." % name)
            raise _AlreadyReported()
        await getattr(Dmsetup(ctl, a, stdin, o), method)(a.args)
        rc = 0
    except UsageError as e:
        text = str(e)
        o.err.write(text if text.endswith("\n") else text + "\n")
    except FieldHelp as e:
        o.err.write(field_help())
        if e.unknown is not None:
            o.error("Unrecognised field: %s" % e.unknown)
        else:
            rc = 0
    except _AlreadyReported:
        pass
    except CommandFailed:
        o.error("Command failed.")
    if stdout_tty is None:
        stdout_tty = os.isatty(1)
    return (o.chunks if stdout_tty else _block_buffered(o.chunks)), rc


def _block_buffered(chunks: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """stdout held back in a :data:`STDOUT_BUFFER_BYTES` buffer, written when full and at
    exit; stderr passes at once."""
    out: list[tuple[int, str]] = []
    pending = ""
    for fd, text in chunks:
        if fd == 2:
            out.append((fd, text))
            continue
        pending += text
        while len(pending.encode("utf-8", "surrogateescape")) >= STDOUT_BUFFER_BYTES:
            raw = pending.encode("utf-8", "surrogateescape")
            head = raw[:STDOUT_BUFFER_BYTES].decode("utf-8", "surrogateescape")
            out.append((1, head))
            pending = pending[len(head):]
    if pending:
        out.append((1, pending))
    return out
