"""naclip-kernels: fused Triton kernels for training-free open-vocabulary segmentation with CLIP."""
import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent

# Every range admits exactly the minor releases the suite was run on (naclip_kernels/_versions.py, also read by the
# tests): a fresh clone installs nothing that was not tested. The package itself is not importable yet here.
_VERSIONS: dict = {}
exec((HERE / "naclip_kernels" / "_versions.py").read_text(encoding="utf-8"), _VERSIONS)
_range = _VERSIONS["minor_range"]

TORCH = "torch" + _range("torch")
TRITON = "triton" + _range("triton") + "; platform_system == 'Linux' and platform_machine == 'x86_64'"

extras = {
    "test": ["pytest>=8,<10", "hypothesis>=6.100,<7", "selenium>=4.20,<5"],
    "bench": ["pytest-benchmark>=4,<6", "matplotlib>=3.7,<4", "psutil>=5.9,<8"],
    "segmenter": [
        "open_clip_torch" + _range("open_clip_torch"),
        "timm" + _range("timm"),
        "torchvision" + _range("torchvision"),
        "pillow>=10,<14",
        "tqdm>=4.60,<5",
        "flask>=3.0,<4",
    ],
}
extras["all"] = sorted({req for reqs in extras.values() for req in reqs})

setup(
    name="naclip-kernels",
    version=re.search(r'^__version__ = "([^"]+)"', (HERE / "naclip_kernels" / "__init__.py").read_text(encoding="utf-8"),
                      re.M).group(1),
    description="Fused Triton kernels (neighbour-aware attention, PAMR) and a NACLIP open-vocabulary segmenter",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.9",
    packages=find_packages(include=["naclip_kernels", "naclip_kernels.*", "naclip", "naclip.*"]),
    # The C sources of the compiled CPU kernels are built on the user's machine (naclip_kernels/native.py).
    package_data={"naclip": ["assets/*", "static/*", "templates/*"], "naclip_kernels": ["csrc/*.c"]},
    install_requires=[TORCH, TRITON, "numpy>=1.24,<3"],
    extras_require=extras,
    entry_points={"console_scripts": ["naclip=naclip.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "License :: OSI Approved :: MIT License",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
