"""The compiled CPU PAMR kernels (naclip_kernels/csrc/pamr_cpu.c) and their build/load machinery.

Against the float64 reference: ragged widths (not whole vectors), heights below the dilations, row classes of
every size (gcd(dilations) 1, 2, 3, 8), more channels than one register block, batches, all three mask dtypes,
resized / same-size / larger masks, one and two threads, and both work splits (by row class, by channel). The
non-AVX-512 variant of the C code is built and checked too, on x86 machines whose compiler accepts the flag.
"""
from __future__ import annotations

import ctypes
import platform
import subprocess
import sys
import threading
import warnings

import pytest
import torch

import naclip_kernels as nk
from naclip_kernels import native
from naclip_kernels._alloc import poison_outputs
from naclip_kernels.ops import pamr as pamr_mod
from tests.tolerances import assert_close_to_reference

pytestmark = pytest.mark.skipif(not native._compilers(), reason="no C compiler on this machine")


@pytest.fixture
def lib():
    loaded = native.load("pamr")
    assert loaded is not None, f"the compiled PAMR kernel did not build: {native.status()['pamr']}"
    return loaded


@pytest.fixture
def threads(request):
    previous = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(previous)


def _expected(image, mask, num_iter, dilations):
    return nk.reference.pamr(image.double(), mask.double(), num_iter, dilations)


# (B, H, W, C, mask h, mask w, dilations, num_iter)
CASES = [
    pytest.param((1, 40, 53, 19, 3, 4, (8, 16), 10), id="40x53_C19_d8-16_resized"),
    pytest.param((1, 7, 6, 2, 3, 4, (8, 16), 3), id="7x6_smaller_than_the_dilations"),
    pytest.param((1, 1, 1, 1, 1, 1, (8, 16), 2), id="1x1"),
    pytest.param((1, 12, 1, 3, 12, 1, (2,), 3), id="12x1_one_column"),
    pytest.param((1, 1, 37, 3, 1, 37, (1, 2), 3), id="1x37_one_row"),
    pytest.param((2, 33, 70, 11, 5, 9, (3, 6), 4), id="B2_33x70_class_step_3"),
    pytest.param((1, 20, 33, 20, 20, 33, (1, 2), 3), id="20x33_same_size_step_1"),
    pytest.param((1, 25, 18, 5, 31, 40, (2, 4), 2), id="larger_mask_25x18_step_2"),
    pytest.param((1, 18, 17, 35, 3, 3, (1, 3, 5), 1), id="C35_three_dilations_1iter"),
    pytest.param((1, 90, 21, 5, 6, 2, (8, 16), 10), id="90x21_d8-16_border_strips_shorter_than_the_image"),
    pytest.param((1, 64, 9, 3, 64, 9, (8, 16), 7), id="64x9_same_size_odd_sweeps"),
]


def _fixed_lib(dilations):
    """The library compiled for ``dilations``, checked to run its fixed-tap kernel for them."""
    fixed = native.load("pamr", pamr_mod._native_defines(dilations))
    assert fixed is not None and fixed.nk_fixed_taps() == 8 * len(dilations)
    pamr_mod._bind_native(fixed)
    offsets = pamr_mod._offsets(dilations)
    dy = torch.tensor([o[0] for o in offsets], dtype=torch.int32)
    dx = torch.tensor([o[1] for o in offsets], dtype=torch.int32)
    row_step = __import__("math").gcd(*dilations)
    assert fixed.nk_fixed_kernel_applies(dy.data_ptr(), dx.data_ptr(), len(offsets), max(dilations), row_step) == 1
    return fixed


@pytest.mark.parametrize("threads", [1, 2], indirect=True, ids=["1_thread", "2_threads"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("variant", ["generic", "fixed_taps"])
@pytest.mark.parametrize("case", CASES)
def test_native_matches_reference(lib, threads, variant, dtype, case, rng):
    b, h, w, c, mh, mw, dilations, num_iter = case
    if variant == "fixed_taps":
        lib = _fixed_lib(dilations)
        assert lib.nk_fixed_taps() > 0
    else:
        assert lib.nk_fixed_taps() == 0
    image = torch.randn(b, 3, h, w, generator=rng)
    mask = (2 * torch.randn(b, c, mh, mw, generator=rng)).clamp(-4, 4).to(dtype)
    with poison_outputs():
        out = pamr_mod._pamr_native(image, mask, num_iter, dilations, lib)
    assert out.dtype == dtype and out.shape == (b, c, h, w)
    assert_close_to_reference(out, _expected(image, mask, num_iter, dilations), "pamr", "torch", dtype)


def test_torch_backend_runs_the_native_kernel_on_cpu(lib, monkeypatch, rng):
    """backend="torch" (and "auto" on CPU) take the compiled path for float32/16/bf16, the eager one for float64;
    the library is the one compiled for the dilations."""
    calls = []
    real = pamr_mod._pamr_native
    def spy(image, mask, num_iter, dilations, library):
        calls.append((mask.dtype, library.nk_fixed_taps()))
        return real(image, mask, num_iter, dilations, library)

    monkeypatch.setattr(pamr_mod, "_pamr_native", spy)
    image = torch.randn(1, 3, 9, 10, generator=rng)
    mask = torch.randn(1, 4, 3, 3, generator=rng)
    for backend in ("torch", "auto"):
        out = nk.pamr(image, mask, num_iter=2, dilations=(1, 2), backend=backend)
        assert_close_to_reference(out, _expected(image, mask, 2, (1, 2)), "pamr", "torch", torch.float32)
    nk.pamr(image.double(), mask, num_iter=2, dilations=(1, 2), backend="torch")
    nk.pamr(image, mask.double(), num_iter=2, dilations=(1, 2), backend="torch")
    assert calls == [(torch.float32, 16), (torch.float32, 16)]
    monkeypatch.setenv("NACLIP_KERNELS_NATIVE", "0")
    nk.pamr(image, mask, num_iter=2, dilations=(1, 2), backend="torch")
    assert len(calls) == 2


@pytest.mark.parametrize("threads", [2], indirect=True, ids=["2_threads"])
@pytest.mark.parametrize("dilations", [(8, 16), (1, 2)], ids=["split_by_class", "split_by_channel"])
def test_small_chunks_and_staging_groups(lib, threads, monkeypatch, dilations, rng):
    """Ring chunks of one register block (a tiny L2 budget) and float32 staging groups of one plane per thread,
    so every chunk, group and split boundary is crossed, also with a channel count that is not a multiple of them."""
    monkeypatch.setattr(pamr_mod, "_L2_FRACTION", 1e-9)
    monkeypatch.setattr(pamr_mod, "_STAGING_PLANES_PER_THREAD", 1)
    image = torch.randn(2, 3, 21, 19, generator=rng)
    for dtype in (torch.float32, torch.bfloat16):
        mask = torch.randn(2, 2 * lib.nk_channel_block() + 3, 4, 5, generator=rng).to(dtype)
        with poison_outputs():
            out = pamr_mod._pamr_native(image, mask, 3, dilations, lib)
        assert_close_to_reference(out, _expected(image, mask, 3, dilations), "pamr", "torch", dtype)


def test_ring_chunk_limit(monkeypatch):
    """Chunks fill half of L2 while one block's rings fit there, else a share of L3 split over the threads; always
    whole blocks, at least one."""
    monkeypatch.setattr(pamr_mod, "_cache_bytes", lambda level: {2: 1 << 20, 3: 32 << 20}[level])
    assert pamr_mod._ring_chunk_limit(60_000, 8, 2) == 8                 # 8 x 60 kB < 1 MB: L2 half = 8.7 -> 8
    assert pamr_mod._ring_chunk_limit(20_000, 8, 2) == 24                # 26.2 channels in half of L2 -> 24
    assert pamr_mod._ring_chunk_limit(150_000, 8, 2) == 32               # 1.2 MB > L2: 0.3 x 32 MB / 2 -> 32
    assert pamr_mod._ring_chunk_limit(150_000, 8, 1) == 64               # one thread has the whole share
    assert pamr_mod._ring_chunk_limit(10 << 20, 8, 2) == 8               # never less than one block


@pytest.mark.parametrize("threads", [2], indirect=True, ids=["2_threads"])
def test_chunks_sized_by_l3(lib, threads, monkeypatch, rng):
    """The wide-image schedule (one block's rings larger than L2): one pass of all 10 sweeps, in chunks of several
    fixed-kernel blocks whose prefetch requests are split per block, against the float64 reference."""
    fixed = _fixed_lib((8, 16))
    block = int(fixed.nk_fixed_channel_block())
    width = 37
    # One block's rings miss this L2, so the pass fuses all 10 sweeps (the wide-image schedule).
    per_channel = 4 * int(fixed.nk_pamr_sweep_scratch_floats(1, width, 16, 8, pamr_mod._WIDE_SWEEPS_PER_PASS))
    l3 = int(2 * block * per_channel * threads / pamr_mod._L3_FRACTION) + 1     # two blocks per chunk
    monkeypatch.setattr(pamr_mod, "_cache_bytes", lambda level: per_channel if level == 2 else l3)
    assert pamr_mod._ring_chunk_limit(per_channel, block, threads) == 2 * block
    image = torch.randn(1, 3, 45, width, generator=rng)
    mask = torch.randn(1, 4 * block + 3, 5, 6, generator=rng)
    spy = _SweepSpy(fixed)
    with poison_outputs():
        out = pamr_mod._pamr_native(image, mask, 10, (8, 16), spy)
    assert_close_to_reference(out, _expected(image, mask, 10, (8, 16)), "pamr", "torch", torch.float32)
    assert set(spy.levels) == {10}


class _SweepSpy:
    """A loaded (and bound) PAMR library that records the sweeps per pass of every nk_pamr_sweep_f32 call."""

    def __init__(self, library):
        self._library, self.levels = library, []

    def __getattr__(self, name):
        found = getattr(self._library, name)
        if name != "nk_pamr_sweep_f32":
            return found

        def sweep(*args):
            self.levels.append(args[14])
            return found(*args)
        return sweep


@pytest.mark.parametrize("threads", [1], indirect=True, ids=["1_thread"])
def test_narrow_images_fuse_five_sweeps(lib, threads, monkeypatch):
    """Images whose one-block rings fit L2 keep passes of _SWEEPS_PER_PASS sweeps (two passes for 10)."""
    monkeypatch.setattr(pamr_mod, "_cache_bytes", lambda level: {2: 1 << 20, 3: 32 << 20}[level])
    fixed = _fixed_lib((8, 16))
    spy = _SweepSpy(fixed)
    pamr_mod._pamr_native(torch.randn(1, 3, 40, 64), torch.randn(1, 3, 3, 4), 10, (8, 16), spy)
    assert spy.levels == [5, 5]


@pytest.mark.parametrize("threads", [1], indirect=True, ids=["1_thread"])
def test_plans_are_reused_per_shape_and_follow_the_settings(lib, threads, monkeypatch):
    """_native_plan is computed once per shape, and a changed setting (part of the cache key) takes effect."""
    monkeypatch.setattr(pamr_mod, "_cache_bytes", lambda level: {2: 1 << 20, 3: 32 << 20}[level])
    spy = _SweepSpy(_fixed_lib((8, 16)))
    image, mask = torch.randn(1, 3, 40, 64), torch.randn(1, 3, 3, 4)
    first = pamr_mod._pamr_native(image, mask, 10, (8, 16), spy)
    hits = pamr_mod._native_plan.cache_info().hits
    again = pamr_mod._pamr_native(image, mask, 10, (8, 16), spy)
    assert pamr_mod._native_plan.cache_info().hits == hits + 1
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    assert spy.levels == [5, 5, 5, 5]
    monkeypatch.setattr(pamr_mod, "_SWEEPS_PER_PASS", 10)
    spy.levels.clear()
    fused = pamr_mod._pamr_native(image, mask, 10, (8, 16), spy)
    assert spy.levels == [10]
    assert_close_to_reference(fused, _expected(image, mask, 10, (8, 16)), "pamr", "torch", torch.float32)


def test_pass_levels():
    assert pamr_mod._pass_levels(10, 5) == [5, 5]
    assert pamr_mod._pass_levels(10, 10) == [10]
    assert pamr_mod._pass_levels(10, 3) == [3, 3, 2, 2]
    assert pamr_mod._pass_levels(7, 99) == [7]          # capped at NK_MAX_LEVELS, 10
    assert pamr_mod._pass_levels(12, 99) == [6, 6]


def test_non_contiguous_inputs(lib, rng):
    image = torch.randn(1, 9, 10, 3, generator=rng).permute(0, 3, 1, 2)
    for mask in (torch.randn(1, 10, 8, 9, generator=rng).permute(0, 2, 3, 1)[:, ::2],
                 torch.randn(1, 3, 8, 5, generator=rng)[:, :, ::2, :]):
        with poison_outputs():
            out = pamr_mod._pamr_native(image, mask, 3, (1, 4), lib)
        assert_close_to_reference(out, _expected(image, mask.contiguous(), 3, (1, 4)), "pamr", "torch",
                                  torch.float32)


def test_concurrent_calls_from_threads(lib, rng):
    """Calls from several Python threads at once share nothing (each allocates its own affinities and rings)."""
    image = torch.randn(1, 3, 24, 30, generator=rng)
    masks = [torch.randn(1, 6, 3, 4, generator=rng) for _ in range(4)]
    expected = [pamr_mod._pamr_native(image, m, 4, (8, 16), lib) for m in masks]
    results = [None] * len(masks)

    def run(i):
        results[i] = pamr_mod._pamr_native(image, masks[i], 4, (8, 16), lib)

    workers = [threading.Thread(target=run, args=(i,)) for i in range(len(masks))]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    for got, want in zip(results, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("width", [2, 3], ids=["2_threads", "3_threads"])
def test_phases_run_in_order_with_a_barrier_between_them(lib, width):
    """_run_phases: job i of every phase on thread i (0: the caller), and no job of a phase starts before every
    job of the phase before it has ended (the C barrier)."""
    pamr_mod._bind_native(lib)
    events, lock = [], threading.Lock()

    def job(phase, index):
        def run():
            with lock:
                events.append(("start", phase, index, threading.get_ident()))
            for _ in range(2000 * (index + 1)):      # uneven jobs: the short ones wait at the barrier
                pass
            with lock:
                events.append(("end", phase, index, threading.get_ident()))
        return run

    phases = [[job(p, i) for i in range(width if p != 2 else 1)] for p in range(5)]
    pamr_mod._run_phases(phases, lib)
    assert len(events) == 2 * sum(len(phase) for phase in phases)
    position = {(kind, p, i): n for n, (kind, p, i, _) in enumerate(events)}
    for p in range(1, 5):
        last_end = max(position[("end", p - 1, i)] for i in range(len(phases[p - 1])))
        assert all(position[("start", p, i)] > last_end for i in range(len(phases[p])))
    thread_of = {(p, i): ident for kind, p, i, ident in events}
    assert all(thread_of[(p, 0)] == threading.get_ident() for p in range(5))
    assert all(thread_of[(p, i)] == thread_of[(0, i)] for p in range(5) for i in range(len(phases[p])))


def test_a_failing_phase_job_stops_every_thread_and_raises(lib):
    pamr_mod._bind_native(lib)
    ran = []

    def fail():
        raise ValueError("job 1 failed")

    phases = [[lambda: ran.append("0.0"), fail], [lambda: ran.append("1.0"), lambda: ran.append("1.1")]]
    with pytest.raises(ValueError, match="job 1 failed"):
        pamr_mod._run_phases(phases, lib)
    assert ran == ["0.0"]                 # no thread passed the aborted barrier


def test_kernel_rejects_inconsistent_arguments(lib):
    """The C entry points check their arguments and write nothing when they are inconsistent; the launcher turns
    that into an error that says it is a bug rather than crashing."""
    pamr_mod._bind_native(lib)
    plane = torch.zeros(1, 4, 4)
    dy = torch.tensor([8], dtype=torch.int32)
    dx = torch.tensor([0], dtype=torch.int32)
    aff = torch.zeros(int(lib.nk_affinity_floats(4, 4, 1)))
    width = int(lib.nk_ring_row_floats(4, 8))
    border = torch.zeros(1, 2, 2, width)
    scratch = torch.zeros(int(lib.nk_pamr_sweep_scratch_floats(1, 4, 8, 8, 2)))
    args = [plane.data_ptr(), 16, 4, 1, 4, 4, aff.data_ptr(), dy.data_ptr(), dx.data_ptr(), 1, 8, 8, 0, 8, 2,
            border.data_ptr(), 4 * width, None, 0, None, None, 1, scratch.data_ptr(), scratch.numel()]
    assert lib.nk_pamr_sweep_f32(*args) == 0
    lo, frac = torch.zeros(4, dtype=torch.int32), torch.zeros(4)
    for changes in [{23: scratch.numel() - 1},          # scratch too short
                    {11: 3},                            # row step that does not divide pad
                    {10: 4, 11: 4},                     # pad below |dy|
                    {13: 9},                            # a class past the row step
                    {21: 0},                            # chunk 0
                    {14: 3},                            # three levels
                    {16: width}]:                       # border rows closer than the levels need
        wrong = list(args)
        for index, value in changes.items():
            wrong[index] = value
        assert lib.nk_pamr_sweep_f32(*wrong) == -1, changes
    resized = list(args)                                # a fused pass may read the resize: any number of levels
    resized[17:21] = [plane.data_ptr(), 4, lo.data_ptr(), frac.data_ptr()]
    assert lib.nk_pamr_sweep_f32(*resized) == 0
    strip = torch.zeros(4 * 4)
    history = [plane.data_ptr(), 16, 4, 1, 4, 4, aff.data_ptr(), dy.data_ptr(), dx.data_ptr(), 1, 8, 8, 2,
               border.data_ptr(), 4 * width, plane.data_ptr(), 4, lo.data_ptr(), frac.data_ptr(), strip.data_ptr(),
               torch.zeros(2 * width).data_ptr(), 1, scratch.data_ptr(), scratch.numel()]
    assert lib.nk_pamr_border_history_f32(*history) == 0
    for changes in [{16: 0},                            # a resize source of no rows
                    {17: None},                         # ... or without its row table
                    {12: 9}]:                           # more levels than a pass can fuse
        wrong = list(history)
        for index, value in changes.items():
            wrong[index] = value
        assert lib.nk_pamr_border_history_f32(*wrong) == -1, changes
    with pytest.raises(RuntimeError, match="bug in naclip_kernels"):
        pamr_mod._check_native(-1, "a sweep")


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 instruction-set flag")
def test_non_avx512_variant_matches_reference(tmp_path, rng):
    """The 8-float-vector build (AVX2 machines, most laptops) is the other half of the C code's #if branches."""
    try:
        path = native.build("pamr", extra_flags=["-mno-avx512f"], directory=tmp_path)
    except native.NativeBuildError as exc:
        pytest.fail(f"could not build the non-AVX-512 variant: {exc}")
    variant = ctypes.CDLL(str(path))
    assert variant.nk_vector_width() == 8 and variant.nk_channel_block() == 8
    defines = [f"-D{k}={v}" for k, v in pamr_mod._native_defines((8, 16)).items()]
    fixed = ctypes.CDLL(str(native.build("pamr", extra_flags=["-mno-avx512f", *defines], directory=tmp_path / "f")))
    assert fixed.nk_vector_width() == 8 and fixed.nk_fixed_taps() == 16
    image = torch.randn(2, 3, 23, 29, generator=rng)
    for lib, dilations, mask in [(variant, (8, 16), torch.randn(2, 19, 3, 4, generator=rng)),
                                 (variant, (1, 3), torch.randn(2, 9, 23, 29, generator=rng)),
                                 (fixed, (8, 16), torch.randn(2, 11, 23, 29, generator=rng))]:
        with poison_outputs():
            out = pamr_mod._pamr_native(image, mask, 4, dilations, lib)
        assert_close_to_reference(out, _expected(image, mask, 4, dilations), "pamr", "torch", torch.float32)


# ----------------------------------------------------------------------------------------------------------------
# Build, cache and fallback
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture
def fresh_native_state(monkeypatch, tmp_path):
    """An empty build cache and no library loaded yet in this process, restored afterwards."""
    monkeypatch.setenv("NACLIP_KERNELS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setattr(native, "_failures", {})
    monkeypatch.setattr(native, "_warned", set())
    return tmp_path / "cache"


def test_build_is_cached_per_source_compiler_and_cpu(fresh_native_state, monkeypatch):
    first = native.build("pamr")
    assert first.is_file() and fresh_native_state in first.parents
    compiles = []
    real_run = subprocess.run

    def run(cmd, **kwargs):
        compiles.extend([cmd] if "-o" in cmd else [])
        return real_run(cmd, **kwargs)

    monkeypatch.setattr(native.subprocess, "run", run)
    assert native.build("pamr") == first and compiles == []          # reused: the compiler is not invoked
    other = native.build("pamr", extra_flags=["-DNK_CB=4"])          # other flags: another cache entry
    assert other != first and other.is_file() and len(compiles) == 1


def test_unbuildable_kernel_falls_back_to_eager_with_one_warning(fresh_native_state, monkeypatch, rng):
    monkeypatch.setattr(native, "_compilers", lambda: [sys.executable])   # "compiles" by failing
    image = torch.randn(1, 3, 6, 7, generator=rng)
    mask = torch.randn(1, 2, 6, 7, generator=rng)
    with pytest.warns(RuntimeWarning, match="compiled CPU kernel 'pamr' is unavailable"):
        out = nk.pamr(image, mask, num_iter=2, dilations=(1, 2), backend="torch")
    assert_close_to_reference(out, _expected(image, mask, 2, (1, 2)), "pamr", "torch", torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nk.pamr(image, mask, num_iter=2, dilations=(1, 2), backend="torch")   # no second warning
    status = native.status()["pamr"]
    assert status["available"] is False and "could not compile pamr_cpu.c" in status["reason"]


def test_no_compiler_at_all(fresh_native_state, monkeypatch):
    monkeypatch.setattr(native, "_compilers", lambda: [])
    with pytest.raises(native.NativeBuildError, match="no C compiler found"):
        native.build("pamr")
    with pytest.warns(RuntimeWarning, match="no C compiler found"):
        assert native.load("pamr") is None


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("NACLIP_KERNELS_NATIVE", "off")
    assert native.disabled() and native.load("pamr") is None
    assert native.status()["pamr"] == {"available": False, "reason": "disabled by NACLIP_KERNELS_NATIVE=off"}


def test_unknown_library_name():
    with pytest.raises(ValueError, match="unknown library 'nope'"):
        native.build("nope")


def test_cli_builds_and_reports(fresh_native_state):
    proc = subprocess.run([sys.executable, "-m", "naclip_kernels.native"], capture_output=True, text=True,
                          timeout=300, env={**__import__("os").environ})
    assert proc.returncode == 0, proc.stderr
    assert "pamr: available:" in proc.stdout and "vector width" in proc.stdout
