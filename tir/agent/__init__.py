"""The agent: a policy that restores a photo by calling one tool per turn.

Policy checkpoints, the prompt and tool-call protocol, the restoration environment, the
multi-turn agent loop, multimodal inputs, training-free baselines and ``tir restore``.
"""
