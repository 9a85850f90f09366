"""Where a training step's time goes: per op and per part of BP-Net (encoder, decoder, propagation stages,
losses, optimizer), forward and backward.

    python bench/profile_train.py                                   # tiny and bpnet-s at the cpu preset
    python bench/profile_train.py --models bpnet --batch 1 --hw 256x320
    python bench/profile_train.py --stage finetune --json prof.json # with the distillation losses
    python bench/profile_train.py --path old                        # the network as it was (bench/legacy.py)

One training step (forward, loss, backward, gradient clipping, AdamW, EMA) is recorded with
torch.profiler after warm-up steps. Parts are marked with profiler ranges pushed by forward hooks on the
network's modules (and around the 4-NN search, the loss and the optimizer); an op's self time counts for
the innermost part around it. Backward ops are attributed through autograd's sequence numbers: each
backward node carries the number of the forward op that created it, and that op sits inside a part.
Times are the profiler's (wall clock per op, one thread by default so that they add up); each entry is the
least over --repeats profiled steps, since on a shared machine an op that was preempted reads long. The
unprofiled step time beside them is CPU time (time.process_time), which other processes barely move.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.train import make_batch, make_step  # noqa: E402

PART = "part:"


def _enter(name: str):
    return torch.ops.profiler._record_function_enter_new(PART + name, None)


def _exit(handle) -> None:
    torch.ops.profiler._record_function_exit._RecordFunction(handle)


def mark_parts(model: torch.nn.Module) -> list:
    """Forward hooks that open a profiler range per part; returns the hook handles."""
    handles, stack = [], []

    def hook_pair(module: torch.nn.Module, name: str) -> None:
        def pre(_m, _inp):
            stack.append(_enter(name))

        def post(_m, _inp, _out):
            _exit(stack.pop())

        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post))

    core = getattr(model, "_orig_mod", model)
    levels = len(core.config.widths)
    hook_pair(core.conv_img, "encoder")
    for lv in range(1, levels):
        hook_pair(getattr(core, f"layer{lv}_img"), "encoder")
    for lv in range(levels):
        level = getattr(core, f"pred{lv}")
        hook_pair(level, f"L{lv} other")  # backprojection, K scaling: what no sub-part covers
        if level.upcat is not None:
            hook_pair(level.upcat, f"L{lv} decoder entry")
        if level.wpool is not None:
            hook_pair(level.wpool, f"L{lv} weighted pool")
        hook_pair(level.prop, f"L{lv} bilateral prop")
        hook_pair(level.fuse, f"L{lv} fusion U-Net")
        hook_pair(level.conv, f"L{lv} fusion U-Net")
        hook_pair(level.cspn, f"L{lv} CSPN propagation")
        for head in ("weight3x3", "weight5x5", "weight7x7", "convmask", "convck", "convct"):
            module = getattr(level.cspn, head)
            hook_pair(getattr(module, "conv", module), f"L{lv} CSPN heads")  # a kernel head's convs
    return handles


class marked_knn:
    """The 4-NN search under its own range (it is a function, not a module), in the module that built
    `model` (trainer.model, or the reference of bench/legacy.py)."""

    def __init__(self, model: torch.nn.Module):
        self.module = sys.modules[type(getattr(model, "_orig_mod", model)).__module__]

    def __enter__(self):
        self.real = self.module.knn4

        def knn(*a, **kw):
            h = _enter("4-NN search")
            try:
                return self.real(*a, **kw)
            finally:
                _exit(h)

        self.module.knn4 = knn
        return self

    def __exit__(self, *exc):
        self.module.knn4 = self.real


def group_of(part: str) -> str:
    """The part's family: encoder, decoder, one of the propagation stages, loss, optimizer."""
    if part.startswith("L") and " " in part:
        part = part.split(" ", 1)[1]
    return {"decoder entry": "decoder (entry + fusion U-Net)", "fusion U-Net": "decoder (entry + fusion U-Net)",
            "weighted pool": "propagation: weighted pool", "bilateral prop": "propagation: bilateral",
            "CSPN propagation": "propagation: CSPN loop", "CSPN heads": "propagation: CSPN heads (convs)", "4-NN search": "propagation: 4-NN search",
            "other": "decoder (entry + fusion U-Net)"}.get(part, part)


def attribute(events, shapes: bool = False) -> dict:
    """{part: {"fwd": us, "bwd": us}} and {op: us} from the profiler's event list (self times)."""
    by_seq: dict[int, str] = {}
    parts: dict[str, dict[str, float]] = defaultdict(lambda: {"fwd": 0.0, "bwd": 0.0})
    ops: dict[str, float] = defaultdict(float)

    def innermost(ev) -> str | None:
        while ev is not None:
            if ev.name.startswith(PART):
                return ev.name[len(PART):]
            ev = ev.cpu_parent
        return None

    def backward_root(ev):
        while ev is not None:
            if ev.name.startswith("autograd::engine::evaluate_function:"):
                return ev
            ev = ev.cpu_parent
        return None

    events = sorted(events, key=lambda e: e.time_range.start)
    for ev in events:  # forward ops: their part, by sequence number for the backward pass
        if ev.sequence_nr >= 0 and backward_root(ev) is None and not ev.name.startswith(PART):
            part = innermost(ev)
            if part is not None:
                by_seq.setdefault(ev.sequence_nr, part)
    op_parts: dict[str, float] = defaultdict(float)
    for ev in events:
        if ev.name.startswith(PART):
            continue
        root = backward_root(ev)
        if root is None:
            owner, where = innermost(ev) or "other", "fwd"
        else:
            owner, where = by_seq.get(root.sequence_nr), "bwd"
            if owner is None:
                owner = "weights (AccumulateGrad)" if "AccumulateGrad" in root.name else "other"
        parts[owner][where] += ev.self_cpu_time_total
        if not ev.name.startswith("autograd::engine"):
            key = f"{ev.name} {ev.input_shapes}" if shapes else ev.name
            ops[key] += ev.self_cpu_time_total
            op_parts[f"{group_of(owner)}|{where}|{key}"] += ev.self_cpu_time_total
    return {"parts": dict(parts), "ops": dict(ops), "op_parts": dict(op_parts)}


def profile_model(name: str, batch: int, hw: tuple[int, int], stage: str, path: str, threads: int,
                  warmup: int, repeats: int, shapes: bool = False) -> dict:
    torch.set_num_threads(threads)
    inputs = make_batch(batch, hw, stage)
    model, step_on = make_step(name, path, stage)

    def step():
        return step_on(inputs)

    handles = mark_parts(model)
    with marked_knn(model):
        for _ in range(warmup):
            step()
        unprofiled = []
        for _ in range(repeats):
            t0 = time.process_time()
            step()
            unprofiled.append(time.process_time() - t0)
        runs = []
        for _ in range(repeats):
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                        record_shapes=shapes) as prof:
                step()
            runs.append(attribute(prof.events(), shapes))
    for h in handles:
        h.remove()
    # per entry the least over the repeats: on a shared machine an op that was preempted reads long
    parts = {p: {k: min(r["parts"].get(p, {}).get(k, 0.0) for r in runs) for k in ("fwd", "bwd")}
             for p in runs[0]["parts"]}
    ops = {o: min(r["ops"].get(o, 0.0) for r in runs) for o in runs[0]["ops"]}
    op_parts = {o: min(r["op_parts"].get(o, 0.0) for r in runs) for o in runs[0]["op_parts"]}
    total = sum(v["fwd"] + v["bwd"] for v in parts.values())
    return {"model": name, "batch": batch, "hw": f"{hw[0]}x{hw[1]}", "stage": stage, "path": path,
            "threads": threads, "repeats": repeats, "step_cpu_s": min(unprofiled), "profiled_total_s": total / 1e6,
            "parts": parts, "ops": ops, "op_parts": op_parts}


def print_profile(r: dict, top: int) -> None:
    total = sum(v["fwd"] + v["bwd"] for v in r["parts"].values())
    print(f"\n### {r['model']}, batch {r['batch']}, {r['hw']}, {r['stage']}, path {r['path']}, "
          f"{r['threads']} thread(s): step {r['step_cpu_s']:.3f} s CPU time unprofiled, {total / 1e6:.3f} s "
          f"profiled (least of {r['repeats']} per entry)\n")
    groups: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for part, v in r["parts"].items():
        g = groups[group_of(part)]
        g[0] += v["fwd"]
        g[1] += v["bwd"]
    print("| part | forward ms | backward ms | share |")
    print("|---|---:|---:|---:|")
    for part, (f, b) in sorted(groups.items(), key=lambda kv: -sum(kv[1])):
        print(f"| {part} | {f / 1e3:.1f} | {b / 1e3:.1f} | {100 * (f + b) / total:.1f}% |")
    print("\n| op (self time) | ms | share |")
    print("|---|---:|---:|")
    for op, us in sorted(r["ops"].items(), key=lambda kv: -kv[1])[:top]:
        print(f"| {op} | {us / 1e3:.1f} | {100 * us / total:.1f}% |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tiny,bpnet-s")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--hw", default="64x192", help="crop HxW (the cpu and demo presets': 64x192)")
    ap.add_argument("--stage", default="pretrain", choices=("pretrain", "finetune", "inference"))
    ap.add_argument("--path", default="new", choices=("old", "new"), help="old: the network as it was")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="profiled steps; each entry is the least of them")
    ap.add_argument("--top", type=int, default=15, help="ops listed")
    ap.add_argument("--shapes", action="store_true", help="list ops per input shapes")
    ap.add_argument("--part", action="append", help="also list the ops of this part (repeatable), e.g. "
                    "'propagation: CSPN heads (convs)'")
    ap.add_argument("--per-level", action="store_true", help="also list the parts per decoder level")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    hw = tuple(int(x) for x in args.hw.lower().split("x"))
    results = []
    for name in args.models.split(","):
        r = profile_model(name, args.batch, hw, args.stage, args.path, args.threads, args.warmup, args.repeats, args.shapes)
        print_profile(r, args.top)
        for group in args.part or []:
            print(f"\n| op in {group} | pass | ms |\n|---|---|---:|")
            rows = [(k.split("|"), v) for k, v in r["op_parts"].items() if k.split("|")[0] == group]
            for (_, where, op), us in sorted(rows, key=lambda kv: -kv[1])[:args.top]:
                print(f"| {op} | {where} | {us / 1e3:.1f} |")
        if args.per_level:
            print("\n| part | forward ms | backward ms |\n|---|---:|---:|")
            for part, v in sorted(r["parts"].items()):
                print(f"| {part} | {v['fwd'] / 1e3:.1f} | {v['bwd'] / 1e3:.1f} |")
        results.append(r)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
