"""TensorFlow Lite Micro (TFLM): run an exported file with TFLM's interpreter, measure the tensor arena
it needs, and write the file as the C array a microcontroller application embeds.

    logits = TFLMRunner(data)(x)                  # x: (N, C, H, W); equals IntModel(rounding="tflm")
    arena = tflm_arena_bytes(data)                # smallest arena in which TFLM allocates and runs it
    write_c_array(data, "out/model")              # out/model.c + out/model.h: model_tflite[], model_tflite_len
    a, b = pixel_map(mean, std, s_in, zp_in)      # uint8 pixel -> int8 input: round(p * a[c] + b[c])

TFLM's kernels are LiteRT's reference kernels but for one: its fully connected layer requantizes like
its conv (``quant.fixed_point``, kernel set 'tflm'). The interpreter is the ``tflite-micro`` package
(an optional import: a missing package is a one-line ``QuantError`` with the pip command); it runs one
image per invoke, so the runner loops over the batch.
"""
from __future__ import annotations

import contextlib
import os
import re
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from quant.errors import QuantError
from quant.io import atomic_write_bytes

TFLM_HINT = "running files with TensorFlow Lite Micro needs the tflite-micro package; pip install tflite-micro"
#: the arena the runner gives the interpreter (more than any model of this project needs)
RUNNER_ARENA = 16 << 20
#: alignment of the C array (TFLM reads tensors and flatbuffer tables in place; 16 covers every type)
C_ALIGN = 16


def _runtime():
    try:
        from tflite_micro.python.tflite_micro import runtime
    except ImportError as e:
        raise QuantError(TFLM_HINT) from e
    return runtime


def tflm_available() -> bool:
    """True when the tflite-micro interpreter can be imported."""
    try:
        _runtime()
    except QuantError:
        return False
    return True


@contextlib.contextmanager
def captured_stderr() -> Iterator[list[str]]:
    """Redirect the process's file descriptor 2 (where TFLM's C++ code writes) into a list of one string."""
    out: list[str] = []
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as f:
        os.dup2(f.fileno(), 2)
        try:
            yield out
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            f.seek(0)
            out.append(f.read().decode(errors="replace"))


def _interpreter(data: bytes, arena: int):
    return _runtime().Interpreter.from_bytes(bytes(data), arena_size=int(arena))


class NHWCRunner:
    """Shared by the LiteRT and TFLM runners: NCHW torch tensors in, the file's NHWC arrays inside.
    Subclasses set ``inp`` (the input's details) and define ``run_nhwc``."""

    inp: dict

    def run_nhwc(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def nhwc(self, x: torch.Tensor) -> np.ndarray:
        """(N, C, H, W) torch tensor -> contiguous (N, H, W, C) numpy array of the input's dtype."""
        return np.ascontiguousarray(x.permute(0, 2, 3, 1).cpu().numpy().astype(self.inp["dtype"]))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.run_nhwc(self.nhwc(x)))


class TFLMRunner(NHWCRunner):
    """The TFLM interpreter for one file: ``runner(x)`` maps an (N, C, H, W) torch tensor (float32, or
    integer values for an int8-input file) to the (N, ...) output as a torch tensor, one invoke per image."""

    mode = "tflm"

    def __init__(self, model: bytes | str | Path, arena: int = RUNNER_ARENA) -> None:
        content = model if isinstance(model, (bytes, bytearray)) else Path(model).read_bytes()
        with captured_stderr() as err:
            try:
                self.interp = _interpreter(content, arena)
            except RuntimeError:
                self.interp = None
        if self.interp is None:
            raise QuantError(f"TFLM could not allocate the model in a {arena}-byte arena: "
                             f"{' '.join(err[0].split())[:200]}")
        self.inp = self.interp.get_input_details(0)
        self.out = self.interp.get_output_details(0)

    def run_nhwc(self, x: np.ndarray) -> np.ndarray:
        """Run an (N, H, W, C) numpy batch of the input's dtype, image by image; returns (N, ...)."""
        outs = []
        for i in range(x.shape[0]):
            self.interp.set_input(np.ascontiguousarray(x[i:i + 1]), 0)
            self.interp.invoke()
            outs.append(np.array(self.interp.get_output(0), copy=True))
        return np.concatenate(outs)

    def delegated(self) -> bool:
        """TFLM has no delegates (kept for the LiteRT runner's interface)."""
        return False


def _runs(data: bytes, arena: int) -> bool:
    try:
        it = _interpreter(data, arena)
        shape, dtype = it.get_input_details(0)["shape"], it.get_input_details(0)["dtype"]
        it.set_input(np.zeros(shape, dtype), 0)
        it.invoke()
    except RuntimeError:
        return False
    return True


def tflm_arena_bytes(data: bytes, limit: int = 1 << 28) -> int:
    """The smallest tensor arena (bytes) in which TFLM allocates ``data`` and runs one inference, found by
    bisection over real allocations. TFLM's RecordingMicroAllocator total can be a little less than this
    (measured: 36480 against 36480 bytes for the Fashion-MNIST cnn_bn, 1544 against 1624 for a one-layer
    file), so the bisection, not the recorder, is what an application must reserve."""
    with captured_stderr():  # each failed allocation prints its reason
        if not _runs(data, limit):
            raise QuantError(f"TFLM cannot run this file even in a {limit}-byte arena")
        lo, hi = 0, limit  # lo fails, hi runs
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if _runs(data, mid) else (mid, hi)
    return hi


def pixel_map(mean: tuple[float, ...], std: tuple[float, ...], scale: float,
              zero_point: int) -> tuple[list[float], list[float]]:
    """(a, b) per channel such that a raw uint8 pixel p of channel c becomes the int8 input value
    q = clamp(round_half_away(p * a[c] + b[c]), qmin, qmax): the normalisation x = (p / 255 - mean) / std
    and the input quantization q = round(x / scale) + zero_point folded into one affine map (float64):
    a = 1 / (255 std scale), b = zero_point - mean / (std scale)."""
    a = [1.0 / (255.0 * float(s) * float(scale)) for s in std]
    b = [zero_point - float(m) / (float(s) * float(scale)) for m, s in zip(mean, std)]
    return a, b


def c_identifier(name: str) -> str:
    """A C identifier from a file name, as ``xxd -i`` makes it (every other character becomes '_')."""
    ident = re.sub(r"[^0-9A-Za-z_]", "_", name)
    return ident if ident and not ident[0].isdigit() else "_" + ident


def write_c_array(data: bytes, stem: str | Path, name: str | None = None) -> tuple[Path, Path]:
    """Write ``<stem>.c`` and ``<stem>.h``: the file as ``const unsigned char <name>[]`` aligned to 16 bytes
    and ``const unsigned int <name>_len`` (C99 and C++, linkable from either). ``name`` defaults to the
    stem's file name + '_tflite' (``xxd -i model.tflite`` gives the same). Returns (source, header)."""
    stem = Path(stem)
    name = c_identifier(name or stem.name + "_tflite")
    guard = f"{name.upper()}_H_"
    header = (f"/* {stem.name}.tflite as a C array, written by quantization-dnns (quant.tflm). */\n"
              f"#ifndef {guard}\n#define {guard}\n\n#ifdef __cplusplus\nextern \"C\" {{\n#endif\n\n"
              f"extern const unsigned char {name}[];\nextern const unsigned int {name}_len;\n\n"
              f"#ifdef __cplusplus\n}}\n#endif\n\n#endif  /* {guard} */\n")
    rows = [", ".join(f"0x{b:02x}" for b in data[i:i + 12]) for i in range(0, len(data), 12)]
    source = (f"/* {stem.name}.tflite as a C array, written by quantization-dnns (quant.tflm). */\n"
              f"#include \"{stem.name}.h\"\n\n"
              f"#if defined(__cplusplus)\n#define QDNN_ALIGNED alignas({C_ALIGN})\n"
              f"#elif defined(__GNUC__) || defined(__clang__)\n#define QDNN_ALIGNED __attribute__((aligned({C_ALIGN})))\n"
              f"#else\n#include <stdalign.h>\n#define QDNN_ALIGNED alignas({C_ALIGN})\n#endif\n\n"
              f"QDNN_ALIGNED const unsigned char {name}[] = {{\n  " + ",\n  ".join(rows) + "\n};\n"
              f"const unsigned int {name}_len = {len(data)};\n")
    src, hdr = stem.with_name(stem.name + ".c"), stem.with_name(stem.name + ".h")
    atomic_write_bytes(hdr, header.encode())
    atomic_write_bytes(src, source.encode())
    return src, hdr
