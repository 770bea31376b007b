"""insitu-daq: control and live acquisition for in situ biasing TEM experiments."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("insitu-daq")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0+unknown"
