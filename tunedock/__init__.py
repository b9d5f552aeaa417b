"""TuneDock: the SDK, the CLI and the domain pieces the services share."""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

try:
    __version__ = _version("tunedock")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
