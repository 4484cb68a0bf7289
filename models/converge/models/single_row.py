"""LightGBM's single-row prediction path, for serving a few rows at a time.

`Booster.predict` prepares a predictor on every call (it parses its
parameters, sizes its buffers, wraps the input), and for one row that costs
more than the trees: measured on this project's churn model, 66 us a call
against 17 us here, 119 against 80 with contributions, and after the process
idled a few milliseconds (as a lightly loaded server does between calls)
500 us against 200-300. LightGBM's C API has a path made for one row at a
time: `LGBM_BoosterPredictForMatSingleRowFastInit` once per model and kind of
output, then `LGBM_BoosterPredictForMatSingleRowFast` per row; its R package
exposes it as `lgb.configure_fast_predict`, its Python package does not, so
this reaches the same functions through the Python package's own library
handle (`lightgbm.basic._LIB`). The answers are bit-identical to
`Booster.predict` (tests/models/test_single_row.py holds it to that).

A prepared config keeps its own buffers and must not be used by two threads
at once: each thread gets its own, and all are freed with this object. A
config holds a lock on its booster, so this object keeps the booster alive
until its configs are freed.
"""

from __future__ import annotations

import ctypes
import threading
import weakref
from typing import Any

import numpy as np
import numpy.typing as npt

FloatMatrix = npt.NDArray[np.float64]
# Up to this many rows go one by one here; more go through `Booster.predict`
# in one call, whose fixed cost is then shared (measured: from 4 rows on,
# one call of `Booster.predict` costs about what 4 rows cost here).
MAX_ROWS = 4


def _library() -> tuple[Any, Any, int, int, int] | None:
    """LightGBM's library handle and the constants of its C API, or None when
    this LightGBM does not have them (then `Booster.predict` serves alone)."""
    try:
        from lightgbm import basic

        lib = basic._LIB
        lib.LGBM_BoosterPredictForMatSingleRowFastInit  # noqa: B018 (present?)
        lib.LGBM_BoosterPredictForMatSingleRowFast  # noqa: B018
        lib.LGBM_FastConfigFree  # noqa: B018
        return (
            lib,
            basic._safe_call,
            basic._C_API_DTYPE_FLOAT64,
            basic._C_API_PREDICT_NORMAL,
            basic._C_API_PREDICT_CONTRIB,
        )
    except (ImportError, AttributeError):
        return None


class SingleRowPredictor:
    """Probabilities (the booster's own output, as `Booster.predict` gives
    it) and contributions of a few rows, without `Booster.predict`'s per-call
    preparation."""

    def __init__(self, booster: Any, num_threads: int) -> None:
        self._api = _library()
        self._booster = booster
        self._inputs = int(booster.num_feature())
        self._parameters = f"num_threads={num_threads}".encode()
        self._local = threading.local()
        self._configs: list[ctypes.c_void_p] = []  # every thread's, to free them all
        self._lock = threading.Lock()
        if self._api is not None:
            # The booster stays referenced by the finalizer until the configs
            # (which lock it) are freed.
            self._finalizer = weakref.finalize(self, _free, self._api, self._configs, booster)

    @property
    def available(self) -> bool:
        return self._api is not None

    def close(self) -> None:
        """Frees the prepared configs (no call may be running on them)."""
        if self._api is not None:
            self._finalizer()

    def predict(self, matrix: FloatMatrix) -> FloatMatrix:
        """One output per row, as `booster.predict(matrix)`."""
        return self._run(matrix, contributions=False)[:, 0]

    def contributions(self, matrix: FloatMatrix) -> FloatMatrix:
        """Per row, each input's contribution then the bias, as
        `booster.predict(matrix, pred_contrib=True)`."""
        return self._run(matrix, contributions=True)

    def _run(self, matrix: FloatMatrix, *, contributions: bool) -> FloatMatrix:
        assert self._api is not None, "check `available` first"
        lib, safe_call, _, _, _ = self._api
        rows = np.ascontiguousarray(matrix, dtype=np.float64)
        width = self._inputs + 1 if contributions else 1
        out = np.empty((len(rows), width), dtype=np.float64)
        config = self._config(contributions)
        written = ctypes.c_int64()
        for n in range(len(rows)):
            safe_call(
                lib.LGBM_BoosterPredictForMatSingleRowFast(
                    config,
                    rows[n].ctypes.data_as(ctypes.c_void_p),
                    ctypes.byref(written),
                    out[n].ctypes.data_as(ctypes.POINTER(ctypes.c_double)),
                )
            )
        return out

    def _config(self, contributions: bool) -> ctypes.c_void_p:
        """This thread's prepared config for the kind of output."""
        configs: dict[bool, ctypes.c_void_p] | None = getattr(self._local, "configs", None)
        if configs is None:
            configs = self._local.configs = {}
        config = configs.get(contributions)
        if config is None:
            assert self._api is not None
            lib, safe_call, float64, normal, contrib = self._api
            config = ctypes.c_void_p()
            safe_call(
                lib.LGBM_BoosterPredictForMatSingleRowFastInit(
                    self._booster._handle,
                    ctypes.c_int(contrib if contributions else normal),
                    ctypes.c_int(0),  # from the first iteration
                    # to the best one, as `Booster.predict` (0: every iteration)
                    ctypes.c_int(int(getattr(self._booster, "best_iteration", 0) or 0)),
                    ctypes.c_int(float64),
                    ctypes.c_int32(self._inputs),
                    ctypes.c_char_p(self._parameters),
                    ctypes.byref(config),
                )
            )
            with self._lock:
                self._configs.append(config)
            configs[contributions] = config
        return config


def _free(
    api: tuple[Any, Any, int, int, int], configs: list[ctypes.c_void_p], booster: Any
) -> None:
    lib, safe_call, _, _, _ = api
    while configs:
        safe_call(lib.LGBM_FastConfigFree(configs.pop()))
    del booster  # (referenced until now: the configs locked it)
