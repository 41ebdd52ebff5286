"""GPU smoke test: the CUDA paths the CPU test suite cannot reach, in one short run (~1 minute).

    python examples/gpu_smoke.py            # on a machine with one GPU (torch + transformers; no Ray, no vLLM)
    python examples/gpu_smoke.py --cpu      # the same checks on CPU with gloo (checks the script itself)

Checks, each timed, printed as one table (check, ok, value, seconds):

- process_group: a one-rank torch.distributed group (NCCL on GPU, gloo with --cpu) initialised
  from env vars (MASTER_ADDR/MASTER_PORT: a TCP store), an all_reduce and a broadcast;
- fsdp2_train_step: a tiny random Qwen2.5-VL (``tir.agent.tiny_policy.build_tiny_policy``) sharded with FSDP2
  (``fully_shard`` on each decoder/vision block and the root, bf16 compute, fp32 reduce, as
  ``workers/engines/fsdp2.py`` does), one AdamW step on two image+text rows, the loss before/after;
- neural_tool_batch: a neural restoration tool (``tool_pool.neural.NeuralTool``, SRVGGNetCompact x2
  with random weights) on a batch of images of two sizes, against the same tool on CPU;
- bf16_logprobs: token log-probs of the tiny policy in bfloat16 vs float32 (max and mean |diff|),
  which is what a bf16 rollout engine vs an fp32 trainer disagree by.

Exit code: 0 when every check passed (or "skipped: no CUDA" without --cpu), 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # tir/ and tool_pool/ from this checkout, installed or not

import torch
import torch.distributed as dist

# Tool schemas for the policy's prompt and tokenizer (only text: no tool runs in the policy checks).
SCHEMAS = [
    {
        "name": name,
        "description": f"restoration tool {name}",
        "parameters": {"type": "object", "properties": {}, "additionalProperties": False},
    }
    for name in ("denoise_tv", "sharpen_unsharp", "brighten_shift")
]
_POLICY: dict = {}  # built once, used by two checks


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Report:
    def __init__(self):
        self.rows: list[tuple[str, str, str, float]] = []

    def run(self, name: str, fn, *args):
        """Run one check; ``fn`` returns its value text (or raises). A failure is a row, not a crash."""
        start = time.perf_counter()
        try:
            value, ok = fn(*args), "ok"
        except SkipCheck as skip:
            value, ok = f"skipped: {skip}", "skip"
        except Exception as err:  # noqa: BLE001 - every check reports, whatever breaks
            value, ok = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}", "FAIL"
            traceback.print_exc(file=sys.stderr)
        self.rows.append((name, ok, value, time.perf_counter() - start))
        print(f"  {name}: {ok} ({time.perf_counter() - start:.1f}s)", file=sys.stderr, flush=True)

    def table(self) -> str:
        header = ("check", "ok", "value", "seconds")
        cells = [header] + [(n, ok, v, f"{s:.2f}") for n, ok, v, s in self.rows]
        widths = [max(len(str(r[i])) for r in cells) for i in range(4)]
        line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"
        return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells[1:])])

    @property
    def failed(self) -> bool:
        return any(ok == "FAIL" for _, ok, _, _ in self.rows)


class SkipCheck(Exception):
    pass


# ---------------------------------------------------------------- the checks


def check_process_group(device: torch.device) -> str:
    backend = "nccl" if device.type == "cuda" else "gloo"
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    dist.init_process_group(
        backend=backend, init_method="env://", rank=0, world_size=1, device_id=device if device.type == "cuda" else None
    )
    x = torch.arange(4, dtype=torch.float32, device=device) + 1
    dist.all_reduce(x)  # one rank: the sum is itself
    y = torch.full((3,), 7.0, device=device)
    dist.broadcast(y, src=0)
    if device.type == "cuda":
        torch.cuda.synchronize()
    if x.tolist() != [1.0, 2.0, 3.0, 4.0] or y.tolist() != [7.0] * 3:
        raise AssertionError(f"collectives gave {x.tolist()} / {y.tolist()}")
    return f"{backend} on {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}, all_reduce + broadcast"


def build_policy(folder: Path):
    if _POLICY:
        return _POLICY["path"], _POLICY["models"], _POLICY["prompts"]
    try:
        from tir.agent import (
            models,
            prompts,
        )  # tir.agent.models imports no Ray: tir (env shims), tir.agent.prompts, tir.registry
    except ImportError as err:
        raise SkipCheck(f"cannot import tir from {REPO} ({err})") from err
    path = models.build_tiny_policy(folder / "tiny_policy", SCHEMAS, seed=0)
    _POLICY.update(path=path, models=models, prompts=prompts)
    return path, models, prompts


def policy_inputs(models, prompts, processor, device) -> dict:
    """Two rows (same length, different photos): the system prompt, the user turn with its
    image, and a tool call as the reply."""
    import numpy as np

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (112, 112, 3), dtype=np.uint8) for _ in range(2)]
    messages = prompts.initial_messages(SCHEMAS, prompts.image_size(images[0]))
    text = prompts.render(processor, messages) + prompts.format_call(prompts.ToolCall("denoise_tv", {})) + "<|im_end|>"
    inputs = processor(text=[text, text], images=images, return_tensors="pt")
    out = {k: inputs[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")}
    out["mm_token_type_ids"] = models.mm_token_type_ids(processor, out["input_ids"])
    return {k: v.to(device) for k, v in out.items()}


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """log p(token t | tokens < t), [B, T-1] (as workers.engines.base.token_logprobs)."""
    logits = logits[:, :-1].float()
    return logits.gather(-1, input_ids[:, 1:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def text_mask(processor, input_ids: torch.Tensor) -> torch.Tensor:
    """Positions predicting a text token (image placeholders carry no target)."""
    image_token = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    return (input_ids[:, 1:] != image_token).float()


def check_fsdp2(device: torch.device, folder: Path) -> str:
    if not dist.is_initialized():
        raise SkipCheck("no process group (process_group failed)")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import DTensor

    path, models, prompts = build_policy(folder)
    model, processor = models.load_policy(path, dtype="float32", device=str(device))
    mesh = init_device_mesh(device.type, (1,))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    wrapped = [m for m in model.modules() if type(m).__name__ in blocks]
    for module in wrapped:
        fully_shard(module, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    params = list(model.parameters())
    plain = [
        n for n, p in model.named_parameters() if not isinstance(p, DTensor)
    ]  # checked before a forward: the root stays unsharded after one
    if plain:
        raise AssertionError(
            f"{len(plain)} of {len(params)} parameters are not DTensors after fully_shard: {plain[:3]}"
        )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    inputs = policy_inputs(models, prompts, processor, device)
    mask = text_mask(processor, inputs["input_ids"])

    def loss_now():
        logprobs = token_logprobs(model(**inputs, use_cache=False).logits, inputs["input_ids"])
        return -(logprobs * mask).sum() / mask.sum()

    model.train()
    loss = loss_now()
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        after = loss_now()
    if not (torch.isfinite(norm) and after.item() < loss.item()):
        raise AssertionError(
            f"loss {loss.item():.4f} -> {after.item():.4f}, grad norm {norm.item():.3g}: one step on the same rows should lower the loss"
        )
    return f"{len(wrapped)} blocks + root sharded ({len(params)} DTensor params, bf16 compute); loss {loss.item():.4f} -> {after.item():.4f}, grad norm {norm.item():.3g}"


def check_neural_tool(device: torch.device, folder: Path) -> str:
    import numpy as np

    try:
        import basicsr  # noqa: F401

        from tool_pool.neural import NeuralTool, NeuralToolSpec, build_network
    except ImportError as err:
        raise SkipCheck(f"basicsr / tool_pool not importable ({err})") from err
    arch = {
        "type": "SRVGGNetCompact",
        "num_in_ch": 3,
        "num_out_ch": 3,
        "num_feat": 16,
        "num_conv": 4,
        "upscale": 2,
        "act_type": "prelu",
    }
    torch.manual_seed(0)
    network = build_network(arch)
    for p in network.parameters():  # random, but small enough that outputs stay inside [0, 1] mostly
        p.data.mul_(0.3)
    checkpoint = folder / "srvgg_random.pth"
    torch.save({"params": network.state_dict()}, checkpoint)

    def tool(on: str) -> NeuralTool:
        spec = NeuralToolSpec(
            name=f"sr_smoke_{on}",
            subtask="super_resolution",
            description="smoke test",
            arch=arch,
            checkpoint=checkpoint,
            scale=2,
            device=on,
        )
        return NeuralTool(spec)

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(4)] + [
        rng.integers(0, 256, (48, 40, 3), dtype=np.uint8) for _ in range(2)
    ]
    target = tool(device.type)
    outputs = target.run(images)
    if device.type == "cuda":
        torch.cuda.synchronize()
    if [o.shape for o in outputs] != [(im.shape[0] * 2, im.shape[1] * 2, 3) for im in images]:
        raise AssertionError(f"output shapes {[o.shape for o in outputs]}")
    reference = tool("cpu").run(images) if device.type == "cuda" else [tool("cpu").run([im])[0] for im in images]
    diff = max(int(np.abs(a.astype(int) - b.astype(int)).max()) for a, b in zip(outputs, reference))
    if diff > 2:
        raise AssertionError(f"max abs diff {device.type} vs cpu reference = {diff} (uint8 levels)")
    against = "cpu" if device.type == "cuda" else "one image at a time"
    return (
        f"{len(images)} images in 2 shape groups on {target.device}; max abs diff vs {against} = {diff} uint8 level(s)"
    )


def check_bf16_logprobs(device: torch.device, folder: Path) -> str:
    path, models, prompts = build_policy(folder)
    model, processor = models.load_policy(path, dtype="float32", device=str(device))
    inputs = policy_inputs(models, prompts, processor, device)
    mask = text_mask(processor, inputs["input_ids"]).bool()
    with torch.no_grad():
        fp32 = token_logprobs(model(**inputs, use_cache=False).logits, inputs["input_ids"])[mask]
        model.to(torch.bfloat16)
        bf16_inputs = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in inputs.items()}
        bf16 = token_logprobs(model(**bf16_inputs, use_cache=False).logits, inputs["input_ids"])[mask]
    diff = (bf16 - fp32).abs()
    if not torch.isfinite(bf16).all() or diff.max().item() > 0.5:
        raise AssertionError(f"bf16 log-probs differ from fp32 by up to {diff.max().item():.3g}")
    return f"{mask.sum().item()} tokens; bf16 vs fp32 max abs diff {diff.max().item():.4f}, mean {diff.mean().item():.4f} (fp32 mean {fp32.mean().item():.2f})"


# ---------------------------------------------------------------- main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--cpu", action="store_true", help="run the same checks on CPU with gloo (to check the script without a GPU)"
    )
    args = parser.parse_args(argv)
    if args.cpu:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        print(
            f"skipped: no CUDA (torch {torch.__version__} sees no GPU); `python {sys.argv[0]} --cpu` runs the same checks on CPU with gloo"
        )
        return 0
    try:
        import transformers
    except ImportError:
        print("gpu_smoke: error: transformers is not installed", file=sys.stderr)
        return 1
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (--cpu)"
    print(f"device: {name}; torch {torch.__version__}, transformers {transformers.__version__}", flush=True)
    report = Report()
    with tempfile.TemporaryDirectory(prefix="tir_gpu_smoke_") as tmp:
        report.run("process_group", check_process_group, device)
        report.run("fsdp2_train_step", check_fsdp2, device, Path(tmp))
        report.run("neural_tool_batch", check_neural_tool, device, Path(tmp))
        report.run("bf16_logprobs", check_bf16_logprobs, device, Path(tmp))
    if dist.is_initialized():
        dist.destroy_process_group()
    print(report.table())
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
