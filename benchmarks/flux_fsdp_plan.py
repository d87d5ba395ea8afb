"""Dry-run memory plan of FSDP2 QAT of FLUX.1-schnell (12 B parameters) on W GPUs — no weights, no GPU.

The published config is built on the meta device (``examples/flux_schnell.py``, preset ``full``); the student
is quantized in place as ``fbqc train --strategy fsdp`` does (:mod:`fbqc.qat.students.modules`, 4-bit weights, dynamic
activations, only the ``*blocks.N.`` parameters trainable), and student and frozen float teacher are sharded by
:func:`fbqc.qat.parallel.dist.wrap` (FSDP2 ``fully_shard`` per block, then the root) under a *fake* process group of W
ranks in this one process. Per-GPU bytes are the local shards of rank 0 (the largest: FSDP2 pads every rank's
storage to it). Activations: with ``--checkpoint-blocks`` each block keeps only its input; the one block being
recomputed in backward holds its saved tensors, measured by running the largest of them on meta under
``saved_tensors_hooks`` (SDPA through the flash-attention kernel, as on the GPU: on meta SDPA would take the
math path and save the L×L scores). Host RAM per process: rank-0 loading (:func:`host_ram`).

    python benchmarks/flux_fsdp_plan.py [--world 4 8] [--batch-per-gpu 1] [--image-tokens N] [--json PATH]
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from torch.testing._internal.distributed.fake_pg import FakeStore

from fbqc.blocks import in_block
from fbqc.frontend import load_model_file
from fbqc.passes import AnnotateLinears
from fbqc.qat.parallel.dist import World, wrap
from fbqc.qat.students.modules import annotate_modules, block_modules, quantize_modules

MODEL_FILE = Path(__file__).resolve().parents[1] / "examples" / "flux_schnell.py"
GIB = 2 ** 30
CARDS = {"H100": 80, "H200": 141}          # GiB per GPU
FP32, BF16 = 4, 2
COMMAND = ("fbqc train examples/flux_schnell.py --preset full --checkpoint {ckpt} --device cuda --nproc {w} "
           "--strategy fsdp --checkpoint-blocks --compile --batch {b} --schedule fractional --steps 20 "
           "-o runs/flux-fsdp{w}")


def build(preset: str = "full"):
    """(student, teacher, quantized layers, image tokens, text tokens): meta FLUX as ``fbqc train`` sets it up."""
    mf = load_model_file(MODEL_FILE, preset=preset)
    model = mf.call("model")
    if not all(p.is_meta for p in model.parameters()):
        model = model.to("meta")                              # the tiny preset has real random weights
    example = mf.call("example_inputs")
    teacher = copy.deepcopy(model).requires_grad_(False)      # the frozen float copy
    specs = annotate_modules(model, AnnotateLinears(bits=4))
    quantize_modules(model, specs, "dynamic")
    for name, p in model.named_parameters():                  # default: only the blocks train
        p.requires_grad_(in_block(name))
    tokens = example["hidden_states"].shape[1], example["encoder_hidden_states"].shape[1]
    return model, teacher, len(specs), *tokens


def shard(student, teacher, world: int, rank: int = 0) -> dict[str, int]:
    """Elements this rank stores after ``fbqc.qat.parallel.dist.wrap(..., "fsdp")`` of copies of both models."""
    student, teacher = copy.deepcopy(student), copy.deepcopy(teacher)
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        meta = torch.device("meta")
        ranks = World(rank, world)
        wrap(student, [b for _, b in block_modules(student)], "fsdp", meta, ranks)
        wrap(teacher, [b for _, b in block_modules(teacher)], "fsdp", meta, ranks, trainable=False,
             param_dtype=torch.bfloat16)
        if not all(isinstance(p, DTensor) for p in student.parameters()):
            raise RuntimeError("fully_shard left a parameter unsharded")
        local = [(p.requires_grad, p.to_local().numel()) for p in student.parameters()]
        return {"student": sum(n for _, n in local), "trainable": sum(n for g, n in local if g),
                "teacher": sum(p.to_local().numel() for p in teacher.parameters())}
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def flash_sdpa():
    """``F.scaled_dot_product_attention`` through the flash kernel (saves out + logsumexp, not the scores)."""
    math_sdpa = F.scaled_dot_product_attention

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        if attn_mask is not None or kw.get("enable_gqa"):
            return math_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, **kw)
        flash = torch.ops.aten._scaled_dot_product_flash_attention
        return flash(query, key, value, dropout_p, is_causal, scale=scale)[0]

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = math_sdpa


def block_inputs(model, batch: int, img: int, txt: int) -> dict:
    """fp32 meta inputs of one FLUX block (both block kinds take the two streams, temb and the RoPE)."""
    cfg = model.config
    d, head = cfg.num_attention_heads * cfg.attention_head_dim, cfg.attention_head_dim
    e = lambda *s, grad=False: torch.empty(*s, device="meta", requires_grad=grad)   # noqa: E731
    return {"hidden_states": e(batch, img, d, grad=True), "encoder_hidden_states": e(batch, txt, d, grad=True),
            "temb": e(batch, d), "image_rotary_emb": (e(img + txt, head), e(img + txt, head))}


def saved_bytes(block, inputs: dict) -> tuple[int, int]:
    """(all, floating-point) bytes autograd saves in one forward of ``block`` — what its recompute holds —
    counted once per storage, the block's own parameters left out."""
    own = {p.untyped_storage()._cdata for p in block.parameters()}
    saved = {}

    def pack(t):
        s = t.untyped_storage()
        if s._cdata not in own:
            saved[s._cdata] = (t, s.nbytes())       # holding t keeps the storage (and its id) alive
        return t

    with flash_sdpa(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(**inputs)
    return sum(n for _, n in saved.values()), sum(n for t, n in saved.values() if t.is_floating_point())


def plan(preset: str = "full", worlds=(4, 8), batch: int = 1, image_tokens: int | None = None) -> dict:
    """Per-GPU memory (bytes) of FSDP2 QAT for each world size, plus the model's counts."""
    student, teacher, quantized, img, txt = build(preset)
    img = image_tokens or img
    blocks = {n: sum(p.numel() for p in b.parameters()) for n, b in block_modules(student)}
    total = sum(p.numel() for p in student.parameters())
    root = total - sum(blocks.values())                       # FSDP2 keeps the root's params gathered
    big = max(blocks, key=blocks.get)
    inputs = block_inputs(student, batch, img, txt)
    first = {}                                                # the first block of each kind
    for n, b in block_modules(student):
        first.setdefault(n.split(".")[0], b)
    recompute = {kind: saved_bytes(b, inputs) for kind, b in first.items()}
    fp32_saved, floating = max(recompute.values())
    recompute_bf16 = fp32_saved - floating // 2               # autocast: floating tensors in bf16
    stream = inputs["hidden_states"].numel() + inputs["encoder_hidden_states"].numel()
    shared = inputs["temb"].numel() * BF16 + 2 * inputs["image_rotary_emb"][0].numel() * FP32
    ckpt_inputs = len(blocks) * stream * BF16 + shared
    working = (2 * blocks[big] * (FP32 + BF16)                # student fp32 + teacher bf16 all-gather, x2 prefetch
               + blocks[big] * FP32                           # the block's unsharded fp32 grads (reduce-scatter in)
               + root * (FP32 + BF16))                        # root params, not resharded after forward
    rows = []
    for w in worlds:
        s = shard(student, teacher, w)
        row = {"world": w, "params": s["student"] * FP32, "grads": s["trainable"] * FP32,
               "adamw": 2 * s["trainable"] * FP32, "teacher": s["teacher"] * FP32, "working": working,
               "activations": ckpt_inputs + recompute_bf16, "shards": s}
        row["total"] = sum(row[k] for k in ("params", "grads", "adamw", "teacher", "working", "activations"))
        rows.append(row)
    return {"preset": preset, "params": total, "trainable": sum(blocks.values()), "root_params": root,
            "blocks": len(blocks),
            "block_params": {k: sum(p.numel() for p in b.parameters()) for k, b in first.items()},
            "largest_block": big, "quantized_layers": quantized, "batch_per_gpu": batch, "image_tokens": img,
            "text_tokens": txt, "ckpt_inputs": ckpt_inputs, "recompute_fp32": fp32_saved,
            "recompute_bf16": recompute_bf16, "recompute_by_kind": {k: v[0] for k, v in recompute.items()},
            "working": working, "host": host_ram(total, sum(blocks.values())), "rows": rows}


def host_ram(params: int, trainable: int) -> dict[str, int]:
    """Host RAM per process (bytes) with rank-0 loading (:func:`fbqc.qat.parallel.dist.load_from_rank0`, as
    ``fbqc train --nproc N`` sets up the module student; measured on the CPU by tests/test_rank0_loading.py).

    - ``rank0_load``: rank 0 builds the fp32 model with its weights (``--checkpoint DIR``), once; the teacher
      is a meta copy filled from the same tensors, student and teacher shards go to the GPU as they are
      broadcast, and the loaded copy is freed once both are loaded.
    - ``other_load``: the other ranks build on the meta device — no weights in host RAM (their shards are
      allocated on the GPU; one tensor at a time is received whole, there too).
    - ``rank0_checkpoint``: at each checkpoint rank 0 gathers the full student and AdamW state (2 states of
      the trainable parameters) to the CPU for ``checkpoint.pt`` (``cpu_offload``: the others keep none).
    - ``before``: what every process held before rank-0 loading: the fp32 model and its teacher copy.
    """
    return {"rank0_load": params * FP32, "other_load": 0, "rank0_checkpoint": (params + 2 * trainable) * FP32,
            "before": 2 * params * FP32}


def report(p: dict) -> str:
    g = lambda b: f"{b / GIB:8.2f}"                         # noqa: E731
    bp = p["block_params"]
    out = [f"FLUX.1-schnell FSDP2 QAT memory plan (dry run on the meta device; preset {p['preset']})",
           f"  parameters {p['params']:,} ({p['params'] * FP32 / GIB:.1f} GiB fp32); trainable (blocks) "
           f"{p['trainable']:,}; outside blocks {p['root_params']:,}",
           f"  {p['blocks']} blocks: double {bp['transformer_blocks']:,} params, single "
           f"{bp['single_transformer_blocks']:,}; {p['quantized_layers']} quantized nn.Linear (4-bit)",
           f"  tokens {p['image_tokens']} image + {p['text_tokens']} text, batch {p['batch_per_gpu']} per GPU; "
           f"checkpointed block inputs {p['ckpt_inputs'] / GIB:.2f} GiB (bf16); one block's recompute "
           f"{p['recompute_fp32'] / GIB:.2f} GiB fp32 measured -> {p['recompute_bf16'] / GIB:.2f} GiB bf16 est.",
           "", "per-GPU GiB  (shards measured: fully_shard on meta, fake process group)",
           f"{'GPUs':>4} {'params':>8} {'grads':>8} {'AdamW':>8} {'teacher':>8} {'working':>8} {'activ.':>8} "
           f"{'total':>8}   " + "   ".join(f"{c} {v}" for c, v in CARDS.items())]
    for r in p["rows"]:
        fits = "   ".join(f"{'fits' if r['total'] <= v * GIB else 'OVER':>8}" for v in CARDS.values())
        out.append(f"{r['world']:>4} " + " ".join(g(r[k]) for k in ("params", "grads", "adamw", "teacher",
                                                                      "working", "activations", "total"))
                   + f"   {fits}")
    h = {k: v / GIB for k, v in p["host"].items()}
    before = ", ".join(f"{r['world']} GPUs: {r['world'] * h['before']:.0f} GiB" for r in p["rows"])
    out += ["",
            "  params: student fp32 shard; grads, AdamW (2 states): fp32 shards of the trainable params; teacher:",
            "  fp32 shard (all-gathered in bf16); working: largest block all-gathered (student fp32 + teacher bf16)",
            "  x2 for prefetch + its unsharded fp32 grads + the root's params (kept gathered); activ.: block inputs",
            "  + one block's recompute. Not counted: CUDA context, NCCL buffers, allocator slack (a few GiB).",
            "",
            "host RAM per process (rank-0 loading; besides Python, torch and the CUDA context, a few GiB):",
            f"  start-up: rank 0 {h['rank0_load']:.1f} GiB (the fp32 model as loaded, once: the teacher is filled from "
            "it, both are",
            "  sharded onto the GPUs, then it is freed); every other rank "
            f"{h['other_load']:.1f} GiB (built on the meta device: its shards",
            f"  are allocated on its GPU and received there): {h['rank0_load']:.1f} GiB in all, for any number of GPUs",
            f"  (was {h['before']:.1f} GiB on every process: {before}; the 8-GPU hosts here have 560 GiB).",
            f"  each checkpoint: rank 0 gathers the full student + AdamW state to the CPU, {h['rank0_checkpoint']:.1f} "
            "GiB (the other ranks keep none).",
            "", "real run (needs a local diffusers FLUX.1-schnell checkpoint: the full preset is meta-only):"]
    out += ["  " + COMMAND.format(ckpt="DIR", w=r["world"], b=r["world"] * p["batch_per_gpu"]) for r in p["rows"]]
    return "\n".join(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--world", type=int, nargs="+", default=[4, 8], help="GPU counts to plan")
    ap.add_argument("--batch-per-gpu", type=int, default=1)
    ap.add_argument("--image-tokens", type=int, default=None,
                    help="image tokens (default: the model file's, 1024 = 512 px; 4096 = 1024 px)")
    ap.add_argument("--preset", default="full", help=argparse.SUPPRESS)
    ap.add_argument("--json", type=Path, default=None, help="also write the plan as JSON")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    p = plan(args.preset, tuple(args.world), args.batch_per_gpu, args.image_tokens)
    print(report(p))
    print(f"\n(planned in {time.perf_counter() - t0:.1f} s)")
    if args.json:
        args.json.write_text(json.dumps(p, indent=2))


if __name__ == "__main__":
    main()
