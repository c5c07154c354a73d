"""The sparse fully connected kernel (sliced-ELL spmv, batch 1) against numpy, on sweeps around its slice."""
from __future__ import annotations

import numpy as np
import pytest

import targets
from schedules.f32_spmv_sell import encode_sell, index_dtype, padding_share, spmv_sell
from tests.test_spmm import _run

SPEC = targets.x86_host()
LANES = SPEC.vector_lanes


@pytest.mark.parametrize("n", [1, LANES - 1, LANES, LANES + 3, 3 * LANES])     # below/at/above one slice
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("rows_vectors", [1, 2])
def test_spmv_matches_numpy(n, sparsity, rows_vectors):
    rng = np.random.default_rng(hash((n, sparsity, rows_vectors)) % 2**32)
    k, rows = 37, rows_vectors * LANES        # odd input length
    w = rng.standard_normal((n, k)).astype(np.float32) * (rng.random((n, k)) >= sparsity)
    w[0] = 0                                  # an empty output row
    x = rng.standard_normal((1, k)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    sp, col, val = encode_sell(w, rows)
    out = _run(spmv_sell(k, n, rows, len(col), str(col.dtype)), [x, sp, col, val, bias], (1, n))
    np.testing.assert_allclose(out, x @ w.T + bias, rtol=1e-5, atol=1e-5)


def test_spmv_int32_columns_for_long_inputs():
    """Inputs of 32768 or more need int32 column numbers; the kernel reads either."""
    rng = np.random.default_rng(3)
    k, n = 40000, 20
    w = np.zeros((n, k), np.float32)
    w[rng.integers(0, n, 300), rng.integers(0, k, 300)] = rng.standard_normal(300)
    w[:, k - 1] = 1.0                         # the last column, beyond int16
    x = rng.standard_normal((1, k)).astype(np.float32)
    bias = np.zeros(n, np.float32)
    sp, col, val = encode_sell(w, LANES)
    assert col.dtype == np.int32 and index_dtype(k) == "int32" and index_dtype(32767) == "int16"
    out = _run(spmv_sell(k, n, LANES, len(col), "int32"), [x, sp, col, val, bias], (1, n))
    np.testing.assert_allclose(out, x @ w.T + bias, rtol=1e-4, atol=1e-4)


def test_sell_encoding_pads_each_slice_to_its_longest_row():
    w = np.zeros((4, 6), np.float32)
    w[0, [1, 4]] = [1.0, 2.0]                 # slice 0: rows 0 (2 entries) and 1 (none)
    w[3, 5] = 3.0                             # slice 1: rows 2 (none) and 3 (1 entry)
    sp, col, val = encode_sell(w, 2)
    assert sp.tolist() == [0, 2, 3] and col.dtype == np.int16
    assert col.tolist() == [[1, 0], [4, 0], [0, 5]] and val.tolist() == [[1, 0], [2, 0], [0, 3]]
    assert padding_share(sp, 2, 3) == pytest.approx(0.5)
    assert encode_sell(np.zeros((3, 2), np.float32), 2)[0].tolist() == [0, 0, 0]
