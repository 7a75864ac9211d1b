"""A checkpoint is untrusted input. Hundreds of hostile variants of a real one (tests/
hostile_checkpoints.py: header fields of the wrong type or out of range, entries missing or
added, bad vocabularies, NaN/inf weights, wrong dtypes, shapes and names, truncated files, lying
length prefixes, files that are not safetensors) must each end in ONE CheckpointError line that
names the file and the problem, within seconds, in a process whose memory is capped."""
import dataclasses
import json
import subprocess
import sys
import typing
from pathlib import Path

import pytest
from safetensors import safe_open

from captioner.checkpoint import CheckpointError, check_header
from captioner.config import FIELD_RULES, DecodeConfig, ModelConfig, PreprocessConfig

sys.path.insert(0, str(Path(__file__).parent))
from hostile_checkpoints import header_mutations, layout_mutations  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "checkpoints" / "model.safetensors"


def test_every_hostile_variant_is_one_clear_error_in_seconds_and_bounded_memory(tiny_checkpoint, tmp_path):
    results_file = tmp_path / "results.json"
    worker = Path(__file__).parent / "hostile_checkpoints.py"
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, str(worker), str(tiny_checkpoint), str(results_file)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(results_file.read_text())
    results = report["results"]
    assert len(results) > 250
    wrong = [r for r in results if r["outcome"] != "CheckpointError"
             or not r["message"].startswith(f"{r['path']}: ") or "\n" in r["message"]
             or r["expected"] not in r["message"]]
    assert not wrong, "\n".join(f"{r['label']}: {r['outcome']}: {r['message'][:300]} "
                                f"(expected {r['expected']!r})" for r in wrong[:20])
    slowest = max(results, key=lambda r: r["seconds"])
    assert slowest["seconds"] < 5, slowest
    # Peak memory after the warm-up load of the good checkpoint: no variant made it grow much
    # (the worker also caps its address space, so a big allocation fails there outright).
    growth = report["rss_end"] - report["rss_warm"]
    assert growth < 200 * 2**20, f"peak RSS grew by {growth / 2**20:.0f} MB"


@pytest.fixture(scope="module")
def shipped_header():
    """The shipped checkpoint's metadata (JSON strings) and tensor index; no tensor is read."""
    if not SHIPPED.is_file():
        pytest.skip("no shipped checkpoint")
    with safe_open(str(SHIPPED), framework="pt") as f:
        raw = f.metadata()
        layout = {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}
    return raw, layout


def as_raw(meta: dict) -> dict[str, str]:
    return {"format": "captioner/1", **{k: json.dumps(v) for k, v in meta.items()}}


def test_shipped_header_variants_are_refused(shipped_header):
    raw, layout = shipped_header
    checked = check_header(SHIPPED, raw, layout)
    assert checked.model.hidden_dim == 512 and len(checked.vocab) == checked.model.vocab_size
    meta = {k: json.loads(v) for k, v in raw.items() if k != "format"}
    variants = [(label, expected, as_raw(m), layout) for label, expected, m in header_mutations(meta)]
    variants += [(label, expected, raw, changed) for label, expected, changed in layout_mutations(layout)]
    assert len(variants) > 250
    for label, expected, bad_raw, bad_layout in variants:
        with pytest.raises(CheckpointError) as info:
            check_header(SHIPPED, bad_raw, bad_layout)
        message = str(info.value)
        assert message.startswith(f"{SHIPPED}: ") and "\n" not in message, (label, message)
        assert expected in message, (label, expected, message)


def test_every_numeric_field_of_a_checkpoint_config_has_a_range():
    """A field added to these configs needs its rule in config.FIELD_RULES (a sane range), or a
    hostile header could set it to anything of the right type."""
    for cls in (ModelConfig, PreprocessConfig, DecodeConfig):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if hints[f.name] is bool:
                continue
            assert f"{cls.__name__}.{f.name}" in FIELD_RULES, f"add a rule for {cls.__name__}.{f.name}"
