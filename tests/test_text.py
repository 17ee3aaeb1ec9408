"""naclip.text: templates, class parsing, exact sequence truncation, template ensembles and the caches."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

open_clip = pytest.importorskip("open_clip")

from naclip import text as nt  # noqa: E402
from naclip.text import (OPENAI_IMAGENET_TEMPLATES, TextEncoder, default_cache_dir, encode_tokens,  # noqa: E402
                         parse_classes)
from tests.naclip_helpers import tiny_clip  # noqa: E402
from tests.tolerances import assert_close_to_reference  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer():
    return open_clip.get_tokenizer("ViT-B-16")


@pytest.fixture(autouse=True)
def _fresh_memory_cache():
    nt.clear_memory_cache()
    yield
    nt.clear_memory_cache()


def test_templates_are_openais_80():
    assert len(OPENAI_IMAGENET_TEMPLATES) == 80 == len(set(OPENAI_IMAGENET_TEMPLATES))
    assert all(t.count("{}") == 1 for t in OPENAI_IMAGENET_TEMPLATES)
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES as theirs
    assert tuple(t("{}") for t in theirs) == OPENAI_IMAGENET_TEMPLATES


def test_parse_classes_synonyms():
    names, queries, q2c = parse_classes(["background", "sofa, couch ,", "  cat  "])
    assert names == ["background", "sofa", "cat"]
    assert queries == ["background", "sofa", "couch", "cat"]
    assert q2c == [0, 1, 1, 2]


@pytest.mark.parametrize("bad, err", [("cat", TypeError), ([], ValueError), (["cat", " , "], ValueError),
                                      (["cat", 3], TypeError)])
def test_parse_classes_errors(bad, err):
    with pytest.raises(err, match="classes"):
        parse_classes(bad)


def test_truncated_encoding_equals_full_context(tokenizer):
    """CLIP's text tower is causal and pools at EOT: cutting the padding must not change the features."""
    model = tiny_clip(seed=1)
    prompts = ["a photo of a cat.", "a", "a black and white photo of the extremely long-named thing over there.",
               "itap of my sofa."]
    tokens = tokenizer(prompts)
    seen = []
    hook = model.transformer.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[1]))
    with torch.no_grad():
        full = model.encode_text(tokens)
        cut = encode_tokens(model, tokens, truncate=True)
    hook.remove()
    longest = int(tokens.argmax(dim=-1).max()) + 1
    assert seen == [77, longest] and longest < 25, seen
    torch.testing.assert_close(cut, full, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        assert torch.equal(encode_tokens(model, tokens, truncate=False), full)


def test_truncation_falls_back_for_non_causal_towers(tokenizer):
    model = tiny_clip(seed=1)
    model.attn_mask = None   # a bidirectional text tower: cutting would not be exact, so it must not cut
    tokens = tokenizer(["a photo of a cat."])
    with torch.no_grad():
        torch.testing.assert_close(encode_tokens(model, tokens), model.encode_text(tokens))


def test_ensemble_is_normalised_mean_of_normalised_prompts(tokenizer):
    model = tiny_clip(seed=2)
    templates = ["a photo of a {}.", "a drawing of the {}.", "itap of my {}."]
    enc = TextEncoder(model, tokenizer, "tiny", None, templates=templates, batch_size=4)
    got = enc(["cat", "sofa"])
    with torch.no_grad():
        expected = []
        for q in ["cat", "sofa"]:
            f = F.normalize(model.encode_text(tokenizer([t.format(q) for t in templates])), dim=-1)
            expected.append(F.normalize(f.mean(0), dim=-1))
    torch.testing.assert_close(got, torch.stack(expected), atol=1e-5, rtol=1e-5)
    assert got.dtype == torch.float32 and got.shape == (2, 32)
    assert enc.encode_calls == 2  # 6 prompts in batches of 4


def test_default_templates_are_the_80(tokenizer):
    model = tiny_clip()
    enc = TextEncoder(model, tokenizer, "tiny", None, cache_dir=False, batch_size=1000)
    assert enc.templates == OPENAI_IMAGENET_TEMPLATES
    enc(["cat"])
    lengths = {int(i) for i in tokenizer([t.format("cat") for t in OPENAI_IMAGENET_TEMPLATES]).argmax(dim=-1)}
    assert enc.encode_calls == len(lengths)  # one forward pass per token length (batch_size is large)


def _record_tokens(model):
    """The (cut) token ids the token embedding sees, one entry per forward pass."""
    seen = []
    handle = model.token_embedding.register_forward_pre_hook(lambda mod, args: seen.append(args[0].clone()))
    return seen, handle


@pytest.mark.parametrize("batch_size", [3, 256], ids=["batches_of_3", "one_batch_per_length"])
def test_grouping_by_length_keeps_the_embeddings(tokenizer, batch_size):
    """Prompts batched by token length (no padding, EOT-only last block) give the prompt-order embeddings."""
    model = tiny_clip(seed=5)
    queries = ["cat", "sofa", "potted plant", "tv monitor", "a very long class name with many words"]
    kwargs = dict(templates=OPENAI_IMAGENET_TEMPLATES[:12], cache_dir=False, batch_size=batch_size, progress=False)
    grouped = TextEncoder(model, tokenizer, "tiny", None, **kwargs)
    assert nt._plain_blocks(model.transformer) is not None   # the last-position-only block is exercised
    seen, handle = _record_tokens(model)
    got = grouped.encode(queries)
    handle.remove()
    plain = TextEncoder(model, tokenizer, "tiny", None, group_by_length=False, **kwargs)
    expected = plain.encode(queries)
    assert_close_to_reference(got, expected, "text", "grouped", torch.float32)
    # Every pass holds prompts of one length and is cut to it: each prompt's EOT is the last token, no padding.
    assert len(seen) == grouped.encode_calls and all(len(ids) <= batch_size for ids in seen)
    assert all(bool((ids.argmax(dim=-1) == ids.shape[1] - 1).all()) for ids in seen)
    lengths = tokenizer([t.format(q) for q in queries for t in kwargs["templates"]]).argmax(dim=-1) + 1
    assert sorted(ids.shape[1] for ids in seen for _ in range(len(ids))) == sorted(lengths.tolist())


def test_eot_only_last_block_equals_full_context(tokenizer):
    """A batch of one token length takes the last-position-only last block: same features as encode_text."""
    model = tiny_clip(seed=6)
    tokens = tokenizer(["a photo of a cat.", "a photo of a dog.", "a drawing of a sofa."])
    assert len(set((tokens.argmax(dim=-1)).tolist())) == 1
    with torch.no_grad():
        torch.testing.assert_close(encode_tokens(model, tokens), model.encode_text(tokens), atol=1e-5, rtol=1e-5)


def test_progress_callback_message_and_counts(tokenizer):
    model = tiny_clip(seed=7)
    calls = []
    enc = TextEncoder(model, tokenizer, "tiny", None, templates=OPENAI_IMAGENET_TEMPLATES[:10], batch_size=4,
                      progress=lambda done, total, message: calls.append((done, total, message)))
    enc(["cat", "sofa", "tv monitor"])
    dones = [c[0] for c in calls]
    assert dones[0] == 0 and dones[-1] == 30 and dones == sorted(dones) and len(calls) == enc.encode_calls + 1
    assert {c[1] for c in calls} == {30}
    assert calls[0][2] == ("encoding 3 class names x 10 prompt templates (30 prompts, first use; kept in memory "
                           "for this process)")
    enc(["cat", "sofa", "tv monitor"])   # cached: no second report
    assert len(calls) == enc.encode_calls + 1


def test_progress_default_logs_off_a_terminal_and_false_is_silent(tokenizer, tmp_path, caplog, capsys):
    model = tiny_clip(seed=8)
    templates = OPENAI_IMAGENET_TEMPLATES[:3]
    with caplog.at_level("INFO", logger="naclip.text"):
        TextEncoder(model, tokenizer, "tiny", "tag:test", templates=templates, cache_dir=tmp_path)(["cat"])
    assert [r.getMessage() for r in caplog.records] == [
        "encoding 1 class names x 3 prompt templates (3 prompts, first run; cached afterwards)"]
    caplog.clear()
    with caplog.at_level("INFO", logger="naclip.text"):
        TextEncoder(model, tokenizer, "tiny", None, templates=templates, progress=False)(["dog"])
    assert not caplog.records
    assert capsys.readouterr().err == ""


def test_bad_progress(tokenizer):
    with pytest.raises(TypeError, match="progress"):
        TextEncoder(tiny_clip(), tokenizer, "tiny", None, progress="yes")


def test_disk_cache_second_run_encodes_nothing(tmp_path, tokenizer):
    model = tiny_clip(seed=4)
    templates = ["a photo of a {}.", "a drawing of the {}."]
    first = TextEncoder(model, tokenizer, "tiny", "tag:test", templates=templates, cache_dir=tmp_path)
    a = first(["cat", "sofa", "couch"])
    assert first.encode_calls == 1 and len(list(tmp_path.glob("*.pt"))) == 1

    nt.clear_memory_cache()   # a new process: only the disk cache is left
    second = TextEncoder(model, tokenizer, "tiny", "tag:test", templates=templates, cache_dir=tmp_path)
    b = second(["cat", "sofa", "couch"])
    assert second.encode_calls == 0
    assert torch.equal(a, b)

    third = TextEncoder(model, tokenizer, "tiny", "tag:test", templates=templates, cache_dir=tmp_path)
    third(["cat", "sofa", "couch"])       # memory hit
    assert third.encode_calls == 0


@pytest.mark.parametrize("change", ["classes", "templates", "weights", "model"])
def test_cache_key_covers_everything(tmp_path, tokenizer, change):
    model = tiny_clip()
    base = dict(model_name="tiny", weights_id="tag:a", templates=["a photo of a {}."])
    TextEncoder(model, tokenizer, cache_dir=tmp_path, **base)(["cat"])
    changed = dict(base)
    queries = ["cat"]
    if change == "classes":
        queries = ["dog"]
    elif change == "templates":
        changed["templates"] = ["a drawing of a {}."]
    elif change == "weights":
        changed["weights_id"] = "tag:b"
    else:
        changed["model_name"] = "tiny2"
    enc = TextEncoder(model, tokenizer, cache_dir=tmp_path, **changed)
    enc(queries)
    assert enc.encode_calls == 1


def test_random_weights_are_never_disk_cached(tmp_path, tokenizer):
    model = tiny_clip()
    enc = TextEncoder(model, tokenizer, "tiny", None, templates=["a {}."], cache_dir=tmp_path)
    enc(["cat"])
    enc(["cat"])
    assert enc.encode_calls == 1                        # the instance's own memory cache
    assert not list(tmp_path.iterdir())
    other = TextEncoder(tiny_clip(seed=9), tokenizer, "tiny", None, templates=["a {}."], cache_dir=tmp_path)
    other(["cat"])
    assert other.encode_calls == 1                      # different random weights are never confused


def test_corrupt_cache_file_is_recomputed(tmp_path, tokenizer):
    model = tiny_clip()
    enc = TextEncoder(model, tokenizer, "tiny", "tag:x", templates=["a {}."], cache_dir=tmp_path)
    a = enc(["cat"])
    (path,) = tmp_path.glob("*.pt")
    path.write_bytes(b"garbage")
    nt.clear_memory_cache()
    enc2 = TextEncoder(model, tokenizer, "tiny", "tag:x", templates=["a {}."], cache_dir=tmp_path)
    torch.testing.assert_close(enc2(["cat"]), a)
    assert enc2.encode_calls == 1


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("NACLIP_CACHE_DIR", str(tmp_path))
    assert default_cache_dir() == tmp_path / "text"
    monkeypatch.delenv("NACLIP_CACHE_DIR")
    assert default_cache_dir().parts[-3:] == (".cache", "naclip", "text")


@pytest.mark.parametrize("templates", [[], ["no placeholder"], ["{} and {}"]])
def test_bad_templates(templates, tokenizer):
    with pytest.raises(ValueError, match="template"):
        TextEncoder(tiny_clip(), tokenizer, "tiny", None, templates=templates)
