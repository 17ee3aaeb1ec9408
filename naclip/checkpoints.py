"""Loading a local checkpoint file into an open_clip model, with errors that say what is wrong with the file.

:func:`load_checkpoint_file` is what :func:`naclip.model.load_clip` uses for ``pretrained="/path/file"`` and for
weights found in the download cache. It keeps open_clip's own loading (``open_clip.load_checkpoint``: third-party
layouts converted, positional embeddings resized, ``weights_only=True``) and adds:

- cheap checks of the file's first bytes and zip directory *before* anything is unpickled: an empty file, a zip
  checkpoint cut off before its end (an interrupted copy or download), a TorchScript archive (OpenAI's original
  ``.pt`` files), a safetensors file with another suffix, a file that is no checkpoint at all;
- an exact key check (every model tensor present, no extra ones) instead of torch's multi-line strict-mode error;
- after any other failure, one look at what the file holds (a list, a dict of non-tensors, pickled objects that
  ``weights_only=True`` refuses) so the message names the problem rather than an exception such as ``KeyError: 101``.

Every problem raises :class:`CheckpointError` whose message is one sentence about the file (the caller adds the path
and the model name).
"""
from __future__ import annotations

import os
import pickle
import re
import struct
import zipfile
from typing import Any, List, Optional, Sequence

__all__ = ["CheckpointError", "load_checkpoint_file", "check_checkpoint_file"]

_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO = b"\x80"          # pickle protocol >= 2: torch's legacy (pre-1.6) checkpoint format starts so
_EXAMPLES = 3


class CheckpointError(ValueError):
    """A checkpoint file that cannot be loaded into the model; the message says why, in one sentence."""


def _size_text(n: int) -> str:
    return f"{n:,} bytes" if n < 1024 * 1024 else f"{n / (1024 * 1024):.1f} MiB"


def _is_safetensors_header(head: bytes) -> bool:
    # safetensors: an 8-byte little-endian header length, then the JSON header itself.
    return len(head) >= 9 and head[8:9] == b"{" and 2 <= struct.unpack("<Q", head[:8])[0] < 100 * 1024 * 1024


def check_checkpoint_file(path: str) -> None:
    """Raise :class:`CheckpointError` when the first bytes / zip directory of ``path`` already show that it cannot
    be a loadable state dict. Reads at most the zip directory, never the tensors."""
    size = os.path.getsize(path)
    if size == 0:
        raise CheckpointError("the file is empty (0 bytes)")
    with open(path, "rb") as fh:
        head = fh.read(16)
    is_safetensors_name = path.endswith(".safetensors")
    if _is_safetensors_header(head):
        if not is_safetensors_name:
            raise CheckpointError("it is a safetensors file, but its name does not end in '.safetensors' (which is "
                                  "how open_clip picks the safetensors reader); rename it")
        return
    if is_safetensors_name:
        raise CheckpointError(f"it is not a safetensors file, or it is truncated ({_size_text(size)}; a safetensors "
                              f"file starts with its header length and a JSON header, this one with {head[:8]!r})")
    if head.startswith(_ZIP_MAGIC):
        if not zipfile.is_zipfile(path):
            raise CheckpointError(f"it is truncated or corrupt: it starts like a PyTorch (zip) checkpoint but its "
                                  f"end, the zip directory, is missing ({_size_text(size)}); copy or download it again")
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
        if any(n.endswith("constants.pkl") or "/code/" in n for n in names):
            raise CheckpointError(
                "it is a TorchScript archive (such as OpenAI's original ViT-B-16.pt), not a state dict; TorchScript "
                "can run code and is not loaded. Use open_clip's checkpoint instead (open_clip_model.safetensors on "
                "the Hugging Face hub), or convert a file you trust once: torch.save(open_clip.load_openai_model("
                "'ViT-B-16.pt', device='cpu').state_dict(), 'w.pt'), used with a '-quickgelu' model name")
        return
    if not head.startswith(_PICKLE_PROTO):
        raise CheckpointError(f"it is not a PyTorch checkpoint (.pt/.pth/.bin) or a safetensors file (it starts "
                              f"with {head[:8]!r})")


def _examples(keys: Sequence[str]) -> str:
    shown = ", ".join(repr(k) for k in list(keys)[:_EXAMPLES])
    return shown + (", ..." if len(keys) > _EXAMPLES else "")


def _shape(text: str) -> str:
    return "[" + ", ".join(p.strip() for p in text.split(",") if p.strip()) + "]"


def _count(n: int, total: int, what: str) -> str:
    return f"{n} of {total} {what} {'is' if n == 1 else 'are'}"


def _mismatch_message(model_name: str, total: int, missing: List[str], unexpected: List[str]) -> str:
    if len(missing) == total:
        return (f"it is not an open_clip CLIP state dict for {model_name!r}: none of the model's {total} tensors are "
                f"in it (its keys: {_examples(unexpected)})")
    parts = []
    if missing:
        parts.append(f"{_count(len(missing), total, 'model tensors')} missing from it ({_examples(missing)})")
    if unexpected:
        parts.append(f"it has {len(unexpected)} tensor{'s' if len(unexpected) != 1 else ''} the model does not "
                     f"have ({_examples(unexpected)})")
    return (f"its tensors do not match {model_name!r}: " + "; ".join(parts)
            + "; is it a checkpoint of another model?")


_SIZE_MISMATCH = re.compile(r"size mismatch for ([\w.]+): copying a param with shape torch\.Size\(\[([\d, ]*)\]\) "
                            r"from checkpoint, the shape in current model is torch\.Size\(\[([\d, ]*)\]\)")


def _looks_truncated(exc: BaseException) -> bool:
    text = str(exc)
    return isinstance(exc, EOFError) or any(marker in text for marker in (
        "pickle data was truncated", "unexpected EOF", "file not fully covered", "Ran out of input"))


def _read_back(path: str) -> Any:
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:   # the legacy (non-zip) format cannot be memory-mapped
        return torch.load(path, map_location="cpu", weights_only=True)


def _compare_with_model(obj: dict, model: Any, model_name: str) -> Optional[str]:
    """What differs between a state dict read from a file and the model's own (names, then shapes)."""
    expected = model.state_dict()
    shapes = [(k, list(v.shape), list(expected[k].shape)) for k, v in obj.items()
              if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    if shapes:
        # Positional embeddings of another grid size are resized by open_clip: show a real difference first.
        shapes.sort(key=lambda item: "positional_embedding" in item[0])
        name, got, want = shapes[0]
        n = len(shapes)
        return (f"{n} tensor{'s' if n != 1 else ''} in it {'have other shapes' if n != 1 else 'has another shape'} "
                f"than in {model_name!r} (e.g. {name}: {got} in the file, {want} in the model); is it a checkpoint "
                f"of another model size?")
    missing = [k for k in expected if k not in obj]
    unexpected = [k for k in obj if k not in expected]
    if missing or unexpected:
        return _mismatch_message(model_name, len(expected), missing, unexpected)
    return None


def _content_problem(path: str, exc: BaseException, model: Any, model_name: str) -> str:
    """Why loading failed, from the exception and (if that is not enough) one look at what the file holds."""
    import torch

    text = " ".join(str(exc).split())
    sizes = _SIZE_MISMATCH.findall(str(exc))
    if sizes:
        name, got, want = sizes[0]
        n = len(sizes)
        return (f"{n} tensor{'s' if n != 1 else ''} in it {'have other shapes' if n != 1 else 'has another shape'} "
                f"than in the model (e.g. {name}: {_shape(got)} in the file, {_shape(want)} in the model); is it a checkpoint of "
                f"another model size?")
    if isinstance(exc, pickle.UnpicklingError) and "Weights only load failed" in text:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        what = f" (it needs {found.group(1)})" if found else ""
        return (f"it holds pickled Python objects besides tensors{what}; checkpoints are loaded with "
                f"weights_only=True so that a file cannot run code. Save a plain state dict instead: "
                f"torch.save(model.state_dict(), 'w.pt')")
    truncated = f"it is truncated ({_size_text(os.path.getsize(path))}); copy or download it again"
    if _looks_truncated(exc):
        return truncated
    if path.endswith(".safetensors"):
        return f"it is not a valid safetensors file ({text[:300]})"
    try:
        obj = _read_back(path)
    except Exception as again:  # noqa: BLE001 - whatever it is, it is the file's problem: report it
        if _looks_truncated(again):
            return truncated
        return f"it could not be read ({type(again).__name__}: {' '.join(str(again).split())[:300]})"
    if isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        return (f"it holds a {type(obj).__name__}, not a state dict (a dict of parameter names to tensors, as "
                f"torch.save(model.state_dict(), path) writes)")
    if not obj:
        return "it holds an empty dict, not a state dict"
    bad = [(k, v) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        key, value = bad[0]
        return (f"it holds a dict, but not a state dict: {_count(len(bad), len(obj), 'entries')} not tensors "
                f"(e.g. {str(key)!r} is of type {type(value).__name__})")
    return _compare_with_model(obj, model, model_name) or f"{type(exc).__name__}: {text[:400]}"


def load_checkpoint_file(open_clip: Any, model: Any, path: str, model_name: str) -> None:
    """Load the state dict in ``path`` into ``model`` (open_clip's ``load_checkpoint``, ``weights_only=True``),
    requiring every model tensor and no extra ones. Raises :class:`CheckpointError` saying what is wrong."""
    check_checkpoint_file(path)
    try:
        incompatible = open_clip.load_checkpoint(model, path, strict=False, weights_only=True, device="cpu")
    except Exception as exc:  # noqa: BLE001 - translated into what is wrong with the file
        raise CheckpointError(_content_problem(path, exc, model, model_name)) from exc
    missing = list(getattr(incompatible, "missing_keys", None) or [])
    unexpected = list(getattr(incompatible, "unexpected_keys", None) or [])
    if missing or unexpected:
        raise CheckpointError(_mismatch_message(model_name, len(model.state_dict()), missing, unexpected))
