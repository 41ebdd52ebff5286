"""The drivers: single-controller loops that own a run and call the worker groups.

- ``tir.trainer.sft``: ``tir train sft recipe=...`` (supervised fine-tuning on expert trajectories)
- ``tir.trainer.evaluate``: tool-choice accuracy of a policy on held-out samples
"""
