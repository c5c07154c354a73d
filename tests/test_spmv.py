"""The sparse fully connected kernels (batch 1) against numpy: sliced-ELL spmv on sweeps around its slice,
the AVX-512 permute spmv on sweeps around its slice (16 rows) and chunk (32 inputs)."""
from __future__ import annotations

import numpy as np
import pytest

import targets
from schedules import f32_spmv_perm
from schedules.f32_spmv_perm import encode_perm, spmv_perm
from schedules.f32_spmv_sell import encode_sell, index_dtype, padding_share, spmv_sell
from tests.test_spmm import _run, _run_guarded

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


needs_avx512 = pytest.mark.skipif(SPEC.isa != f32_spmv_perm.ISA, reason="f32_spmv_perm needs AVX-512 on this host")


def _fc_case(seed, n, k, sparsity):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k)).astype(np.float32) * (rng.random((n, k)) >= sparsity)
    if n > 1:
        w[1] = 0                              # an empty output row
    return w, rng.standard_normal((1, k)).astype(np.float32), rng.standard_normal(n).astype(np.float32)


@needs_avx512
@pytest.mark.parametrize("n,k", [(1, 5), (15, 31), (16, 32), (17, 33), (48, 64), (33, 97), (1000, 1280)])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])         # rows below/at/above a slice of 16, inputs
                                                                    # below/at/above a chunk of 32, odd/even chunks
def test_spmv_perm_matches_numpy(n, k, sparsity):
    w, x, bias = _fc_case(n * 1000 + k + int(sparsity * 10), n, k, sparsity)
    ptr, col, val = encode_perm(w)
    out = _run(spmv_perm(k, n, len(col)), [x, ptr, col, val, bias], (1, n))
    np.testing.assert_allclose(out, x @ w.T + bias, rtol=1e-4, atol=1e-4)


def test_perm_encoding_pads_each_chunk_to_its_longest_row():
    """Each (slice, chunk) gets as many entries as its longest row; columns count from the chunk's start."""
    w = np.zeros((2, 40), np.float32)
    w[0, [1, 4, 33]] = [1.0, 2.0, 3.0]        # chunk 0: row 0 has 2 entries, row 1 none; chunk 1: column 33
    w[1, 39] = 4.0                            # chunk 1: row 1 at column 39
    ptr, col, val = encode_perm(w)
    assert ptr.tolist() == [[0, 2, 3]] and col.dtype == np.int8 and val.shape == (3, f32_spmv_perm.ROWS)
    assert col[:, :2].tolist() == [[1, 0], [4, 0], [1, 7]] and val[:, :2].tolist() == [[1, 0], [2, 0], [3, 4]]
    assert f32_spmv_perm.padding_share(ptr, 4) == pytest.approx(1 - 4 / (3 * f32_spmv_perm.ROWS))
    assert encode_perm(np.zeros((3, 2), np.float32))[0].tolist() == [[0, 0]]


@needs_avx512
@pytest.mark.parametrize("k", [33, 1280])
@pytest.mark.parametrize("guard", ["before", "after"])
def test_spmv_perm_stays_inside_its_buffers(k, guard):
    """The partial last chunk is read element by element: x and the output each against an inaccessible page."""
    w, x, bias = _fc_case(k, 40, k, 0.8)
    ptr, col, val = encode_perm(w)
    out = _run_guarded(spmv_perm(k, 40, len(col)), [x, ptr, col, val, bias], {0}, (1, 40), guard)
    np.testing.assert_allclose(out, x @ w.T + bias, rtol=1e-4, atol=1e-4)
