"""The torchvision / basicsr shims: needed here (CPU torch beside PyPI's torchvision), and inert
where torchvision's C++ ops load (GPU machines), which the second test reproduces by declaring
the ops the way torchvision's own library does before the shim runs."""
import subprocess
import sys


def run(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.strip()


def test_shims_make_torchvision_pyiqa_and_basicsr_import_on_cpu_torch():
    out = run(
        "import tir, tir._shims as s\n"
        "import torchvision, basicsr, pyiqa\n"
        "from torchvision.transforms import functional_tensor\n"
        "print(sorted(s.applied))"
    )
    assert out == "['functional_tensor_alias', 'torchvision_schemas']"


def test_torchvision_without_the_shim_is_broken_here():
    # The reason the shim exists; if this ever passes unshimmed, the shim is dead weight.
    result = subprocess.run([sys.executable, "-c", "import torchvision"], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "torchvision::nms" in result.stderr


def test_schema_shim_does_nothing_when_the_ops_already_exist():
    out = run(
        "import torch\n"
        "lib = torch.library.Library('torchvision', 'DEF')  # what a working torchvision _C does\n"
        "lib.define('nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor')\n"
        "lib.define('qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor')\n"
        "import tir, tir._shims as s\n"
        "import torchvision\n"
        "print(s.declare_torchvision_schemas(), 'torchvision_schemas' in s.applied)"
    )
    assert out == "False False"


def test_apply_is_idempotent():
    out = run("import tir, tir._shims as s\nprint(s.apply(), s.apply() == s.applied)")
    assert out.endswith("True")
