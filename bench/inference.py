"""Benchmark: inference speed of PyTorch float32, the integer engine and LiteRT (float32 and int8).

    python bench/inference.py                                  # the four models, 8 bits, 1 and 2 threads
    python bench/inference.py --dataset fashion_mnist --model cnn --threads 1 --repeats 3

For each model: the shipped float checkpoint, its 8-bit integer model (the PTQ checkpoint, or PTQ on
the fly, as export.py), and both as .tflite files (quant.export_tflite). Side by side in one run,
interleaved within every repeat so that background load hits every backend alike:

    pytorch_fp32        the float nn.Module, eager, torch.no_grad
    int_engine          quant.IntModel.forward_int (the integer engine)
    litert_fp32         LiteRT, float32 file, default resolver (XNNPACK)
    litert_int8         LiteRT, int8 file, default resolver (XNNPACK)
    litert_int8_builtin LiteRT, int8 file, BUILTIN_WITHOUT_DEFAULT_DELEGATES (ruy kernels, no delegate)

Per-image latency at batch 1 (a loop over --latency-images test images, one at a time) and throughput
at batch 256 (--throughput-batches batches), each the median of --repeats runs, with 1 and 2 threads
(torch.set_num_threads / LiteRT num_threads). LiteRT inputs are converted to NHWC numpy arrays before
timing; the float models get the same images as torch tensors. Appends one row per model, backend
and thread count to results/inference_speed.csv, with the file sizes, the speed-ups over
pytorch_fp32 and the 1-minute load average (another job may be using a core).
"""
from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from data import Loader, load_split  # noqa: E402
from models import MODELS  # noqa: E402
from utils.pipeline import load_export_source, load_float_model  # noqa: E402
from quant.export_tflite import TFLiteRunner, export_tflite  # noqa: E402
from utils.args import export_parser  # noqa: E402
from utils.io import append_csv_row, versions  # noqa: E402

BACKENDS = ("pytorch_fp32", "int_engine", "litert_fp32", "litert_int8", "litert_int8_builtin")


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def backends(float_model: torch.nn.Module, imodel, f32: bytes, i8: bytes,
             threads: int, partial: set[str]) -> dict[str, tuple[Callable, Callable]]:
    """name -> (prepare(x: NCHW torch batch) -> input, run(input)) for ``threads`` threads. XNNPACK
    backends that do not take the whole graph (int8 AVERAGE_POOL_2D stays on the builtin kernel) are
    added to ``partial`` and recorded as such in the rows."""
    torch_in = lambda x: x.contiguous()  # noqa: E731
    out: dict[str, tuple[Callable, Callable]] = {
        "pytorch_fp32": (torch_in, lambda x: float_model(x)),
        "int_engine": (torch_in, lambda x: imodel.forward_int(x)),
    }
    for name, data, mode in (("litert_fp32", f32, "xnnpack"), ("litert_int8", i8, "xnnpack"),
                             ("litert_int8_builtin", i8, "builtin")):
        runner = TFLiteRunner(data, mode, num_threads=threads)
        if mode == "xnnpack" and not runner.delegated():
            print(f"{name}: XNNPACK does not take the whole graph (the rest runs on builtin kernels)")
            partial.add(name)
        out[name] = (runner.nhwc, runner.run_nhwc)
    return out


@torch.no_grad()
def measure(fns: dict[str, tuple[Callable, Callable]], images: torch.Tensor, latency_images: int,
            throughput_batches: int, repeats: int) -> dict[str, dict[str, float]]:
    """Median latency (ms per image, batch 1) and throughput (images/s, batch 256) per backend."""
    singles = {k: [prep(images[i:i + 1]) for i in range(latency_images)] for k, (prep, _) in fns.items()}
    batches = {k: [prep(images[i * 256:(i + 1) * 256]) for i in range(throughput_batches)]
               for k, (prep, _) in fns.items()}
    lat: dict[str, list[float]] = {k: [] for k in fns}
    thr: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(repeats + 1):  # the first round warms up (allocations, XNNPACK weight packing)
        for k, (_, run) in fns.items():
            s = timed(lambda: [run(x) for x in singles[k]])
            b = timed(lambda: [run(x) for x in batches[k]])
            if r:
                lat[k].append(1000.0 * s / latency_images)
                thr[k].append(256 * throughput_batches / b)
    return {k: {"latency_ms": statistics.median(lat[k]), "img_per_s": statistics.median(thr[k])} for k in fns}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=list(MODELS), nargs="*", default=list(MODELS))
    p.add_argument("--model", choices=sorted({m for ms in MODELS.values() for m in ms}), nargs="*",
                   default=["cnn", "cnn_bn"], help="models (default: cnn cnn_bn; each where its data set has it, "
                   "e.g. --dataset cifar10 --model resnet8 for the zoo)")
    p.add_argument("--bits", type=int, default=8, help="bits of the integer model (default: %(default)s)")
    p.add_argument("--threads", type=int, nargs="*", default=[1, 2], help="thread counts (default: 1 2)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (default: %(default)s)")
    p.add_argument("--latency-images", type=int, default=200, help="batch-1 images per run (default: %(default)s)")
    p.add_argument("--throughput-batches", type=int, default=4, help="256-image batches per run (default: %(default)s)")
    p.add_argument("--data-root", default=None)
    p.add_argument("--out", default="results/inference_speed.csv", help="CSV to append to (default: %(default)s)")
    args = p.parse_args()
    litert_version = importlib.metadata.version("ai-edge-litert")  # fails early when LiteRT is missing
    run_id = time.strftime("%Y-%m-%dT%H:%M:%S")
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    print(f"{cpu}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} (another job may use a core)")
    for dataset in args.dataset:
        test = load_split(dataset, "test", args.data_root)
        n = max(args.latency_images, 256 * args.throughput_batches)
        images = next(iter(Loader(test.images[:n], test.labels[:n], dataset, n)))[0]
        for name in (m for m in args.model if m in MODELS[dataset]):
            eargs = export_parser().parse_args(["--dataset", dataset, "--model", name, "--bits", str(args.bits)]
                                      + (["--data-root", args.data_root] if args.data_root else []))
            imodel, source, how = load_export_source(eargs, None)
            float_model, _ = load_float_model(eargs)
            shape = tuple(images.shape[1:])
            f32, i8 = export_tflite(float_model, None, shape), export_tflite(imodel, None, shape)
            for threads in args.threads:
                torch.set_num_threads(threads)
                load = os.getloadavg()[0]
                partial: set[str] = set()
                res = measure(backends(float_model, imodel, f32, i8, threads, partial), images, args.latency_images,
                              args.throughput_batches, args.repeats)
                base = res["pytorch_fp32"]
                print(f"\n{dataset}/{name} w{args.bits}a{args.bits}, {threads} thread(s), load {load:.2f} "
                      f"(int8 {len(i8):,} B, float {len(f32):,} B, ratio {len(i8) / len(f32):.3f})")
                print(f"{'backend':<20} {'ms/image b1':>12} {'speed-up':>9} {'img/s b256':>11} {'speed-up':>9}")
                for k, v in res.items():
                    s1, s256 = base["latency_ms"] / v["latency_ms"], v["img_per_s"] / base["img_per_s"]
                    print(f"{k:<20} {v['latency_ms']:>12.3f} {s1:>8.2f}x {v['img_per_s']:>11,.0f} {s256:>8.2f}x")
                    append_csv_row(args.out, {
                        "run_id": run_id, "dataset": dataset, "model": name, "bits": args.bits, "backend": k,
                        "threads": threads, "xnnpack_partial": k in partial, "latency_ms_b1": round(v["latency_ms"], 4),
                        "img_per_s_b256": round(v["img_per_s"], 1), "speedup_b1_vs_pytorch": round(s1, 2),
                        "speedup_b256_vs_pytorch": round(s256, 2),
                        "tflite_bytes": {"litert_fp32": len(f32)}.get(k, len(i8) if k.startswith("litert_int8") else ""),
                        "int8_over_float_bytes": round(len(i8) / len(f32), 3),
                        "repeats": args.repeats, "latency_images": args.latency_images,
                        "throughput_images": 256 * args.throughput_batches, "int_source": how,
                        "load_avg_1min": round(load, 2), "cpu": cpu, "cores": os.cpu_count(),
                        "ai_edge_litert": litert_version, **versions()})


if __name__ == "__main__":
    main()
