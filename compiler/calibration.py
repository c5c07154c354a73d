"""Calibration inputs for `--shrink auto` and `shrinkc analyze`: .npy (one input) or .npz (by input name)."""
from __future__ import annotations

import os

import numpy as np

from targets.errors import ShrinkcError


def load_calibration(path: str) -> dict[str, np.ndarray]:
    """{input name: array with a leading batch axis}; a .npy's name is filled in later ('' key)."""
    if not os.path.exists(path):
        raise ShrinkcError(f"calibration file '{path}' does not exist", "check the --calib path")
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise ShrinkcError(f"cannot read calibration file '{path}': {err}",
                           "save it with numpy.save (.npy) or numpy.savez (.npz)") from None
    if isinstance(data, np.ndarray):
        return {"": data}
    return {k: data[k] for k in data.files}


def samples(calib: dict[str, np.ndarray], inputs: list) -> list[dict[str, np.ndarray]]:
    """Split calibration arrays into per-run feeds shaped like the model's inputs (dicts with name/shape/dtype)."""
    if "" in calib:
        if len(inputs) != 1:
            raise ShrinkcError(f"a .npy calibration file feeds one input, the model has {len(inputs)}",
                               "save an .npz keyed by input name")
        calib = {inputs[0]["name"]: calib[""]}
    missing = [t["name"] for t in inputs if t["name"] not in calib]
    if missing:
        raise ShrinkcError(f"calibration data has no input {', '.join(missing)}",
                           f"save an .npz with arrays named {', '.join(t['name'] for t in inputs)}")
    per_run = int(inputs[0]["shape"][0]) if inputs[0]["shape"] else 1
    n = min(len(calib[t["name"]]) for t in inputs) // max(per_run, 1)
    if n < 1:
        raise ShrinkcError("calibration data holds no complete batch", "give at least one sample per input")
    out = []
    for i in range(n):
        feed = {}
        for t in inputs:
            a = np.asarray(calib[t["name"]][i * per_run:(i + 1) * per_run], dtype=t["dtype"])
            if list(a.shape) != list(t["shape"]):
                raise ShrinkcError(f"calibration input '{t['name']}' has samples of shape {list(a.shape[1:])}, "
                                   f"the model takes {t['shape'][1:]}", "resize the calibration data")
            feed[t["name"]] = a
        out.append(feed)
    return out
