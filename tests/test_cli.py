"""The `captioner` command line: help, evaluate end to end on the tiny Flickr8k fixture, combine,
usage errors (exit 2) and bad input (one line, no traceback)."""
import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from captioner.api import Captioner
from captioner.checkpoint import load_tensors, save_tensors
from captioner.cli import build_parser, main
from captioner.evaluate import METRIC_NAMES, score_captions

ROOT = Path(__file__).resolve().parents[1]


def run_main(capsys, *argv):
    """main() in this process; returns (exit status, stdout, stderr)."""
    try:
        status = main([str(a) for a in argv])
    except SystemExit as exc:               # argparse: --help and usage errors
        status = exc.code
    out, err = capsys.readouterr()
    return status, out, err


def subcommands() -> list[str]:
    parser = build_parser()
    (action,) = [a for a in parser._actions if a.dest == "command"]
    return sorted(action.choices)


def test_python_m_captioner_help():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "captioner", "--help"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: captioner")
    for command in ("caption", "train", "evaluate", "serve"):
        assert command in result.stdout


def test_the_four_subcommands_exist():
    assert {"caption", "train", "evaluate", "serve", "combine"} <= set(subcommands())


@pytest.mark.parametrize("command", subcommands())
def test_each_subcommand_has_help(capsys, command):
    status, out, _ = run_main(capsys, command, "--help")
    assert status == 0 and out.startswith(f"usage: captioner {command}")


@pytest.mark.parametrize("argv", [
    [],                                                   # no subcommand
    ["frobnicate"],                                       # unknown subcommand
    ["evaluate", "--data-root", "x"],                     # --dataset missing
    ["evaluate", "--dataset", "imagenet", "--data-root", "x"],
    ["caption"],                                          # no INPUT
    ["caption", "a.jpg", "--method", "magic"],
    ["caption", "a.jpg", "--beam-size", "three"],
    ["train", "--dataset", "flickr8k", "--data-root", "x", "--output", "y", "--epochs", "1.5"],
    ["combine", "a.safetensors"],                         # -o missing
])
def test_usage_errors_exit_2(capsys, argv):
    status, out, err = run_main(capsys, *argv)
    assert status == 2 and "usage: captioner" in err and "error:" in err
    assert out == ""


def evaluate_args(checkpoint, data_root, *extra):
    return ["evaluate", "--checkpoint", checkpoint, "--dataset", "flickr8k", "--data-root", data_root,
            "--split", "test", "--no-fast", *extra]


def test_evaluate_prints_the_coco_caption_scores(capsys, tmp_path, tiny_checkpoint, tiny_captioner,
                                                 flickr8k_tiny, coco_caption_scores):
    report = tmp_path / "eval.json"
    with pytest.warns(UserWarning, match="skipped 1 captions that point to no image, 1 missing images"):
        status, out, err = run_main(capsys, *evaluate_args(tiny_checkpoint, flickr8k_tiny, "--method",
                                                           "greedy", "--json", report))
    assert status == 0, err
    assert "flickr8k test: 4 images, greedy" in out
    printed = {m.group(1): float(m.group(2))
               for m in re.finditer(r"^(BLEU-[1-4]|METEOR|ROUGE-L|CIDEr)\s+([0-9.]+)$", out, re.M)}
    assert list(printed) == list(METRIC_NAMES)
    assert "SPICE: not computed" in out

    written = json.loads(report.read_text())
    captions = written["captions"]
    test_split = (flickr8k_tiny / "Flickr_8k.testImages.txt").read_text().split()
    assert sorted(captions) == sorted(test_split[:4])          # the absent 5th image is skipped
    # the captions are the model's own (same as the Python API gives)
    paths = [str(flickr8k_tiny / "Images" / name) for name in captions]
    assert list(captions.values()) == [c.text for c in tiny_captioner.caption(paths, method="greedy")]
    references = {}
    for line in (flickr8k_tiny / "Flickr8k.token.txt").read_text().splitlines():
        name, _, text = line.partition("\t")
        if name.split("#")[0] in captions:
            references.setdefault(name.split("#")[0], []).append(text)
    expected = coco_caption_scores(references, captions)
    assert score_captions(references, captions) == pytest.approx(expected, abs=1e-12)
    for name in METRIC_NAMES:
        assert written["scores"][name] == pytest.approx(expected[name], abs=1e-12), name
        assert printed[name] == pytest.approx(expected[name], abs=5e-5), name
    assert written["scores"]["BLEU-1"] > 0.3      # trained on these captions: real overlap


@pytest.mark.parametrize("argv, message", [
    (["--checkpoint", "{tmp}/missing.safetensors"], "no such checkpoint"),
    (["--data-root", "{tmp}/nowhere"], "Flickr8k.token.txt not found"),
    (["--split", "holiday"], "unknown Flickr8k split 'holiday'"),
])
@pytest.mark.filterwarnings("ignore:Flickr8k test")       # the data is read first, its messy rows warned of
def test_evaluate_bad_input_is_one_line(capsys, tmp_path, tiny_checkpoint, flickr8k_tiny, argv, message):
    args = evaluate_args(tiny_checkpoint, flickr8k_tiny) + [a.format(tmp=tmp_path) for a in argv]
    status, out, err = run_main(capsys, *args)
    assert status == 2 and message in err
    assert "Traceback" not in err and err.strip().count("\n") == 0


def other_checkpoint(tiny_checkpoint, path, scale=0.9, vocab_extra=()):
    """A second checkpoint of the same shape: the same model with its readout scaled."""
    tensors, meta = load_tensors(tiny_checkpoint)
    tensors["decoders.0.readout.weight"] = tensors["decoders.0.readout.weight"] * scale
    if vocab_extra:
        meta = {**meta, "vocab": meta["vocab"][: -len(vocab_extra)] + list(vocab_extra)}
    save_tensors(path, tensors, meta)
    return path


def test_combine_makes_an_ensemble_that_loads_and_captions(capsys, tmp_path, tiny_checkpoint,
                                                           tiny_captioner, flickr8k_tiny):
    images = sorted(str(p) for p in (flickr8k_tiny / "Images").glob("*.jpg"))[:3]
    second = other_checkpoint(tiny_checkpoint, tmp_path / "second.safetensors")
    status, out, err = run_main(capsys, "combine", tiny_checkpoint, second, "-o", tmp_path / "ens")
    assert status == 0, err
    path = tmp_path / "ens" / "model.safetensors"
    assert out.strip() == f"wrote {path}"
    ensemble = Captioner.load(path, fast=False)
    assert len(ensemble.decoders) == 2
    assert torch.equal(ensemble.decoders[1].readout.weight, tiny_captioner.decoders[0].readout.weight * 0.9)
    captions = ensemble.caption(images, method="beam", beam_size=2)
    assert all(c.text and c.logprob < 0 for c in captions)
    # file names only: a header carries no local paths
    assert ensemble.info["ensemble_of"] == [tiny_checkpoint.name, second.name]

    # a model averaged with itself is the same model
    status, _, err = run_main(capsys, "combine", tiny_checkpoint, tiny_checkpoint, "-o",
                              tmp_path / "self.safetensors", "--half")
    assert status == 0, err
    twice = Captioner.load(tmp_path / "self.safetensors", fast=False)
    single = [c.text for c in tiny_captioner.caption(images, method="greedy")]
    assert [c.text for c in twice.caption(images, method="greedy")] == single


def test_combine_stores_a_tied_member_untied_with_the_same_captions(tmp_path, tiny_captioner, flickr8k_tiny):
    from captioner.ensemble import ensemble_of

    images = sorted(str(p) for p in (flickr8k_tiny / "Images").glob("*.jpg"))[:3]
    cfg = tiny_captioner.model_cfg
    tied = Captioner.create(dataclasses.replace(cfg, tie_embeddings=True, embed_dim=cfg.hidden_dim),
                            tiny_captioner.vocab, pretrained=False)
    tied.encoder = tiny_captioner.encoder
    plain = Captioner.create(dataclasses.replace(cfg, embed_dim=cfg.hidden_dim), tiny_captioner.vocab,
                             pretrained=False)
    plain.encoder = tiny_captioner.encoder
    both = ensemble_of([plain, tied], ["plain", "tied"])
    assert not both.model_cfg.tie_embeddings and len(both.decoders) == 2
    loaded = Captioner.load(both.save(tmp_path / "both.safetensors"), fast=False)
    alone = ensemble_of([tied], ["tied"])
    assert [c.text for c in alone.caption(images, method="greedy")] == \
        [c.text for c in tied.eval().caption(images, method="greedy")]
    assert [c.text for c in loaded.caption(images, method="greedy")] == \
        [c.text for c in both.eval().caption(images, method="greedy")]


def test_an_fp16_member_combines_with_fp32_members_of_the_same_cnn(tmp_path, tiny_captioner, flickr8k_tiny):
    """A released (fp16) checkpoint joins an ensemble of freshly trained (fp32) decoders on the same
    CNN; a CNN that differs beyond fp16 rounding is still refused."""
    from captioner.checkpoint import CheckpointError
    from captioner.ensemble import ensemble_of

    images = sorted(str(p) for p in (flickr8k_tiny / "Images").glob("*.jpg"))[:3]
    released = Captioner.load(tiny_captioner.save(tmp_path / "released.safetensors", half=True), fast=False)
    both = ensemble_of([tiny_captioner, released], ["fresh", "released"])
    assert len(both.decoders) == 2 and all(c.text for c in both.caption(images, method="greedy"))
    with torch.no_grad():
        next(p for p in released.encoder.parameters() if p.numel() > 1).mul_(1.01)
    with pytest.raises(CheckpointError, match="encoder weights differ"):
        ensemble_of([tiny_captioner, released], ["fresh", "changed"])


def test_combine_refuses_different_vocabularies(capsys, tmp_path, tiny_checkpoint):
    other = other_checkpoint(tiny_checkpoint, tmp_path / "other.safetensors", vocab_extra=("zebra",))
    status, out, err = run_main(capsys, "combine", tiny_checkpoint, other, "-o", tmp_path / "x.safetensors")
    assert status == 2 and "vocabulary differs" in err and "Traceback" not in err
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize("argv", [["--help"], ["caption", "--help"], ["evaluate", "--help"],
                                  ["train", "--help"], ["caption"], ["frobnicate"]])
def test_help_and_usage_errors_do_not_import_torch(argv):
    """`captioner --help` answers in a fraction of a second: torch (seconds to import) stays out."""
    code = ("import sys\nfrom captioner.cli import main\ntry:\n    main(sys.argv[1:])\n"
            "except SystemExit:\n    pass\nassert 'torch' not in sys.modules, 'torch was imported'\n")
    result = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True,
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
