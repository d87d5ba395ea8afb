"""FraQAT's table, small and real (DESIGN.md §6): which QAT schedule wins, per architecture, on one teacher.

Per architecture (``--arch``: tiny Sana, PixArt-Σ, SD3.5-M and FLUX transformers, :mod:`paper_archs`):

1. Train one teacher on scikit-learn's 8×8 digits (:mod:`paper_digits`; deterministic algorithms, a
   fixed data order) and save it (``OUT/teachers/ARCH.pt``), or load it (``--teacher DIR``).
2. Export it with fbqc and make every student from that one teacher: W4A8 (each linear / 1×1 conv in
   the blocks) by PTQ (calibration only) or by QAT with a schedule at equal compute (same steps, batch,
   KD against the teacher, dynamic INT8 activations while training), then static activation
   calibration as for deployment. A method is ``ptq`` or ``SCHEDULE[+KEY=VALUE…]``: SCHEDULE as for
   ``fbqc train --schedule`` (``direct``, ``integer``, ``fractional``, ``continuous``, ``NAME@SHARE``,
   ``BITS:PARTS,…``), KEY one of rewarm, moments, lr, warmup (e.g. ``fractional+moments=reset``).
3. Sample every model from the same noises and labels per seed; score against the teacher's samples
   with ``fbqc eval``'s metric code (:mod:`fbqc.image_metrics`: FID in a digit classifier's features,
   PSNR, SSIM on the uint8 images) plus the classifier's label accuracy. A seed fixes the QAT data
   order, the calibration batches and the sampling noises, so the methods are paired per seed.

Students run in parallel processes (``--jobs``). Writes results.json, table.md, loss_curves.png to --out.

    python benchmarks/paper_table.py --device cuda --jobs 24      # the README's table (with CUDA MPS)
    python benchmarks/paper_table.py --reduced                      # CPU-sized (CI smoke-tests it)
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import torch

from fbqc.outputs import write_replacing

sys.path.insert(0, str(Path(__file__).resolve().parent))
import paper_archs  # noqa: E402
import paper_digits as D  # noqa: E402
import paper_report as R  # noqa: E402

METHODS = ("ptq", "direct", "integer", "fractional", "continuous",      # the README's table
           "fractional+moments=reset+rewarm=8", "fractional+lr=1e-4")
REFERENCE = "fractional"                     # the paired deltas are against fbqc train's default
REMEDY = {"rewarm": int, "moments": str, "lr": float, "warmup": int}
REDUCED = ["--seeds", "2", "--teacher-steps", "150", "--qat-steps", "24", "--samples", "64", "--sample-steps",
           "6", "--width", "32", "--layers", "2", "--batch", "32", "--classifier-steps", "300", "--calib-batches",
           "2"]
_STATE: dict = {}                            # per process: args, data, classifier, teachers (cached)


def method_config(method: str, a) -> tuple[str | None, dict]:
    """``ptq`` → (None, {}); ``SCHEDULE+KEY=VALUE…`` → (schedule, fbqc.qat.train keywords)."""
    if method == "ptq":
        return None, {}
    schedule, *extra = method.split("+")
    kw = {"lr": a.qat_lr, "warmup": a.qat_steps // 20}
    for item in extra:
        key, sep, value = item.partition("=")
        if not sep or key not in REMEDY:
            raise ValueError(f"method {method!r}: {item!r} is not KEY=VALUE with KEY one of {', '.join(REMEDY)}")
        try:
            kw[key] = REMEDY[key](value)
        except ValueError:
            raise ValueError(f"method {method!r}: {key}={value!r} is not a {REMEDY[key].__name__}") from None
    return schedule, kw


# ---- work done in the worker processes ------------------------------------------------------------

def _init(a, counter=None) -> None:
    """A worker: threads, determinism, data, classifier; with ``--device cuda`` and several GPUs the
    workers take them in turn (``counter``: a shared worker count)."""
    torch.set_num_threads(max(1, a.threads))
    if counter is not None and a.device == "cuda" and torch.cuda.device_count() > 1:
        with counter.get_lock():
            index, counter.value = counter.value, counter.value + 1
        a = argparse.Namespace(**{**vars(a), "device": f"cuda:{index % torch.cuda.device_count()}"})
        torch.cuda.set_device(a.device)
    _STATE.clear()
    _STATE.update(args=a, varies=D.deterministic(a.device), data=D.digits(a.size))
    clf = D.Classifier(a.size)
    clf.load_state_dict(torch.load(Path(a.out) / "classifier.pt"))
    _STATE["clf"] = clf.eval()


def _seed_draw(seed: int, n: int, a, test_x):
    g = torch.Generator().manual_seed(10_000 + seed)
    noises = torch.randn(n, 1, a.size, a.size, generator=g)
    labels = torch.arange(n) % 10
    real = test_x[torch.randint(len(test_x), (n,), generator=g)]
    return noises, labels, real


def _n(a) -> int:
    return a.batch * math.ceil(a.samples / a.batch)


def score(samples: torch.Tensor, reference: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """FID / PSNR / SSIM through fbqc.image_metrics (uint8 images, as ``fbqc eval`` scores PNGs), label acc."""
    from fbqc import image_metrics as M

    for what, x in (("samples", samples), ("reference samples", reference)):
        if not torch.isfinite(x).all():             # uint8 would turn NaN into black pixels: a wrong score
            raise ValueError(f"{int((~torch.isfinite(x)).sum())} {what} values are not finite")
    s8, r8 = D.to_uint8(samples), D.to_uint8(reference)
    net = M.FeatureNet(D.DigitFeatures(_STATE["clf"]), r8[:2], what="the digit feature network")
    pairs = [M.psnr_ssim(s8[i:i + 1], r8[i:i + 1]) for i in range(len(s8))]
    with torch.no_grad():
        acc = float((_STATE["clf"](s8[:, :1].float() / 127.5 - 1.0).argmax(1) == labels).float().mean())
    fid = M.fid_with(net, [s8], [r8])
    if not math.isfinite(fid):
        raise ValueError(f"FID is {fid}")
    return {"fid": fid, "psnr": float(np.mean([p for p, _ in pairs])),
            "ssim": float(np.mean([s for _, s in pairs])), "label_acc": acc}


def _teacher_program(arch_name: str):
    """The exported teacher of ``arch_name`` (cached per process) from OUT/teachers/ARCH.pt."""
    import fbqc

    if arch_name not in _STATE.setdefault("teachers", {}):
        a, arch = _STATE["args"], paper_archs.ARCHS[arch_name]
        saved = torch.load(Path(a.out) / "teachers" / f"{arch_name}.pt")
        model = arch.make(a.width, a.layers, a.size, D.CAPTION)
        model.load_state_dict(saved["state"])
        (x, y), _ = _STATE["data"]
        ex = next(D.stream(arch, x, y, a.batch, 0)())
        _STATE["teachers"][arch_name] = fbqc.export(model.eval(), ex, source=f"paper_table {arch_name} teacher")
    return _STATE["teachers"][arch_name]


def teacher_job(arch_name: str) -> dict:
    """Train (or load) the teacher, save it, sample its references per seed; its scores vs real digits."""
    from fbqc.qat.students.program import on_device

    a, arch = _STATE["args"], paper_archs.ARCHS[arch_name]
    (x, y), (tx, _) = _STATE["data"]
    t0, path = time.perf_counter(), Path(a.out) / "teachers" / f"{arch_name}.pt"
    config = {"arch": arch_name, "width": a.width, "layers": a.layers, "size": a.size, "batch": a.batch,
              "teacher_steps": a.teacher_steps, "lr": a.lr}
    lines: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        given = Path(a.teacher) / f"{arch_name}.pt" if a.teacher else None
        if given is not None and (given.is_file() or not a.train_missing):
            saved = _load_teacher(given, config)
            curve, source = saved["loss"], f"loaded from {a.teacher}"
        else:
            model, curve = D.train_teacher(arch, a, x, y, lines.append)
            saved = {"state": model.state_dict(), "config": config, "loss": curve}
            source = f"trained here (not in --teacher {a.teacher})" if given is not None else "trained here"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_replacing(path, lambda tmp: torch.save(saved, tmp))
        teacher = _teacher_program(arch_name)
        fn, refs, scores = on_device(teacher, a.device), {}, []
        for seed in range(a.seeds):
            noises, labels, real = _seed_draw(seed, _n(a), a, tx)
            refs[seed] = D.sample(fn, arch, noises, labels, a)
            scores.append(score(refs[seed], real, labels))
    torch.save(refs, path.with_name(f"{arch_name}-refs.pt"))
    return {"arch": arch_name, "describe": arch.describe(a.width, a.layers), "source": source, "log": lines,
            "final_loss": float(np.mean(curve[-max(1, len(curve) // 20):])) if curve else None,
            "curve": curve, "vs_real": scores, "seconds": round(time.perf_counter() - t0, 1),
            "nondeterministic": D.nondeterministic_warnings(caught) + _STATE["varies"]}


def _load_teacher(path: Path, config: dict) -> dict:
    if not path.is_file():
        raise SystemExit(f"--teacher: {path} does not exist; train it with a run without --teacher (it is "
                         f"saved as OUT/teachers/{path.name})")
    saved = torch.load(path)
    diff = {k: (saved["config"].get(k), v) for k, v in config.items()
            if k in ("arch", "width", "layers", "size") and saved["config"].get(k) != v}
    if diff:
        raise SystemExit(f"--teacher {path}: made with " + ", ".join(f"{k} {s}" for k, (s, _) in diff.items())
                         + "; give the same --width/--layers/--size or train a new teacher")
    return saved


def student_job(arch_name: str, method: str, seed: int) -> dict:
    """One student of the shared teacher: quantize (PTQ or QAT), calibrate, sample, score."""
    import fbqc
    import fbqc.qat
    from fbqc.passes import AnnotateLinears, Calibrate, InsertFakeQuant
    from fbqc.qat.students.program import on_device

    a, arch = _STATE["args"], paper_archs.ARCHS[arch_name]
    (x, y), (tx, _) = _STATE["data"]
    t0 = time.perf_counter()
    schedule, kw = method_config(method, a)
    teacher = _teacher_program(arch_name)
    student = fbqc.PassManager([AnnotateLinears(a.bits), InsertFakeQuant()])(teacher)
    rows, summary = [], {}
    if schedule is not None:
        r = fbqc.qat.train(student, teacher, D.stream(arch, x, y, a.batch, 1000 + seed), schedule=schedule,
                           steps=a.qat_steps, bits=None if ":" in schedule else a.bits, device=a.device,
                           seed=seed, checkpoint_every=0, progress=False, log=lambda s: None, report=False,
                           data_note="noised digits", **kw)
        rows, summary = r.log, r.summary
    program = fbqc.PassManager([Calibrate(D.stream(arch, x, y, a.batch, 2000 + seed)(), a.calib_batches)])(student)
    noises, labels, _ = _seed_draw(seed, _n(a), a, tx)
    ref = torch.load(Path(a.out) / "teachers" / f"{arch_name}-refs.pt")[seed]
    s = score(D.sample(on_device(program, a.device), arch, noises, labels, a), ref, labels)
    losses = [r["loss"] for r in rows]
    s["final_kd_loss"] = float(np.mean(losses[-max(1, len(losses) // 10):])) if losses else None
    s["bit_changes"] = summary.get("bit_changes", [])
    s["seconds"] = round(time.perf_counter() - t0, 1)
    return {"arch": arch_name, "method": method, "seed": seed, "scores": s,
            "curve": losses if seed == 0 else None, "bits": [r["bits"] for r in rows] if seed == 0 else None}


# ---- orchestration ---------------------------------------------------------------------------------

def run(a, log=print) -> dict:
    threads = torch.get_num_threads()
    try:
        return _run(a, log)
    finally:
        torch.set_num_threads(threads)


def _run(a, log) -> dict:
    for m in a.methods:
        method_config(m, a)                                   # every method checked before any work
    unknown = [x for x in a.arch if x not in paper_archs.ARCHS]
    if unknown:
        raise SystemExit(f"--arch {','.join(unknown)}: unknown; choose from {', '.join(paper_archs.ARCHS)}")
    out = Path(a.out)
    _check_out(out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"config": vars(a), "archs": {k: {"runs": {m: [None] * a.seeds for m in a.methods}, "curves": {},
                                                "bits": {}} for k in a.arch}}
    if a.resume:
        _resume(a, results, out, log)
    t0 = time.perf_counter()
    train, test = D.digits(a.size)
    log(f"digits: {len(train[0])} train / {len(test[0])} test at {a.size}×{a.size}; device {a.device}; "
        f"{len(a.arch)} architecture(s) × {len(a.methods)} method(s) × {a.seeds} seed(s), {a.jobs} job(s)")
    torch.save(D.train_classifier(a, train, test, log).state_dict(), out / "classifier.pt")
    # the main methods of every architecture and seed first: a run cut short still gives whole rows
    jobs = [(k, m, s) for m in a.methods for s in range(a.seeds) for k in a.arch
            if results["archs"][k]["runs"][m][s] is None]
    before = results.pop("seconds_before", 0.0)
    total = sum(len(runs) for v in results["archs"].values() for runs in v["runs"].values())

    def took(r: dict) -> None:
        res = results["archs"][r["arch"]]
        res["runs"][r["method"]][r["seed"]] = r["scores"]
        if r["curve"]:
            res["curves"][r["method"]], res["bits"][r["method"]] = r["curve"], r["bits"]
        done = sum(x is not None for v in results["archs"].values() for runs in v["runs"].values() for x in runs)
        s = r["scores"]
        log(f"  [{done}/{total}] {r['arch']:<6} seed {r['seed']} {r['method']:<28} FID {s['fid']:8.3f}  "
            f"PSNR {s['psnr']:6.2f} dB  acc {s['label_acc']:.3f}  ({s['seconds']:.0f} s, "
            f"{time.perf_counter() - t0:.0f} s in all)")
        results["seconds"] = round(time.perf_counter() - t0 + before, 1)
        _write(out / "results.json", results)                  # after every job: a cut-short run keeps its rows

    def teacher_done(r: dict) -> None:
        for line in r["log"]:
            log(line)
        results["archs"][r["arch"]]["teacher"] = {k: v for k, v in r.items() if k != "log"}
        log(f"{r['describe']}: teacher {r['source']} ({r['seconds']:.0f} s), FID vs real digits "
            f"{R.ms([x['fid'] for x in r['vs_real']])}")

    if a.jobs <= 1:
        _init(a)
        for k in a.arch:
            teacher_done(teacher_job(k))
        for job in jobs:
            took(student_job(*job))
    else:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        with ProcessPoolExecutor(a.jobs, mp_context=ctx, initializer=_init,
                                 initargs=(a, ctx.Value("i", 0))) as pool:
            pending = {pool.submit(teacher_job, k): k for k in a.arch}
            for f in as_completed(list(pending)):
                teacher_done(f.result())
            futures = {pool.submit(student_job, *job): job for job in jobs}
            for f in as_completed(futures):
                try:
                    took(f.result())
                except Exception as e:  # noqa: BLE001 - one failed student is reported, the table goes on
                    k, m, seed = futures[f]
                    results.setdefault("errors", []).append(f"{k} {m} seed {seed}: {type(e).__name__}: {e}")
                    log(f"  FAILED {k} seed {seed} {m}: {type(e).__name__}: {e}")
    results["seconds"] = round(time.perf_counter() - t0 + before, 1)
    R.analyse(results, REFERENCE)
    results["table"] = R.table(results, REFERENCE)
    _write(out / "results.json", results)
    (out / "table.md").write_text(results["table"] + "\n")
    R.plot_curves(results, out / "loss_curves.png")
    log(results["table"])
    return results


def _check_out(out: Path) -> None:
    """--out must be new, empty or an earlier paper table's (its results.json): nothing else is overwritten."""
    if not out.exists():
        return
    if not out.is_dir():
        raise SystemExit(f"--out {out} is a file; give a directory")
    if not any(out.iterdir()):
        return
    try:
        own = "archs" in json.loads((out / "results.json").read_text())
    except (OSError, ValueError, TypeError):
        own = False
    if not own:
        raise SystemExit(f"--out {out}: a non-empty directory that holds no paper table (results.json); "
                         f"choose another --out")


def _write(path: Path, results: dict) -> None:
    text = json.dumps(results, indent=2, default=str) + "\n"
    write_replacing(path, lambda tmp: tmp.write_text(text))


#: settings that change what a student computes: a resumed table must keep them
SAME = ("bits", "size", "width", "layers", "batch", "lr", "teacher_steps", "qat_steps", "qat_lr",
        "calib_batches", "samples", "sample_steps", "classifier_steps")


def _resume(a, results: dict, out: Path, log) -> None:
    """Fill ``results`` with the students of OUT/results.json; the teachers come from OUT/teachers."""
    path = out / "results.json"
    if not path.is_file():
        raise SystemExit(f"--resume: {path} does not exist; run without --resume first")
    old = json.loads(path.read_text())
    diff = [f"--{k.replace('_', '-')} {old['config'].get(k)} → {getattr(a, k)}" for k in SAME
            if old["config"].get(k) != getattr(a, k)]
    if diff:
        raise SystemExit(f"--resume {out}: the table was made with other settings ({', '.join(diff)}); "
                         f"give the same ones or another --out")
    kept = 0
    for k, res in old["archs"].items():
        for m, runs in res.get("runs", {}).items():
            for seed, r in enumerate(runs):
                if r is not None and k in results["archs"] and m in results["archs"][k]["runs"] and seed < a.seeds:
                    results["archs"][k]["runs"][m][seed] = r
                    kept += 1
        if k in results["archs"]:
            results["archs"][k]["curves"].update(res.get("curves", {}))
            results["archs"][k]["bits"].update(res.get("bits", {}))
    results["seconds_before"] = old.get("seconds", 0.0)
    if a.teacher is None and all((out / "teachers" / f"{k}.pt").is_file() for k in a.arch):
        a.teacher = str(out / "teachers")
    log(f"resumed {out}: {kept} student(s) kept; teachers from {a.teacher or 'a new training'}")


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    comma = lambda s: tuple(x for x in s.split(",") if x)  # noqa: E731
    p.add_argument("--device", default="cpu")
    p.add_argument("--arch", type=comma, default=tuple(paper_archs.ARCHS),
                   help=f"comma list of {', '.join(paper_archs.ARCHS)}  [default: all]")
    p.add_argument("--methods", type=comma, default=METHODS,
                   help="comma list: ptq, or SCHEDULE[+KEY=VALUE…] (KEY: rewarm, moments, lr, warmup)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--jobs", type=int, default=1, help="parallel worker processes (1: in this process)")
    p.add_argument("--teacher", default=None, metavar="DIR",
                   help="load the teachers from DIR/ARCH.pt (an earlier run's OUT/teachers) instead of training")
    p.add_argument("--train-missing", action="store_true",
                   help="with --teacher: train the teachers DIR does not hold (stated in the table)")
    p.add_argument("--bits", type=float, default=4.0)
    p.add_argument("--size", type=int, default=8)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3, help="teacher learning rate")
    p.add_argument("--teacher-steps", type=int, default=2000)
    p.add_argument("--qat-steps", type=int, default=200)
    p.add_argument("--qat-lr", type=float, default=5e-4)
    p.add_argument("--calib-batches", type=int, default=8)
    p.add_argument("--samples", type=int, default=512)
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--classifier-steps", type=int, default=1500)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--resume", action="store_true",
                   help="keep the students already in OUT/results.json (same settings), run the missing ones")
    p.add_argument("--reduced", action="store_true", help="CPU-sized: " + " ".join(REDUCED))
    p.add_argument("--out", default="runs/paper_table")
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--reduced" in argv:
        argv = REDUCED + argv                          # explicit flags after it still win
    a = p.parse_args(argv)
    if a.seeds < 1 or a.jobs < 0:
        p.error("--seeds must be ≥ 1 and --jobs ≥ 0")
    return a


if __name__ == "__main__":
    run(parse())
