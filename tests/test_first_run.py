"""What a first-time user of `naclip` meets (issue 12, "the rough edges"): start-up messages, offline hints for the
interface in use, up-front errors for impossible options, checkpoint files that do not load, the web app's port
and request format, overlay colours, pipes, --version, --json units."""
from __future__ import annotations

import json
import logging
import os
import pickle
import socket
import subprocess
import sys
import warnings
from importlib import metadata

import numpy as np
import pytest
import torch
from PIL import Image

import open_clip
from naclip import cli, server
from naclip import model as nm
from naclip.cli import main
from naclip.model import ModelLoadError, load_clip
from tests.conftest import ROOT, run_python
from tests.naclip_helpers import register_tiny_config, tiny_clip
from tests.test_cli import Factory, _image, _voc
from tests.test_server import FakeSegmenter, make_client

STATUS_LOADING = "naclip: loading "
STATUS_READY = "naclip: model ready in "


def _stderr_lines(capsys):
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------------------------
# One accurate message per way of getting weights
# ---------------------------------------------------------------------------------------------------------------

def _random_init_records(caplog):
    return [r for r in caplog.records if "initialized randomly" in r.getMessage()]


def test_random_weights_give_one_warning_and_no_open_clip_line(caplog):
    name = register_tiny_config()
    with caplog.at_level(logging.INFO), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_clip(name, pretrained=None)
    assert [str(w.message) for w in caught if "RANDOM weights" in str(w.message)] and len(caught) == 1, \
        [str(w.message) for w in caught]
    assert _random_init_records(caplog) == []


def test_loaded_file_gives_no_random_weights_message(tmp_path, caplog):
    name = register_tiny_config()
    path = tmp_path / "tiny.pt"
    torch.save(tiny_clip(seed=2).state_dict(), path)
    with caplog.at_level(logging.INFO), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_clip(name, pretrained=str(path))
    assert [str(w.message) for w in caught] == []
    assert _random_init_records(caplog) == []


def test_open_clip_still_logs_its_line_elsewhere(caplog):
    """The filter is only in place while load_clip builds a model: open_clip's line is not lost for other code."""
    name = register_tiny_config()
    with caplog.at_level(logging.INFO):
        open_clip.create_model(name, pretrained=None)
    assert len(_random_init_records(caplog)) == 1


def test_cli_stderr_has_one_message_per_weights_kind(tmp_path):
    """The real command line's stderr (logging handler and warning format included), in a fresh process."""
    image = _image(tmp_path / "a.png", w=20, h=16)
    weights = tmp_path / "tiny.pt"
    torch.save(tiny_clip(seed=4).state_dict(), weights)
    code = f"""
import sys
from tests.naclip_helpers import register_tiny_config
from naclip.cli import main
name = register_tiny_config()
common = ["segment", {str(image)!r}, "--classes", "a, b", "--model", name, "--device", "cpu", "--no-pamr",
          "--short-side", "32", "--whole"]
for label, pretrained in (("FILE", {str(weights)!r}), ("NONE", "none")):
    print("=== " + label, file=sys.stderr, flush=True)
    rc = main(common + ["--pretrained", pretrained, "--out", {str(tmp_path / "out")!r} + label])
    print(f"rc={{rc}}", file=sys.stderr, flush=True)
"""
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr
    file_part, none_part = proc.stderr.split("=== NONE")
    assert "rc=0" in file_part and "rc=0" in none_part, proc.stderr
    for part in (file_part, none_part):
        assert "initialized randomly" not in part and "Traceback" not in part, part
        assert part.count(STATUS_LOADING) == 1 and part.count(STATUS_READY) == 1, part
    assert f"with weights from {weights}" in file_part and "RANDOM" not in file_part and "warning" not in file_part
    assert none_part.count("RANDOM weights") == 1, none_part            # the warning, once


# ---------------------------------------------------------------------------------------------------------------
# Start-up: say what loads before the slow imports; offline errors in the interface's own words
# ---------------------------------------------------------------------------------------------------------------

def test_loading_is_announced_before_torch_is_imported_and_offline_fails_fast(tmp_path):
    """`naclip segment` with a pretrained tag on an offline machine: the first stderr line says what loads and comes
    before torch / open_clip are imported; NACLIP_OFFLINE=1 skips the network probe; the error's hint is written as
    command-line options."""
    image = _image(tmp_path / "a.png")
    code = f"""
import os, socket, sys
os.environ["NACLIP_OFFLINE"] = "1"
# Empty download caches, whatever this machine has downloaded (patching naclip.model would import torch).
os.environ["HOME"] = os.environ["HF_HOME"] = {str(tmp_path / "home")!r}
os.environ.pop("HF_HUB_CACHE", None)
probes = []
real_connect = socket.create_connection
socket.create_connection = lambda *a, **k: probes.append(a) or real_connect(*a, **k)

class Spy:
    def __init__(self, real):
        self.real, self.first = real, None
    def write(self, text):
        if self.first is None and text.strip():
            self.first = (text.strip(), "torch" in sys.modules, "open_clip" in sys.modules)
        return self.real.write(text)
    def flush(self):
        self.real.flush()
    def isatty(self):
        return False

spy = Spy(sys.stderr)
sys.stderr = spy
from naclip.cli import main
rc = main(["segment", {str(image)!r}, "--classes", "cat, sofa", "--out", {str(tmp_path / "o")!r}, "--device", "cpu"])
print(repr((rc, spy.first, len(probes))))
"""
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr
    rc, (first, torch_loaded, open_clip_loaded), probes = eval(proc.stdout.strip().splitlines()[-1])
    assert rc == 2 and probes == 0
    assert first.startswith("naclip: loading ViT-B-16 with pretrained weights 'openai'") and "torch" in first
    assert not torch_loaded and not open_clip_loaded
    error = [line for line in proc.stderr.splitlines() if line.startswith("naclip: error: ")]
    assert len(error) == 1, proc.stderr
    assert "--pretrained /path/to/open_clip_model.safetensors" in error[0] and "--model ViT-B-16-quickgelu" in error[0]
    assert "pretrained='/path" not in error[0]


@pytest.mark.parametrize("variable", ["NACLIP_OFFLINE", "HF_HUB_OFFLINE"])
def test_offline_variables_skip_the_network_probe(monkeypatch, variable):
    probes = []
    monkeypatch.setenv(variable, "1")
    monkeypatch.setattr(nm, "_cached_weights_file", lambda *a, **k: None)
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: probes.append(a))
    with pytest.raises(ModelLoadError, match="no network access") as info:
        load_clip("ViT-B-16", pretrained="openai")
    assert probes == []                                                  # not even tried
    python_text, cli_text = str(info.value), info.value.cli_message
    assert "pretrained='/path/to/open_clip_model.safetensors'" in python_text and "--pretrained" not in python_text
    assert "--pretrained /path/to/open_clip_model.safetensors" in cli_text and "pretrained='/path" not in cli_text


def test_model_load_error_keeps_both_messages_through_pickle():
    exc = ModelLoadError("python words", cli_message="cli words")
    back = pickle.loads(pickle.dumps(exc))
    assert str(back) == "python words" and back.cli_message == "cli words"
    assert ModelLoadError("same").cli_message == "same"


@pytest.mark.parametrize("quiet", [False, True], ids=["default", "quiet"])
def test_segment_and_eval_say_what_loads_unless_quiet(tmp_path, capsys, quiet):
    image = _image(tmp_path / "a.png")
    q = ["-q"] if quiet else []
    assert main(["segment", str(image), "--classes", "a, b", "--out", str(tmp_path / "o"), "--device", "cpu",
                 "--pretrained", "none"] + q, segmenter_factory=Factory()) == 0
    seg_lines = _stderr_lines(capsys)
    _voc(tmp_path / "voc", {"x": np.zeros((4, 6), np.int64)})
    assert main(["eval", "--preset", "voc21", "--data-root", str(tmp_path / "voc"), "--device", "cpu"] + q,
                segmenter_factory=Factory(by_size={(6, 4): np.zeros((4, 6), np.int64)})) == 0
    eval_lines = _stderr_lines(capsys)
    for lines in (seg_lines, eval_lines):
        status = [line for line in lines if line.startswith((STATUS_LOADING, STATUS_READY))]
        if quiet:
            assert status == [], lines
        else:
            assert status[0].startswith(STATUS_LOADING) and status[1].startswith(STATUS_READY), lines
            assert status[1].endswith("(cpu, float32)")
    if not quiet:   # random weights: the loading line does not repeat what load_clip's warning says
        assert seg_lines[0] == "naclip: loading ViT-B-16 (importing torch and open_clip first takes a few seconds)..."
        assert eval_lines[0].startswith("naclip: loading ViT-B-16 with pretrained weights 'openai'")


def _serve_stops_at_once(monkeypatch):
    """naclip serve binds its port as usual, then stops as if Ctrl+C came at once."""
    from werkzeug import serving

    real_make_server = serving.make_server

    def make_server(*args, **kwargs):
        srv = real_make_server(*args, **kwargs)

        def stop():
            raise KeyboardInterrupt
        srv.serve_forever = stop
        return srv

    monkeypatch.setattr(serving, "make_server", make_server)


def test_serve_says_what_loads(monkeypatch, capsys):
    _serve_stops_at_once(monkeypatch)
    monkeypatch.setattr(server, "build_segmenter", lambda args: FakeSegmenter())
    args = server.add_serve_arguments(cli._Parser()).parse_args(["--port", "0", "--device", "cpu"])
    assert server.run_serve(args) == 0
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("naclip: loading ViT-B-16 with pretrained weights 'openai' (importing torch")
    assert err[1].startswith(STATUS_READY)


# ---------------------------------------------------------------------------------------------------------------
# Options that cannot work are errors before the model loads
# ---------------------------------------------------------------------------------------------------------------

def test_impossible_triton_backend_is_an_up_front_error(tmp_path, capsys, monkeypatch):
    import naclip_kernels._backend as backend

    monkeypatch.setattr(backend, "interpreter_enabled", lambda: False)     # a plain CPU machine
    reason = backend.triton_unavailable_reason(torch.device("cpu"))
    assert reason is not None
    f = Factory()
    rc = main(["segment", str(_image(tmp_path / "a.png")), "--classes", "a", "--out", str(tmp_path / "o"),
               "--backend", "triton", "--device", "cpu"], segmenter_factory=f)
    errors = [line for line in _stderr_lines(capsys) if line.startswith("naclip: error: ")]
    assert rc == 2 and f.calls == [] and len(errors) == 1
    assert errors[0].startswith("naclip: error: --backend triton cannot run on cpu: ")
    assert "TRITON_INTERPRET=1" in errors[0] and "--backend torch" in errors[0] and "backend='torch'" not in errors[0]
    assert reason.split(";")[0] in errors[0]                               # naclip_kernels' own reason

    monkeypatch.setattr(server, "build_segmenter", lambda args: pytest.fail("loaded a model"))
    assert main(["serve", "--backend", "triton", "--device", "cpu", "--port", "0"]) == 2
    assert "--backend triton cannot run on cpu" in capsys.readouterr().err

    # Where Triton can run (here: under the interpreter), the same options go through to the segmenter.
    monkeypatch.setattr(backend, "interpreter_enabled", lambda: True)
    assert main(["segment", str(_image(tmp_path / "a.png")), "--classes", "a", "--out", str(tmp_path / "o"),
                 "--backend", "triton", "--device", "cpu", "-q"], segmenter_factory=f) == 0
    assert f.calls[-1][1]["backend"] == "triton"


@pytest.mark.parametrize("port", ["99999", "65536", "-1", "http"])
def test_out_of_range_port_is_refused(capsys, monkeypatch, port):
    monkeypatch.setattr(server, "run_serve", lambda args: pytest.fail(f"served on {args.port}"))
    assert main(["serve", "--port", port]) == 2
    err = capsys.readouterr().err
    assert "invalid --port" in err and "1..65535" in err and "0 for a free port" in err


def test_port_limits_are_accepted():
    parse = server.add_serve_arguments(cli._Parser()).parse_args
    assert parse(["--port", "0"]).port == 0 and parse(["--port", "65535"]).port == 65535


def test_taken_port_fails_before_the_model_loads(capsys, monkeypatch):
    monkeypatch.setattr(server, "build_segmenter", lambda args: pytest.fail("loaded a model"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert main(["serve", "--port", str(port), "--pretrained", "none", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err and "--port" in err and STATUS_LOADING not in err


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint files that do not load say what is wrong with them
# ---------------------------------------------------------------------------------------------------------------

def _zip_checkpoint(path):
    torch.save(tiny_clip(seed=5).state_dict(), path)


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _make_empty(path):
    path.write_bytes(b"")


def _make_text(path):
    path.write_text("hello\n")


def _make_random(path):
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes())


def _make_truncated_zip(path):
    _zip_checkpoint(path)
    _truncate(path)


def _make_truncated_legacy(path):
    torch.save(tiny_clip(seed=5).state_dict(), path, _use_new_zipfile_serialization=False)
    _truncate(path)


def _make_list(path):
    torch.save([torch.zeros(2)], path)


def _make_dict_of_numbers(path):
    torch.save({"epoch": 3, "lr": 0.1}, path)


def _make_non_tensor_entry(path):
    sd = dict(tiny_clip(seed=5).state_dict())
    sd["visual.conv1.weight"] = 3
    torch.save(sd, path)


def _make_partial_dict(path):
    sd = dict(tiny_clip(seed=5).state_dict())
    sd.pop("visual.conv1.weight")
    sd["fc.weight"] = torch.zeros(2)
    torch.save(sd, path)


def _make_other_size(path):
    sd = dict(tiny_clip(seed=5).state_dict())
    sd["visual.conv1.weight"] = torch.zeros(64, 3, 32, 32)
    torch.save(sd, path)


def _make_torchscript(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")      # torch.jit.script's deprecation notice
        torch.jit.script(torch.nn.Linear(2, 2)).save(str(path))


def _make_misnamed_safetensors(path):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tiny_clip(seed=5).state_dict().items()}, str(path))


def _make_truncated_safetensors(path):
    _make_misnamed_safetensors(path)
    _truncate(path)


@pytest.mark.parametrize("make, filename, expected", [
    (_make_empty, "w.pt", "the file is empty (0 bytes)"),
    (_make_text, "w.pt", "it is not a PyTorch checkpoint (.pt/.pth/.bin) or a safetensors file (it starts with "
                         "b'hello\\n')"),
    (_make_random, "w.bin", "it is not a PyTorch checkpoint"),
    (_make_truncated_zip, "w.pt", "it is truncated or corrupt: it starts like a PyTorch (zip) checkpoint"),
    (_make_truncated_legacy, "w.pt", "it is truncated ("),
    (_make_list, "w.pt", "it holds a list, not a state dict"),
    (_make_dict_of_numbers, "w.pt", "it is not an open_clip CLIP state dict for 'naclip-test-tiny': none of the "
                                    "model's 62 tensors are in it (its keys: 'epoch', 'lr')"),
    (_make_non_tensor_entry, "w.pt", "it holds a dict, but not a state dict: 1 of 62 entries is not tensors "
                                     "(e.g. 'visual.conv1.weight' is of type int)"),
    (_make_partial_dict, "w.pt", "1 of 62 model tensors is missing from it ('visual.conv1.weight'); it has 1 tensor "
                                 "the model does not have ('fc.weight')"),
    (_make_other_size, "w.pt", "1 tensor in it has another shape than in the model (e.g. visual.conv1.weight: "
                               "[64, 3, 32, 32] in the file, [64, 3, 16, 16] in the model)"),
    (_make_torchscript, "w.pt", "it is a TorchScript archive"),
    (_make_misnamed_safetensors, "w.bin", "it is a safetensors file, but its name does not end in '.safetensors'"),
    (_make_truncated_safetensors, "w.safetensors", "it is truncated ("),
], ids=["empty", "text", "random-bytes", "truncated-zip", "truncated-legacy-pickle", "list", "dict-of-numbers",
        "non-tensor-entry", "keys-mismatch", "other-model-size", "torchscript", "safetensors-named-bin", "truncated-safetensors"])
def test_bad_checkpoint_file_says_what_is_wrong(tmp_path, make, filename, expected):
    name = register_tiny_config()
    path = tmp_path / filename
    make(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ModelLoadError) as info:
            load_clip(name, pretrained=str(path))
    message = str(info.value)
    assert message.startswith(f"load_clip: could not load checkpoint '{path}' into '{name}': "), message
    assert expected in message, message
    assert "\n" not in message and len(message) < 700
    assert [str(w.message) for w in caught] == []           # torch's own warnings (e.g. TorchScript) not shown


def test_checkpoint_of_another_model_names_the_difference(tmp_path):
    """A real model name with a checkpoint of another size (here the tiny one into ViT-S-16)."""
    path = tmp_path / "tiny.pt"
    _zip_checkpoint(path)
    with pytest.raises(ModelLoadError, match=r"tensors in it have other shapes than in 'ViT-S-16' \(e\.g\. "):
        load_clip("ViT-S-16", pretrained=str(path))


def test_safetensors_file_loads(tmp_path):
    name = register_tiny_config()
    path = tmp_path / "w.safetensors"
    _make_misnamed_safetensors(path)
    loaded = load_clip(name, pretrained=str(path))
    assert torch.equal(loaded.model.state_dict()["visual.conv1.weight"],
                       tiny_clip(seed=5).state_dict()["visual.conv1.weight"])


# ---------------------------------------------------------------------------------------------------------------
# Other first-run errors: model names and tags
# ---------------------------------------------------------------------------------------------------------------

def test_unknown_model_suggests_the_right_spelling():
    with pytest.raises(ModelLoadError, match=r"unknown open_clip model 'vit-b-16'; did you mean 'ViT-B-16'\?"):
        load_clip("vit-b-16", pretrained=None)


def test_model_without_pretrained_tags_says_what_to_pass(tmp_path, capsys):
    assert not open_clip.list_pretrained_tags_by_model("ViT-S-16")
    with pytest.raises(ModelLoadError) as info:
        load_clip("ViT-S-16", pretrained="openai")
    assert "'ViT-S-16' has no pretrained weights in open_clip" in str(info.value)
    assert "pretrained='/path/w.pt'" in str(info.value) and "pretrained=None" in str(info.value)
    assert "--pretrained /path/w.pt" in info.value.cli_message and "--pretrained none" in info.value.cli_message


# ---------------------------------------------------------------------------------------------------------------
# Overlay colours
# ---------------------------------------------------------------------------------------------------------------

def test_overlay_colours_are_distinct_and_never_dark():
    from naclip.visualize import _srgb_to_lab, overlay_palette

    pal = overlay_palette(256)
    assert pal.shape == (256, 3) and pal.dtype == np.uint8 and len({tuple(c) for c in pal}) == 256
    lightness = _srgb_to_lab(pal.astype(np.float64))[:, 0]
    assert lightness.min() >= 40 and lightness.max() <= 85                # no near-black, no near-white
    first = pal[:20].astype(np.float64)
    rgb_gap = np.sqrt(((first[:, None] - first[None]) ** 2).sum(-1))[np.triu_indices(20, 1)].min()
    assert rgb_gap > 60, rgb_gap                                          # 20 classes: clearly different colours
    assert np.array_equal(overlay_palette(5), pal[:5])
    with pytest.raises(ValueError):
        overlay_palette(257)


def test_first_class_is_coloured_in_the_overlay_and_its_legend():
    from naclip.visualize import class_color, overlay, overlay_color

    assert class_color(0) == (0, 0, 0)                                   # label PNGs keep the VOC palette
    labels = np.zeros((40, 40), np.int64)
    labels[:, 20:] = 1
    photo = Image.new("RGB", (40, 40), (128, 128, 128))
    out = np.asarray(overlay(photo, labels, ["cat", "sofa"], alpha=1.0, legend="all"))
    assert tuple(out[5, 5]) == overlay_color(0) and tuple(out[5, 30]) == overlay_color(1)
    assert out[:, :20].mean() > 60                                      # not a dark patch
    # The legend swatches (right of the image) show the same colours as the overlay, in class order.
    panel = out[:, 40:]
    swatch_colours = {tuple(p) for row in panel for p in row}
    assert overlay_color(0) in swatch_colours and overlay_color(1) in swatch_colours


def test_web_app_legend_uses_the_overlay_colours():
    from naclip.visualize import overlay_color

    labels = np.zeros((8, 8), np.int64)
    labels[:, 4:] = 2
    rendered = server.render_result(Image.new("RGB", (8, 8)), labels, ["cat", "wall", "floor"], server.ServerConfig())
    assert {e["index"]: e["color"] for e in rendered["legend"]} == {
        i: "#%02x%02x%02x" % overlay_color(i) for i in range(3)}


# ---------------------------------------------------------------------------------------------------------------
# Pipes, --version, --json units, output names, the web API's request format
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, status", [(["presets"], 141), (["--version"], 141), (["--help"], None)],
                         ids=["presets", "version", "help"])
def test_closed_stdout_ends_quietly(argv, status):
    """`naclip presets | head -1`: the reader is gone before anything is written (read end closed up front)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        proc = subprocess.run([sys.executable, "-m", "naclip"] + argv, stdout=write_end, stderr=subprocess.PIPE,
                              env=env, timeout=120, text=True)
    finally:
        os.close(write_end)
    assert proc.stderr == ""
    if status is not None:
        assert proc.returncode == status


def test_version_is_instant_and_names_the_stack():
    proc = run_python("import sys\nfrom naclip.cli import main\nrc = main(['--version'])\n"
                      "print('rc', rc, 'torch' in sys.modules, 'open_clip' in sys.modules)")
    assert proc.returncode == 0, proc.stderr
    version_line, status_line = proc.stdout.strip().splitlines()
    assert status_line == "rc 0 False False"                            # nothing heavy imported
    import naclip_kernels

    assert version_line.startswith(f"naclip {naclip_kernels.__version__}")
    for name, dist in (("torch", "torch"), ("triton", "triton"), ("open_clip", "open_clip_torch")):
        assert f"{name} {metadata.version(dist)}" in version_line


def test_eval_json_says_its_units(tmp_path, capsys):
    label = np.zeros((4, 6), np.int64)
    label[:, 3:] = 15
    pred = label.copy()
    pred[:, 5] = 0
    _voc(tmp_path / "voc", {"x": label})
    assert main(["eval", "--preset", "voc21", "--data-root", str(tmp_path / "voc"), "--json", "-", "-q"],
                segmenter_factory=Factory(by_size={(6, 4): pred})) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert result["units"] == "fraction" and 0 < result["mIoU"] < 1
    assert f"mIoU {100 * result['mIoU']:.2f}" in captured.err            # the table: percent of the same value


def test_same_stem_naming_is_documented(capsys):
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["segment", "--help"])
    assert "cat.png -> cat_png_*" in " ".join(capsys.readouterr().out.split())


def test_json_body_is_told_to_use_multipart():
    client = make_client()
    resp = client.post("/api/segment", json={"classes": "cat", "sample": "cat"})
    assert resp.status_code == 415 and "multipart/form-data" in resp.get_json()["error"]
    assert "application/json" in resp.get_json()["error"]
    # A plain urlencoded form (no file: a sample) is a form too and works.
    ok = client.post("/api/segment", data={"classes": "cat, wall", "sample": "cat"},
                     content_type="application/x-www-form-urlencoded")
    assert ok.status_code == 200, ok.get_data(as_text=True)[:300]



def test_checkpoint_path_with_a_tilde_loads(tmp_path, monkeypatch):
    """`--pretrained=~/w.pt` (and pretrained="~/w.pt" in Python) arrive unexpanded: no shell saw that ~."""
    name = register_tiny_config()
    monkeypatch.setenv("HOME", str(tmp_path))
    _zip_checkpoint(tmp_path / "w.pt")
    loaded = load_clip(name, pretrained="~/w.pt")
    assert loaded.weights_id.startswith(f"file:{tmp_path / 'w.pt'}:")


@pytest.mark.parametrize("classes, warned", [("cat", True), ("cat/kitten", True), ("cat, sofa", False)],
                         ids=["one-class", "one-class-with-synonyms", "two-classes"])
def test_a_single_class_is_warned_about(tmp_path, capsys, classes, warned):
    assert main(["segment", str(_image(tmp_path / "a.png")), "--classes", classes, "--out", str(tmp_path / "o"),
                 "-q"], segmenter_factory=Factory()) == 0
    err = capsys.readouterr().err
    assert ("naclip: warning: only one class ('cat'), so every pixel gets it" in err) == warned, err


def test_data_root_one_folder_too_high_gets_a_hint(tmp_path, capsys):
    _voc(tmp_path / "VOCdevkit" / "VOC2012", {"x": np.zeros((4, 6), np.int64)})
    (tmp_path / "VOCdevkit" / "VOC2010").mkdir()                  # a sibling that is not the dataset
    f = Factory()
    assert main(["eval", "--preset", "voc21", "--data-root", str(tmp_path / "VOCdevkit")], segmenter_factory=f) == 2
    err = capsys.readouterr().err
    assert f"did you mean --data-root {tmp_path / 'VOCdevkit' / 'VOC2012'}?" in err and f.calls == []
    assert main(["eval", "--preset", "voc21", "--data-root", str(tmp_path / "VOCdevkit" / "VOC2010")],
                segmenter_factory=f) == 2
    assert "did you mean" not in capsys.readouterr().err               # no guess when there is nothing to find


def test_under_torchrun_only_rank_0_says_what_loads(tmp_path, capsys, monkeypatch):
    import contextlib

    from naclip.distributed import Distributed

    class SecondRank(Distributed):
        def gather(self, obj):           # no process group in this test: this rank's share only
            return [obj]

    @contextlib.contextmanager
    def second_rank(args):
        args.world = SecondRank(rank=1, world_size=2, device="cpu")
        yield args.world

    monkeypatch.setattr(cli, "_world", second_rank)
    images = [str(_image(tmp_path / f"{i}.png")) for i in range(2)]
    assert main(["segment", *images, "--classes", "cat", "--out", str(tmp_path / "o"), "--device", "cpu"],
                segmenter_factory=Factory()) == 0
    err = capsys.readouterr().err
    assert STATUS_LOADING not in err and STATUS_READY not in err and "only one class" not in err, err
    assert (tmp_path / "o" / "1_labels.png").exists()                  # the rank did its share


@pytest.mark.parametrize("quiet", [False, True], ids=["default", "quiet"])
def test_text_encoding_is_its_own_step_before_the_images(tmp_path, capsys, quiet):
    """A first run's text encoding happens right after the model is ready, with naclip.text's progress as lines on
    a non-terminal stderr (tests' stderr is not a terminal), not inside the first image."""
    from naclip.text import clear_memory_cache
    from tests.test_server import tiny_segmenter

    clear_memory_cache()
    made = []

    def factory(preset=None, **kwargs):
        made.append(tiny_segmenter(classes=kwargs["classes"]))
        return made[-1]

    images = [str(_image(tmp_path / f"{i}.png", w=40, h=32)) for i in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["segment", *images, "--classes", "cat, sofa/couch", "--out", str(tmp_path / "o"),
                     "--device", "cpu", "--pretrained", "none"] + (["-q"] if quiet else []),
                    segmenter_factory=factory) == 0
    lines = _stderr_lines(capsys)
    assert made[0]._query_embeddings is not None
    if quiet:
        assert lines == [], lines
        return
    ready = next(i for i, line in enumerate(lines) if line.startswith(STATUS_READY))
    assert lines[ready + 1] == ("naclip: encoding 3 class names x 80 prompt templates (240 prompts, first use; "
                                "kept in memory for this process)...")
    assert lines[ready + 2].startswith("naclip: 240 prompts encoded in ") and lines[ready + 3].startswith(
        "naclip: segmented 2 of 2 image(s)")


def test_text_progress_lines_report_every_encoding(capsys):
    lines = cli._TextProgressLines()
    for total in (4, 6):                      # e.g. two class lists in the web app, one after the other
        for done in range(0, total + 1, 2):
            lines(done, total, f"encoding {total} prompts")
    err = _stderr_lines(capsys)
    assert [line.split(" in ")[0] for line in err] == [
        "naclip: encoding 4 prompts...", "naclip: 4 prompts encoded", "naclip: encoding 6 prompts...",
        "naclip: 6 prompts encoded"]


def test_serve_reports_text_encoding_in_its_log(monkeypatch, capsys):
    from tests.test_server import tiny_segmenter

    made = []
    _serve_stops_at_once(monkeypatch)
    monkeypatch.setattr(server, "build_segmenter", lambda args: made.append(tiny_segmenter()) or made[-1])
    args = server.add_serve_arguments(cli._Parser()).parse_args(["--port", "0", "--device", "cpu"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert server.run_serve(args) == 0
    assert isinstance(made[0].text_encoder.progress, cli._TextProgressLines)     # stderr here is not a terminal
