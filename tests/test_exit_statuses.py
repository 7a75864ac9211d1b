"""Exit statuses mean one thing each (cli.EXIT_*): 0 all captioned, 1 some inputs failed, 2 usage
error (bad options, unusable checkpoint, mismatched resume), 3 crash, 130 Ctrl-C, 141 stdout
closed early. A hostile checkpoint gets status 2 and one line naming the file from every command
that opens one, never a traceback."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from captioner import batch, cli
from captioner.checkpoint import load_tensors, save_tensors
from captioner.cli import main

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def run_main(capsys, *argv):
    try:
        status = main([str(a) for a in argv])
    except SystemExit as exc:
        status = exc.code
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture(scope="module")
def hostile(tiny_checkpoint, tmp_path_factory):
    """A valid safetensors file whose header says hidden_dim "64" (a string): a TypeError
    traceback before the header was checked."""
    tensors, meta = load_tensors(tiny_checkpoint)
    meta["model"]["hidden_dim"] = str(meta["model"]["hidden_dim"])
    path = tmp_path_factory.mktemp("hostile") / "hostile.safetensors"
    save_tensors(path, tensors, meta)
    return path


@pytest.fixture(scope="module")
def photo(flickr8k_tiny):
    return sorted((flickr8k_tiny / "Images").glob("*.jpg"))[0]


def assert_one_line_naming(err: str, path) -> None:
    assert "Traceback" not in err
    assert err.strip().count("\n") == 0, err
    assert str(path) in err and "ModelConfig.hidden_dim must be an integer" in err


def test_caption_help_documents_every_status(capsys):
    status, out, _ = run_main(capsys, "caption", "--help")
    assert status == 0 and "exit status:" in out
    for code in (cli.EXIT_OK, cli.EXIT_INPUTS_FAILED, cli.EXIT_USAGE, cli.EXIT_CRASH,
                 cli.EXIT_INTERRUPTED, cli.EXIT_BROKEN_PIPE):
        assert f"\n  {code} " in out
    assert len({cli.EXIT_OK, cli.EXIT_INPUTS_FAILED, cli.EXIT_USAGE, cli.EXIT_CRASH,
                cli.EXIT_INTERRUPTED, cli.EXIT_BROKEN_PIPE}) == 6
    status, out, _ = run_main(capsys, "--help")
    assert status == 0 and "exit status: 0 done, 1 some inputs failed" in " ".join(out.split())


def test_caption_with_a_hostile_checkpoint_exits_2_with_one_line(hostile, photo, tmp_path):
    """The installed entry point, as a user runs it; the output file is not created."""
    out = tmp_path / "out.jsonl"
    done = subprocess.run([sys.executable, "-m", "captioner", "caption", str(photo), "-o", str(out),
                           "--checkpoint", str(hostile)], env=ENV, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert_one_line_naming(done.stderr, hostile)
    assert not out.exists() and not Path(f"{out}.provenance.json").exists()
    assert done.stderr.startswith("captioner caption: error: ")


@pytest.mark.filterwarnings("ignore:Flickr8k .* skipped:UserWarning")   # the fixture's messy cases
@pytest.mark.parametrize("command", ["evaluate", "serve", "combine", "train --resume", "train --init-from"])
def test_every_command_refuses_a_hostile_checkpoint_in_one_line(capsys, hostile, tiny_checkpoint,
                                                                 flickr8k_tiny, tmp_path, command):
    if command == "evaluate":
        argv = ["evaluate", "--checkpoint", hostile, "--dataset", "flickr8k", "--data-root",
                flickr8k_tiny, "--split", "test", "--no-fast"]
    elif command == "serve":
        argv = ["serve", "--checkpoint", hostile, "--port", "0"]
    elif command == "combine":
        argv = ["combine", tiny_checkpoint, hostile, "-o", tmp_path / "ensemble.safetensors"]
    elif command == "train --init-from":
        argv = ["train", "--dataset", "flickr8k", "--data-root", flickr8k_tiny, "--output", tmp_path / "run",
                "--init-from", hostile, "--epochs", "1", "--num-workers", "0", "--cache-dir", tmp_path / "cache"]
    else:
        # a training run whose last.safetensors (a training state) was replaced by a hostile one
        run = tmp_path / "run"
        tensors, meta = load_tensors(hostile)
        meta.update(trainer={"epoch": 0, "global_step": 3}, optimizer={"param_groups": [], "scalars": {}})
        hostile_here = run / "last.safetensors"
        save_tensors(hostile_here, tensors, meta)
        argv = ["train", "--dataset", "flickr8k", "--data-root", flickr8k_tiny, "--output", run,
                "--resume", "--epochs", "1", "--num-workers", "0", "--cache-dir", tmp_path / "cache"]
    status, out, err = run_main(capsys, *argv)
    assert status == 2
    assert_one_line_naming(err, hostile if command != "train --resume" else hostile_here)
    assert not (tmp_path / "ensemble.safetensors").exists()


def test_bad_weights_are_refused_before_the_output_is_touched(capsys, tiny_checkpoint, photo, tmp_path):
    tensors, meta = load_tensors(tiny_checkpoint)
    tensors["decoders.0.readout.weight"][0, 0] = float("nan")
    bad = tmp_path / "nan.safetensors"
    save_tensors(bad, tensors, meta)
    out = tmp_path / "out.jsonl"
    status, _, err = run_main(capsys, "caption", photo, "-o", out, "--checkpoint", bad)
    assert status == 2 and err.strip() == (f"captioner caption: error: {bad}: tensor "
                                           "decoders.0.readout.weight holds NaN or infinite values")
    assert not out.exists() and not Path(f"{out}.provenance.json").exists()


def test_a_file_that_is_not_safetensors_says_so_first(capsys, photo, tmp_path):
    fake = tmp_path / "model.safetensors"
    fake.write_bytes(photo.read_bytes())
    status, _, err = run_main(capsys, "caption", photo, "--checkpoint", fake)
    assert status == 2 and "Traceback" not in err
    assert err.strip() == f"captioner caption: error: {fake}: not a safetensors file (no JSON header at its start)"


def test_a_crash_exits_3_with_the_traceback(capsys, monkeypatch, photo):
    def bug(args):
        raise KeyError("a bug")

    monkeypatch.setattr(batch, "caption_inputs", bug)
    status, _, err = run_main(capsys, "caption", photo)
    assert status == cli.EXIT_CRASH == 3
    assert "Traceback" in err and "KeyError: 'a bug'" in err
    assert err.strip().splitlines()[-1].startswith("captioner caption: internal error (exit status 3)")


def test_ctrl_c_exits_130(capsys, monkeypatch, photo):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(batch, "caption_inputs", interrupted)
    status, _, err = run_main(capsys, "caption", photo)
    assert status == 130 and err.strip() == "interrupted"


def test_head_closing_the_pipe_exits_141_without_a_traceback(tiny_checkpoint, photo, tmp_path):
    """`captioner caption dir | head -1`: one row printed, then quiet exit with 128 + SIGPIPE."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(40):                    # more rows than one can read before the pipe closes
        shutil.copy(photo, folder / f"{i:02d}.jpg")
    command = (f"set -o pipefail; {sys.executable} -m captioner caption {folder} --checkpoint "
               f"{tiny_checkpoint} --batch-size 1 --workers 0 --no-fast --method greedy | head -1")
    done = subprocess.run(["bash", "-c", command], env=ENV, capture_output=True, text=True, timeout=180)
    assert done.returncode == 141, done.stderr
    assert json.loads(done.stdout)["image"].endswith("00.jpg")
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr
