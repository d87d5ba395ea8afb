"""GPU QAT step: fused fractional fake quant vs the plain bf16 step, measured in the same run.

    python benchmarks/gpu_qat_step.py                       # Sana-600M, batch 4, 1024 tokens, W4.5A8
    python benchmarks/gpu_qat_step.py --preset tiny --device cpu --steps 2 --warmup 1   # smoke test

One KD training step of the module student (``fbqc.qat.students.modules``): frozen float teacher forward +
student forward/backward + fused AdamW, bf16 autocast, ``torch.compile``
of each transformer block (``--scope blocks``, the default: regional, as ``fbqc train --compile``
does; ``--scope model``: one graph, but compiling Sana-600M's fake-quant graph takes over 7 minutes),
the same for every variant. Variants:

    baseline   the float model (no fake quant)              ← the reference
    fused      fbqc's fused fake quant (fbqc.ops.fused)      ← ours: W<bits> per channel + A8 dynamic
    op         the same quantizers as opaque custom ops      (the straightforward implementation)
    fused-fastdiv  fused, compiled without IEEE division (Triton's approximate x / y: not bit-exact)
    *-cg       the same with CUDA graphs (``triton.cudagraphs``: kernels replayed without CPU launch cost)
    *-eager    the same without torch.compile
    *-tc       the same with ``fbqc train --teacher-cache``: the KD target is the teacher output recorded
               in a capture (here: computed once before timing, held in pinned host memory and copied to
               the device every step, as the data loader hands it over); no teacher is built or run

``X-tc`` vs ``X`` in the same run is the teacher-cache saving (printed as a ratio, in the JSON as
``teacher_cache_ratio``).

Prints step time (median wall clock), GPU busy time (the kernels' own time, from the profiler) and
peak memory per variant, their ratios to the baseline, the device, whether a
bit-width change recompiled anything, and a numerics check of the compiled fused kernels against
the reference op (on this device and on CPU).
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import fbqc.qat  # noqa: F401  registers the ops
from fbqc.frontend import load_model_file
from fbqc.passes import AnnotateLinears
from fbqc.ops.fused import compile_options, fq_act_dynamic, fq_weight
from fbqc.qat.students.modules import annotate_modules, block_modules, module_bits, quantize_modules
from fbqc.qat.students.program import set_bits

ROOT = Path(__file__).resolve().parents[1]


def inputs(model, batch: int, device) -> dict:
    """Batch ``batch`` of Sana-shaped inputs at the preset's resolution (1024 tokens for full/1600m)."""
    cfg = model.config
    side = cfg.sample_size
    g = torch.Generator().manual_seed(0)
    text = 300 if side >= 32 else 8
    return {"hidden_states": torch.randn(batch, cfg.in_channels, side, side, generator=g).to(device),
            "encoder_hidden_states": torch.randn(batch, text, cfg.caption_channels, generator=g).to(device),
            "timestep": (torch.rand(batch, generator=g) * 1000).to(device)}


def compile_model(model, scope: str, exact: bool = True, cudagraphs: bool = False):
    """``torch.compile`` of the whole model or of each block; ``cudagraphs``: replay each compiled
    graph as a CUDA graph (``reduce-overhead``: no per-kernel launch cost on the CPU)."""
    options = {**(compile_options() if exact else {}), **({"triton.cudagraphs": True} if cudagraphs else {})}
    if scope == "model":
        return torch.compile(model, options=options)
    for _, b in block_modules(model):
        b.compile(options=options)
    return model


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def teacher_output(base, x, device) -> torch.Tensor:
    """The float teacher's output for ``x`` (bf16 autocast on CUDA, as in the step), on the host —
    pinned on CUDA — as ``--teacher-cache`` reads it from a capture."""
    teacher = copy.deepcopy(base).to(device).requires_grad_(False)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        out = teacher(**x, return_dict=False)[0].cpu()
    del teacher
    return out.pin_memory() if device.type == "cuda" else out


def measure(name, build, x, args, device, cached=None) -> dict:
    """``cached``: the recorded teacher output (``-tc`` variants: ``build`` made no teacher)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    torch._dynamo.reset()
    student, teacher, bits = build()
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-6,
                            fused=device.type == "cuda")
    amp = device.type == "cuda"
    fixed = None
    if not args.teacher and cached is None:
        fixed = torch.randn_like(teacher(**x, return_dict=False)[0])
    forwards, first = [], []

    def step():
        if device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            if cached is not None:                          # --teacher-cache: the recorded output
                target = cached.to(device, non_blocking=True)
            elif args.teacher:
                forwards.append(1)
                with torch.no_grad():
                    target = teacher(**x, return_dict=False)[0]
            else:
                target = fixed
            out = student(**x, return_dict=False)[0]
            loss = F.mse_loss(out.float(), target.float())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if not first:
            first.append(float(loss.detach()))             # the first step's loss (a sync, once)
        return loss

    t = time.perf_counter()
    for _ in range(args.warmup):
        step()
    sync(device)
    warm_s = time.perf_counter() - t
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    recompiled = None
    if bits:                                              # a schedule step: 4.5 → 4 bits
        frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        set_bits(bits, bits, args.bits - 0.5)
        step()
        sync(device)
        recompiled = torch._dynamo.utils.counters["stats"]["unique_graphs"] - frames
    busy = None
    if device.type == "cuda":                      # GPU busy time: the kernels' own time per step
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                step()
            sync(device)
        events = prof.key_averages()
        busy = sum(getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0)
                   for e in events) / 3 / 1e3
        if args.profile:
            print(f"--- {name}: top kernels over 3 steps", file=sys.stderr)
            print(events.table(sort_by="self_cuda_time_total", row_limit=args.profile), file=sys.stderr)
    times.sort()
    row = {"variant": name, "step_ms": 1e3 * times[len(times) // 2], "min_ms": 1e3 * times[0], "gpu_busy_ms": busy,
           "peak_gib": peak / 2**30, "warmup_s": warm_s, "new_graphs_on_bit_change": recompiled,
           "first_loss": first[0] if first else None, "teacher_forwards": len(forwards), "teacher_cache": cached is not None}
    del student, teacher, opt
    return row


def numerics(device, bits_list=(8.0, 5.5, 4.5, 4.0)) -> dict:
    """Compiled fused fake quant (Triton on CUDA) vs the registered ops, element for element."""
    g = torch.Generator().manual_seed(1)
    w = (torch.randn(1152, 2304, generator=g) * torch.rand(1152, 1, generator=g)).to(device)
    x = (torch.randn(4, 1024, 1152, generator=g) * 3 + 0.5).to(device, torch.bfloat16)
    b = torch.tensor(8.0, dtype=torch.float64, device=device)
    fw = torch.compile(lambda w, b: fq_weight(w, b, 0, "narrow"), options=compile_options())
    fa = torch.compile(lambda x, b: fq_act_dynamic(x, b), options=compile_options())
    out = {"elements": 0, "weight_mismatch": 0, "act_mismatch": 0, "vs_cpu_mismatch": 0}
    for bits in bits_list:
        b.fill_(bits)
        ref_w = torch.ops.fbqc.fake_quant_weight(w, b, 0, "narrow")
        ref_a = torch.ops.fbqc.fake_quant_act_dynamic(x, b)
        out["weight_mismatch"] += int((fw(w, b) != ref_w).sum())
        out["act_mismatch"] += int((fa(x, b) != ref_a).sum())
        out["vs_cpu_mismatch"] += int((torch.ops.fbqc.fake_quant_weight(w.cpu(), b.cpu(), 0, "narrow")
                                       != ref_w.cpu()).sum())
        out["elements"] += w.numel() + x.numel()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-file", default=str(ROOT / "examples" / "sana.py"))
    ap.add_argument("--preset", default="full")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--bits", type=float, default=4.5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--variants", default="baseline,fused,op,baseline-cg,fused-cg,fused-tc,fused-cg-tc",
                    help="comma-separated; suffix -tc: the --teacher-cache step (no teacher forward)")
    ap.add_argument("--no-teacher", dest="teacher", action="store_false",
                    help="student step only (MSE to a fixed target) instead of the KD step")
    ap.add_argument("--scope", choices=["model", "blocks"], default="blocks",
                    help="torch.compile the whole model (default) or each transformer block")
    ap.add_argument("--profile", type=int, default=0, help="print the top N CUDA kernels of each variant")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    mf = load_model_file(args.model_file, preset=args.preset)
    t = time.perf_counter()
    base = mf.call("model")
    print(f"built {type(base).__name__} ({args.preset}, {sum(p.numel() for p in base.parameters()):,} "
          f"parameters) in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    specs = annotate_modules(base, AnnotateLinears(bits=args.bits))
    x = inputs(base, args.batch, device)

    cached = teacher_output(base, x, device) if any(k.endswith("-tc") for k in args.variants.split(",")) else None

    def builder(kind: str):
        tc, kind = kind.endswith("-tc"), kind.removesuffix("-tc")

        def build():
            teacher = None if tc else copy.deepcopy(base).to(device).requires_grad_(False)
            student = copy.deepcopy(base).to(device)
            bits = {}
            if kind.startswith(("fused", "op")):
                bits = quantize_modules(student, specs, "dynamic", fused=kind.startswith("fused"))
            if not kind.endswith("eager"):
                cg = kind.endswith("-cg")
                student = compile_model(student, args.scope, exact=bool(bits) and "fastdiv" not in kind,
                                        cudagraphs=cg)
                if teacher is not None:
                    teacher = compile_model(teacher, args.scope, exact=False, cudagraphs=cg)   # float teacher
            return student, teacher, bits
        return build

    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    rows = []
    for kind in args.variants.split(","):
        row = measure(kind, builder(kind), x, args, device, cached if kind.endswith("-tc") else None)
        rows.append(row)
        print(f"  {kind:15s} {row['step_ms']:9.1f} ms/step  peak {row['peak_gib']:6.2f} GiB  "
              f"(warm-up {row['warmup_s']:.0f} s)", file=sys.stderr)
    ref = {r["variant"]: r for r in rows}
    print(f"\nGPU QAT step — {dev_name}; torch {torch.__version__}; {args.preset} preset, batch {args.batch}, "
          f"{len(specs)} layers at W{args.bits:g} per channel + A8 dynamic; "
          f"{'KD step (teacher fwd + student fwd/bwd + AdamW)' if args.teacher else 'student step'}, bf16 autocast")
    print(f"{'variant':16s} {'ms/step':>9s} {'GPU ms':>8s} {'peak GiB':>9s} {'time ×':>8s} {'GPU ×':>7s} "
          f"{'memory ×':>9s}  recompiles on bit change")
    fmt = lambda v, f=".3f": format(v, f) if v is not None else "-"   # noqa: E731
    for r in rows:
        v = r["variant"].removesuffix("-tc")
        live = ref.get(v) if r["variant"].endswith("-tc") else None
        r["teacher_cache_ratio"] = r["step_ms"] / live["step_ms"] if live else None
        b = ref.get("baseline-eager" if v.endswith("eager") else "baseline-cg" if v.endswith("-cg") else "baseline")
        r["time_ratio"] = r["step_ms"] / b["step_ms"] if b else None
        r["gpu_ratio"] = r["gpu_busy_ms"] / b["gpu_busy_ms"] if b and b["gpu_busy_ms"] else None
        r["memory_ratio"] = r["peak_gib"] / b["peak_gib"] if b and b["peak_gib"] else None
        print(f"{r['variant']:16s} {r['step_ms']:9.1f} {fmt(r['gpu_busy_ms'], '.1f'):>8s} {r['peak_gib']:9.2f} "
              f"{fmt(r['time_ratio']):>8s} {fmt(r['gpu_ratio']):>7s} {fmt(r['memory_ratio']):>9s}  "
              f"{r['new_graphs_on_bit_change'] if r['new_graphs_on_bit_change'] is not None else '-'}")
    for r in rows:
        if r["teacher_cache_ratio"] is not None:
            print(f"teacher cache: {r['variant']} takes {r['teacher_cache_ratio']:.3f}× the step time of "
                  f"{r['variant'].removesuffix('-tc')} (live teacher forward), measured in this run; "
                  f"peak memory {r['peak_gib']:.2f} vs {ref[r['variant'].removesuffix('-tc')]['peak_gib']:.2f} GiB")
    check = numerics(device) if device.type == "cuda" else None
    if check:
        print(f"numerics: compiled fused vs op on {dev_name}: weight {check['weight_mismatch']}, activation "
              f"{check['act_mismatch']} mismatches; op {dev_name} vs CPU: {check['vs_cpu_mismatch']} "
              f"(of {check['elements']:,} elements)")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": dev_name, "torch": torch.__version__, "args": vars(args),
                                               "rows": rows, "numerics": check}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
