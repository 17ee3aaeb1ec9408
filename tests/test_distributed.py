"""``torchrun --nproc-per-node 2 -m naclip eval|segment`` on CPU (gloo) against one process: identical results.

The multi-process runs start the real launcher (``python -m torch.distributed.run``, i.e. ``torchrun``) with a
localhost rendezvous on a free port, on a VOC-layout dataset made here, with the tiny random-weights model
(tests/dist_runner.py); the single-process runs call the same command line in this process.
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from naclip.cli import main
from naclip.distributed import Distributed, DistributedError, world_from_env
from tests import dist_runner
from tests.naclip_helpers import random_image

REPO = Path(__file__).resolve().parents[1]
SIZES = [(40, 56), (48, 32), (36, 36), (52, 44), (30, 60)]          # (H, W): five images, ragged shards
MODEL = ["--model", "naclip-test-tiny", "--pretrained", "none", "--device", "cpu", "--short-side", "32",
         "--slide", "none"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _make_voc(root: Path, corrupt: str = "") -> Path:
    rng = np.random.default_rng(0)
    ids = [f"img{i}" for i in range(len(SIZES))]
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(ids) + "\n")
    (root / "JPEGImages").mkdir()
    (root / "SegmentationClass").mkdir()
    for seed, (i, (h, w)) in enumerate(zip(ids, SIZES)):
        Image.fromarray(random_image(h, w, seed=seed).permute(1, 2, 0).numpy()).save(root / "JPEGImages" / f"{i}.jpg")
        label = Image.fromarray(rng.integers(0, 21, (h, w)).astype(np.uint8), mode="P")
        label.putpalette([0] * 768)
        label.save(root / "SegmentationClass" / f"{i}.png")
    if corrupt:
        (root / "JPEGImages" / f"{corrupt}.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    return root


def _torchrun(args, tmp_path, nproc=2):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), str(REPO / "tests" / "dist_runner.py"),
           *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)


def _single(args, monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return main(args, segmenter_factory=dist_runner.factory)
    finally:
        torch.set_num_threads(threads)


def _comparable(result: dict) -> dict:
    return {k: v for k, v in result.items() if k not in ("seconds", "mean_stage_seconds", "processes")}


EVAL = ["eval", "--preset", "voc21", *MODEL, "-q"]
SEGMENT = ["segment", "--classes", "sky, cat, dog/puppy", *MODEL]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """One ``torchrun --nproc-per-node 2`` start running ``eval`` (a corrupt image among five) then ``segment``."""
    tmp = tmp_path_factory.mktemp("torchrun")
    root = _make_voc(tmp / "voc", corrupt="img3")
    clean = _make_voc(tmp / "clean")
    args = [*EVAL, "--data-root", str(root), "--workers", "1", "--json", str(tmp / "two.json"), "--then",
            *SEGMENT, str(clean / "JPEGImages"), "--out", str(tmp / "two"), "--workers", "1"]
    proc = _torchrun(args, tmp)
    return tmp, proc


def _statuses(proc):
    """``{command index: [exit status of each rank]}`` from the runner's ``naclip-rc`` lines."""
    # Searched, not split by line: the ranks share one stdout pipe, so a rank's line can land inside another's
    # unfinished one (seen once in a fresh-clone CI run).
    found = {}
    for index, status in re.findall(r"naclip-rc (\d+) (\d+)", proc.stdout):
        found.setdefault(int(index), []).append(int(status))
    return found


@pytest.mark.filterwarnings("ignore:.*RANDOM weights")
def test_torchrun_eval_equals_one_process(two_ranks, monkeypatch, capsys):
    tmp, proc = two_ranks
    assert _statuses(proc).get(0) == [1, 1], proc.stdout + proc.stderr   # img3 is corrupt: every rank says 1
    assert sum("img3.jpg" in line and "naclip: error:" in line for line in proc.stderr.splitlines()) == 1
    two = json.loads((tmp / "two.json").read_text())
    assert two["processes"] == 2 and two["images"] == 4 and two["failed"] == 1
    assert proc.stdout.count("mIoU") == 1                                        # only rank 0 prints the table

    rc = _single([*EVAL, "--data-root", str(tmp / "voc"), "--workers", "0", "--json", str(tmp / "one.json")],
                 monkeypatch)
    one = json.loads((tmp / "one.json").read_text())
    assert rc == 1 and one["processes"] == 1
    assert _comparable(two) == _comparable(one)
    assert one["pixels"] == sum(h * w for i, (h, w) in enumerate(SIZES) if i != 3)
    table = capsys.readouterr().out
    assert table.strip().splitlines()[-1] in proc.stdout                          # the same mIoU/aAcc/mAcc line


@pytest.mark.filterwarnings("ignore:.*RANDOM weights")
def test_torchrun_segment_equals_one_process(two_ranks, monkeypatch):
    tmp, proc = two_ranks
    assert _statuses(proc).get(1) == [0, 0], proc.stdout + proc.stderr
    assert f"segmented {len(SIZES)} of {len(SIZES)} image(s)" in proc.stderr and "by 2 processes" in proc.stderr
    assert _single([*SEGMENT, str(tmp / "clean" / "JPEGImages"), "--out", str(tmp / "one"), "--workers", "0",
                    "-q"], monkeypatch) == 0
    for i in range(len(SIZES)):
        two = np.array(Image.open(tmp / "two" / f"img{i}_labels.png"))
        one = np.array(Image.open(tmp / "one" / f"img{i}_labels.png"))
        assert two.shape == SIZES[i] and np.array_equal(two, one), f"img{i}"


def test_world_from_env(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert world_from_env("cpu") == Distributed(device="cpu")
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(DistributedError, match="RANK is not"):
        world_from_env("cpu")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    world = world_from_env("cpu")
    assert (world.rank, world.world_size, world.backend, world.device) == (2, 3, "gloo", "cpu")
    assert world.shard(list(range(8))) == [2, 5] and not world.is_main
    monkeypatch.setenv("RANK", "3")
    with pytest.raises(DistributedError, match="outside 0..2"):
        world_from_env("cpu")
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(DistributedError, match="not an integer"):
        world_from_env("cpu")


def test_one_process_world_reduces_to_itself():
    world = Distributed()
    counts = np.arange(6, dtype=np.int64).reshape(2, 3)
    assert np.array_equal(world.sum_int64(counts), counts) and world.gather("x") == ["x"]
    assert world.shard("abc") == ["a", "b", "c"] and world.is_main and not world.enabled
