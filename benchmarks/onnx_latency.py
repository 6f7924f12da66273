"""onnxruntime vs PyTorch CPU latency of an exported graph (``tools/export_onnx.py --bench``)."""
import statistics
import time

import torch

from reparam_mm.export import ort_session, run_ort


def measure_latency(graph, path, inputs, repeat=5, warmup=1, threads=2):
    """Wall-clock seconds of PyTorch (the fused model, its own CPU dispatch) and onnxruntime (CPU
    provider) on ``inputs``, each with ``threads`` threads: ``{name: [seconds, ...]}``."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    session = ort_session(path, threads=threads)
    times = {'pytorch': [], 'onnxruntime': []}
    try:
        with torch.inference_mode():
            for i in range(warmup + repeat):
                t0 = time.perf_counter()
                graph(*inputs)
                if i >= warmup:
                    times['pytorch'].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                run_ort(session, graph.input_names, inputs)
                if i >= warmup:
                    times['onnxruntime'].append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(saved)
    return times


def latency_line(times):
    return '; '.join(f'{k}: min {min(v):.3f} s, median {statistics.median(v):.3f} s over {len(v)}'
                     for k, v in times.items())
