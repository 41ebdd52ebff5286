"""The drivers: single-controller loops that own a run and call the worker groups.

``sft`` (``tir train sft``) and ``rl`` (``tir train rl``) read top to bottom as stories; they
share ``checkpoint`` (atomic, resumable) and ``run_log`` (console, metrics.jsonl, TensorBoard).
"""
