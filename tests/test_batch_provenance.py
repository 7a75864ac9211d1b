"""The batch CLI records what produced its rows (OUT.provenance.json: the checkpoint's sha256 and
the decoding options) and refuses to resume into OUT with another checkpoint or other options:
exit status 2, a message naming the difference, OUT and its record untouched. --overwrite starts
OUT again. JSON Lines and CSV alike."""
import hashlib
import json
from pathlib import Path

import pytest

from captioner.checkpoint import load_tensors, save_tensors
from captioner.cli import main


def run_cli(capsys, *argv):
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture(scope="module")
def photos(flickr8k_tiny):
    return sorted((flickr8k_tiny / "Images").glob("*.jpg"))[:3]


@pytest.fixture(scope="module")
def other_checkpoint(tiny_checkpoint, tmp_path_factory):
    """The same model with slightly other readout weights: another sha256, same everything else."""
    tensors, meta = load_tensors(tiny_checkpoint)
    tensors["decoders.0.readout.weight"] = tensors["decoders.0.readout.weight"] * 0.5
    path = tmp_path_factory.mktemp("other") / "other.safetensors"
    save_tensors(path, tensors, meta)
    return path


def snapshot(out: Path) -> tuple[bytes, bytes]:
    return out.read_bytes(), Path(f"{out}.provenance.json").read_bytes()


@pytest.mark.parametrize("suffix", ["jsonl", "csv"])
def test_provenance_is_recorded_and_a_mismatched_rerun_is_refused(capsys, tmp_path, photos, tiny_checkpoint,
                                                                  other_checkpoint, suffix):
    out = tmp_path / f"captions.{suffix}"
    two, three = ["caption", photos[0], photos[1]], ["caption", *photos]
    base = ["-o", out, "--workers", "0", "--no-fast", "-q"]
    status, _, err = run_cli(capsys, *two, *base, "--checkpoint", tiny_checkpoint, "--method", "greedy")
    assert status == 0, err
    record = json.loads(Path(f"{out}.provenance.json").read_text())
    assert record["checkpoint_sha256"] == hashlib.sha256(tiny_checkpoint.read_bytes()).hexdigest()
    assert record["decode"]["method"] == "greedy" and record["checkpoint"] == tiny_checkpoint.name
    before = snapshot(out)

    # the same command with one more photo resumes: appends one row
    status, _, err = run_cli(capsys, *three, *base, "--checkpoint", tiny_checkpoint, "--method", "greedy")
    assert status == 0, err
    assert out.read_bytes().startswith(before[0]) and len(out.read_bytes()) > len(before[0])
    before = snapshot(out)

    refused = [
        (["--checkpoint", other_checkpoint, "--method", "greedy"], "checkpoint model.safetensors (sha256 "),
        (["--checkpoint", tiny_checkpoint, "--method", "beam"], 'method "greedy" -> "beam"'),
        (["--checkpoint", tiny_checkpoint, "--method", "greedy", "--max-len", "5"], "max_len 20 -> 5"),
        (["--checkpoint", tiny_checkpoint], 'method "greedy" -> "beam"'),      # the checkpoint's default
    ]
    for options, difference in refused:
        status, stdout, err = run_cli(capsys, *three, *base, *options)
        assert status == 2 and stdout == ""
        assert err.startswith(f"captioner caption: error: {out} holds captions from another checkpoint "
                              "or other options (") and difference in err, err
        assert "--overwrite" in err and err.count("\n") == 1 and "Traceback" not in err
        assert snapshot(out) == before                     # output and record untouched

    # --overwrite starts again with the new checkpoint: only its rows, and its record
    status, _, err = run_cli(capsys, *two, *base, "--checkpoint", other_checkpoint, "--method", "greedy",
                             "--overwrite")
    assert status == 0, err
    rows = out.read_text().splitlines()
    assert len(rows) == (3 if suffix == "csv" else 2)        # CSV: header + 2 rows
    assert json.loads(Path(f"{out}.provenance.json").read_text())["checkpoint"] == other_checkpoint.name


def test_an_output_without_a_record_is_not_resumed(capsys, tmp_path, photos, tiny_checkpoint):
    """Rows of unknown origin (a file from before records, or its record deleted) are refused too."""
    out = tmp_path / "old.jsonl"
    out.write_text(json.dumps({"image": str(photos[0]), "caption": "a dog", "score": -1.0}) + "\n")
    before = out.read_bytes()
    status, _, err = run_cli(capsys, "caption", photos[0], photos[1], "-o", out,
                             "--checkpoint", tiny_checkpoint, "--workers", "0", "--no-fast", "-q")
    assert status == 2 and "has no record of the checkpoint and options that wrote it" in err
    assert out.read_bytes() == before and not Path(f"{out}.provenance.json").exists()
