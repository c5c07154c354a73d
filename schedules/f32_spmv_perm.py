"""Sparse fully connected layers at batch 1 on AVX-512: the inputs a weight needs are picked out of registers.

out[0, n] = bias[n] + sum_k W[n, k] * x[0, k]. The output rows are cut into slices of ROWS (one vector),
the inputs into chunks of COLS (two vectors). For one slice and one chunk the kernel holds the chunk's
inputs in two registers and walks that chunk's entries: entry g holds, per row of the slice, one weight
and the column (0..COLS-1) inside the chunk it multiplies. A two-register permute (vpermi2ps) builds
the vector x[col[g, r]] from the registers, so no input is loaded per weight (a gather, which Zen 4 runs
slowly, or an insert per lane, which the sliced-ELL kernel in f32_spmv_sell.py compiles to). Inside a
chunk the rows are padded with zero weights to the chunk's longest row. Chunks alternate between two
accumulators so consecutive FMAs do not wait on each other. A last, partial chunk (k % COLS inputs)
is copied into a zero-padded table first, so no load reaches past x.
Stored: ptr [slices, chunks + 1] int32 (entries of slice s, chunk c: ptr[s, c] .. ptr[s, c + 1]),
col [entries, ROWS] int8, val [entries, ROWS] f32. x86 with AVX-512 only (isa "avx512").
"""
from __future__ import annotations

import numpy as np
import tvm
from tvm.script import tirx as T

from schedules.rule import SCHEDULED_ATTR

KIND = "spmv_perm"
ROWS = 16               # output rows per slice: one AVX-512 vector
COLS = 32               # inputs per chunk: the two-register table of vpermi2ps
ISA = "avx512"
_PERMUTE = "llvm.x86.avx512.vpermi2var.ps.512"


def kernel_name() -> str:
    return f"f32_spmv_perm_{ROWS}x{COLS}"


def encode_perm(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[N, K] dense weights -> (ptr [slices, chunks + 1] int32, col [E, ROWS] int8, val [E, ROWS] f32).

    Padding entries have column 0 and weight 0; an all-zero weight still gets one (padding) entry."""
    n, k = w.shape
    slices, chunks = -(-n // ROWS), -(-k // COLS)
    full = np.zeros((slices * ROWS, chunks * COLS), np.float32)
    full[:n, :k] = w
    blocks = full.reshape(slices, ROWS, chunks, COLS).transpose(0, 2, 1, 3)     # [s, c, row, column]
    nonzero = blocks != 0
    lengths = nonzero.sum(axis=3).max(axis=2)                                  # [s, c] entries
    ptr = np.zeros((slices, chunks + 1), np.int32)
    ptr[:, 1:] = np.cumsum(lengths, axis=1)
    ptr += np.concatenate([[0], np.cumsum(lengths.sum(axis=1))[:-1]]).astype(np.int32)[:, None]
    total = max(1, int(lengths.sum()))
    col = np.zeros((total, ROWS), np.int8)
    val = np.zeros((total, ROWS), np.float32)
    s_idx, c_idx, r_idx, k_idx = np.nonzero(nonzero)            # in order s, c, row, column
    # the j-th non-zero of a (slice, chunk, row) goes to entry ptr[s, c] + j
    group = (s_idx * chunks + c_idx) * ROWS + r_idx
    first = np.searchsorted(group, group)                       # index of the group's first non-zero
    entry = ptr[s_idx, c_idx] + (np.arange(len(group)) - first)
    col[entry, r_idx] = k_idx
    val[entry, r_idx] = blocks[s_idx, c_idx, r_idx, k_idx]
    return ptr, col, val


def padding_share(ptr: np.ndarray, nnz: int) -> float:
    """Share of stored entries that are padding (0 for none)."""
    stored = int(ptr[-1, -1]) * ROWS
    return 1.0 - nnz / stored if stored else 0.0


def spmv_perm(k: int, n: int, entries: int, name: str | None = None) -> tvm.tirx.PrimFunc:
    """The scheduled kernel (marked `shrinkc.scheduled`). Parameters in order: x [1, k],
    ptr [slices, chunks + 1] int32, col [entries, ROWS] int8, val [entries, ROWS], bias [n], out [1, n]."""
    slices, chunks = -(-n // ROWS), -(-k // COLS)
    whole = k // COLS                   # chunks whose inputs all exist; a last, partial one is copied
    pairs, single = divmod(whole, 2)
    full, rest = divmod(n, ROWS)
    entries = max(1, entries)
    lanes = T.Ramp(0, 1, ROWS)

    @T.macro
    def chunk(ptr, col, val, acc, table, base, s, c, a):
        # the entries of slice s, chunk c into accumulator a; the chunk's inputs are table[base : base + COLS]
        lo = table[T.Ramp(base, 1, ROWS)]
        hi = table[T.Ramp(base + ROWS, 1, ROWS)]
        for g in T.serial(ptr[s, c], ptr[s, c + 1]):
            xv = T.call_llvm_intrin(f"float32x{ROWS}", _PERMUTE, lo, T.Cast(f"int32x{ROWS}", col[g, lanes]), hi)
            acc[a, lanes] = acc[a, lanes] + val[g, lanes] * xv

    @T.macro
    def task(x, ptr, col, val, bias, out, s, nrows):
        # NOTE: nrows is a Python int (ROWS, or the last slice's rest)
        acc = T.alloc_buffer((2, ROWS), "float32", scope="local")
        tail = T.alloc_buffer((COLS,), "float32", scope="local")
        for a in T.unroll(2):
            for r in T.vectorized(ROWS):
                acc[a, r] = T.float32(0)
        xs = T.decl_buffer((k,), "float32", data=x.data)
        for p in T.serial(pairs):
            chunk(ptr, col, val, acc, xs, 2 * p * COLS, s, 2 * p, 0)
            chunk(ptr, col, val, acc, xs, (2 * p + 1) * COLS, s, 2 * p + 1, 1)
        if single == 1:
            chunk(ptr, col, val, acc, xs, (whole - 1) * COLS, s, whole - 1, 0)
        if whole < chunks:      # NOTE: decided at build time; the partial chunk's inputs, zero-padded
            for j in T.serial(COLS):
                tail[j] = T.if_then_else(whole * COLS + j < k, xs[T.min(whole * COLS + j, k - 1)], T.float32(0))
            chunk(ptr, col, val, acc, tail, 0, s, whole, 1)
        if nrows == ROWS:
            for r in T.vectorized(ROWS):
                out[0, s * ROWS + r] = acc[0, r] + acc[1, r] + bias[s * ROWS + r]
        else:
            for r in T.serial(nrows):
                out[0, s * ROWS + r] = acc[0, r] + acc[1, r] + bias[s * ROWS + r]

    @T.prim_func
    def func(x: T.Buffer((1, k), "float32"), ptr: T.Buffer((slices, chunks + 1), "int32"),
             col: T.Buffer((entries, ROWS), "int8"), val: T.Buffer((entries, ROWS), "float32"),
             bias: T.Buffer((n,), "float32"), out: T.Buffer((1, n), "float32")):
        T.func_attr({"tirx.noalias": True})
        for s in T.parallel(slices):
            if s < full:
                task(x, ptr, col, val, bias, out, s, ROWS)
            else:
                task(x, ptr, col, val, bias, out, s, rest)

    name = name or kernel_name()
    return func.with_attr("global_symbol", name).with_attr(SCHEDULED_ATTR, 1)
