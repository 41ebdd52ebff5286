"""Neural tools whose manifest entry names only a checkpoint: spandrel detects the architecture and
scale. Real spandrel architectures (small configs, random weights) are saved in the layouts their
releases use and loaded through the manifest, the tool and the Serve pool."""

import asyncio
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file
from spandrel.architectures.Compact import Compact
from spandrel.architectures.NAFNet import NAFNet
from spandrel.architectures.SCUNet import SCUNet
from spandrel.architectures.SwinIR import SwinIR

import tir  # noqa: F401  (shims first: spandrel imports torchvision)
from tool_pool.neural import AUTO_TILE, TILE_ABOVE, NeuralTool, load_manifest, register_manifest
from tool_pool.tools import ToolUnavailableError, get_tool, unavailable_tools

pytestmark = pytest.mark.usefixtures("forget_registered_tools")
EXAMPLE = Path(__file__).resolve().parent.parent / "tool_pool" / "manifests" / "example.yaml"

# name: (builder, detected spandrel id, scale, release layout, file suffix)
ARCHS = {
    "scunet": (lambda: SCUNet(config=[1, 0, 0, 0, 0, 0, 1], dim=64), "SCUNet", 1, "bare", ".pth"),  # KAIR
    "nafnet": (
        lambda: NAFNet(width=8, middle_blk_num=1, enc_blk_nums=[1, 1], dec_blk_nums=[1, 1]),
        "NAFNet",
        1,
        "params",
        ".pth",
    ),
    "swinir": (
        lambda: SwinIR(
            upscale=2,
            img_size=16,
            window_size=4,
            depths=[1, 1],
            embed_dim=12,
            num_heads=[2, 2],
            mlp_ratio=2,
            upsampler="pixelshuffle",
            resi_connection="1conv",
            img_range=1.0,
        ),
        "SwinIR",
        2,
        "params_ema",
        ".pth",
    ),
    "compact": (lambda: Compact(num_feat=8, num_conv=2, upscale=4), "Compact", 4, "bare", ".safetensors"),
}


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def save(path: Path, build, layout: str = "bare", seed: int = 0) -> torch.nn.Module:
    """Random weights in a release layout; returns the module whose weights were saved."""
    torch.manual_seed(seed)
    network = build().eval()
    state = {k: v.contiguous() for k, v in network.state_dict().items()}
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    elif layout == "params_ema":  # a release with both: the EMA weights must win
        torch.manual_seed(seed + 1)
        torch.save({"params": build().state_dict(), "params_ema": state}, path)
    elif layout == "params":
        torch.save({"params": state}, path)
    else:
        torch.save(state, path)
    return network


def register(tmp_path: Path, checkpoint: Path, subtask: str = "denoising", **extra) -> NeuralTool:
    """A manifest entry with only the four required fields (plus ``extra``); returns the tool."""
    name = unique("spandrel")
    item = {"name": name, "subtask": subtask, "description": "Restores (test network).", "checkpoint": str(checkpoint)}
    manifest = tmp_path / f"{name}.yaml"
    manifest.write_text(yaml.safe_dump({"tools": [item | extra]}))
    register_manifest(manifest)
    return get_tool(name)


def image(seed: int, h: int = 40, w: int = 44, c: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, c), dtype=np.uint8)


def direct(network, array: np.ndarray) -> torch.Tensor:
    """The module's own forward (float, before quantisation), N C H W."""
    with torch.no_grad():
        return network(torch.from_numpy(array).permute(2, 0, 1)[None].float() / 255)


def quantised(x: torch.Tensor) -> np.ndarray:
    return x.clamp(0, 1).mul(255).round().byte()[0].permute(1, 2, 0).numpy()


def assert_same_image(out: np.ndarray, reference: np.ndarray) -> None:
    """Equal uint8 images, but for the rare pixel a float rounding tie flips by one level."""
    assert out.shape == reference.shape and out.dtype == reference.dtype == np.uint8
    off = np.abs(out.astype(int) - reference)
    assert off.max() <= 1 and (off > 0).mean() < 1e-3


@pytest.mark.parametrize("arch", list(ARCHS))
def test_a_checkpoint_alone_is_detected_and_runs_as_its_network(tmp_path, arch):
    build, arch_id, scale, layout, suffix = ARCHS[arch]
    network = save(tmp_path / f"net{suffix}", build, layout)
    tool = register(tmp_path, Path(f"net{suffix}"))  # relative to the manifest, no arch, no scale
    assert tool.spec.arch is None and tool.spec.scale is None
    assert tool.scale == scale and tool.network.arch == arch_id  # detected from the state dict
    inputs = [image(1), image(3, 48, 40)]
    outs = tool(inputs)
    for x, out in zip(inputs, outs):
        assert out.dtype == np.uint8 and out.shape == (x.shape[0] * scale, x.shape[1] * scale, 3)
        reference = direct(network, x).clamp(0, 1)  # the saved (EMA) weights, not others
        with torch.inference_mode():  # before quantisation: the same numbers
            restored = tool._restore(torch.from_numpy(x).permute(2, 0, 1)[None].float() / 255)
        torch.testing.assert_close(restored, reference, atol=1e-4, rtol=0)
        assert_same_image(out, quantised(reference))


def test_manifest_scale_must_agree_with_the_detected_one(tmp_path):
    save(tmp_path / "x4.pth", lambda: Compact(num_feat=4, num_conv=1, upscale=4), "params")
    agreeing = register(tmp_path, tmp_path / "x4.pth", subtask="super_resolution", scale=4)
    assert agreeing([image(0)])[0].shape == (160, 176, 3)
    wrong = register(tmp_path, tmp_path / "x4.pth", subtask="super_resolution", scale=2)
    with pytest.raises(ToolUnavailableError) as caught:
        wrong([image(0)])
    message = str(caught.value)
    assert f"{tmp_path / 'x4.pth'} holds a x4 RealESRGAN Compact model, but the manifest says scale: 2" in message
    assert "\n" not in message and wrong.name in unavailable_tools()


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_a_truncated_checkpoint_is_one_line_naming_the_file(tmp_path, suffix):
    path = tmp_path / f"cut{suffix}"
    save(path, lambda: Compact(num_feat=8, num_conv=2, upscale=1), "params")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    tool = register(tmp_path, path)
    with pytest.raises(ToolUnavailableError) as caught:
        tool([image(0)])
    message = str(caught.value)
    assert (
        message.startswith(f"tool {tool.name!r}: checkpoint {path} cannot be read (truncated") and "\n" not in message
    )


@pytest.mark.parametrize(
    "content, expected",
    [
        (
            {"encoder.weight": torch.zeros(8, 3, 3, 3), "decoder.weight": torch.zeros(3, 8, 3, 3)},
            "unknown architecture",
        ),
        ([torch.zeros(3)], "holds a list, not a state dict"),
        ({"epoch": 12, "lr": 1e-4}, "is not a state dict (a mapping of parameter names to tensors): its entries are"),
    ],
    ids=["unknown", "list", "no_tensors"],
)
def test_an_unusable_checkpoint_is_one_line_naming_the_file(tmp_path, content, expected):
    torch.save(content, tmp_path / "odd.pth")
    tool = register(tmp_path, tmp_path / "odd.pth")
    with pytest.raises(ToolUnavailableError) as caught:
        tool([image(0)])
    message = str(caught.value)
    assert f"checkpoint {tmp_path / 'odd.pth'}" in message and expected in message and "\n" not in message
    assert unavailable_tools()[tool.name] == message  # reported, and the pool can list why


def test_a_gray_model_runs_on_each_colour_channel(tmp_path):
    network = save(tmp_path / "gray.pth", lambda: Compact(num_in_ch=1, num_out_ch=1, num_feat=4, num_conv=1, upscale=2))
    tool = register(tmp_path, tmp_path / "gray.pth", subtask="super_resolution")
    x = image(5)
    out = tool([x])[0]
    assert out.shape == (80, 88, 3)
    for c in range(3):
        assert_same_image(out[..., c : c + 1], quantised(direct(network, x[..., c : c + 1])))


def test_a_model_that_is_neither_rgb_nor_gray_is_refused(tmp_path):
    save(tmp_path / "rgba.pth", lambda: Compact(num_in_ch=4, num_out_ch=4, num_feat=4, num_conv=1, upscale=1))
    tool = register(tmp_path, tmp_path / "rgba.pth")
    with pytest.raises(ToolUnavailableError, match="rgba.pth holds a RealESRGAN Compact model from 4 to 4 channels"):
        tool([image(0)])


def test_tiles_equal_one_pass_when_the_context_covers_the_receptive_field(tmp_path):
    # conv_first, 2 body convs and conv_last: four 3x3 convolutions see +-4 px
    save(tmp_path / "x1.pth", lambda: Compact(num_feat=8, num_conv=2, upscale=1), "params")
    whole = register(tmp_path, tmp_path / "x1.pth")
    tiled = register(tmp_path, tmp_path / "x1.pth", tile=16, tile_pad=4)
    leaky = register(tmp_path, tmp_path / "x1.pth", tile=16, tile_pad=1)
    x = torch.from_numpy(np.stack([image(6, 45, 37), image(7, 45, 37)])).permute(0, 3, 1, 2).float() / 255
    with torch.inference_mode():
        reference = whole.load()._restore(x)
        assert whole._tile_side(45, 37) is None and tiled.load()._tile_side(45, 37) == 16
        torch.testing.assert_close(tiled._restore(x), reference, atol=1e-4, rtol=0)
        assert (leaky.load()._restore(x) - reference).abs().max() > 1e-3  # too little context shows


def test_large_images_are_tiled_automatically(tmp_path):
    network = save(tmp_path / "x1.pth", lambda: Compact(num_feat=4, num_conv=2, upscale=1))
    tool = register(tmp_path, tmp_path / "x1.pth", tile_pad=4)
    h, w = 1100, 1000  # over TILE_ABOVE pixels, no tile in the manifest
    assert h * w > TILE_ABOVE and tool.load()._tile_side(h, w) == AUTO_TILE
    assert tool._tile_side(512, 512) is None
    x = image(8, h, w)
    out = tool([x])[0]
    assert out.shape == x.shape
    assert_same_image(out, quantised(direct(network, x)))


def test_spandrel_imports_and_runs_on_this_torch_in_a_fresh_process():
    # spandrel imports torchvision, which the CPU torch wheel breaks without tir's shim (tir/_shims.py)
    code = (
        "import tir\nimport spandrel, torch\n"
        "from spandrel.architectures.Compact import Compact\n"
        "d = spandrel.ModelLoader().load_from_state_dict(Compact(num_feat=4, num_conv=1, upscale=2).state_dict())\n"
        "print(spandrel.__version__, d.architecture.id, d.scale, *d(torch.rand(1, 3, 8, 8)).shape)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["0.4.2", "Compact", "2", "1", "3", "16", "16"]  # the version constraints.txt pins


def test_the_example_manifest_has_a_spandrel_entry(monkeypatch):
    monkeypatch.setenv("TIR_WEIGHTS", "/weights")
    detected = [s for s in load_manifest(EXAMPLE) if s.arch is None]
    assert detected and all(s.scale is None or s.scale >= 1 for s in detected)
    assert any(str(s.checkpoint).startswith("/weights/") for s in detected)


def test_the_pool_serves_a_checkpoint_named_only_by_its_path(ray_cluster, tmp_path):
    from tir.agent.baselines import tools_by_subtask
    from tir.config import load_recipe
    from tool_pool.pool import make_pool
    from tool_pool.serve_app import stop_pool

    network = save(tmp_path / "sr.pth", lambda: Compact(num_feat=8, num_conv=2, upscale=4), "params")
    name = unique("sr_spandrel")
    entry = {"name": name, "subtask": "super_resolution", "description": "Upscales x4.", "checkpoint": "sr.pth"}
    manifest = tmp_path / "manifest.yaml"
    manifest.write_text(yaml.safe_dump({"tools": [entry]}))
    pool_name = unique("spandrel_pool")
    cfg = load_recipe(
        "tiny_cpu",
        [
            f"pool.name={pool_name}",
            "pool.tools=[]",
            f"pool.manifest={manifest}",
            "pool.num_replicas=1",
            "pool.num_cpus_per_replica=0.5",
            "pool.call_timeout_s=120",
        ],
    )
    pool = make_pool(cfg.pool)  # pool.backend: serve
    try:
        assert name in asyncio.run(pool.available_tools())
        # the caller knows the served tool too (its subtask, for the expert search and the baselines)
        assert name in tools_by_subtask(asyncio.run(pool.available_tools()))["super_resolution"]
        x = image(9, 32, 24)
        out = asyncio.run(pool.run(name, x))
        assert out.shape == (128, 96, 3)
        assert_same_image(out, quantised(direct(network, x)))
    finally:
        stop_pool(pool_name)
