"""naclip_kernels._host_memory: private mappings for CPU buffers and transparent-huge-page hints."""
import gc
import sys
import weakref

import pytest
import torch

from naclip_kernels import _host_memory as hm
from naclip_kernels._alloc import empty_output, poison_outputs

LINUX = sys.platform.startswith("linux")


def _thp_mode() -> str:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled", encoding="ascii") as fh:
            text = fh.read()
    except OSError:
        return "absent"
    return text[text.index("[") + 1:text.index("]")]


def _mapped(address: int) -> bool:
    """Whether ``address`` lies in one of this process's mappings (Linux)."""
    with open("/proc/self/maps", encoding="ascii") as fh:
        for line in fh:
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if lo <= address < hi:
                return True
    return False


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int32], ids=str)
@pytest.mark.parametrize("shape", [(7,), (3, 5, 11), (2, 1 << 20)], ids=["7", "3x5x11", "2x1M"])
def test_mapped_empty_is_a_usable_contiguous_tensor(shape, dtype):
    t = hm.mapped_empty(shape, dtype)
    assert t.shape == shape and t.dtype == dtype and t.device.type == "cpu" and t.is_contiguous()
    values = torch.arange(t.numel()).reshape(shape).to(dtype)
    t.copy_(values)
    assert torch.equal(t, values)
    assert torch.equal(t.clone() * 1, values)


def test_mapped_empty_edge_shapes_and_errors():
    assert hm.mapped_empty((0, 4), torch.float32).shape == (0, 4)
    assert hm.mapped_empty((), torch.float32).shape == ()
    with pytest.raises(ValueError, match="non-negative"):
        hm.mapped_empty((2, -1), torch.float32)


@pytest.fixture
def empty_cache():
    hm.empty_cpu_cache()
    yield
    hm.empty_cpu_cache()


@pytest.mark.skipif(not LINUX, reason="reads /proc/self/maps")
def test_without_the_cache_the_mapping_is_released_with_the_last_view(monkeypatch, empty_cache):
    monkeypatch.setenv("NACLIP_KERNELS_CPU_CACHE", "0")
    t = hm.mapped_empty((1 << 20,), torch.float32)
    address = t.data_ptr()
    view = t[10:20].view(2, 5)
    view.fill_(1.0)
    del t
    gc.collect()
    assert _mapped(address), "a live view must keep the mapping"
    ref = weakref.ref(view)
    del view
    gc.collect()
    assert ref() is None
    assert not _mapped(address), "the mapping must be returned to the system with its last view"
    assert hm.cached_bytes() == 0


@pytest.mark.skipif(not LINUX, reason="reads /proc/self/maps")
def test_the_cache_reuses_a_freed_mapping_of_a_similar_size(empty_cache):
    t = hm.mapped_empty((3 << 20,), torch.float32)                    # 12 MiB
    address = t.data_ptr()
    other = hm.mapped_empty((3 << 20,), torch.float32)
    assert other.data_ptr() != address, "a mapping in use is never handed out twice"
    del t
    gc.collect()
    assert hm.cached_bytes() >= 12 << 20 and _mapped(address)
    again = hm.mapped_empty((5 << 19,), torch.float16)              # 5 MiB: below half of it, a new mapping
    assert again.data_ptr() != address
    reused = hm.mapped_empty((10, 1 << 18), torch.float32)            # 10 MiB: fits
    assert reused.data_ptr() == address and reused.shape == (10, 1 << 18)
    del reused, again, other
    gc.collect()
    assert 0 < len(hm._free) <= hm._MAX_CACHED
    released = hm.empty_cpu_cache()
    assert released >= 12 << 20 and hm.cached_bytes() == 0
    assert not _mapped(address)


def test_the_cache_keeps_at_most_a_few_mappings(empty_cache):
    buffers = [hm.mapped_empty((1000 + i,), torch.float32) for i in range(hm._MAX_CACHED + 3)]
    del buffers
    gc.collect()
    assert len(hm._free) == hm._MAX_CACHED


def test_empty_cpu_cache_is_public():
    import naclip_kernels as nk

    assert nk.empty_cpu_cache is hm.empty_cpu_cache


def test_advise_skips_small_disabled_and_non_cpu(monkeypatch):
    assert hm.advise_huge_pages(torch.empty(1000)) is False          # below two huge pages: nothing aligned inside
    big = torch.empty(3 * hm.HUGE_PAGE_BYTES // 4)
    monkeypatch.setenv("NACLIP_KERNELS_HUGE_PAGES", "0")
    assert not hm.huge_pages_enabled()
    assert hm.advise_huge_pages(big) is False
    monkeypatch.setenv("NACLIP_KERNELS_HUGE_PAGES", "1")
    assert hm.huge_pages_enabled() == LINUX
    if torch.cuda.is_available():
        assert hm.advise_huge_pages(torch.empty(3 * hm.HUGE_PAGE_BYTES // 4, device="cuda")) is False


@pytest.mark.skipif(not LINUX or _thp_mode() not in ("always", "madvise"), reason="needs transparent huge pages")
def test_advise_hints_the_aligned_interior(monkeypatch):
    monkeypatch.delenv("NACLIP_KERNELS_HUGE_PAGES", raising=False)
    assert hm.advise_huge_pages(torch.empty(3 * hm.HUGE_PAGE_BYTES // 4)) is True
    assert hm.advise_huge_pages(hm.mapped_empty((hm.HUGE_PAGE_BYTES,), torch.float32)) is True


def test_empty_output_own_mapping_is_poisoned_and_cpu_only():
    with poison_outputs():
        out = empty_output(2, 3, dtype=torch.float16, device="cpu", own_mapping=True)
        assert out.isnan().all()
        ints = empty_output(4, dtype=torch.int32, device="cpu", own_mapping=True)
        assert (ints == -1).all()
    with pytest.raises(RuntimeError, match="not resizable"):
        out.resize_(10, 10)
    plain = empty_output(2, 3, dtype=torch.float32, device="cpu")
    plain.resize_(10, 10)                                             # the default stays an ordinary allocation


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_a_forked_child_starts_with_an_empty_cache(empty_cache):
    import os

    t = hm.mapped_empty((1 << 20,), torch.float32)
    del t
    gc.collect()
    assert hm.cached_bytes() > 0
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:                                                      # the child: report and leave at once
        try:
            cached = hm.cached_bytes()
            fresh = hm.mapped_empty((1000,), torch.float32)
            fresh.fill_(2.0)
            ok = cached == 0 and float(fresh.sum()) == 2000.0
            os.write(write, b"1" if ok else b"0")
        finally:
            os._exit(0)
    os.close(write)
    answer = os.read(read, 1)
    os.waitpid(pid, 0)
    os.close(read)
    assert answer == b"1", "the child inherited the parent's cached mappings"
    assert hm.cached_bytes() > 0, "the parent keeps its cache"
