"""``naclip`` with the tiny random-weights test model, as a script: what tests/test_distributed.py starts under
``torchrun`` (and calls in-process for the single-process run it compares with).

The weights are drawn from a fixed seed when the segmenter is built, so every rank, and the single process, build
the same model; one thread per process (torchrun's default) keeps the float summation order the same everywhere.
"""
from __future__ import annotations

import sys

import torch

TEMPLATES = ["a photo of a {}."]   # one prompt template: the text tower is the slow part of a tiny model


def factory(preset=None, **kwargs):
    from naclip import Segmenter
    from tests.naclip_helpers import register_tiny_config

    register_tiny_config()
    torch.manual_seed(0)
    if preset is not None:
        return Segmenter.from_preset(preset, templates=TEMPLATES, cache_dir=False, **kwargs)
    return Segmenter(templates=TEMPLATES, cache_dir=False, **kwargs)


def run(commands):
    """Run each command line of ``commands`` in one process group (one torchrun start for several commands);
    prints ``naclip-rc <i> <status>`` per command and returns the largest status."""
    from naclip.cli import main
    from naclip.distributed import process_group

    torch.set_num_threads(1)
    statuses = []
    with process_group("cpu"):
        for i, argv in enumerate(commands):
            statuses.append(main(argv, segmenter_factory=factory))
            # One write per line: under PYTHONUNBUFFERED (CI) print() writes the text and the newline separately,
            # and the other rank's output can land between them on the shared pipe.
            sys.stdout.write(f"naclip-rc {i} {statuses[-1]}\n")
            sys.stdout.flush()
    return max(statuses)


if __name__ == "__main__":
    # Command lines separated by a "--then" argument.
    commands, current = [], []
    for arg in sys.argv[1:]:
        if arg == "--then":
            commands.append(current)
            current = []
        else:
            current.append(arg)
    sys.exit(run(commands + [current]))
