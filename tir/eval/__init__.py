"""Evaluation: any agent on a test set (``tir eval``), its report, and tool-choice accuracy.

Also the oracle demo (``tir demo``): a greedy schedule that sees the HQ photo, an upper bound.
"""
