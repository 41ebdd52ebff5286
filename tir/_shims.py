"""Environment shims, in one place, imported first by ``tir``.

1. PyPI's torchvision is built against CUDA torch. Beside the CPU torch wheel it fails at import
   (``operator torchvision::nms does not exist``) because it registers meta kernels for two op
   schemas that its (unloadable) C++ library would have declared. Declaring those two schemas
   first lets the Python parts (transforms, models, utils) import; the C++ ops stay unavailable.
2. basicsr 1.4.2 imports ``torchvision.transforms.functional_tensor``, which newer torchvision
   renamed to ``_functional_tensor``: an alias in ``sys.modules`` fixes it.

Both do nothing where torchvision already works (GPU machines with matching wheels).
"""
from __future__ import annotations

import importlib
import importlib.util
import sys

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_library = None  # keeps the torch.library.Library alive: dropping it would drop the schemas
applied: list[str] = []  # which shims this process needed, for tests and bug reports


def _torchvision_ops_declared() -> bool:
    import torch

    try:
        torch._C._dispatch_find_schema_or_throw("torchvision::nms", "")
        return True
    except RuntimeError:
        return False


def _load_torchvision_cpp_ops(package_dir: str) -> None:
    """Load torchvision's C++ library as torchvision itself would; where it matches torch (GPU
    wheels, source builds) this declares the ops, where it does not it fails quietly."""
    import glob
    import os

    import torch

    for path in glob.glob(os.path.join(package_dir, "_C*.so")) + glob.glob(os.path.join(package_dir, "_C*.pyd")):
        try:
            torch.ops.load_library(path)
        except (OSError, RuntimeError):
            pass


def declare_torchvision_schemas() -> bool:
    """Declare torchvision's op schemas when its C++ library cannot provide them.

    Returns True when the shim was applied."""
    global _library
    if "torchvision" in sys.modules or importlib.util.find_spec("torchvision") is None:
        return False
    try:
        import torch
    except ImportError:
        return False
    import os

    spec = importlib.util.find_spec("torchvision")
    if not _torchvision_ops_declared():
        _load_torchvision_cpp_ops(os.path.dirname(spec.origin))
    if _torchvision_ops_declared():
        return False
    _library = torch.library.Library("torchvision", "DEF")
    for schema in _SCHEMAS.values():
        _library.define(schema)
    applied.append("torchvision_schemas")
    return True


def alias_functional_tensor() -> bool:
    """Make ``torchvision.transforms.functional_tensor`` importable for basicsr."""
    name = "torchvision.transforms.functional_tensor"
    if name in sys.modules:
        return False
    try:
        importlib.import_module(name)
        return False
    except ImportError:
        pass
    try:
        sys.modules[name] = importlib.import_module("torchvision.transforms._functional_tensor")
    except ImportError:
        return False
    applied.append("functional_tensor_alias")
    return True


def apply() -> list[str]:
    declare_torchvision_schemas()
    alias_functional_tensor()
    return list(applied)
