"""naclip-kernels: fused Triton kernels for training-free open-vocabulary segmentation with CLIP."""
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent

# Ranges are pinned to what the suite is run against: torch 2.15 / triton 3.9 / open_clip 3.3 were the
# versions tested; the lower bounds are the oldest releases whose APIs the code uses (torch.nn.attention.flex_attention,
# triton.knobs, open_clip's get_tokenizer/create_model signatures).
TORCH = "torch>=2.5,<2.16"
TRITON = "triton>=3.2,<3.10; platform_system == 'Linux' and platform_machine == 'x86_64'"

extras = {
    "test": ["pytest>=8,<10", "hypothesis>=6.100,<7", "selenium>=4.20,<5"],
    "bench": ["pytest-benchmark>=4,<6", "matplotlib>=3.7,<4", "psutil>=5.9,<8"],
    "segmenter": [
        "open_clip_torch>=2.24,<3.4",
        "torchvision>=0.20,<0.30",
        "pillow>=10,<14",
        "tqdm>=4.60,<5",
        "flask>=3.0,<4",
    ],
}
extras["all"] = sorted({req for reqs in extras.values() for req in reqs})

setup(
    name="naclip-kernels",
    version="0.1.0",
    description="Fused Triton kernels (neighbour-aware attention, PAMR) and a NACLIP open-vocabulary segmenter",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.9",
    packages=find_packages(include=["naclip_kernels", "naclip_kernels.*", "naclip", "naclip.*"]),
    package_data={"naclip": ["assets/*", "static/*", "templates/*"]},
    install_requires=[TORCH, TRITON, "numpy>=1.24,<3"],
    extras_require=extras,
    entry_points={"console_scripts": ["naclip=naclip.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "License :: OSI Approved :: MIT License",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
