"""One checkpoint save, and its load on resume, of an FSDP run, per process: seconds and peak
memory, sharded (DCP: every process writes its own shards, in parallel, and on resume reads only
the pieces of its own shards) against gathered (every tensor gathered whole into the first
process's CPU memory, which writes model.safetensors and optimizer.safetensors, and on resume
every process reads the whole files before it shards the model: the format before sharded
checkpoints, still the one of single-process and DDP runs).

Save: the model is built on the meta device and sharded before it gets memory, so no process
ever holds it whole; AdamW's moments come from one step of zero gradients at lr 0. Load: as
`monotile resume` does it, the model is built on the CPU with its weights left uninitialised
(weights_left_uninitialised), then gathered: the whole files read into it, then sharded, then
the whole moments cut to each process's shards; sharded: sharded first, then each process
reads its pieces of the weights and of the moments (checkpoint.load_model_shards,
load_optimizer_state). Each method and phase runs in its own torchrun (fresh processes, gloo
on CPU). Peak memory is the kernel's high-water mark of the resident set (VmHWM), reset just
before the save or the load (/proc/self/clear_refs, Linux): `extra` is that peak less the
resident set before.

    .venv/bin/python bench/checkpoint_fsdp.py [--d-model 1024 --n-layer 12 --vocab 32000]
        [--nproc 2] [--out DIR] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GB = 1e9


def memory() -> dict[str, float]:
    """This process's resident set now and its high-water mark, in bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def worker(a) -> None:
    import torch.distributed as dist

    from monotile.core.transformer import ModelConfig
    from monotile.train import distributed

    ctx = distributed.setup("fsdp")
    cfg = ModelConfig(vocab_size=a.vocab, n_layer=a.n_layer, n_head=max(1, a.d_model // 64),
                      d_model=a.d_model, context=a.context)
    mine = (save if a.phase == "save" else load)(a, cfg, ctx)
    every = [None] * ctx.world
    dist.all_gather_object(every, mine)
    if ctx.main:
        print(json.dumps({"method": a.method, "parameters": mine.pop("parameters"),
                          "processes": every}))
    distributed.shutdown()


def save(a, cfg, ctx) -> dict:
    import torch
    import torch.distributed as dist

    from monotile.modalities.text import LanguageModel
    from monotile.train import checkpoint, distributed
    from monotile.train.optim import make_optimizer

    with torch.device("meta"):
        model = LanguageModel(cfg)
    parameters = sum(p.numel() for p in model.parameters())
    distributed.wrap(model, ctx)  # sharded on meta: no process holds the model whole
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    opt = make_optimizer(model, lr=1e-3, weight_decay=0.1, beta1=0.9, beta2=0.99)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    for group in opt.param_groups:
        group["lr"] = 0.0
    opt.step()  # AdamW's moments, sharded like the weights
    opt.zero_grad(set_to_none=True)

    run = Path(a.out) / a.method
    if ctx.main:
        shutil.rmtree(run, ignore_errors=True)
        run.mkdir(parents=True)
    dist.barrier()
    before = memory()["VmRSS"]
    Path("/proc/self/clear_refs").write_text("5")  # the high-water mark starts again from now
    t = time.perf_counter()
    if a.method == "sharded":
        checkpoint.save_checkpoint(run, model, opt, {"step": 1})
    else:  # the gathered path, as save_checkpoint takes it for a whole model
        checkpoint._save_whole(run, model, opt, {"step": 1}, None, None)
        distributed.barrier()
    seconds = time.perf_counter() - t
    peak = memory()["VmHWM"]
    if a.method == "sharded":
        name = json.loads((run / "trainer_state.json").read_text())["checkpoint"]
        written = sum(f.stat().st_size for f in (run / name).glob(f"shard-{ctx.rank + 1:05d}-*"))
    else:
        written = sum((run / f).stat().st_size for f in ("model.safetensors",
                                                         "optimizer.safetensors")) \
            if ctx.main else 0
    return {"rank": ctx.rank, "seconds": seconds, "rss_before": before, "peak": peak,
            "extra": peak - before, "written": written, "checksum": checksum(model),
            "parameters": parameters}


def load(a, cfg, ctx) -> dict:
    """Read the checkpoint the save phase wrote back into a model and optimizer sharded over
    the processes, the way `monotile resume` does it for each method."""

    from monotile.core.transformer import weights_left_uninitialised
    from monotile.modalities.text import LanguageModel
    from monotile.train import checkpoint, distributed
    from monotile.train.optim import make_optimizer

    run = Path(a.out) / a.method
    state = (json.loads((run / "trainer_state.json").read_text()) if a.method == "sharded"
             else {"step": 1})  # the gathered save wrote the files alone
    distributed.barrier()
    before = memory()["VmRSS"]
    Path("/proc/self/clear_refs").write_text("5")
    t = time.perf_counter()
    with weights_left_uninitialised():
        model = LanguageModel(cfg)
    parameters = sum(p.numel() for p in model.parameters())
    if a.method == "gathered":
        checkpoint.load_model_weights(model, run / "model.safetensors")
    distributed.wrap(model, ctx)
    opt = make_optimizer(model, lr=1e-3, weight_decay=0.1, beta1=0.9, beta2=0.99)
    if a.method == "sharded":
        checkpoint.load_model_shards(model, run, state)
    checkpoint.load_optimizer_state(model, opt, run, state)
    distributed.barrier()
    seconds = time.perf_counter() - t
    peak = memory()["VmHWM"]
    assert len(opt.state) == len(list(model.parameters())), "the moments were not read"
    return {"rank": ctx.rank, "seconds": seconds, "rss_before": before, "peak": peak,
            "extra": peak - before, "checksum": checksum(model), "parameters": parameters}


def checksum(model) -> float:
    """The sum of this process's shards of the weights: the same after the load as at the
    save when the load read them back."""
    import torch

    from monotile.train import distributed
    with torch.no_grad():
        return sum(float((p.to_local() if distributed.is_dtensor(p) else p).double().sum())
                   for p in model.parameters())


def launch(a, method: str, phase: str) -> dict:
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={a.nproc}", __file__, "--worker", "--method", method,
            "--phase", phase, "--d-model", str(a.d_model), "--n-layer", str(a.n_layer),
            "--vocab", str(a.vocab), "--context", str(a.context), "--out", a.out]
    threads = str(max(1, (os.cpu_count() or 1) // a.nproc))
    done = subprocess.run(args, capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS=threads))
    if done.returncode != 0:
        sys.exit(f"the {method} {phase} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarise(procs: list[dict]) -> dict:
    return {"seconds": max(p["seconds"] for p in procs),
            "max_peak_gb": max(p["peak"] for p in procs) / GB,
            "max_extra_gb": max(p["extra"] for p in procs) / GB,
            "per_process": [{k: round(v / GB, 3) if k in ("rss_before", "peak", "extra",
                                                          "written") else v
                             for k, v in p.items()} for p in procs]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--d-model", type=int, default=1024)
    ap.add_argument("--n-layer", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--out", help="where the checkpoints go (default: a temporary folder, "
                    "removed after)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--method", choices=["sharded", "gathered"], help=argparse.SUPPRESS)
    ap.add_argument("--phase", choices=["save", "load"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(a)
        return
    keep = a.out is not None
    a.out = a.out or tempfile.mkdtemp(prefix="bench_checkpoint_fsdp_")
    results = {}
    try:
        for m in ("gathered", "sharded"):
            for phase in ("save", "load"):
                results[m, phase] = launch(a, m, phase)
    finally:
        if not keep:
            shutil.rmtree(a.out, ignore_errors=True)
    for m in ("gathered", "sharded"):  # every process read back the weights it saved
        for saved, read in zip(results[m, "save"]["processes"], results[m, "load"]["processes"]):
            if abs(saved["checksum"] - read["checksum"]) > 1e-6 * (1 + abs(saved["checksum"])):
                sys.exit(f"{m}: process {saved['rank']} read back other weights than it saved "
                         f"(sum {read['checksum']} against {saved['checksum']})")
    n = results["sharded", "save"]["parameters"]
    summary = {"parameters": n, "processes": a.nproc, "checkpoint_gb": 12 * n / GB}
    for phase in ("save", "load"):
        g, s = (summarise(results[m, phase]["processes"]) for m in ("gathered", "sharded"))
        summary[phase] = {"gathered": g, "sharded": s, "ratio_gathered_over_sharded": {
            "seconds": g["seconds"] / s["seconds"],
            "max_peak": g["max_peak_gb"] / s["max_peak_gb"],
            "max_extra": g["max_extra_gb"] / max(s["max_extra_gb"], 1e-9)}}
    if a.json:
        print(json.dumps(summary))
        return
    print(f"{n / 1e6:,.0f}M parameters on {a.nproc} processes (gloo, CPU); one checkpoint: "
          f"{summary['checkpoint_gb']:.2f} GB of weights and AdamW moments (fp32)")
    print("phase  method    rank  seconds  RSS before  peak RSS  extra (peak - before)")
    for phase in ("save", "load"):
        for m in ("gathered", "sharded"):
            for p in summary[phase][m]["per_process"]:
                print(f"{phase:6} {m:9} {p['rank']:4} {p['seconds']:8.2f} "
                      f"{p['rss_before']:8.2f} GB {p['peak']:6.2f} GB {p['extra']:14.2f} GB")
    for phase in ("save", "load"):
        r = summary[phase]["ratio_gathered_over_sharded"]
        print(f"{phase}: gathered / sharded: time {r['seconds']:.2f}x (slowest process), peak "
              f"RSS {r['max_peak']:.2f}x, extra memory {r['max_extra']:.2f}x (the most of any "
              "process)")
    print("every process read back the weights it saved (sums of its shards equal)")


if __name__ == "__main__":
    main()
