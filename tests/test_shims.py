"""The torchvision / basicsr shims: needed here (CPU torch beside PyPI's torchvision), inert where
torchvision's C++ ops load (GPU machines; reproduced by declaring the ops the way torchvision's
own library does before the shim runs), and present in every Python process of the venv."""

import os
import subprocess
import sys


def run(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env={**os.environ, **env}
    )


def ok(code: str, **env) -> str:
    result = run(code, **env)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.strip()


def test_shims_make_torchvision_pyiqa_and_basicsr_import_on_cpu_torch():
    out = ok(
        "import tir, tir._shims as s\n"
        "import torchvision, basicsr, pyiqa\n"
        "from torchvision.transforms import functional_tensor\n"
        "print(sorted(s.applied))"
    )
    assert out == "['functional_tensor_alias', 'torchvision_schemas']"


def test_without_the_shims_torchvision_is_broken_here():
    # The reason the shims exist; if this ever imports unshimmed, they are dead weight here.
    result = run("import torchvision", TIR_NO_SHIMS="1")
    assert result.returncode != 0 and "torchvision::nms" in result.stderr


def test_every_venv_process_has_them_without_importing_tir():
    # vLLM inspects model classes in a subprocess that imports torchvision but never tir.
    out = ok("import torchvision, sys\nprint('tir._shims' in sys.modules)")
    assert out == "True"


def test_schema_shim_does_nothing_when_the_ops_already_exist():
    out = ok(
        "import torch\n"
        "lib = torch.library.Library('torchvision', 'DEF')  # what a working torchvision _C does\n"
        "lib.define('nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor')\n"
        "lib.define('qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor')\n"
        "import tir, tir._shims as s\n"
        "import torchvision\n"
        "print(s.applied)"
    )
    assert out == "[]"


def test_install_is_idempotent_and_cheap():
    out = ok("import sys, tir, tir._shims as s\nprint(s.install(), 'torch' in sys.modules)")
    assert out == "False False"  # already installed by `import tir`, and nothing heavy imported
