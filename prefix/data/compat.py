"""Make `import streaming` work with a CPU-only torch.

`streaming/__init__.py` eagerly imports `streaming.vision` (torchvision), `streaming.text` and
`streaming.multimodal`. With a CPU build of torch the torchvision wheel fails to load ("operator
torchvision::nms does not exist"), so the whole package fails to import although prefix only uses
`streaming.base`. When torchvision cannot be imported, we register empty placeholder modules for
those three subpackages before the first import of streaming. Import streaming only through here.
"""

from __future__ import annotations

import importlib
import sys
import types

_OPTIONAL_SUBPACKAGES = ("streaming.vision", "streaming.text", "streaming.multimodal")


def _torchvision_loads() -> bool:
    try:
        importlib.import_module("torchvision")
        return True
    except Exception:  # RuntimeError from the operator registry, ImportError when absent
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]  # a half-imported torchvision must not linger
        return False


def import_streaming() -> types.ModuleType:
    """Return the `streaming` package, with placeholders for its vision/text parts if needed."""
    if "streaming" not in sys.modules and not _torchvision_loads():
        for name in _OPTIONAL_SUBPACKAGES:
            placeholder = types.ModuleType(name, "placeholder: unusable without a working torchvision")
            sys.modules.setdefault(name, placeholder)
    return importlib.import_module("streaming")


streaming = import_streaming()
MDSWriter = streaming.MDSWriter
StreamingDataset = streaming.StreamingDataset
StreamingDataLoader = streaming.StreamingDataLoader
