"""dmsim: Linux device-mapper in userspace Python.

In-process use needs only trio::

    import dmsim.api

    async def main():
        async with dmsim.api.open_dm() as dm:
            await dm.dmsetup("create", "lz", "--table", "0 8 zero")

The FUSE daemon (``dmsim daemon``) needs pyfuse3; importing this package does not.
"""
from .bio import SECTOR_SIZE, Bio, Op
from .errors import DMError, TargetError
from .manager import DeviceInfo, Manager, open_manager
from .table import TableLine, parse_table_text

__all__ = ["Bio", "Op", "SECTOR_SIZE", "DMError", "TargetError", "DeviceInfo", "Manager",
           "open_manager", "TableLine", "parse_table_text"]
__version__ = "0.1.0"
