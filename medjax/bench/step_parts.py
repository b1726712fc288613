"""Where the DINOv2 step's FLOPs and time go, part by part.

    python -m medjax.bench.step_parts --config=configs/dinov2_reg.py:bench [--steps=3] [--trace_dir=DIR]

(the flags of ``medjax.bench.step``, ``--steps`` counting the profiled steps, and ``--trace_dir``)

The step is the trainer's (``medjax.bench.step`` builds it). Its parts are the named scopes of
``pretrain/loss_model.py`` and ``pretrain/trainer.py``: teacher_backbone, teacher_heads, teacher_targets,
student_global, student_local, student_heads, losses, optimizer, teacher_ema; each split into its forward
and its backward (the transposed computations of the gradient).

FLOPs: every dot and convolution of the compiled program, read from its HLO text (2 x output elements x
contracted size), summed by part. XLA's cost analysis of the whole step also counts elementwise work;
the difference is printed as one line.

Time (CPU only): a ``jax.profiler`` trace of ``--steps`` steps; XLA:CPU records each executed operation
(a "thunk": one fusion, one library matmul, ...) with the HLO instruction it runs, so each one's duration
goes to its part, split into matmuls and the rest. Thunks run concurrently on the CPU's threads, so the
summed durations exceed the wall time; the shares are what to read.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import math
import os
import re
import tempfile

import jax
from absl import app, flags

from medjax.bench.step import CONFIG, STEPS, WORKDIR, dinov2_step, step_flops

_TOP = flags.DEFINE_integer("top", 0, "Also list the N longest operations (HLO instruction and source op).")
_TRACE_DIR = flags.DEFINE_string("trace_dir", "", "Keep the profile here (TensorBoard / Perfetto); default: a temp dir.")

PARTS = ("teacher_backbone", "teacher_heads", "teacher_targets", "student_global", "student_local",
         "student_heads", "losses", "optimizer", "teacher_ema")
_INSTRUCTION = re.compile(r"\s*(?:ROOT )?%?([\w.\-]+) = (\w+)\[([\d,]*)\]\S* (\w[\w\-]*)\(([^)]*)\)")


def part_of(op_name: str) -> str:
    """'student_global (backward)' for an op of the student's global-crop pass under the gradient."""
    part = next((p for p in PARTS if p in op_name), "other")
    return f"{part} (backward)" if "transpose(" in op_name else part


def _dims(text: str) -> list[int]:
    return [int(d) for d in text.split(",") if d]


def hlo_parts(hlo_text: str) -> tuple[dict, dict]:
    """({part: dot/conv FLOPs}, {instruction name: (shape, op_name)}) of a compiled module's HLO text."""
    shapes, rows = {}, []
    for line in hlo_text.splitlines():
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        name, _, dims, opcode, operands = m.groups()
        shapes[name] = _dims(dims)
        op_name = re.search(r'op_name="([^"]*)"', line)
        rows.append((name, opcode, _dims(dims), operands, line, op_name.group(1) if op_name else ""))
    flops, source = collections.Counter(), {}
    for name, opcode, out_dims, operands, line, op_name in rows:
        part = part_of(op_name)
        source[name] = (f"{opcode}{out_dims}", op_name)
        names = [o.strip().split(" ")[-1].lstrip("%") for o in operands.split(",")]
        if opcode == "dot":
            lhs = shapes.get(names[0], [])
            contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", line)
            k = math.prod(lhs[int(d)] for d in _dims(contracting.group(1))) if contracting else 1
            flops[part] += 2 * math.prod(out_dims) * k
        elif opcode == "convolution":
            kernel = shapes.get(names[1], [1])
            flops[part] += 2 * math.prod(out_dims) * math.prod(kernel) // max(out_dims[-1], 1)
    return dict(flops), source


def thunk_times(trace_dir: str, source: dict, steps: int) -> tuple[dict, dict]:
    """({(part, 'matmul' | 'other'): ms per step}, {instruction: ms per step}) summed over the thunks."""
    path = sorted(glob.glob(os.path.join(trace_dir, "plugins", "profile", "*", "perfetto_trace.json.gz")))[-1]
    with gzip.open(path) as f:
        events = json.load(f)["traceEvents"]
    times, by_instruction = collections.Counter(), collections.Counter()
    for event in events:
        if event.get("ph") != "X" or event.get("name") not in source:
            continue
        part = part_of(source[event["name"]][1])
        kind = "matmul" if event["name"].startswith(("ynn_fusion", "dot", "convolution")) else "other"
        ms = event.get("dur", 0) / 1e3 / steps
        times[(part, kind)] += ms
        by_instruction[event["name"]] += ms
    return dict(times), dict(by_instruction)


def main(argv):
    del argv
    config = CONFIG.value
    if config.mode != "pretrain":
        raise app.UsageError("step_parts reads the DINOv2 step's named parts; give a DINOv2 config.")
    jitted, state, batch, inputs, _ = dinov2_step(config, WORKDIR.value)
    compiled = jitted.lower(state, batch, *inputs).compile()
    flops, source = hlo_parts(compiled.as_text())
    total = step_flops(compiled)
    times, by_instruction = {}, {}
    if jax.default_backend() == "cpu":
        state, metrics = compiled(state, batch, *inputs)  # warm-up
        jax.block_until_ready(metrics)
        trace_dir = _TRACE_DIR.value or tempfile.mkdtemp(prefix="medjax_step_trace_")
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            for _ in range(STEPS.value):
                state, metrics = compiled(state, batch, *inputs)
            jax.block_until_ready(metrics)
        times, by_instruction = thunk_times(trace_dir, source, STEPS.value)
        print(f"profile: {trace_dir}")
    parts = sorted(set(flops) | {p for p, _ in times}, key=lambda p: -flops.get(p, 0))
    summed = sum(times.values()) or float("nan")
    print(f"{'part':32s} {'matmul GFLOP':>12s} {'matmul ms':>10s} {'other ms':>9s} {'share':>6s}")
    for part in parts:
        mm, other = times.get((part, "matmul"), 0.0), times.get((part, "other"), 0.0)
        print(f"{part:32s} {flops.get(part, 0) / 1e9:12.3f} {mm:10.1f} {other:9.1f} {(mm + other) / summed:6.1%}")
    dots = sum(flops.values())
    print(f"{'matmuls and convolutions':32s} {dots / 1e9:12.3f}")
    print(f"{'elementwise etc. (XLA - above)':32s} {(total - dots) / 1e9:12.3f}")
    print(f"{'step (XLA cost analysis)':32s} {total / 1e9:12.3f}")
    if times:
        print(f"summed thunk time {summed:.1f} ms per step (thunks overlap on the CPU's threads)")
    for name, ms in sorted(by_instruction.items(), key=lambda kv: -kv[1])[:_TOP.value]:
        shape, op_name = source[name]
        print(f"{ms:8.2f} ms  {name:28s} {shape:32s} {op_name}")


if __name__ == "__main__":
    app.run(main)
