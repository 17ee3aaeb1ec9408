"""Text side of the pipeline (SPEC.md section 4): prompt templates, synonyms, encoding and caching.

- :data:`OPENAI_IMAGENET_TEMPLATES`: the 80 prompt templates of OpenAI's CLIP ImageNet notebook.
- :func:`parse_classes`: class lines ``"name1, name2"`` -> queries and the query -> class index map.
- :func:`encode_tokens`: CLIP's text tower on token ids, with the sequence cut to the longest prompt. CLIP's text
  transformer is causal and reads the features at the end-of-text token, so the padding after the last EOT never
  influences the result; cutting it is exact (up to floating-point summation order) and makes encoding ~4-6x
  cheaper (prompts are ~10-20 tokens of the 77-token context).
- :class:`TextEncoder`: per query, every template is encoded and L2-normalised, the templates are averaged and the
  mean is L2-normalised again; results are cached in memory and on disk keyed by (model name, weights identity,
  templates, class names, dtype), so a second run with the same classes encodes nothing. The first run groups the
  prompts by token length, so that no batch carries padding (exact, see :func:`encode_tokens`), and reports its
  progress (a message and a tqdm bar on a terminal, or a callback).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import threading
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "OPENAI_IMAGENET_TEMPLATES",
    "parse_classes",
    "read_class_file",
    "encode_tokens",
    "TextEncoder",
    "default_cache_dir",
]

# The 80 templates from OpenAI's "Prompt_Engineering_for_ImageNet" notebook, in its order.
OPENAI_IMAGENET_TEMPLATES: Tuple[str, ...] = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)


def default_cache_dir() -> Path:
    """``$NACLIP_CACHE_DIR/text`` if set, else ``~/.cache/naclip/text``."""
    root = os.environ.get("NACLIP_CACHE_DIR")
    return Path(root) / "text" if root else Path.home() / ".cache" / "naclip" / "text"


def parse_classes(classes: Sequence[str]) -> Tuple[List[str], List[str], List[int]]:
    """Split class lines into queries.

    Args:
        classes: one string per class; synonyms separated by commas (``"sofa, couch"``).

    Returns:
        ``(class_names, queries, query_to_class)``: ``class_names[k]`` is the first name of class ``k``;
        ``queries`` all names in order; ``query_to_class[q]`` the class of query ``q``.

    Raises ``TypeError`` unless ``classes`` is a sequence of str and ``ValueError`` for an empty list or a line
    with no name.
    """
    if isinstance(classes, (str, bytes)) or not isinstance(classes, Sequence):
        raise TypeError(f"classes must be a list of str (one line per class, synonyms 'name1, name2'), got "
                        f"{type(classes).__name__}")
    if len(classes) == 0:
        raise ValueError("classes must not be empty")
    class_names, queries, query_to_class = [], [], []
    for k, line in enumerate(classes):
        if not isinstance(line, str):
            raise TypeError(f"classes[{k}] must be a str, got {type(line).__name__}")
        names = [n.strip() for n in line.split(",") if n.strip()]
        if not names:
            raise ValueError(f"classes[{k}] ({line!r}) has no class name")
        class_names.append(names[0])
        queries.extend(names)
        query_to_class.extend([k] * len(names))
    return class_names, queries, query_to_class


def read_class_file(path) -> List[str]:
    """Class lines from a text file: one class per line (synonyms comma-separated), blank lines skipped."""
    with open(path, encoding="utf-8") as fh:
        return [line.strip() for line in fh if line.strip()]


# --------------------------------------------------------------------------------------------------------------
# Encoding with the sequence cut to the longest prompt
# --------------------------------------------------------------------------------------------------------------
def _text_parts(model: nn.Module):
    """The text tower's pieces as a dict, or ``None`` when it is not the standard causal CLIP text transformer
    (then the full-context ``model.encode_text`` is used)."""
    text = getattr(model, "text", None)
    if text is not None and type(text).__name__ == "TextTransformer":   # CustomTextCLIP
        if text.cls_emb is not None or getattr(text, "use_pad_mask", False):
            return None
        parts = dict(token_embedding=text.token_embedding, positional_embedding=text.positional_embedding,
                     transformer=text.transformer, attn_mask=text.attn_mask, ln_final=text.ln_final,
                     text_projection=text.text_projection, pool_type=text.pool_type,
                     eos_id=getattr(text, "eos_id", None))
    elif hasattr(model, "token_embedding") and hasattr(model, "transformer"):  # open_clip CLIP
        parts = dict(token_embedding=model.token_embedding, positional_embedding=model.positional_embedding,
                     transformer=model.transformer, attn_mask=model.attn_mask, ln_final=model.ln_final,
                     text_projection=model.text_projection, pool_type=getattr(model, "text_pool_type", "argmax"),
                     eos_id=getattr(model, "text_eos_id", None))
    else:
        return None
    # Cutting is exact only for a causal mask and a pooled token that lies inside the kept prefix.
    if parts["attn_mask"] is None or parts["pool_type"] not in ("argmax", "eos", "first"):
        return None
    return parts


def _plain_blocks(transformer: nn.Module):
    """The residual blocks of open_clip's batch-first ``Transformer`` when every one is the plain
    ``ResidualAttentionBlock`` (``ln_1 -> attention -> ls_1``, ``ln_2 -> mlp -> ls_2``); ``None`` otherwise (then
    the transformer runs as a whole)."""
    blocks = getattr(transformer, "resblocks", None)
    if (type(transformer).__name__ != "Transformer" or not getattr(transformer, "batch_first", False)
            or getattr(transformer, "grad_checkpointing", False) or not blocks):
        return None
    if any(type(b).__name__ != "ResidualAttentionBlock" or hasattr(b, "ln_1_kv") for b in blocks):
        return None
    return list(blocks)


def _pool_index(tokens: torch.Tensor, pool_type: str, eos_id: Optional[int]) -> torch.Tensor:
    if pool_type == "argmax":
        return tokens.argmax(dim=-1)
    if pool_type == "eos":
        return (tokens == eos_id).int().argmax(dim=-1)
    return torch.zeros(tokens.shape[0], dtype=torch.long, device=tokens.device)


def encode_tokens(model: nn.Module, tokens: torch.Tensor, truncate: bool = True) -> torch.Tensor:
    """Text features ``[n, D]`` (not normalised, model dtype) for token ids ``[n, context_length]`` int64.

    With ``truncate=True`` the sequence is cut to ``max(pooled position) + 1`` and the text transformer runs on
    ``positional_embedding[:L]`` and ``attn_mask[:L, :L]``: exact for CLIP's causal text tower, which pools at
    the EOT token. When every prompt pools at the last kept position (one token length, as
    :class:`TextEncoder` batches them), the last block computes that position only. Both are exact up to
    floating-point summation order. Towers where that is not exact (no causal mask, last-token pooling, CoCa) use
    ``model.encode_text`` on the full context.
    """
    parts = _text_parts(model) if truncate else None
    if parts is None:
        return model.encode_text(tokens)
    pooled_at = _pool_index(tokens, parts["pool_type"], parts["eos_id"])
    length = int(pooled_at.max().item()) + 1
    tokens = tokens[:, :length]
    cast_dtype = parts["transformer"].get_cast_dtype()
    x = parts["token_embedding"](tokens).to(cast_dtype)
    x = x + parts["positional_embedding"][:length].to(cast_dtype)
    mask = parts["attn_mask"][:length, :length]
    blocks = _plain_blocks(parts["transformer"])
    if blocks is not None and bool((pooled_at == length - 1).all()):
        # Every prompt pools at the last position (a batch of one token length): the last block only has to
        # produce that position. Its keys and values still come from every position; its query, output
        # projection and MLP run on one token per prompt instead of all of them (the causal row of the last
        # position sees every key, so no mask is needed there).
        for block in blocks[:-1]:
            x = block(x, attn_mask=mask)
        last = blocks[-1]
        y = last.ln_1(x)
        x = x[:, -1:] + last.ls_1(last.attention(q_x=y[:, -1:], k_x=y, v_x=y))
        x = x + last.ls_2(last.mlp(last.ln_2(x)))
        x = parts["ln_final"](x)[:, 0]
    else:
        x = parts["transformer"](x, attn_mask=mask)
        x = parts["ln_final"](x)
        x = x[torch.arange(x.shape[0], device=x.device), pooled_at]
    proj = parts["text_projection"]
    if proj is not None:
        x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
    return x


# --------------------------------------------------------------------------------------------------------------
# Progress of a first-run encoding
# --------------------------------------------------------------------------------------------------------------
ProgressCallback = Callable[[int, int, str], None]
_LOG = logging.getLogger("naclip.text")


class _Progress:
    """``with _Progress(setting, total, message) as report: report(n)`` for :class:`TextEncoder`'s ``progress``.

    ``None``: the message and a tqdm bar on stderr when it is a terminal, else the message to the ``naclip.text``
    logger (INFO); ``False`` / ``True``: silent / always the terminal form; a callable gets ``(done, total,
    message)`` once before the first batch and after each.
    """

    def __init__(self, setting, total: int, message: str):
        self.setting, self.total, self.message, self.done = setting, total, message, 0
        self.bar = None

    def __enter__(self):
        if callable(self.setting) and not isinstance(self.setting, bool):
            self.setting(0, self.total, self.message)
        elif self.setting is True or (self.setting is None and sys.stderr.isatty()):
            from tqdm import tqdm

            print(self.message, file=sys.stderr, flush=True)
            self.bar = tqdm(total=self.total, desc="text", unit="prompt", file=sys.stderr, dynamic_ncols=True,
                            leave=False)
        elif self.setting is None:
            _LOG.info(self.message)
        return self._report

    def _report(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif callable(self.setting) and not isinstance(self.setting, bool):
            self.setting(self.done, self.total, self.message)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()
        return False


# --------------------------------------------------------------------------------------------------------------
# Template ensembles with caching
# --------------------------------------------------------------------------------------------------------------
_MEMORY_CACHE: Dict[str, torch.Tensor] = {}
_MEMORY_LOCK = threading.Lock()
_MEMORY_CACHE_MAX = 64


class TextEncoder:
    """Query embeddings for class lists: templates averaged per query, cached in memory and on disk.

    Args:
        model: an open_clip CLIP model (text tower used; any device and dtype).
        tokenizer: its open_clip tokenizer.
        model_name: open_clip model name (cache key).
        weights_id: identity of the weights (``"tag:..."`` / ``"file:path:size:mtime"``); ``None`` (random or
            user-supplied weights of unknown identity) disables the disk cache and keys the memory cache on this
            encoder instance only.
        templates: prompt templates with one ``{}`` each (default: the 80 OpenAI ImageNet templates).
        cache_dir: disk cache directory (default :func:`default_cache_dir`); ``False`` disables the disk cache.
        batch_size: prompts encoded per forward pass (at most).
        truncate: cut token sequences to the longest prompt (exact; see :func:`encode_tokens`).
        group_by_length: batch prompts of equal token length together (with ``truncate``), so that no batch
            carries padding and the last block runs on the pooled token only: about 1.4x less text-tower work for
            the 80 templates than batching in prompt order. Exact up to floating-point summation order.
        progress: how a first-run encoding reports itself. ``None`` (default): on a terminal, a message such as
            ``encoding 56 class names x 80 prompt templates ...`` and a tqdm bar on stderr; elsewhere the message
            goes to the ``naclip.text`` logger. ``False``: silent. A callable ``progress(done, total, message)``
            is called with the prompts encoded so far (``0`` first, ``total`` last) and the same message.

    ``__call__(queries) -> [len(queries), D]`` float32, each row L2-normalised, on the model's device.
    ``encode_calls`` counts text-tower forward passes (0 on a full cache hit).
    """

    def __init__(self, model: nn.Module, tokenizer: Callable, model_name: str, weights_id: Optional[str],
                 templates: Optional[Sequence[str]] = None, cache_dir=None, batch_size: int = 256,
                 truncate: bool = True, group_by_length: bool = True,
                 progress: Union[None, bool, ProgressCallback] = None):
        templates = tuple(OPENAI_IMAGENET_TEMPLATES if templates is None else templates)
        if not templates:
            raise ValueError("templates must not be empty")
        for t in templates:
            if not isinstance(t, str) or t.count("{}") != 1:
                raise ValueError(f"templates: each template must be a str with exactly one '{{}}', got {t!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.weights_id = weights_id
        self.templates = templates
        if not (progress is None or isinstance(progress, bool) or callable(progress)):
            raise TypeError(f"progress must be None, a bool or a callable(done, total, message), got "
                            f"{type(progress).__name__}")
        self.batch_size = batch_size
        self.truncate = truncate
        self.group_by_length = group_by_length
        self.progress = progress
        if cache_dir is False or weights_id is None:
            self.cache_dir: Optional[Path] = None
        else:
            self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.encode_calls = 0
        self._local_cache: Dict[str, torch.Tensor] = {}

    def _dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def cache_key(self, queries: Sequence[str]) -> str:
        payload = json.dumps({"v": 1, "model": self.model_name, "weights": self.weights_id,
                              "templates": list(self.templates), "queries": list(queries),
                              "dtype": str(self._dtype()), "truncate": self.truncate}, sort_keys=True)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()

    def _disk_path(self, key: str) -> Optional[Path]:
        return None if self.cache_dir is None else self.cache_dir / f"{key}.pt"

    def _load_disk(self, key: str, n: int) -> Optional[torch.Tensor]:
        path = self._disk_path(key)
        if path is None or not path.is_file():
            return None
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
            emb = data["embeddings"]
            if not isinstance(emb, torch.Tensor) or emb.dim() != 2 or emb.shape[0] != n:
                return None
            return emb.float()
        except Exception:
            return None  # a corrupt or foreign cache file is simply recomputed (and overwritten)

    def _save_disk(self, key: str, emb: torch.Tensor, queries: Sequence[str]) -> None:
        path = self._disk_path(key)
        if path is None:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            torch.save({"embeddings": emb.cpu(), "queries": list(queries), "model": self.model_name,
                        "weights": self.weights_id}, tmp)
            os.replace(tmp, path)  # atomic: concurrent processes never read a half-written file
        except OSError:
            pass  # an unwritable cache dir only costs re-encoding next time

    def _batches(self, tokens: torch.Tensor) -> List[torch.Tensor]:
        """Prompt indices per forward pass: runs of equal pooled position (token length) when grouping applies,
        each split into ``batch_size`` pieces; otherwise consecutive ``batch_size`` slices."""
        parts = _text_parts(self.model) if self.truncate and self.group_by_length else None
        n = tokens.shape[0]
        if parts is None:
            return [torch.arange(s, min(n, s + self.batch_size)) for s in range(0, n, self.batch_size)]
        pooled_at = _pool_index(tokens, parts["pool_type"], parts["eos_id"])
        batches = []
        for length in torch.unique(pooled_at).tolist():
            idx = torch.nonzero(pooled_at == length).flatten()
            batches.extend(idx.split(self.batch_size))
        return batches

    def _message(self, queries: Sequence[str]) -> str:
        where = ("first run; cached afterwards" if self.cache_dir is not None else
                 "first use; kept in memory for this process")
        return (f"encoding {len(queries)} class names x {len(self.templates)} prompt templates "
                f"({len(queries) * len(self.templates)} prompts, {where})")

    @torch.no_grad()
    def encode(self, queries: Sequence[str]) -> torch.Tensor:
        """Encode without any cache: ``[len(queries), D]`` float32, L2-normalised rows (reports progress)."""
        device = self._device()
        prompts = [t.format(q) for q in queries for t in self.templates]
        tokens = self.tokenizer(prompts)
        feats: Optional[torch.Tensor] = None
        with _Progress(self.progress, len(prompts), self._message(queries)) as report:
            for idx in self._batches(tokens):
                f = encode_tokens(self.model, tokens[idx].to(device), truncate=self.truncate).float()
                self.encode_calls += 1
                if feats is None:
                    feats = f.new_empty(len(prompts), f.shape[-1])
                feats[idx.to(device)] = F.normalize(f, dim=-1)
                report(len(idx))
        per_prompt = feats.view(len(queries), len(self.templates), -1)
        return F.normalize(per_prompt.mean(dim=1), dim=-1)

    def __call__(self, queries: Sequence[str]) -> torch.Tensor:
        queries = list(queries)
        if not queries:
            raise ValueError("queries must not be empty")
        key = self.cache_key(queries)
        device = self._device()
        shared = self.weights_id is not None
        with _MEMORY_LOCK:
            hit = (_MEMORY_CACHE if shared else self._local_cache).get(key)
        if hit is not None:
            return hit.to(device)
        emb = self._load_disk(key, len(queries))
        if emb is None:
            emb = self.encode(queries)
            self._save_disk(key, emb, queries)
        emb = emb.to(device)
        with _MEMORY_LOCK:
            cache = _MEMORY_CACHE if shared else self._local_cache
            if len(cache) >= _MEMORY_CACHE_MAX:
                cache.pop(next(iter(cache)))
            cache[key] = emb
        return emb


def clear_memory_cache() -> None:
    """Drop the process-wide text-embedding cache (the disk cache is kept)."""
    with _MEMORY_LOCK:
        _MEMORY_CACHE.clear()
