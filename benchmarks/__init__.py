"""Speed and memory measurements behind ``tools/benchmark.py`` and ``tools/bench_report.py``
(see docs/benchmarks.md). Not part of the installed library: it imports ``reparam_mm`` and is
itself imported from the checkout (the tools put it on ``sys.path``).

* :mod:`.measure`: timing and memory primitives, the JSON result document (``SCHEMA``).
* :mod:`.models`: configs built and timed, alone or two compared (fused / unfused / plain).
* :mod:`.doconv_layers`: DO-Conv formulations at ResNet-50's 3x3 shapes.
* :mod:`.large_dw`: RepLKNet's large depthwise convs against a roofline bound.
* :mod:`.onnx_latency`: onnxruntime vs PyTorch latency of an exported graph.
* :mod:`.report`: tables for docs/benchmarks.md and plots from the JSON files.
"""
