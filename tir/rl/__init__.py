"""RL math as small pure functions: advantages, KL, the GRPO and SFT losses, and the reward.

Nothing here talks to Ray or to a worker: the drivers in ``tir.trainer`` call these functions.
"""
