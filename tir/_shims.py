"""Environment shims, in one place, installed first by ``tir`` (and by a ``.pth`` file that
scripts/install.sh writes, so that every Python process of the venv has them: Ray workers, and
the subprocess vLLM starts to inspect model classes, which imports torchvision without tir).

1. PyPI's torchvision is built against CUDA torch. Beside the CPU torch wheel it fails at import
   (``operator torchvision::nms does not exist``) because it registers meta kernels for two op
   schemas that its (unloadable) C++ library would have declared. Declaring those two schemas
   first lets the Python parts (transforms, models, utils) import; the C++ ops stay unavailable.
2. basicsr 1.4.2 imports ``torchvision.transforms.functional_tensor``, which newer torchvision
   renamed to ``_functional_tensor``: an alias fixes it.

Both are applied lazily by an import hook, at the first import of torchvision (so a process that
never imports it pays nothing), and both do nothing where torchvision already works (GPU
machines with matching wheels). ``TIR_NO_SHIMS=1`` turns them off, to see the bare environment.
"""

from __future__ import annotations

import glob
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_OLD_NAME = "torchvision.transforms.functional_tensor"
_NEW_NAME = "torchvision.transforms._functional_tensor"
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
    import torch

    for path in glob.glob(os.path.join(package_dir, "_C*.so")) + glob.glob(os.path.join(package_dir, "_C*.pyd")):
        try:
            torch.ops.load_library(path)
        except (OSError, RuntimeError):
            pass


def declare_torchvision_schemas(package_dir: str) -> bool:
    """Declare torchvision's op schemas when its C++ library cannot. True when applied."""
    global _library
    import torch

    if not _torchvision_ops_declared():
        _load_torchvision_cpp_ops(package_dir)
    if _torchvision_ops_declared():
        return False
    _library = torch.library.Library("torchvision", "DEF")
    for schema in _SCHEMAS:
        _library.define(schema)
    applied.append("torchvision_schemas")
    return True


class _AliasLoader(importlib.abc.Loader):
    def create_module(self, spec):
        module = importlib.import_module(_NEW_NAME)
        applied.append("functional_tensor_alias")
        return module

    def exec_module(self, module) -> None:
        pass  # already executed under its new name


class _ShimFinder(importlib.abc.MetaPathFinder):
    """Runs the torchvision fix just before torchvision is first imported, and serves the old
    ``functional_tensor`` name where torchvision no longer has it."""

    def __init__(self):
        self._torchvision_checked = False

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "torchvision" and not self._torchvision_checked:
            self._torchvision_checked = True
            spec = importlib.machinery.PathFinder.find_spec("torchvision")
            if spec is not None and spec.origin:
                declare_torchvision_schemas(os.path.dirname(spec.origin))
            return None  # the regular finders import torchvision itself
        if fullname == _OLD_NAME:
            parent = sys.modules.get("torchvision.transforms")
            old_file = parent and os.path.join(os.path.dirname(parent.__file__), "functional_tensor.py")
            if old_file and not os.path.exists(old_file):
                return importlib.util.spec_from_loader(fullname, _AliasLoader())
        return None


def install() -> bool:
    """Install the import hook once per process (cheap: nothing is imported until needed)."""
    if os.environ.get("TIR_NO_SHIMS") == "1" or any(isinstance(f, _ShimFinder) for f in sys.meta_path):
        return False
    sys.meta_path.insert(0, _ShimFinder())
    return True
