"""The results file (results.json), schema version 1. Fields are only ever added, never renamed;
a change that would break readers bumps SCHEMA_VERSION.

{
  "schema_version": 1,
  "environment": {
    "date": ISO-8601 start time, "torch_version", "fused_rnn_version", "python_version", "platform",
    "git_commit": str | null, "git_dirty": bool | null  (of the fused_rnn checkout),
    "device": "cpu" | "cuda", "device_name": str, "cpu_model": str, "gpu_name": str | null,
    "cuda_version": str | null, "cudnn_version": int | null,
    "dtype": "float32" | "float64" | "float16" | "bfloat16", "num_threads": torch.get_num_threads(),
    "fused_rnn_backends": {"cpu": bool, "cuda": bool},
    "onednn_available": bool  (torch's CPU LSTM reference runs on oneDNN when it can),
    "cudnn_rnn_fp32": str | null  (precision cuDNN RNNs used for float32: "ieee" = no TF32),
    "timer": str, "memory_measure": str  (what "peak_memory_bytes" means on this device),
    "cpu_instruction_sets": {"torch": str, "fused_rnn": str, "onednn_cap": str | null,
                             "mkl_cap": str | null}  (added later: absent in older files)
  },
  "config": {"grid": str ("cpu" | "cpu-large" | "gpu" | "gpu-small" | "quick" | "step" | "cells" | "custom"), "cells": [str], "modes": [str],
             "repeats": int, "warmup": int, "seed": int, "with_aten": bool,
             "input_grad": bool  (training: whether the input needs a gradient; added later, absent
                                  in older files, which all had it),
             "cuda_kernel": "auto" | "persistent" | "stepwise" | null  (FUSED_RNN_CUDA_KERNEL on CUDA,
                                  null on CPU; added later)},
  "points": [{
    "cell": "LSTM" | "GRU" | "RNN" | "LSTMCell" | "GRUCell" | "RNNCell"  (the *Cell modules called once
            a step, in a Python loop over seq_len; added later), "mode": "inference" | "training",
    "shape": {"seq_len", "batch", "input_size", "hidden_size", "num_layers", "proj_size": int,
              "bidirectional", "packed": bool},
    "status": "ok" | "failed",  "failure": str | null  (why it failed),
    "tolerance": float, "max_abs_error": float | null  (largest |ours - reference| checked),
    "timings": {IMPL: {"median_ms", "q1_ms", "q3_ms", "min_ms", "max_ms",
                       "us_per_step" (median / seq_len, in µs): float, "samples_ms": [float]}},
    "peak_memory_bytes": {IMPL: int | null},
    "ratio": float | null       (reference median / ours median; > 1 means ours is faster),
    "ratio_aten": float | null  (aten median / ours median),
    "cuda_path": "persistent" | "stepwise" | "mixed" | null  (how ours ran its recurrences on CUDA,
                                from fused_rnn.cuda_recurrence_counts() around the check's call;
                                null on CPU and for failed points; added later)
  }],
  "summary": {"points": int, "failed": int,
              "geomean_ratio": {MODE: float | null}, "geomean_ratio_aten": {MODE: float | null},
              "min_ratio": float | null, "min_ratio_point": int | null  (index into "points")}
}

IMPL is "reference", "ours" and, with --with-aten, "aten". A failed point has empty "timings"
and "peak_memory_bytes" and null ratios: no speed is reported for an implementation that is wrong.
"""
from .shapes import CELLS as _CELLS, MODES as _MODES

SCHEMA_VERSION = 1

IMPLEMENTATIONS = ("reference", "ours", "aten")


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value):
    return _is_int(value) or isinstance(value, float)


def _is_str(value):
    return isinstance(value, str)


def _is_bool(value):
    return isinstance(value, bool)


def _optional(check):
    return lambda value: value is None or check(value)


def _one_of(*choices):
    return lambda value: value in choices


def _list_of(check):
    return lambda value: isinstance(value, list) and all(check(item) for item in value)


def _dict_of(check):
    return lambda value: isinstance(value, dict) and all(check(item) for item in value.values())


_ENVIRONMENT = {
    "date": _is_str, "torch_version": _is_str, "fused_rnn_version": _is_str, "python_version": _is_str,
    "platform": _is_str, "git_commit": _optional(_is_str), "git_dirty": _optional(_is_bool),
    "device": _one_of("cpu", "cuda"), "device_name": _is_str, "cpu_model": _is_str,
    "gpu_name": _optional(_is_str), "cuda_version": _optional(_is_str), "cudnn_version": _optional(_is_int),
    "dtype": _one_of("float32", "float64", "float16", "bfloat16"), "num_threads": _is_int,
    "fused_rnn_backends": _dict_of(_is_bool), "onednn_available": _is_bool, "cudnn_rnn_fp32": _optional(_is_str),
    "timer": _is_str, "memory_measure": _is_str,
}
# Environment fields added after the first results were written: checked where present.
_ENVIRONMENT_ADDED = {"cpu_instruction_sets": _dict_of(_optional(_is_str))}
_CONFIG = {"grid": _is_str, "cells": _list_of(_one_of(*_CELLS)), "modes": _list_of(_one_of(*_MODES)),
           "repeats": _is_int, "warmup": _is_int, "seed": _is_int, "with_aten": _is_bool}
_CONFIG_ADDED = {"input_grad": _is_bool, "cuda_kernel": _optional(_one_of("auto", "persistent", "stepwise"))}
_SHAPE = {"seq_len": _is_int, "batch": _is_int, "input_size": _is_int, "hidden_size": _is_int,
          "num_layers": _is_int, "bidirectional": _is_bool, "proj_size": _is_int, "packed": _is_bool}
_TIMING = {"median_ms": _is_number, "q1_ms": _is_number, "q3_ms": _is_number, "min_ms": _is_number,
           "max_ms": _is_number, "us_per_step": _is_number, "samples_ms": _list_of(_is_number)}
_POINT = {"cell": _one_of(*_CELLS), "mode": _one_of(*_MODES), "shape": dict, "status": _one_of("ok", "failed"),
          "failure": _optional(_is_str), "tolerance": _is_number, "max_abs_error": _optional(_is_number),
          "timings": dict, "peak_memory_bytes": _dict_of(_optional(_is_int)),
          "ratio": _optional(_is_number), "ratio_aten": _optional(_is_number)}
_POINT_ADDED = {"cuda_path": _optional(_one_of("persistent", "stepwise", "mixed"))}
_SUMMARY = {"points": _is_int, "failed": _is_int, "geomean_ratio": _dict_of(_optional(_is_number)),
            "geomean_ratio_aten": _dict_of(_optional(_is_number)), "min_ratio": _optional(_is_number),
            "min_ratio_point": _optional(_is_int)}
_TOP = {"schema_version": _one_of(SCHEMA_VERSION), "environment": dict, "config": dict, "points": list,
        "summary": dict}


def _check_fields(obj, fields, where, added=None):
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected an object, got {type(obj).__name__}")
    for key, check in {**fields, **(added or {})}.items():
        if key not in obj:
            if key in fields:
                raise ValueError(f"{where}: missing field {key!r}")
            continue
        valid = isinstance(obj[key], check) if isinstance(check, type) else check(obj[key])
        if not valid:
            raise ValueError(f"{where}.{key}: invalid value {obj[key]!r}")


def _check_point(point, where):
    _check_fields(point, _POINT, where, _POINT_ADDED)
    _check_fields(point["shape"], _SHAPE, where + ".shape")
    for impl, timing in point["timings"].items():
        _check_fields(timing, _TIMING, f"{where}.timings.{impl}")
    unknown = (set(point["timings"]) | set(point["peak_memory_bytes"])) - set(IMPLEMENTATIONS)
    if unknown:
        raise ValueError(f"{where}: unknown implementations {sorted(unknown)}")
    if point["status"] == "ok":
        if point["failure"] is not None or point["ratio"] is None or {"reference", "ours"} - set(point["timings"]):
            raise ValueError(f"{where}: an ok point needs reference and ours timings, a ratio and no failure")
    elif point["failure"] is None or point["timings"] or point["ratio"] is not None:
        raise ValueError(f"{where}: a failed point needs a failure and no timings or ratio")


def validate(result):
    """Raises ValueError naming the first field that does not follow the schema above."""
    _check_fields(result, _TOP, "result")
    _check_fields(result["environment"], _ENVIRONMENT, "environment", _ENVIRONMENT_ADDED)
    _check_fields(result["config"], _CONFIG, "config", _CONFIG_ADDED)
    for index, point in enumerate(result["points"]):
        _check_point(point, f"points[{index}]")
    _check_fields(result["summary"], _SUMMARY, "summary")
    failed = sum(point["status"] == "failed" for point in result["points"])
    if result["summary"]["points"] != len(result["points"]) or result["summary"]["failed"] != failed:
        raise ValueError("summary: point counts do not match the points")
    return result
