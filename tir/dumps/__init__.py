"""Rollout dumps: each RL step's trajectories as Parquet, and reading them back.

``writer`` writes them during a run; ``reader`` loads them; ``summary`` and ``viewer`` are
``tir dumps summary`` (tables and plots) and ``tir dumps view`` (one self-contained HTML page).
"""
