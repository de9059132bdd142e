"""Speed of interval bounds: plain forward pass vs the tutorial's formulas vs pyibp's fused operators.

One process, one run: for each model, batch size and device, the median time of
  * plain:    model(x)                                   — the floor a bound is measured against
  * tutorial: IBP in lower/upper form, four products per layer (pyibp backend="torch")
  * pyibp:    IBP in centre/radius form through the fused C++/CUDA operators (the graph walker)
  * pyibp-crown: CROWN-IBP margins (the graph's CROWN walker)
  * pyibp-sound, pyibp-crown-sound: IBP and CROWN-IBP margins with sound=True (bounds of the network
    in exact real arithmetic), each in its own round-robin with its unsound twin (forward only: the
    sound mode computes no gradients)
  * seq, seq-crown: the same through the walk over an nn.Sequential's layer list that pyibp used
    before its bound graph (kept here, and only here, as the baseline of the graph path)
forward only and forward+backward (gradients to the parameters, as in certified training), with
peak memory, and the time of the first call's graph capture. Prints tables and writes JSON.

    python benchmarks/bench_bounds.py [--models tutorial-cnn cifar-cnn] [--batches 1 32 256]
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch
from torch import nn
from torchvision.models import resnet18

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pyibp  # noqa: E402
from common import devices, interleaved_medians, peak_bytes, print_table, write_json  # noqa: E402
from pyibp.bounds import coefficients, crown as crown_engine  # noqa: E402
from pyibp.bounds.checks import _check_labels, _check_model_device, check_box  # noqa: E402
from pyibp.bounds.graph import ConvParams, _capture  # noqa: E402
from pyibp.bounds.ibp import FusedBackend  # noqa: E402
from pyibp.models import cifar_cnn, tutorial_cnn  # noqa: E402
from pyibp.precision import full_precision  # noqa: E402

MODELS = {"tutorial-cnn": (tutorial_cnn, (1, 28, 28)), "cifar-cnn": (cifar_cnn, (3, 32, 32))}
EPS = 0.1


# ---------------------------------------------------------------------------------------------
# the previous path: a walk over the layer list of an nn.Sequential of Conv2d/Linear/ReLU/Flatten
def _conv_params(layer: nn.Conv2d) -> ConvParams:
    return ConvParams(layer.weight, layer.bias, list(layer.stride), list(layer.padding), list(layer.dilation),
                      layer.groups)


def _seq_ibp(layers, box, backend, fuse, record, shapes):
    i, state = 0, box
    while i < len(layers):
        layer = layers[i]
        shapes.append(tuple(state[0].shape[1:]))
        relu = fuse and isinstance(layer, (nn.Linear, nn.Conv2d)) and i + 1 < len(layers) \
            and isinstance(layers[i + 1], nn.ReLU)
        if isinstance(layer, nn.Linear):
            state = backend.linear(state, layer.weight, layer.bias, relu)
        elif isinstance(layer, nn.Conv2d):
            p = _conv_params(layer)
            state = backend.conv2d(state, p.weight, p.bias, p.stride, p.padding, p.dilation, p.groups, relu)
        elif isinstance(layer, nn.ReLU):
            if record is not None:
                record[i] = state
            state = backend.relu(state)
        elif isinstance(layer, nn.Flatten):
            state = backend.reshape(state, layer)
        i += 2 if relu else 1
    return state


def _seq_backward(layers, shapes, A, const, boxes, box):
    for i in reversed(range(len(layers))):
        layer = layers[i]
        if isinstance(layer, nn.Linear):
            A, const = crown_engine._back_linear(A, const, layer.weight, layer.bias)
        elif isinstance(layer, nn.Conv2d):
            A, const = crown_engine._back_conv(A, const, _conv_params(layer), shapes[i])
        elif isinstance(layer, nn.ReLU):
            A, const = crown_engine._back_relu(A, const, *boxes[i])
        elif isinstance(layer, nn.Flatten):
            A = A.reshape(A.shape[:2] + shapes[i])
    cl = crown_engine._channels_last(A)
    lam, mu, rad = (crown_engine._flat_features(A, cl), crown_engine._flat_box(box[0], cl),
                    crown_engine._flat_box(box[1], cl))
    return const + torch.bmm(lam, mu[:, :, None])[..., 0] - torch.bmm(lam.abs(), rad[:, :, None])[..., 0]


def sequential_margins(model: nn.Sequential, x, y, eps: float, crown: bool):
    """Margins as pyibp computed them before the bound graph (IBP with last-layer elision, or
    CROWN-IBP), for the layer types of the benchmark's models."""
    layers, last = list(model)[:-1], model[-1]
    # the checks every bound ran before (flatten_layers' per-layer checks, box, device, labels)
    assert all(isinstance(m, (nn.Conv2d, nn.Linear, nn.ReLU, nn.Flatten)) for m in model)
    eps_t = check_box(x, eps, 0.0, 1.0)
    _check_model_device(model, x)
    _check_labels(y, x, None)
    with full_precision(x.device.type):
        backend = crown_engine._ChannelsLastBackend() if crown else FusedBackend()
        box = backend.start(x, eps_t, 0.0, 1.0)
        boxes, shapes = ({} if crown else None), []
        state = _seq_ibp(layers, box, backend, not crown, boxes, shapes)
        _check_labels(y, x, last.out_features)
        ibp = backend.margins(state, last.weight, last.bias, y)
        if not crown:
            return ibp
        others = crown_engine._other_classes(y, ibp.shape[1])
        A = last.weight[y][:, None, :] - last.weight[others]
        const = last.bias[y][:, None] - last.bias[others]
        # the backward pass in chunks of examples on CPU, as before (see coefficients._examples_per_chunk)
        per_example = A.shape[1] * max(math.prod(shape) for shape in shapes) * A.element_size()
        chunk = max(1, min(x.shape[0], coefficients._CPU_CHUNK_BYTES // per_example))
        split = lambda pair: list(zip(*(t.split(chunk) for t in pair)))  # noqa: E731
        pieces = {i: split(b) for i, b in boxes.items()}
        bound = torch.cat([_seq_backward(layers, shapes, a, c, {i: p[k] for i, p in pieces.items()}, b)
                           for k, (a, c, b) in enumerate(zip(A.split(chunk), const.split(chunk), split(box)))])
        return torch.maximum(ibp.new_zeros(ibp.shape).scatter(1, others, bound), ibp)


def workloads(model, x, y):
    """name -> (forward, forward+backward) closures."""
    def plain():
        return model(x)

    def plain_bwd():
        model(x).sum().backward()

    def closures(bound):
        return bound, lambda: bound().sum().backward()

    def bounds(backend, method="ibp"):
        return closures(lambda: pyibp.margin_bounds(model, x, y, EPS, backend=backend, method=method))

    def sequential(crown):
        return closures(lambda: sequential_margins(model, x, y, EPS, crown))

    return {"plain": (plain, plain_bwd), "tutorial": bounds("torch"), "pyibp": bounds("fused"),
            "seq": sequential(False), "pyibp-crown": bounds("fused", "crown-ibp"), "seq-crown": sequential(True),
            "pyibp-sound": (lambda: pyibp.margin_bounds(model, x, y, EPS, sound=True), None),
            "pyibp-crown-sound": (lambda: pyibp.margin_bounds(model, x, y, EPS, method="crown-ibp", sound=True), None)}


def capture_ms(model: nn.Module, repeats: int = 5) -> float:
    """Median milliseconds of capturing ``model``'s bound graph (what the first call adds)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        _capture(model)
        times.append(time.perf_counter() - start)
    return 1e3 * sorted(times)[len(times) // 2]


def run(args):
    rows, results, ratios, captures, sound = [], [], [], [], []
    for device in devices(args.device):
        for name in args.models:
            factory, shape = MODELS[name]
            torch.manual_seed(0)
            model = factory().to(device).eval()
            for batch in args.batches:
                x = torch.rand(batch, *shape, device=device)
                y = torch.randint(0, 10, (batch,), device=device)
                repeats = args.repeats if batch < 256 else max(5, args.repeats // 2)
                work = workloads(model, x, y)
                torch.testing.assert_close(work["pyibp-crown"][0](), work["seq-crown"][0](), rtol=1e-4, atol=1e-4)
                # One round-robin per table: the graph path and the Sequential path follow each
                # other, so neither always runs behind the tutorial's cache-thrashing formulas.
                groups = [("plain", "tutorial", "pyibp"), ("pyibp", "seq"), ("pyibp-crown", "seq-crown")]
                fwd, bwd, mem = [], [], {}
                for group in groups:
                    with torch.no_grad():
                        fwd.append(interleaved_medians({k: work[k][0] for k in group}, device, repeats=repeats))
                        mem.update({k: peak_bytes(work[k][0], device) for k in group})
                    bwd.append(interleaved_medians({k: work[k][1] for k in group}, device, repeats=repeats))
                    model.zero_grad(set_to_none=True)
                f, b = fwd[0], bwd[0]
                for label in groups[0]:
                    row = {"device": device.type, "model": name, "batch": batch, "method": label,
                           "fwd_ms": 1e3 * f[label], "fwd_x_plain": f[label] / f["plain"],
                           "fwd_speedup_vs_tutorial": f["tutorial"] / f[label],
                           "fwdbwd_ms": 1e3 * b[label], "fwdbwd_x_plain": b[label] / b["plain"],
                           "fwdbwd_speedup_vs_tutorial": b["tutorial"] / b[label],
                           "peak_fwd_MiB": mem[label] / 2**20}
                    rows.append(row)
                    results.append(row)
                for (graph, seq), f, b in zip(groups[1:], fwd[1:], bwd[1:]):
                    ratios.append({"device": device.type, "model": name, "batch": batch,
                                   "method": "ibp" if graph == "pyibp" else "crown-ibp",
                                   "graph_fwd_ms": 1e3 * f[graph], "seq_fwd_ms": 1e3 * f[seq],
                                   "fwd_graph_x_seq": f[graph] / f[seq],
                                   "graph_fwdbwd_ms": 1e3 * b[graph], "seq_fwdbwd_ms": 1e3 * b[seq],
                                   "fwdbwd_graph_x_seq": b[graph] / b[seq],
                                   "graph_peak_fwd_MiB": mem[graph] / 2**20, "seq_peak_fwd_MiB": mem[seq] / 2**20})
                for method, plain_key, sound_key in (("ibp", "pyibp", "pyibp-sound"),
                                                     ("crown-ibp", "pyibp-crown", "pyibp-crown-sound")):
                    with torch.no_grad():
                        f = interleaved_medians({k: work[k][0] for k in (plain_key, sound_key)}, device,
                                                repeats=repeats)
                        peak = {k: peak_bytes(work[k][0], device) for k in (plain_key, sound_key)}
                    sound.append({"device": device.type, "model": name, "batch": batch, "method": method,
                                  "unsound_fwd_ms": 1e3 * f[plain_key], "sound_fwd_ms": 1e3 * f[sound_key],
                                  "sound_x_unsound": f[sound_key] / f[plain_key],
                                  "unsound_peak_MiB": peak[plain_key] / 2**20, "sound_peak_MiB": peak[sound_key] / 2**20})
            captures.append({"model": name, "capture_ms": capture_ms(model)})
    captures.append({"model": "torchvision-resnet18", "capture_ms": capture_ms(resnet18(num_classes=10))})
    print_table(rows, ["device", "model", "batch", "method", "fwd_ms", "fwd_x_plain", "fwd_speedup_vs_tutorial",
                       "fwdbwd_ms", "fwdbwd_x_plain", "fwdbwd_speedup_vs_tutorial", "peak_fwd_MiB"])
    print("\nGraph path vs the previous nn.Sequential path (same run, interleaved):")
    print_table(ratios, ["device", "model", "batch", "method", "graph_fwd_ms", "seq_fwd_ms", "fwd_graph_x_seq",
                         "graph_fwdbwd_ms", "seq_fwdbwd_ms", "fwdbwd_graph_x_seq", "graph_peak_fwd_MiB",
                         "seq_peak_fwd_MiB"])
    print("\nSound mode (sound=True: bounds of the exact-arithmetic network) vs the default (same run, interleaved):")
    print_table(sound, ["device", "model", "batch", "method", "unsound_fwd_ms", "sound_fwd_ms", "sound_x_unsound",
                        "unsound_peak_MiB", "sound_peak_MiB"])
    print("\nFirst call: capture of the bound graph (once per model), excluded from the steady-state times above:")
    print_table(captures, ["model", "capture_ms"])
    print("\nx_plain: time / plain forward (or forward+backward) of the same model and batch; "
          "speedup_vs_tutorial: tutorial time / this time.")
    print("Targets (CPU, batch 256, tutorial CNN): pyibp fwd_x_plain <= 2.3, fwd_speedup_vs_tutorial >= 1.8; "
          "graph_x_seq <= 1.05 everywhere; sound_x_unsound <= 1.5 (CPU).")
    write_json(args.out, {"benchmark": "bounds", "eps": EPS, "results": results, "graph_vs_sequential": ratios,
                          "sound_vs_unsound": sound, "capture": captures})


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32, 256])
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cpu, and cuda when present)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "bench_bounds.json"))
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
