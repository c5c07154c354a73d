"""Sparse fully connected layers at batch 1: a row vector times sparse [out, in] weights, bias fused.

out[0, n] = bias[n] + sum_k W[n, k] * x[0, k] with W stored sliced-ELL ("SELL", CSR over slices of
rows): the output rows are cut into slices of `rows` consecutive rows; inside a slice every row is
padded with zero weights to the slice's longest row, and the slice's entries are stored column-major,
so entry g of a slice holds one (column, value) per row: `col[g, 0:rows]`, `val[g, 0:rows]`.
`slice_ptr[s]..slice_ptr[s+1]` index the entries of slice s. The kernel keeps the slice's `rows`
accumulators in vector registers and, for each entry, loads `rows` weights as vectors, gathers the
matching inputs x[col] and FMAs: vectorised over output rows, one parallel task per slice.
Columns are int16 when the input length fits (< 32768): half the index bytes, one widening load each.
Knob: `rows` (output rows per slice, a multiple of the vector lanes; fixed when encoding).
Padding costs little for unstructured zeros (rows of one slice have similar lengths).
"""
from __future__ import annotations

import numpy as np
import tvm
from tvm.script import tirx as T

from schedules.f32_spmm_chw import index_dtype
from schedules.rule import SCHEDULED_ATTR

KIND = "spmv_sell"


def kernel_name(rows: int) -> str:
    return f"f32_spmv_sell_{rows}"


def encode_sell(w: np.ndarray, rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[N, K] dense weights -> (slice_ptr [ceil(N/rows) + 1] int32, col [G, rows], val [G, rows] f32).

    col is int16 or int32 (index_dtype(K)); padding entries have column 0 and weight 0. An all-zero
    weight still gets buffers of positive size (one padding entry)."""
    n, k = w.shape
    slices = -(-n // rows)
    full = np.zeros((slices * rows, k), np.float32)
    full[:n] = w
    full = full.reshape(slices, rows, k)
    lengths = np.count_nonzero(full, axis=2).max(axis=1)                 # [slices] entries per slice
    slice_ptr = np.zeros(slices + 1, np.int32)
    slice_ptr[1:] = np.cumsum(lengths)
    total = max(1, int(slice_ptr[-1]))
    col = np.zeros((total, rows), index_dtype(k))
    val = np.zeros((total, rows), np.float32)
    for s in range(slices):
        for r in range(rows):
            nz = np.flatnonzero(full[s, r])
            col[slice_ptr[s]:slice_ptr[s] + len(nz), r] = nz
            val[slice_ptr[s]:slice_ptr[s] + len(nz), r] = full[s, r, nz]
    return slice_ptr, col, val


def padding_share(slice_ptr: np.ndarray, rows: int, nnz: int) -> float:
    """Share of stored entries that are padding (0 for none)."""
    stored = int(slice_ptr[-1]) * rows
    return 1.0 - nnz / stored if stored else 0.0


def spmv_sell(k: int, n: int, rows: int, entries: int, col_dtype: str = "int32",
              name: str | None = None) -> tvm.tirx.PrimFunc:
    """The scheduled kernel (marked `shrinkc.scheduled`, so ApplySchedules leaves it alone).

    Parameters in order: x [1, k], slice_ptr [ceil(n/rows)+1] int32, col [entries, rows] col_dtype,
    val [entries, rows], bias [n], out [1, n]."""
    slices = -(-n // rows)
    full, rest = divmod(n, rows)
    entries = max(1, entries)

    @T.macro
    def task(x, sp, col, val, bias, out, s, nrows):
        # NOTE: nrows is a Python int (rows, or the last slice's rest): the branch is decided at build time
        acc = T.alloc_buffer((rows,), "float32", scope="global")
        for r in T.vectorized(rows):
            acc[r] = T.float32(0)
        for g in T.serial(sp[s], sp[s + 1]):
            for r in T.vectorized(rows):
                acc[r] = acc[r] + val[g, r] * x[0, T.Cast("int32", col[g, r])]
        if nrows == rows:
            for r in T.vectorized(rows):
                out[0, s * rows + r] = acc[r] + bias[s * rows + r]
        else:
            for r in T.serial(nrows):
                out[0, s * rows + r] = acc[r] + bias[s * rows + r]

    @T.prim_func
    def func(x: T.Buffer((1, k), "float32"), sp: T.Buffer((slices + 1,), "int32"),
             col: T.Buffer((entries, rows), col_dtype), val: T.Buffer((entries, rows), "float32"),
             bias: T.Buffer((n,), "float32"), out: T.Buffer((1, n), "float32")):
        T.func_attr({"tirx.noalias": True})
        for s in T.parallel(slices):
            if s < full:
                task(x, sp, col, val, bias, out, s, rows)
            else:
                task(x, sp, col, val, bias, out, s, rest)

    name = name or kernel_name(rows)
    return func.with_attr("global_symbol", name).with_attr(SCHEDULED_ATTR, 1)
