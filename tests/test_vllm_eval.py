"""`tir eval` of a policy on vLLM (CPU, in this process, no Ray) against the transformers
reference: greedy on both, the same tool calls and the same scores per image, and the same table
when vLLM runs it again. One vLLM engine serves the module (its start-up is the slow part).

The policy is the tiny one taught in a few optimizer steps to answer the task with a tool call (a
random policy only writes malformed replies), so that episodes run several turns and images.
"""

import asyncio
import json
import shutil

import pytest
import torch

import tir  # noqa: F401  - shims before transformers
from tir.agent import models, prompts
from tir.eval.agent_specs import AgentSpec
from tir.eval.agents import evaluate_agents
from tir.eval.policy import open_policy_engine
from tir.eval.report import render_markdown
from tool_pool.client import LocalPool
from tool_pool.tools import tool_schemas

pytest.importorskip("vllm")
pytestmark = [pytest.mark.vllm, pytest.mark.slow]

# test_evaluation's tools, test set and settings (its module is imported, not re-run)
from test_evaluation import TOOLS, settings, small_test_set  # noqa: E402

TOOL_PROMPT = "names"  # the short tool list: a short prompt, cheap to teach
TAUGHT = prompts.format_call(prompts.ToolCall("denoise_tv", {}))


def teach(base, folder, test):
    """The tiny policy after a few Adam steps on "first reply: call denoise_tv" for two photos."""
    shutil.copytree(base, folder)
    model, processor = models.load_policy(folder)
    schemas = prompts.policy_schemas(tool_schemas(TOOLS), TOOL_PROMPT)
    reply = processor.tokenizer(TAUGHT, add_special_tokens=False)["input_ids"] + [processor.tokenizer.eos_token_id]
    examples = []
    for lq in test.column("lq")[:2]:
        text = prompts.render(processor, prompts.initial_messages(schemas, prompts.image_size(lq)))
        inputs = processor(text=[text], images=[lq.copy()], return_tensors="pt")
        ids = torch.cat([inputs["input_ids"][0], torch.tensor(reply)])[None]
        examples.append((ids, inputs["pixel_values"], inputs["image_grid_thw"]))
    for name, parameter in model.named_parameters():
        parameter.requires_grad_("visual" not in name)  # the vision tower stays as built (cheaper)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(60):
        learned = True
        for ids, pixels, grid in examples:
            logits = model(
                input_ids=ids,
                pixel_values=pixels,
                image_grid_thw=grid,
                mm_token_type_ids=models.mm_token_type_ids(processor, ids),
            ).logits[0, -len(reply) - 1 : -1]
            loss = torch.nn.functional.cross_entropy(logits.float(), ids[0, -len(reply) :])
            learned &= bool(torch.equal(logits.argmax(-1), ids[0, -len(reply) :])) and loss.item() < 0.05
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        if learned:
            break
    assert learned, loss.item()
    model.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def test_set():
    return small_test_set()


@pytest.fixture(scope="module")
def policy(tiny_policy_dir, test_set, tmp_path_factory):
    return teach(tiny_policy_dir(tool_schemas(TOOLS)), tmp_path_factory.mktemp("taught") / "policy", test_set)


@pytest.fixture(scope="module")
def vllm_engine(policy):
    engine = open_policy_engine("vllm", policy, max_images=4, max_length=4096)
    yield engine
    asyncio.run(engine.shutdown())


def test_vllm_eval_matches_transformers_and_repeats(policy, vllm_engine, test_set):
    def run(engine_setting, engine=None):
        spec = AgentSpec("taught", "policy", path=policy, agent=engine)
        return evaluate_agents(
            {"taught": spec},
            test_set,
            LocalPool(TOOLS),
            settings=settings(engine=engine_setting, tool_prompt=TOOL_PROMPT),
        )

    def per_image(report):
        keys = ("tools", "tool_calls", "turns", "format_errors", "tool_errors", "stop_reason", "scores", "error")
        return [{key: row[key] for key in keys} for row in report["rows"]]

    reference = run("hf")
    on_vllm = run("vllm", vllm_engine)  # all 5 images in flight (policy concurrency 16 on vLLM)
    again = run("vllm", vllm_engine)
    assert {row["engine"] for row in reference["rows"]} == {"hf"}
    assert {row["engine"] for row in on_vllm["rows"]} == {"vllm"}
    assert "(greedy, vLLM engine)" in on_vllm["meta"]["agents"]["taught"]
    # the taught call, then whatever the policy makes of the images its calls produced
    assert all(row["tools"][:1] == ["denoise_tv"] for row in reference["rows"]), per_image(reference)
    assert sum(row["turns"] for row in reference["rows"]) > len(test_set)  # multi-turn, multi-image prompts
    assert json.dumps(per_image(on_vllm)) == json.dumps(per_image(reference))  # same calls, same PSNR and SSIM
    assert json.dumps(per_image(again)) == json.dumps(per_image(on_vllm))
    assert render_markdown(again, timing=False) == render_markdown(on_vllm, timing=False)
