"""Neural tools from a manifest: real basicsr architectures (tiny configs, random weights saved
to tmp_path in the layouts that releases use) loaded through the same code as real checkpoints."""

import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import tir  # noqa: F401  (shims first: basicsr imports torchvision)
from tool_pool.neural import ManifestError, NeuralTool, build_network, load_manifest, register_manifest
from tool_pool.tools import ToolUnavailableError, available_tools, get_tool, tool_schemas, unavailable_tools

pytestmark = pytest.mark.usefixtures("forget_registered_tools")
EXAMPLE = Path(__file__).resolve().parent.parent / "tool_pool" / "manifests" / "example.yaml"
TINY_SR = {
    "type": "SRVGGNetCompact",
    "num_in_ch": 3,
    "num_out_ch": 3,
    "num_feat": 8,
    "num_conv": 2,
    "upscale": 4,
    "act_type": "prelu",
}
TINY_SWINIR = {
    "type": "SwinIR",
    "upscale": 1,
    "in_chans": 3,
    "img_size": 16,
    "window_size": 4,
    "img_range": 1.0,
    "depths": [1],
    "embed_dim": 12,
    "num_heads": [2],
    "mlp_ratio": 2,
    "upsampler": "",
    "resi_connection": "1conv",
}


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def save_checkpoint(path: Path, arch: dict, layout: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    network = build_network(arch)
    state = network.state_dict()
    if layout == "params_ema":  # a release with both: the EMA weights must win
        torch.manual_seed(seed + 1)
        other = build_network(arch).state_dict()
        torch.save({"params": other, "params_ema": state}, path)
    elif layout == "params_module":  # saved from DataParallel
        torch.save({"params": {f"module.{k}": v for k, v in state.items()}}, path)
    else:
        torch.save(state, path)
    return network.eval()


def write_manifest(path: Path, entries: list[dict]) -> Path:
    path.write_text(yaml.safe_dump({"tools": entries}))
    return path


def entry(name: str, checkpoint, arch=TINY_SR, **extra) -> dict:
    return {
        "name": name,
        "subtask": "super_resolution",
        "description": "Upscales x4 (test network).",
        "arch": arch,
        "checkpoint": str(checkpoint),
        "scale": arch.get("upscale", 1),
        "device": "cpu",
        **extra,
    }


def images(seed: int = 0, size: int = 20) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [
        rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
        rng.integers(0, 256, (size - 4, size + 4, 3), dtype=np.uint8),
    ]


def reference_output(network, image: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
        return network(x).clamp(0, 1).mul(255).round().byte()[0].permute(1, 2, 0).numpy()


@pytest.mark.parametrize("layout", ["params_ema", "params_module", "bare"])
def test_checkpoint_layouts_load_and_run(tmp_path, layout):
    network = save_checkpoint(tmp_path / "net.pth", TINY_SR, layout)
    name = unique("sr_tiny")
    assert (
        register_manifest(write_manifest(tmp_path / "m.yaml", [entry(name, "net.pth")])) == {}
    )  # path relative to the manifest
    tool = get_tool(name)
    assert isinstance(tool, NeuralTool) and tool.available and name in available_tools()
    batch = images()
    outs = tool(batch)
    for image, out in zip(batch, outs):
        assert out.dtype == np.uint8 and out.shape == (image.shape[0] * 4, image.shape[1] * 4, 3)
        np.testing.assert_array_equal(out, reference_output(network, image))  # the saved (EMA) weights, not others


def test_batched_call_equals_per_image_calls(tmp_path):
    save_checkpoint(tmp_path / "net.pth", TINY_SR, "params_ema")
    name = unique("sr_tiny")
    register_manifest(write_manifest(tmp_path / "m.yaml", [entry(name, tmp_path / "net.pth")]))
    same_size = [images(1)[0], images(2)[0]]
    together = get_tool(name)(same_size)
    for image, out in zip(same_size, together):
        np.testing.assert_array_equal(out, get_tool(name)([image])[0])


def test_tiles_give_the_same_result_as_one_pass(tmp_path):
    # two 3x3 convolutions and a pixel shuffle see +-2 px: 4 px of context make tiles exact
    save_checkpoint(tmp_path / "net.pth", TINY_SR, "bare")
    whole, tiled = unique("sr_whole"), unique("sr_tiled")
    register_manifest(
        write_manifest(
            tmp_path / "m.yaml",
            [entry(whole, tmp_path / "net.pth"), entry(tiled, tmp_path / "net.pth", tile=8, tile_pad=4)],
        )
    )
    image = images(3, size=21)[0]
    np.testing.assert_array_equal(get_tool(tiled)([image])[0], get_tool(whole)([image])[0])


def test_window_padding_for_swinir(tmp_path):
    network = save_checkpoint(tmp_path / "swin.pth", TINY_SWINIR, "params_ema")
    name = unique("denoise_swin")
    spec = entry(name, tmp_path / "swin.pth", arch=TINY_SWINIR, pad_multiple=4) | {"subtask": "denoising"}
    register_manifest(write_manifest(tmp_path / "m.yaml", [spec]))
    image = images(4, size=18)[0]  # not a multiple of the window: padded, then cropped back
    out = get_tool(name)([image])[0]
    assert out.shape == image.shape and out.dtype == np.uint8
    padded = np.pad(image, ((0, 2), (0, 2), (0, 0)), mode="reflect")
    np.testing.assert_array_equal(out, reference_output(network, padded)[:18, :18])


def test_missing_checkpoint_is_reported_not_fatal(tmp_path):
    save_checkpoint(tmp_path / "net.pth", TINY_SR, "bare")
    present, missing = unique("sr_present"), unique("sr_missing")
    manifest = write_manifest(
        tmp_path / "m.yaml", [entry(present, tmp_path / "net.pth"), entry(missing, tmp_path / "nowhere" / "x4.pth")]
    )
    unavailable = register_manifest(manifest)
    assert list(unavailable) == [missing]
    assert missing in unavailable[missing] and str(tmp_path / "nowhere" / "x4.pth") in unavailable[missing]
    assert unavailable_tools()[missing] == unavailable[missing]
    assert present in available_tools() and missing not in available_tools()
    assert missing not in {s["name"] for s in tool_schemas()}
    with pytest.raises(ToolUnavailableError, match=f"{missing}.*checkpoint not found"):
        get_tool(missing)(images())
    assert get_tool(present)(images())[0].shape == (80, 80, 3)  # the other tool still works


def test_mismatched_checkpoint_gives_a_clear_error(tmp_path):
    save_checkpoint(tmp_path / "net.pth", TINY_SR, "params")
    wider, deeper = dict(TINY_SR, num_feat=16), dict(TINY_SR, num_conv=3)
    wide_name, deep_name = unique("sr_wide"), unique("sr_deep")
    register_manifest(
        write_manifest(
            tmp_path / "m.yaml",
            [entry(wide_name, tmp_path / "net.pth", arch=wider), entry(deep_name, tmp_path / "net.pth", arch=deeper)],
        )
    )
    with pytest.raises(
        ToolUnavailableError,
        match=f"{wide_name}.*cannot load .*net.pth.*does not match architecture SRVGGNetCompact.*size mismatches",
    ):
        get_tool(wide_name)(images())
    with pytest.raises(
        ToolUnavailableError, match=f"{deep_name}.*does not match architecture SRVGGNetCompact.*missing keys"
    ):
        get_tool(deep_name)(images())
    assert deep_name in unavailable_tools()  # and it stays reported


def test_unknown_architecture_is_reported(tmp_path):
    (tmp_path / "net.pth").write_bytes(b"")
    name = unique("sr_unknown")
    register_manifest(
        write_manifest(tmp_path / "m.yaml", [entry(name, tmp_path / "net.pth", arch={"type": "SwinIRR"})])
    )
    with pytest.raises(ToolUnavailableError, match="unknown basicsr architecture 'SwinIRR'; did you mean 'SwinIR'"):
        get_tool(name)(images())


def test_reading_the_same_manifest_twice_is_a_no_op(tmp_path):
    save_checkpoint(tmp_path / "net.pth", TINY_SR, "bare")
    name = unique("sr_twice")
    manifest = write_manifest(tmp_path / "m.yaml", [entry(name, tmp_path / "net.pth")])
    register_manifest(manifest)
    register_manifest(manifest)
    changed = write_manifest(tmp_path / "m2.yaml", [entry(name, tmp_path / "net.pth", tile=64)])
    with pytest.raises(ValueError, match="registered twice"):
        register_manifest(changed)


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"checkpoint": None}, "missing field"),
        ({"subtask": "denoise"}, "unknown subtask 'denoise'; did you mean 'denoising'"),
        ({"tiles": 64}, "unknown field 'tiles'; did you mean 'tile'\\?"),
        ({"scale": 0}, "'scale' must be a positive integer"),
        ({"arch": {"num_feat": 8}}, "'arch' must be a mapping with a 'type'"),
        ({"name": "Bad Name"}, "snake_case"),
    ],
)
def test_malformed_manifest_entries_are_rejected(tmp_path, bad, message):
    item = entry("sr_x", tmp_path / "net.pth")
    item.update(bad)
    item = {k: v for k, v in item.items() if v is not None}
    with pytest.raises(ManifestError, match=message):
        load_manifest(write_manifest(tmp_path / "m.yaml", [item]))


def test_the_example_manifest_parses(monkeypatch):
    monkeypatch.setenv("TIR_WEIGHTS", "/weights")
    specs = load_manifest(EXAMPLE)
    assert {s.subtask for s in specs} >= {"super_resolution", "denoising", "jpeg_artifact_removal"}
    swinir = next(s for s in specs if s.name == "sr_swinir")
    assert swinir.checkpoint == Path("/weights/001_classicalSR_DF2K_s64w8_SwinIR-M_x4.pth")
    assert swinir.scale == 4 and swinir.pad_multiple == 8 and swinir.arch["type"] == "SwinIR"
    assert (
        next(s for s in specs if s.name == "denoise_srvgg").checkpoint
        == EXAMPLE.parent / "weights" / "denoise_srvgg_x1.pth"
    )
