"""First-run text encoding benchmark: ``python -m bench.text [--quick] [--preset voc21] [--model ViT-B-16]``.

Encodes a preset's queries with the 80 OpenAI templates on the real text tower with random weights (no download),
once with the prompts batched in prompt order (``group_by_length=False``: the encoder before prompts were grouped
by token length) and once grouped by token length (the default), alternating the two ``--repeats`` times in one
process, and prints the medians, their ratio and the largest embedding difference. ``--quick`` encodes 4 queries
with 8 templates (a smoke test of the script, not a result). Nothing is cached on disk.
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from typing import Any, Dict

from bench import machine, stats, tables


def run(args) -> Dict[str, Any]:
    import torch

    from naclip.model import load_clip
    from naclip.presets import get_preset
    from naclip.text import OPENAI_IMAGENET_TEMPLATES, TextEncoder, parse_classes

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # "RANDOM weights" warning: intended here
        loaded = load_clip(args.model, pretrained=None, device=args.device)
    _, queries, _ = parse_classes(get_preset(args.preset).classes)
    templates = OPENAI_IMAGENET_TEMPLATES
    if args.quick:
        queries, templates = queries[:4], templates[:8]
    times: Dict[str, list] = {"prompt order": [], "grouped by length": []}
    embeddings = {}
    for _ in range(args.repeats):
        for name, grouped in (("prompt order", False), ("grouped by length", True)):
            enc = TextEncoder(loaded.model, loaded.tokenizer, args.model, None, templates=templates,
                              cache_dir=False, group_by_length=grouped, progress=False)
            t0 = time.perf_counter()
            embeddings[name] = enc.encode(queries)
            times[name].append(time.perf_counter() - t0)
    med = {name: stats.percentile(v, 50) for name, v in times.items()}
    diff = (embeddings["prompt order"] - embeddings["grouped by length"]).abs().max().item()
    info = machine.machine_info(args.device)
    print(f"{args.model} text tower (random weights) on {info['cpu_model']}, {info['torch_threads']} threads, "
          f"commit {info['git_commit']}{'-dirty' if info['git_dirty'] else ''}; {len(queries)} queries x "
          f"{len(templates)} templates = {len(queries) * len(templates)} prompts"
          + (" (QUICK smoke run, not a result)" if args.quick else ""))
    for name, v in times.items():
        print(f"  {name:<18} median {tables.fmt_time(med[name])}  (samples: "
              + ", ".join(tables.fmt_time(x) for x in v) + ")")
    print(f"  speedup {med['prompt order'] / med['grouped by length']:.2f}x; max |embedding difference| {diff:.1e}")
    return {"median_s": med, "times_s": times, "max_abs_diff": diff}


def main(argv=None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench.text", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--preset", default="voc21", help="dataset preset whose queries are encoded")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3, help="encodings per variant, alternated (default 3)")
    parser.add_argument("--quick", action="store_true", help="4 queries x 8 templates: a smoke test")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
