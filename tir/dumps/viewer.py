"""``tir dumps view``: one self-contained HTML file to browse a run's trajectories.

Everything is in the file: the trajectories as JSON in a ``<script type="application/json">``
block, every image as a base64 data URI (each distinct image once: a GRPO group shares its LQ and
HQ), and a small inline script that renders one ``<section class="trajectory">`` per trajectory
and filters them by step, degradation combination and reward range. No network, no libraries:
the page opens from a laptop's disk or a CI artefact.

Per trajectory: the degraded photo, each turn (the policy's reply, what it saw back, the tool's
output image), the final image beside the HQ, and per metric the input and final scores, the
gain, the weight and its contribution to the reward.

The filters also read the page address's fragment (``report.html#step=3&combo=noise&rmin=0.5``)
and write it back, so a view can be shared as a link. When the script has run it sets
``data-ready="1"`` on ``<body>`` (``data-error`` if a script error happened, ``data-shown``: how
many trajectories the filters let through): what the headless-browser test reads.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tir.dumps.reader import SUMMARY_COLUMNS, DumpError, dump_files, first_line, read_batch

# the summary's columns plus the images and the chat
VIEW_COLUMNS = ("lq", "hq", "images", "final_image", "messages", *SUMMARY_COLUMNS)
REQUIRED = ("lq", "final_image", "messages", "stop_reason")


class ImageStore:
    """Images as data URIs, each distinct one encoded once, shrunk to ``side`` pixels at most."""

    def __init__(self, side: int = 256, image_format: str = "jpeg", quality: int = 85):
        if side < 8 or image_format not in ("jpeg", "png"):
            raise ValueError(f"image side must be >= 8 and format jpeg or png, got {side}, {image_format!r}")
        self.side, self.format, self.quality = side, image_format, quality
        self.uris: dict[str, str] = {}

    def add(self, image: np.ndarray | None) -> str | None:
        if image is None:
            return None
        key = hashlib.sha1(np.ascontiguousarray(image).tobytes() + str(image.shape).encode()).hexdigest()[:16]
        if key not in self.uris:
            self.uris[key] = encode_image(image, self.side, self.format, self.quality)
        return key


def encode_image(image: np.ndarray, side: int = 256, image_format: str = "jpeg", quality: int = 85) -> str:
    """A uint8 HxWx3 array as a ``data:image/...;base64,`` URI, shrunk to ``side`` at most."""
    from PIL import Image

    picture = Image.fromarray(np.ascontiguousarray(image))
    if max(picture.size) > side:
        picture.thumbnail((side, side), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    if image_format == "png":
        picture.save(buffer, format="PNG", optimize=True)
    else:
        picture.save(buffer, format="JPEG", quality=quality)
    return f"data:image/{image_format};base64,{base64.b64encode(buffer.getvalue()).decode()}"


def episode_view(step: int, row: int, values: dict, store: ImageStore) -> dict:
    """What the page shows of one trajectory; images go into ``store`` and are named by key."""
    shown = list(values.get("images") or [])
    chat, next_image = [], 0
    for message in values.get("messages") or []:
        if message["role"] == "system":
            continue  # the tool list: the same in every trajectory
        image = None
        if message.get("image") and next_image < len(shown):
            image, next_image = store.add(shown[next_image]), next_image + 1
        chat.append({"role": message["role"], "text": message.get("text", ""), "img": image})
    calls = [c for c in values.get("tool_calls") or [] if c.get("committed", True)]
    final = store.add(values.get("final_image"))
    if (
        values.get("stop_reason") == "max_turns"
        and chat
        and chat[-1]["role"] == "assistant"
        and calls
        and calls[-1].get("ok")
    ):
        # the last call's output ended the episode unseen: it is the final image
        chat.append(
            {
                "role": "result",
                "text": f"{calls[-1]['name']} output (the final image; the turn limit ended the episode)",
                "img": final,
            }
        )
    terms = values.get("reward_terms") or {}
    weights = values.get("reward_weights") or {}
    finals, inputs = values.get("final_scores") or {}, values.get("input_scores") or {}
    metrics = sorted({*finals, *inputs, *(terms.get("gain") or {})})
    return {
        "id": f"{step}-{row}",
        "step": step,
        "row": row,
        "image_id": values.get("image_id"),
        "combo": values.get("combo") or "?",
        "reward": _number(values.get("reward")),
        "advantage": _number(values.get("advantage")),
        "stop": values.get("stop_reason"),
        "turns": values.get("num_turns"),
        "format_errors": values.get("format_errors"),
        "tool_errors": values.get("tool_errors"),
        "calls": [c["name"] for c in calls],
        "error": values.get("error") or "",
        "lq": store.add(values.get("lq")),
        "hq": store.add(values.get("hq")),
        "final": final,
        "chat": chat,
        "terms": {k: _number(terms.get(k)) for k in ("quality", "format", "tool") if k in terms},
        "scores": [
            {
                "metric": m,
                "input": _number(inputs.get(m)),
                "final": _number(finals.get(m)),
                "gain": _number((terms.get("gain") or {}).get(m)),
                "weight": _number(weights.get(m)),
                "contribution": _number((terms.get("contribution") or {}).get(m)),
            }
            for m in metrics
        ],
    }


def pick_rows(counts: dict[int, int], max_episodes: int) -> dict[int, list[int]]:
    """Step -> row indices to show: all of them, or ``max_episodes`` spread evenly over the run."""
    total = sum(counts.values())
    flat = [(step, row) for step, n in counts.items() for row in range(n)]
    if total > max_episodes:
        flat = (
            [flat[round(i * (total - 1) / max(1, max_episodes - 1))] for i in range(max_episodes)]
            if max_episodes > 1
            else flat[:max_episodes]
        )
    out: dict[int, list[int]] = {}
    for step, row in flat:
        out.setdefault(step, []).append(row)
    return out


def write_viewer(
    folder,
    out,
    steps: Sequence[int] | None = None,
    max_episodes: int = 500,
    image_side: int = 256,
    image_format: str = "jpeg",
) -> dict:
    """Write the HTML page of the dumps in ``folder`` to ``out``; how many trajectories it holds."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if max_episodes < 1:
        raise DumpError(f"--max-episodes must be >= 1, got {max_episodes}")
    files = dump_files(folder, steps)
    counts = {}
    for step, path in files.items():
        try:
            counts[step] = pq.ParquetFile(path).metadata.num_rows
        except (pa.ArrowException, OSError) as err:
            raise DumpError(f"{path}: cannot read this dump (corrupt or not Parquet): {first_line(err)}") from err
    chosen = pick_rows(counts, max_episodes)
    store, episodes, meta = ImageStore(image_side, image_format), [], {}
    for step, rows in chosen.items():
        batch = read_batch(files[step], VIEW_COLUMNS, REQUIRED).take(rows)
        meta = batch.meta or meta
        try:
            columns = {name: batch.column(name) for name in batch.columns}
        except ValueError as err:
            raise DumpError(f"{files[step]}: a column cannot be decoded: {first_line(err)}") from err
        real_step = int(batch.meta.get("step", step))
        for i, row in enumerate(rows):
            episodes.append(episode_view(real_step, row, {name: values[i] for name, values in columns.items()}, store))
    title = f"TIR rollouts: {folder}"
    info = {
        "folder": str(folder),
        "steps": sorted({ep["step"] for ep in episodes}),
        "config_hash": meta.get("config_hash"),
        "episodes": len(episodes),
        "available": sum(counts.values()),
    }
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(
        render_html(title, {"info": info, "images": store.uris, "episodes": episodes}), encoding="utf-8"
    )
    return {"episodes": len(episodes), "available": sum(counts.values()), "steps": len(chosen)}


def render_html(title: str, data: dict) -> str:
    # "<", ">" and "&" as JSON escapes: no "</script>" or "<!--" can end or stall the data block
    payload = json.dumps(data, allow_nan=False, separators=(",", ":"))
    payload = payload.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return PAGE.replace("__TITLE__", html.escape(title)).replace("__DATA__", payload)


def _number(value) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if np.isfinite(value) else None


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>__TITLE__</title>
<style>
body{font:14px/1.4 system-ui,sans-serif;margin:0;background:#f4f4f6;color:#222}
header{position:sticky;top:0;background:#fff;border-bottom:1px solid #ccc;padding:8px 16px;z-index:1}
header h1{font-size:17px;margin:0 0 6px}
header label{margin-right:12px}
input[type=number]{width:6em}
#status{font-weight:600;margin-left:8px}
main{padding:12px 16px}
.trajectory{background:#fff;border:1px solid #ddd;border-radius:6px;margin:0 0 14px;padding:10px}
.trajectory h2{font-size:15px;margin:0 0 6px}
.badge{display:inline-block;background:#eef;border-radius:4px;padding:0 6px;margin-right:6px;font-size:12px}
.badge.bad{background:#fdd}
.row{display:flex;flex-wrap:wrap;gap:10px;align-items:flex-start}
.turn{border:1px solid #eee;border-radius:4px;padding:6px;max-width:300px}
.turn .role{font-size:11px;text-transform:uppercase;color:#666}
.turn.assistant{background:#f7fbff}.turn.result{background:#f7fff7}
pre{white-space:pre-wrap;word-break:break-word;font-size:12px;margin:2px 0;max-height:9em;overflow:auto}
figure{margin:0}figure img{width:192px;display:block}.turn img{width:160px;display:block}
figcaption{font-size:12px;color:#555}
table{border-collapse:collapse;font-size:12px;margin-top:6px}td,th{border:1px solid #ddd;padding:2px 6px;text-align:right}
.error{color:#a00}
</style></head>
<body data-ready="0">
<header><h1>__TITLE__</h1>
<label>step <select id="f-step"><option value="">all</option></select></label>
<label>combination <select id="f-combo"><option value="">all</option></select></label>
<label>reward from <input id="f-rmin" type="number" step="any"> to <input id="f-rmax" type="number" step="any"></label>
<label>order <select id="f-sort"><option value="step">step, row</option><option value="reward-desc">reward, best first</option>
<option value="reward-asc">reward, worst first</option></select></label>
<span id="status">loading...</span></header>
<main id="list"></main>
<script type="application/json" id="tir-data">__DATA__</script>
<script>
(function () {
  "use strict";
  const body = document.body, status = document.getElementById("status");
  window.addEventListener("error", (e) => { body.setAttribute("data-error", String(e.message)); status.textContent = "script error: " + e.message; });
  const data = JSON.parse(document.getElementById("tir-data").textContent);
  const images = data.images, episodes = data.episodes;

  function el(tag, attrs, children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) if (v !== null && v !== undefined) node.setAttribute(k, v);
    for (const c of children || []) node.append(c instanceof Node ? c : String(c));
    return node;
  }
  const fmt = (v, d) => (v === null || v === undefined ? "-" : Number(v).toFixed(d === undefined ? 3 : d));
  function figure(key, caption) {
    return el("figure", {}, [key ? el("img", {src: images[key], alt: caption, title: caption}) : "(no image)", el("figcaption", {}, [caption])]);
  }
  function render(ep) {
    const badges = [["reward " + fmt(ep.reward), ""], ["advantage " + fmt(ep.advantage), ""], ["stop: " + ep.stop, ep.stop === "answer" ? "" : "bad"],
      [ep.turns + " turn(s)", ""], [ep.format_errors + " format error(s)", ep.format_errors ? "bad" : ""], [ep.tool_errors + " tool error(s)", ep.tool_errors ? "bad" : ""]];
    const sec = el("section", {"class": "trajectory", id: "t-" + ep.id, "data-step": ep.step, "data-combo": ep.combo, "data-reward": ep.reward === null ? "" : ep.reward}, [
      el("h2", {}, ["step " + ep.step + " \\u00b7 row " + ep.row + " \\u00b7 " + (ep.image_id || "") + " \\u00b7 " + ep.combo]),
      el("div", {}, badges.map(([text, cls]) => el("span", {"class": "badge " + cls}, [text]))),
      el("p", {}, ["tools: " + (ep.calls.length ? ep.calls.join(" \\u2192 ") : "(none)")]),
    ]);
    const turns = el("div", {"class": "row"}, ep.chat.map((m) => el("div", {"class": "turn " + m.role}, [
      el("div", {"class": "role"}, [m.role === "tool" ? "observation" : m.role]), el("pre", {}, [m.text]), ...(m.img ? [el("img", {src: images[m.img], alt: m.role})] : [])])));
    sec.append(turns);
    sec.append(el("div", {"class": "row"}, [figure(ep.lq, "degraded input"), figure(ep.final, "final image"), figure(ep.hq, "HQ reference")]));
    if (ep.scores.length) {
      const head = el("tr", {}, ["metric", "input", "final", "gain", "weight", "contribution"].map((h) => el("th", {}, [h])));
      const rows = ep.scores.map((s) => el("tr", {}, [el("th", {}, [s.metric]), ...[s.input, s.final, s.gain, s.weight, s.contribution].map((v) => el("td", {}, [fmt(v)]))]));
      const terms = Object.entries(ep.terms).map(([k, v]) => k + " " + fmt(v)).join(", ");
      sec.append(el("table", {}, [head, ...rows]), el("p", {}, ["reward terms: " + terms]));
    }
    if (ep.error) sec.append(el("p", {"class": "error"}, ["episode error: " + ep.error]));
    return sec;
  }

  const list = document.getElementById("list");
  const nodes = episodes.map((ep) => list.appendChild(render(ep)));
  const f = {step: document.getElementById("f-step"), combo: document.getElementById("f-combo"), rmin: document.getElementById("f-rmin"),
             rmax: document.getElementById("f-rmax"), sort: document.getElementById("f-sort")};
  [...new Set(episodes.map((e) => e.step))].sort((a, b) => a - b).forEach((s) => f.step.append(el("option", {value: s}, ["" + s])));
  [...new Set(episodes.map((e) => e.combo))].sort().forEach((c) => f.combo.append(el("option", {value: c}, [c])));
  const rewards = episodes.map((e) => e.reward).filter((r) => r !== null);
  if (rewards.length) { f.rmin.placeholder = fmt(Math.min(...rewards), 2); f.rmax.placeholder = fmt(Math.max(...rewards), 2); }

  function readHash() {
    const p = new URLSearchParams(location.hash.slice(1));
    for (const k of Object.keys(f)) if (p.has(k)) f[k].value = p.get(k);
  }
  function apply() {
    const lo = parseFloat(f.rmin.value), hi = parseFloat(f.rmax.value);
    let shown = 0;
    episodes.forEach((ep, i) => {
      const ok = (f.step.value === "" || String(ep.step) === f.step.value) && (f.combo.value === "" || ep.combo === f.combo.value) &&
                 (isNaN(lo) || (ep.reward !== null && ep.reward >= lo)) && (isNaN(hi) || (ep.reward !== null && ep.reward <= hi));
      nodes[i].hidden = !ok;
      shown += ok ? 1 : 0;
    });
    const order = episodes.map((_, i) => i);
    const key = (i) => (episodes[i].reward === null ? -Infinity : episodes[i].reward);
    if (f.sort.value === "reward-desc") order.sort((a, b) => key(b) - key(a));
    if (f.sort.value === "reward-asc") order.sort((a, b) => key(a) - key(b));
    order.forEach((i) => list.appendChild(nodes[i]));
    status.textContent = "showing " + shown + " of " + episodes.length + " trajectories";
    body.setAttribute("data-shown", shown);
    const p = new URLSearchParams();
    for (const [k, node] of Object.entries(f)) if (node.value !== "" && !(k === "sort" && node.value === "step")) p.set(k, node.value);
    try { history.replaceState(null, "", p.toString() ? "#" + p : location.pathname); } catch (err) { /* some file:// settings refuse it */ }
  }
  for (const node of Object.values(f)) node.addEventListener(node.tagName === "INPUT" ? "input" : "change", apply);
  readHash();
  apply();
  body.setAttribute("data-ready", "1");
})();
</script>
</body></html>
"""
