"""tir: TIR-Agent, a vision-language agent that restores photos by calling tools, trained with
SFT and multi-turn GRPO on Ray."""

from tir import _shims

_shims.install()  # before anything imports torchvision (transformers, pyiqa, basicsr do)

__version__ = "0.1.0"
