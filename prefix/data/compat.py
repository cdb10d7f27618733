"""Make `import streaming` work with a CPU-only torch.

`streaming/__init__.py` eagerly imports `streaming.vision` (torchvision), `streaming.text` and
`streaming.multimodal`. With a CPU build of torch the torchvision wheel fails to load ("operator
torchvision::nms does not exist"), so the whole package fails to import although prefix only uses
`streaming.base`. When torchvision cannot be imported, we register empty placeholder modules for
those three subpackages before the first import of streaming. Import streaming only through here.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import types
from collections.abc import Iterator

_OPTIONAL_SUBPACKAGES = ("streaming.vision", "streaming.text", "streaming.multimodal")


def _torchvision_loads() -> bool:
    try:
        importlib.import_module("torchvision")
        return True
    except Exception:  # RuntimeError from the operator registry, ImportError when absent
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]  # a half-imported torchvision must not linger
        return False


_TRANSFORMERS_CLASSES = {"transformers.feature_extraction_utils": "BatchFeature",
                         "transformers.tokenization_utils_base": "BatchEncoding"}


@contextlib.contextmanager
def _without_transformers() -> Iterator[None]:
    """`streaming.base.dataloader` imports transformers (~4 s, a third of a start) for one isinstance
    check on batch types prefix never makes. While streaming loads, stand-in classes answer it; they
    leave `sys.modules` after, so a later `import transformers` (prefix export) is the real one."""
    if "transformers" in sys.modules:
        yield
        return
    added = [name for name in _TRANSFORMERS_CLASSES if name not in sys.modules]
    for name in added:
        module = types.ModuleType(name, "stand-in while streaming imports (prefix.data.compat)")
        setattr(module, _TRANSFORMERS_CLASSES[name], type(_TRANSFORMERS_CLASSES[name], (), {}))
        sys.modules[name] = module
    try:
        yield
    finally:
        for name in added:
            sys.modules.pop(name, None)


def import_streaming() -> types.ModuleType:
    """Return the `streaming` package, with placeholders for its vision/text parts if needed."""
    if "streaming" not in sys.modules and not _torchvision_loads():
        for name in _OPTIONAL_SUBPACKAGES:
            placeholder = types.ModuleType(name, "placeholder: unusable without a working torchvision")
            sys.modules.setdefault(name, placeholder)
    with _without_transformers():
        return importlib.import_module("streaming")


streaming = import_streaming()
MDSWriter = streaming.MDSWriter
StreamingDataset = streaming.StreamingDataset
StreamingDataLoader = streaming.StreamingDataLoader
