"""The Python API: device-mapper in a few lines, in-process, no root, no FUSE.

Async (inside Trio)::

    async with dmsim.api.open_dm() as dm:
        await dm.create("lz", "0 8 linear /tmp/a.img 0")
        await dm.write("lz", 0, b"hello")
        print(await dm.dmsetup("status"))           # what dmsetup prints

Blocking (anywhere; a Trio loop runs in a helper thread)::

    with dmsim.api.DM() as dm:
        dm.create("lz", "0 8 zero")
        assert dm.read("lz", 0, 4096) == bytes(4096)

Every dmsetup verb is ``dm.dmsetup(verb, *args)`` returning its stdout (a non-zero exit
raises :class:`DmsetupError` carrying stderr and the exit status); structured forms are
``info``, ``status``, ``table``, ``deps`` and the :class:`~dmsim.manager.Manager` itself
(``dm.manager``).
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass

import trio

from . import dmsetup as _dmsetup
from .control import LocalControl
from .errors import DMError
from .manager import DeviceInfo, Manager, open_manager
from .table import TableLine, parse_table_text


class DmsetupError(DMError):
    """A dmsetup command that exited non-zero."""

    def __init__(self, argv, stdout: str, stderr: str, rc: int):
        super().__init__(0, stderr.strip() or "dmsetup %s failed" % " ".join(argv))
        self.argv, self.stdout, self.stderr, self.rc = list(argv), stdout, stderr, rc


@dataclass
class Result:
    stdout: str
    stderr: str
    rc: int


class AsyncDM:
    """dm verbs over one :class:`Manager`, for Trio code."""

    def __init__(self, manager: Manager):
        self.manager = manager
        self.control = LocalControl(manager)

    async def run(self, *argv: str, stdin: str | None = None) -> Result:
        """A dmsetup command line; never raises for a failing command."""
        out, err, rc = await _dmsetup.run(self.control, list(argv), stdin)
        return Result(out, err, rc)

    async def dmsetup(self, *argv: str, stdin: str | None = None) -> str:
        """A dmsetup command line; its stdout, or :class:`DmsetupError`."""
        r = await self.run(*argv, stdin=stdin)
        if r.rc:
            raise DmsetupError(argv, r.stdout, r.stderr, r.rc)
        return r.stdout

    async def create(self, name: str, table: str | None = None, uuid: str = "",
                     read_only: bool = False) -> DeviceInfo:
        """``dmsetup create``: create, load and resume; the device is removed again if the
        table is refused (DMError with the kernel's errno; reasons in :meth:`klog`)."""
        lines = parse_table_text(table or "")
        m = self.manager
        m.create(name, uuid)
        if lines:
            try:
                await m.load(name, lines, read_only)
                await m.resume(name)
            except BaseException:
                with trio.CancelScope(shield=True):
                    await m.remove(name)
                raise
        return m.info(name)

    async def load(self, name: str, table: str, read_only: bool = False) -> None:
        await self.manager.load(name, parse_table_text(table), read_only)

    async def reload(self, name: str, table: str, noflush: bool = False) -> None:
        """Replace the live table: load, suspend, resume."""
        await self.load(name, table)
        await self.manager.suspend(name, noflush)
        await self.manager.resume(name)

    async def suspend(self, name: str, noflush: bool = False) -> None:
        await self.manager.suspend(name, noflush)

    async def resume(self, name: str) -> None:
        await self.manager.resume(name)

    async def remove(self, name: str) -> None:
        await self.manager.remove(name)

    async def message(self, name: str, sector: int, *words: str) -> str:
        return await self.manager.message(name, sector, " ".join(words))

    def info(self, name: str) -> DeviceInfo:
        return self.manager.info(name)

    def status(self, name: str) -> list[TableLine]:
        return self.manager.table_lines(name, "info") or []

    def table(self, name: str) -> list[TableLine]:
        return self.manager.table_lines(name, "table") or []

    def image_path(self, number: str | tuple[int, int]) -> str:
        """The image file a printed number (``"240:3"``) stands for (see
        :meth:`Manager.image_path`)."""
        return self.manager.image_path(number)

    def image_ref(self, path: str) -> str:
        """How tables and status print an image file a table opened: ``240:N`` (paths
        with ``image_numbers=False``; see :meth:`Manager.image_ref`)."""
        return self.manager.image_ref(path)

    def klog(self) -> list[str]:
        """The kernel-log lines since the last call."""
        return self.manager.read_log()

    def device(self, name: str):
        return self.manager.find(name)

    async def read(self, name: str, offset_bytes: int, length_bytes: int) -> bytes:
        return await self.manager.find(name).pread(offset_bytes, length_bytes)

    async def write(self, name: str, offset_bytes: int, data: bytes) -> None:
        await self.manager.find(name).pwrite(offset_bytes, data)

    async def flush(self, name: str) -> None:
        await self.manager.find(name).flush()

    async def wait(self, name: str, event_nr: int = 0) -> DeviceInfo:
        return await self.manager.wait(name, event_nr)


@contextlib.asynccontextmanager
async def open_dm(mount_dir: str | None = None, image_numbers: bool | None = None):
    """``async with open_dm() as dm``: an :class:`AsyncDM` over a fresh manager.
    ``image_numbers=False``: image files print by path, not as ``240:N`` (see
    :func:`dmsim.manager.image_numbers_default`)."""
    async with open_manager(mount_dir, image_numbers=image_numbers) as m:
        yield AsyncDM(m)


class DM:
    """The blocking API: the same methods as :class:`AsyncDM`, run on a Trio loop in a
    helper thread (for plain, non-async tests and scripts)."""

    def __init__(self, mount_dir: str | None = None, image_numbers: bool | None = None):
        self._mount_dir = mount_dir
        self._image_numbers = image_numbers
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._adm: AsyncDM | None = None
        self._stop: trio.Event | None = None
        self._error: BaseException | None = None

    def __enter__(self) -> "DM":
        ready = threading.Event()

        async def main():
            self._stop = trio.Event()
            self._token = trio.lowlevel.current_trio_token()
            async with open_dm(self._mount_dir, self._image_numbers) as adm:
                self._adm = adm
                ready.set()
                await self._stop.wait()

        def thread():
            try:
                trio.run(main)
            except BaseException as e:  # reported by __exit__
                self._error = e
            finally:
                ready.set()

        self._thread = threading.Thread(target=thread, name="dmsim-trio", daemon=True)
        self._thread.start()
        ready.wait()
        if self._adm is None:
            raise RuntimeError("dmsim loop failed to start") from self._error
        return self

    def close(self) -> None:
        if self._thread is not None:
            assert self._stop is not None
            trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
            self._thread.join()
            self._thread = None
            if self._error is not None:
                raise self._error

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def manager(self) -> Manager:
        if self._adm is None:
            raise RuntimeError("the DM is not open (use it in a with block)")
        return self._adm.manager

    def _call(self, fn, *args, **kw):
        async def call():
            return await fn(*args, **kw)

        return trio.from_thread.run(call, trio_token=self._token)

    def _call_sync(self, fn, *args):
        return trio.from_thread.run_sync(fn, *args, trio_token=self._token)

    def __getattr__(self, attr):
        adm = self.__dict__.get("_adm")
        if adm is None or attr.startswith("_"):
            raise AttributeError(attr)
        fn = getattr(adm, attr)
        if not callable(fn):
            return fn
        import inspect

        if inspect.iscoroutinefunction(fn):
            return lambda *a, **kw: self._call(fn, *a, **kw)
        return lambda *a: self._call_sync(fn, *a)
