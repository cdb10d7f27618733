"""prefix: a preemption-tolerant distributed training daemon."""

from importlib import metadata

DISTRIBUTION = "prefix-train"
"""The name on the package index (`pip install prefix-train`); `prefix` there is another project."""

try:
    __version__ = metadata.version(DISTRIBUTION)
except metadata.PackageNotFoundError:  # a source checkout that was never installed
    __version__ = "0+unknown"
