"""GPU readiness without a GPU: the attention kernel compiles for sm_80 and sm_90 and its configs do not spill.

One subprocess (TRITON_INTERPRET unset, since an interpreted kernel cannot be compiled) compiles every default
config (each dtype x head dim x {single pair, csa} x {no bias, each BLOCK_W}) plus every autotune config of head dim
64, for both targets. Compiled kernels land in Triton's cache, so reruns are fast. Skipped when ptxas/cuobjdump
are unavailable.
"""
from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest

from naclip_kernels import aot
from naclip_kernels._aot_spec import KernelConfig
from naclip_kernels._triton_compat import HAS_TRITON
from naclip_kernels._versions import TESTED, aot_report_name, minor_range

_AVAILABLE, _REASON = aot.ptxas_available() if HAS_TRITON else (False, "Triton is not installed")
requires_ptxas = pytest.mark.skipif(not _AVAILABLE, reason=f"AOT compile unavailable: {_REASON}")


@pytest.fixture(scope="module")
def attention_rows():
    return aot.run_aot(ops=["neighbour_attention"], defaults_only=True, full_head_dims=[64], timeout=900)


@requires_ptxas
def test_all_selected_configs_compile(attention_rows):
    failed = [f"{r['config']} {r['target']}: {r['error']}" for r in attention_rows if not r["ok"]]
    assert not failed, "\n".join(failed)
    assert {r["target"] for r in attention_rows} == {"sm_80", "sm_90"}


@requires_ptxas
def test_default_configs_do_not_spill(attention_rows):
    defaults = [r for r in attention_rows if r["default"]]
    # 3 dtypes x 4 head dims x {pair, csa} at least, on two targets.
    assert len({r["config"] for r in defaults}) >= 24
    spilled = [f"{r['config']} {r['target']}: {r['registers']} regs, {r['spill_bytes']} B spilled"
               for r in defaults if r["ok"] and r["spill_bytes"]]
    assert not spilled, "\n".join(spilled)


@requires_ptxas
def test_head_dim_64_defaults_cover_fp16_bf16_both_targets(attention_rows):
    for dtype in ("fp16", "bf16"):
        for target in ("sm_80", "sm_90"):
            rows = [r for r in attention_rows if r["default"] and r["tags"].get("dtype") == dtype
                    and r["tags"].get("head_dim") == 64 and r["target"] == target]
            assert rows, f"no default D=64 {dtype} config compiled for {target}"
            assert all(r["ok"] and r["spill_bytes"] == 0 for r in rows), rows


@requires_ptxas
def test_autotune_list_has_no_spilling_config(attention_rows):
    """Every config aot_configs() lists (= the pruned autotune space) for head dim 64 is spill-free."""
    hd64 = [r for r in attention_rows if r["tags"].get("head_dim") == 64]
    assert len(hd64) > len([r for r in hd64 if r["default"]])  # non-default configs were compiled too
    spilled = [f"{r['config']} {r['target']}: {r['spill_bytes']} B" for r in hd64 if r["ok"] and r["spill_bytes"]]
    assert not spilled, "\n".join(spilled)


# ---------------------------------------------------------------------------------------------------------------
# No compiler needed
# ---------------------------------------------------------------------------------------------------------------
def test_collect_configs_from_every_op_module():
    configs = aot.collect_configs()
    assert all(isinstance(c, KernelConfig) for c in configs)
    attention = [c for c in configs if c.op == "neighbour_attention"]
    assert attention and all(c.kernel.__name__ == "_neighbour_attention_fwd_kernel" for c in attention)
    arg_names = list(inspect.signature(getattr(attention[0].kernel, "fn", attention[0].kernel)).parameters)
    for c in attention:
        assert list(c.signature) == arg_names, c.name
        assert all(c.signature[name] == "constexpr" for name in c.constexprs), c.name
    # Exactly one default per specialisation (dtype, head dim, similarity kind, bias, BLOCK_W).
    keys = [(c.tags["dtype"], c.tags["head_dim"], c.tags["similarity"], c.tags["has_bias"], c.tags["block_w"])
            for c in attention if c.default]
    assert len(keys) == len(set(keys))
    assert {(k[0], k[1]) for k in keys} == {(d, h) for d in ("fp16", "bf16", "fp32") for h in (32, 64, 80, 128)}


def test_parse_resource_usage_and_table():
    text = ("Resource usage:\n Common:\n  GLOBAL:0\n Function _neighbour_attention_fwd_kernel:\n"
            "  REG:168 STACK:8 SHARED:0 LOCAL:0 CONSTANT[0]:488 TEXTURE:0 SURFACE:0 SAMPLER:0\n")
    assert aot.parse_resource_usage(text) == {"registers": 168, "stack": 8, "static_shared": 0, "local": 0}
    with pytest.raises(ValueError):
        aot.parse_resource_usage("nothing here")
    row = {"op": "x", "kernel": "k", "config": "c", "default": True, "target": "sm_90", "registers": 1,
           "spill_bytes": 0, "shared_bytes": 2, "ok": True, "error": None}
    table = aot.format_table([row])
    assert table.splitlines()[2] == "| x | k | c | * | sm_90 | 1 | 0 | 2 | yes |"


# ---------------------------------------------------------------------------------------------------------------
# Committed reports: one per Triton release that setup.py admits, each clean and covering today's config lists
# ---------------------------------------------------------------------------------------------------------------
REPORTS = Path(__file__).resolve().parent.parent / "bench" / "results" / "aot"


@pytest.mark.parametrize("triton_version", TESTED["triton"])
def test_committed_report_for_each_admitted_triton_is_clean_and_current(triton_version):
    """Every config aot_configs() lists today compiled without spills on sm_80 and sm_90 with that Triton.

    A change to an autotune list or a kernel signature without re-running ``python -m naclip_kernels.aot --json
    bench/results/aot/triton-<version>.json`` under each admitted Triton fails here (names are per config).
    """
    doc = json.loads((REPORTS / aot_report_name(triton_version)).read_text())
    assert doc["toolchain"]["triton"] == triton_version
    rows = {(r["op"], r["config"], r["target"]): r for r in doc["rows"]}
    missing, bad = [], []
    for cfg in aot.collect_configs():
        for target in ("sm_80", "sm_90"):
            row = rows.get((cfg.op, cfg.name, target))
            if row is None:
                missing.append(f"{cfg.op} {cfg.name} {target}")
            elif not row["ok"] or row["spill_bytes"]:
                bad.append(f"{cfg.op} {cfg.name} {target}: ok={row['ok']} spill={row['spill_bytes']} {row['error']}")
    assert not missing, f"not in the triton {triton_version} report:\n" + "\n".join(missing)
    assert not bad, "\n".join(bad)


def test_admitted_triton_range_is_the_tested_one():
    """setup.py's ranges come from _versions.TESTED, and the installed Triton is one of the tested releases."""
    import triton

    assert minor_range("triton") == ">=3.8,<3.10"  # update TESTED and the committed reports together
    tested_minors = {tuple(v.split(".")[:2]) for v in TESTED["triton"]}
    assert tuple(triton.__version__.split(".")[:2]) in tested_minors, triton.__version__


# ---------------------------------------------------------------------------------------------------------------
# Proxy attention: every config aot_configs() lists (all autotune entries x CHUNKS, all dtypes), both targets
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def proxy_rows():
    return aot.run_aot(ops=["proxy_attention"], timeout=900)


@requires_ptxas
def test_proxy_configs_compile_without_spills(proxy_rows):
    failed = [f"{r['config']} {r['target']}: {r['error']}" for r in proxy_rows if not r["ok"]]
    assert not failed, "\n".join(failed)
    spilled = [f"{r['config']} {r['target']}: {r['registers']} regs, {r['spill_bytes']} B spilled"
               for r in proxy_rows if r["spill_bytes"]]
    assert not spilled, "\n".join(spilled)
    assert {r["target"] for r in proxy_rows} == {"sm_80", "sm_90"}
    assert len(proxy_rows) == 2 * len(aot.collect_configs(ops=["proxy_attention"]))


@requires_ptxas
@pytest.mark.parametrize("hd", [64, 256, 768, 1024])
def test_proxy_default_for_clip_widths_compiled_on_both_targets(proxy_rows, hd):
    """The specialisation an un-tuned launch picks for H*D (CLIP ViT-B: 768, ViT-L: 1024) is compiled and
    spill-free for every dtype on both targets."""
    from naclip_kernels.ops import proxy_attention as proxy_op

    for dtype, nbytes in (("fp16", 2), ("bf16", 2), ("fp32", 4)):
        chunks = proxy_op._default_config(nbytes, hd)[4]
        rows = [r for r in proxy_rows if r["default"] and r["tags"]["dtype"] == dtype and r["tags"]["chunks"] == chunks]
        assert {r["target"] for r in rows} == {"sm_80", "sm_90"}, (dtype, hd)
        assert all(r["ok"] and r["spill_bytes"] == 0 for r in rows), rows


def test_proxy_configs_cover_every_launchable_specialisation():
    """No compiler needed: every (dtype, entry, CHUNKS) the launcher can produce is in aot_configs(), with the
    kernel's exact argument list as its signature."""
    from naclip_kernels.ops import proxy_attention as proxy_op

    configs = aot.collect_configs(ops=["proxy_attention"])
    arg_names = list(inspect.signature(getattr(configs[0].kernel, "fn", configs[0].kernel)).parameters)
    names = set()
    for c in configs:
        assert c.kernel.__name__ == "_proxy_attention_fwd_kernel"
        assert list(c.signature) == arg_names, c.name
        assert all(c.signature[name] == "constexpr" for name in c.constexprs), c.name
        names.add(c.name)
    assert len(names) == len(configs)
    for dtype, nbytes in (("fp16", 2), ("bf16", 2), ("fp32", 4)):
        for hd in (8, 64, 200, 256, 512, 768, 1024, 1280, 2048):
            for base in proxy_op._tune_configs(nbytes):
                bm, bn, bc, bh, chunks, nw, ns = proxy_op._specialise(base, hd)
                assert f"{dtype},M{bm},N{bn},C{bc},HD{bh}x{chunks},w{nw},s{ns}" in names, (dtype, hd, base)


def test_report_rows_carry_the_kernel_source_hash():
    """Reports made before a kernel edit are detected as stale: the row hash is the kernel module's jit sources."""
    hashes = {cfg.op: aot.kernel_source_hash(cfg.kernel) for cfg in aot.collect_configs()}
    assert len(set(hashes.values())) == len(hashes)  # one hash per kernel module
    for triton_version in TESTED["triton"]:
        doc = json.loads((REPORTS / aot_report_name(triton_version)).read_text())
        stale = sorted({r["op"] for r in doc["rows"] if r.get("source_hash") != hashes.get(r["op"])})
        assert not stale, (f"triton {triton_version} report is stale for {stale}: re-run python -m naclip_kernels.aot "
                           f"--update bench/results/aot/{aot_report_name(triton_version)} under that Triton")
