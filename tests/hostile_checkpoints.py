"""Hostile variants of a real checkpoint, for test_hostile_checkpoints.py: its header (every
config field given a wrong type or an out-of-range value, entries missing or added, a bad
vocabulary), its tensors (NaN, inf, wrong dtypes, shapes and names) and the file itself
(truncated, a lying length prefix, not safetensors at all). Each variant comes with words its
error message must contain, so a variant refused for some other reason does not pass unnoticed.

Run as a script, it is the worker that opens every variant with `Captioner.load` in a process
whose address space is capped, and reports what happened to each:

    python tests/hostile_checkpoints.py CHECKPOINT RESULTS.json
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import resource
import struct
import sys
import time
import typing
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors.torch import save

from captioner.config import FIELD_RULES, DecodeConfig, ModelConfig, PreprocessConfig

SECTIONS = {"model": ModelConfig, "preprocess": PreprocessConfig, "decode": DecodeConfig}
NAN, INF = float("nan"), float("inf")
# Address space the worker may add after its warm-up load: far below what any mutation that
# slipped through would allocate (hidden_dim 10**9 = gigabytes), far above a real load.
ADDRESS_SPACE_HEADROOM = 1536 * 2**20


# ---------------------------------------------------------------------------------------------
# Mutations of the header: (label, words the message must contain, mutated header)
def wrong_types(annotation: typing.Any) -> list[typing.Any]:
    """JSON values of another type than the field's annotation (null only if not optional)."""
    args = typing.get_args(annotation)
    optional = type(None) in args
    if optional:
        annotation = next(a for a in args if a is not type(None))
    if typing.get_origin(annotation) is tuple:
        values = ["0.5,0.5,0.5", 0.5, [None] * 3, [True] * 3, ["0.5"] * 3, {"r": 0.5}]
    elif annotation is bool:
        values = [1, 0, "true", [True], 1.0]
    elif annotation is int:
        values = ["512", 512.0, 1.0, True, [512], {"v": 512}, NAN]
    elif annotation is float:
        values = ["0.5", True, [0.5], {"v": 0.5}, NAN, INF, -INF]
    else:                                                          # str
        values = [5, True, ["beam"], {"name": "beam"}, 1.5]
    return values + ([] if optional else [None])


# Values the issue met in the wild and other bad ones, per field. A value refused by something
# else than the field's own rule says what refuses it.
OUT_OF_RANGE = {
    "PreprocessConfig.image_size": [0, -224, 10**6, 10**12],
    "PreprocessConfig.resize": ["zoom", "", "squash; rm -rf /"],
    "PreprocessConfig.mean": [[0.5], [0.5, 0.5], [0.5] * 4, [], [NAN] * 3, [1e9] * 3],
    "PreprocessConfig.std": [[0, 0, 0], [0.5, 0.5, 0], [-0.5] * 3, [0.5], [INF] * 3, [1e-30] * 3],
    "ModelConfig.backbone": ["", "../../etc/passwd", "os.system", "x" * 500,
                             ("resnet9000", "unknown backbone"),
                             ("fasterrcnn_resnet50_fpn", "unknown backbone"),
                             ("resnet18", "gives 512 features")],
    "ModelConfig.feature_dim": [0, -1, 10**9, (1024, "gives 1280 features")],
    "ModelConfig.vocab_size": [0, -1, 3, 10**9],
    "ModelConfig.embed_dim": [0, -32, 10**9],
    "ModelConfig.hidden_dim": [0, -64, 10**9, (8192, "do not match")],
    "ModelConfig.num_layers": [0, -1, 10**6, (8, "do not match")],
    "ModelConfig.dropout": [-0.1, 1.0, 7.5],
    "DecodeConfig.method": ["beam_search", "", "BEAM"],
    "DecodeConfig.beam_size": [0, -3, 10**9],
    "DecodeConfig.max_len": [0, -1, 10**9],
    "DecodeConfig.length_penalty": [-1.0, 1e300],
    "DecodeConfig.temperature": [0.0, -1.0, 1e300],
    "DecodeConfig.top_k": [-1, 10**12],
    "DecodeConfig.top_p": [0.0, -0.5, 1.5],
    "DecodeConfig.seed": [-1, 10**30],
    "DecodeConfig.n_best": [0, -1, 10**6],
    "DecodeConfig.no_repeat_ngram_size": [-1, 10**9],
}


def out_of_range(rule_name: str) -> list[tuple[typing.Any, str]]:
    """(value, words of its message): the values above, and +-10**15 where the rule refuses them
    (so a field added later with a rule is covered too)."""
    values = [v if isinstance(v, tuple) else (v, rule_name) for v in OUT_OF_RANGE.get(rule_name, [])]
    rule = FIELD_RULES.get(rule_name)
    for candidate in (-(10**15), 10**15):
        if rule is not None and rule.need.startswith("in ") and not rule.ok(candidate):
            values.append((candidate, rule_name))
    return values


def header_mutations(meta: dict) -> Iterator[tuple[str, str, dict]]:
    """Every way we know to break a header; `meta` is a valid parsed header (not modified)."""
    def changed(edit: Callable[[dict], None]) -> dict:
        new = copy.deepcopy(meta)
        edit(new)
        return new

    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            rule_name = f"{cls.__name__}.{f.name}"
            bad = [(f"wrong type {v!r}", v, rule_name) for v in wrong_types(hints[f.name])]
            bad += [(f"out of range {v!r}"[:80], v, expected) for v, expected in out_of_range(rule_name)]
            for label, value, expected in bad:
                yield (f"{section}.{f.name}: {label}", expected,
                       changed(lambda m, s=section, n=f.name, v=value: m.setdefault(s, {}).__setitem__(n, v)))
        yield (f"{section}: unknown field", f"unknown {cls.__name__} fields",
               changed(lambda m, s=section: m.setdefault(s, {}).__setitem__("extra_field", 1)))
        for bad_section in (None, [], "beam", 3):
            yield (f"{section} is {bad_section!r}", f"{cls.__name__} must be a JSON object",
                   changed(lambda m, s=section, v=bad_section: m.__setitem__(s, v)))
    for section, names in (("model", ModelConfig), ("preprocess", PreprocessConfig)):
        for required in ("mean", "std", "image_size", "resize") if section == "preprocess" else (
                "backbone", "vocab_size", "hidden_dim", "embed_dim", "num_layers", "feature_dim"):
            yield (f"{section}.{required} missing", f"{section} has no {required}",
                   changed(lambda m, s=section, n=required: m[s].pop(n)))
    for entry in ("model", "preprocess", "vocab"):
        yield f"no {entry} entry", f"has no '{entry}' entry", changed(lambda m, e=entry: m.pop(e))
    yield "extra entry", "unexpected checkpoint header entries", changed(lambda m: m.__setitem__("evil", 1))
    yield ("a training state's entries", "a training state",
           changed(lambda m: m.update(trainer={}, optimizer={"param_groups": [], "scalars": {}})))
    # the model's own consistency
    yield ("tied weights of different sizes", "tie_embeddings needs embed_dim == hidden_dim",
           changed(lambda m: m["model"].update(tie_embeddings=True, embed_dim=m["model"]["hidden_dim"] // 2)))
    yield ("8 layers of 8192 units: checked on the meta device, never allocated", "do not match",
           changed(lambda m: m["model"].update(num_layers=8, hidden_dim=8192, embed_dim=8192)))
    # the vocabulary
    words = meta["vocab"]
    vocab_cases = [
        ("vocab is a string", "vocab must be a list", " ".join(words)),
        ("vocab is an object", "vocab must be a list", {w: i for i, w in enumerate(words)}),
        ("a duplicate word", "duplicate", words[:-1] + [words[5]]),
        ("no special tokens", "must start with", words[4:] + ["a", "b", "c", "d"]),
        ("special tokens reordered", "must start with", [words[1], words[0]] + words[2:]),
        ("a number for a word", "vocab entry 7 is not a word", words[:7] + [7] + words[8:]),
        ("null for a word", "vocab entry 7 is not a word", words[:7] + [None] + words[8:]),
        ("an empty word", "vocab entry 7 is not a word", words[:7] + [""] + words[8:]),
        ("a word with a space", "vocab entry 7 is not a word", words[:7] + ["a dog"] + words[8:]),
        ("a word with a newline", "vocab entry 7 is not a word", words[:7] + ["dog\n"] + words[8:]),
        ("a very long word", "vocab entry 7 is not a word", words[:7] + ["x" * 10_000] + words[8:]),
        ("one word fewer", "but the vocabulary has", words[:-1]),
        ("one word more", "but the vocabulary has", words + ["zebra-unicorn"]),
    ]
    for label, expected, value in vocab_cases:
        yield f"vocab: {label}", expected, changed(lambda m, v=value: m.__setitem__("vocab", v))
    yield ("vocab and vocab_size one more than the weights", "do not match",
           changed(lambda m: (m["vocab"].append("zebra-unicorn"), m["model"].update(vocab_size=len(words) + 1))))
    for value in (0, -1, 2, 10**9, "1", 1.0, True, None):
        expected = "do not match" if value == 2 else "num_decoders must be an integer"
        yield f"num_decoders {value!r}", expected, changed(lambda m, v=value: m.__setitem__("num_decoders", v))
    for value in ([], "trained on my laptop", 5):
        yield f"info {value!r}", "info must be a JSON object", changed(lambda m, v=value: m.__setitem__("info", v))


# ---------------------------------------------------------------------------------------------
# Mutations of the tensors: (label, words the message must contain, mutated tensors)
def tensor_mutations(tensors: dict[str, torch.Tensor]) -> Iterator[tuple[str, str, dict]]:
    def changed(edit: Callable[[dict], None]) -> dict:
        new = dict(tensors)
        edit(new)
        return new

    def poke(name: str, value: float) -> Callable[[dict], None]:
        def edit(t: dict) -> None:
            t[name] = t[name].clone()
            t[name].view(-1)[t[name].numel() // 2] = value
        return edit

    readout, embed = "decoders.0.readout.weight", "decoders.0.embed.weight"
    conv = next(k for k in tensors if k.startswith("encoder.") and k.endswith("conv_stem.weight"))
    counter = next(k for k in tensors if k.endswith("num_batches_tracked"))
    for name in (readout, conv, "decoders.0.lstm.bias_hh_l0"):
        for value in (NAN, INF, -INF):
            yield f"{name} holds {value}", f"tensor {name} holds NaN or infinite", changed(poke(name, value))
    def huge(t: dict) -> None:                        # float32: 1e30 is no inf there
        t[readout] = t[readout].float()
        poke(readout, 1e30)(t)

    yield f"{readout} holds 1e30", f"tensor {readout} holds 1e+30, beyond any trained weight", changed(huge)
    variance = next(k for k in tensors if k.endswith("running_var"))
    yield f"{variance} negative", f"tensor {variance} holds negative variances", changed(poke(variance, -1.0))
    for dtype, stored in ((torch.int64, "I64"), (torch.float64, "F64"), (torch.int8, "I8"),
                          (torch.uint8, "U8"), (torch.bool, "BOOL")):
        yield (f"{embed} stored as {dtype}", f"{embed}: dtype {stored}",
               changed(lambda t, d=dtype: t.__setitem__(embed, t[embed].to(d))))
    yield (f"{counter} stored as float", f"{counter}: dtype F32",
           changed(lambda t: t.__setitem__(counter, t[counter].float())))
    shapes = [("one row more", lambda w: torch.cat([w, w[:1]])), ("transposed", lambda w: w.t().contiguous()),
              ("flattened", lambda w: w.reshape(-1)), ("a scalar", lambda w: w[0, 0]),
              ("empty", lambda w: w[:0])]
    for label, reshape in shapes:
        yield f"{readout} {label}", f"{readout}: checkpoint", changed(
            lambda t, r=reshape: t.__setitem__(readout, r(t[readout])))
    yield "a tensor missing", "missing ['decoders.0.lstm.weight_hh_l0']", changed(
        lambda t: t.pop("decoders.0.lstm.weight_hh_l0"))
    yield "no encoder", "missing ['encoder.", changed(
        lambda t: [t.pop(k) for k in list(t) if k.startswith("encoder.")])
    yield "an extra tensor", "unexpected ['decoders.0.extra']", changed(
        lambda t: t.__setitem__("decoders.0.extra", torch.zeros(3)))
    yield "optimizer state in a model", "unexpected ['optimizer.0.exp_avg']", changed(
        lambda t: t.__setitem__("optimizer.0.exp_avg", torch.zeros(3)))
    yield "a second decoder's tensor", "unexpected ['decoders.1.embed.weight']", changed(
        lambda t: t.__setitem__("decoders.1.embed.weight", t[embed]))
    yield "a tensor renamed", "unexpected ['decoder.0.embed.weight']", changed(
        lambda t: t.__setitem__("decoder.0.embed.weight", t.pop(embed)))
    yield "a tensor name with a line break", "unexpected ['decoders.0.x\\nTraceback']", changed(
        lambda t: t.__setitem__("decoders.0.x\nTraceback", torch.zeros(1)))
    yield "no tensors at all", "missing", {}


def layout_mutations(layout: dict[str, tuple[str, tuple[int, ...]]]) -> Iterator[tuple[str, str, dict]]:
    """The same, on a tensor index {name: (dtype, shape)} (the shipped checkpoint's, unread)."""
    readout = "decoders.0.readout.weight"
    for dtype in ("I64", "F64", "U8", "BOOL", "I32"):
        yield f"{readout} as {dtype}", f"{readout}: dtype {dtype}", {**layout, readout: (dtype, layout[readout][1])}
    rows, cols = layout[readout][1]
    for shape in ((rows + 1, cols), (cols, rows), (rows * cols,), ()):
        yield f"{readout} of shape {shape}", f"{readout}: checkpoint", {**layout, readout: ("F16", shape)}
    yield ("a tensor of 10**18 values", "more than a captioner has",
           {**layout, readout: ("F16", (10**9, 10**9))})
    yield "a tensor missing", f"missing ['{readout}']", {k: v for k, v in layout.items() if k != readout}
    yield "an extra tensor", "unexpected ['decoders.0.extra']", {**layout, "decoders.0.extra": ("F16", (3,))}
    yield ("2**31 values in extra tensors", "more than a captioner has",
           {**layout, **{f"decoders.0.x{i}": ("F16", (2**30,)) for i in range(2)}})


# ---------------------------------------------------------------------------------------------
# Files: a checkpoint's bytes broken, or not a checkpoint at all
def to_bytes(tensors: dict[str, torch.Tensor], meta: dict) -> bytes:
    """A safetensors file as captioner.checkpoint.save_tensors writes it (without the checks)."""
    metadata = {"format": "captioner/1", **{k: json.dumps(v) for k, v in meta.items()}}
    return save({k: v.clone().contiguous() for k, v in tensors.items()}, metadata=metadata)


def with_json_header(data: bytes, edit: Callable[[dict], None]) -> bytes:
    """The file with its safetensors JSON header (tensor index + metadata) edited."""
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + size])
    edit(header)
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data[8 + size:]


def file_mutations(data: bytes) -> Iterator[tuple[str, str, bytes]]:
    (size,) = struct.unpack("<Q", data[:8])
    for cut in (0, 4, 8, 9, 8 + size // 2, 8 + size, 8 + size + 100, len(data) - 1):
        yield f"truncated to {cut} bytes", "not a safetensors file", data[:cut]
    for claimed in (2**63, 2**40, len(data), 0, 1):
        yield (f"length prefix says {claimed}", "not a safetensors file" if claimed < 2**40 else "truncated",
               struct.pack("<Q", claimed) + data[8:])
    yield ("a header bigger than the limit", "larger than a checkpoint's can be",
           with_json_header(data, lambda h: h["__metadata__"].__setitem__("padding", " " * (5 * 2**20))))
    yield ("JSON nested 100000 deep", "corrupt JSON", with_json_header(
        data, lambda h: h["__metadata__"].__setitem__("info", "[" * 100_000 + "]" * 100_000)))
    yield ("corrupt JSON in an entry", "corrupt JSON", with_json_header(
        data, lambda h: h["__metadata__"].__setitem__("vocab", '["<pad>", ')))
    yield ("NaN in the JSON", "ModelConfig.dropout", with_json_header(
        data, lambda h: h["__metadata__"].__setitem__("model", h["__metadata__"]["model"].replace(
            '"dropout": 0.0', '"dropout": NaN'))))
    for fmt in ("captioner/2", "pt", None):
        def set_format(h, fmt=fmt):
            if fmt is None:
                h["__metadata__"].pop("format")
            else:
                h["__metadata__"]["format"] = fmt
        yield f"format {fmt!r}", "not a captioner checkpoint", with_json_header(data, set_format)
    yield ("no metadata at all", "not a captioner checkpoint", with_json_header(
        data, lambda h: h.pop("__metadata__")))
    readout = "decoders.0.readout.weight"
    yield ("tensor offsets beyond the file", "not a safetensors file", with_json_header(
        data, lambda h: h[readout].__setitem__("data_offsets", [0, 2**40])))
    yield ("a tensor claiming 10**18 values", "not a safetensors file", with_json_header(
        data, lambda h: h[readout].__setitem__("shape", [10**9, 10**9])))
    yield ("overlapping tensors", "not a safetensors file", with_json_header(
        data, lambda h: h[readout].__setitem__("data_offsets", [0, h[readout]["data_offsets"][1]
                                                                - h[readout]["data_offsets"][0]])))
    yield "a pickle", "not a safetensors file", b"\x80\x04\x95" + os.urandom(200)
    yield "a zip (torch.save)", "not a safetensors file", b"PK\x03\x04" + os.urandom(200)
    yield "random bytes", "not a safetensors file", os.urandom(4096)
    yield "a text file", "not a safetensors file", b"hidden_dim: 512\n" * 20
    yield "a PNG image", "not a safetensors file", b"\x89PNG\r\n\x1a\n" + os.urandom(100)


def all_file_variants(checkpoint: Path) -> Iterator[tuple[str, str, bytes]]:
    """(label, expected words, file bytes) for every variant of a (small) checkpoint file."""
    from captioner.checkpoint import load_tensors

    tensors, meta = load_tensors(checkpoint)
    tensors = {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}   # smaller files
    for label, expected, new_meta in header_mutations(meta):
        yield label, expected, to_bytes(tensors, new_meta)
    for label, expected, new_tensors in tensor_mutations(tensors):
        yield label, expected, to_bytes(new_tensors, meta)
    yield from file_mutations(to_bytes(tensors, meta))


# ---------------------------------------------------------------------------------------------
def address_space() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def main(checkpoint: str, results_file: str) -> None:
    """Load the good checkpoint once and work out a torchvision backbone's shapes (warm-up: the
    imports and one-time setup a variant naming such a backbone runs, ~150 MB and seconds once,
    whatever the file says), cap the address space just above that, then open every hostile
    variant and record the outcome and the time taken."""
    from captioner.api import Captioner
    from captioner.checkpoint import CheckpointError, backbone_layout

    torch.set_num_threads(1)
    Captioner.load(checkpoint, fast=False)
    backbone_layout("resnet18")
    rss_warm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    limit = address_space() + ADDRESS_SPACE_HEADROOM
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    work = Path(results_file).parent / "variant.safetensors"
    results = []
    for label, expected, data in all_file_variants(Path(checkpoint)):
        work.write_bytes(data)
        start = time.perf_counter()
        try:
            Captioner.load(work, fast=False)
            outcome, message = "loaded", ""
        except CheckpointError as exc:
            outcome, message = "CheckpointError", str(exc)
        except BaseException as exc:  # what the test is looking for: anything but CheckpointError
            outcome, message = type(exc).__name__, str(exc)[:500]
        results.append({"label": label, "expected": expected, "outcome": outcome, "message": message,
                        "seconds": time.perf_counter() - start, "path": str(work)})
        work.unlink()
    rss_end = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    Path(results_file).write_text(json.dumps({"results": results, "rss_warm": rss_warm,
                                              "rss_end": rss_end}))


if __name__ == "__main__":
    main(*sys.argv[1:])
