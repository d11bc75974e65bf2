"""The `monotile` command: thin verbs over the Python API (monotile.train, load, resume).

Every user error is one line on stderr and exit status 2; figures go to stdout, as one JSON
object with --json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import warnings

from .errors import MonotileError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="monotile", description="One Transformer trunk for text, "
                                "images, speech and time series.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train a model from a preset into a run directory")
    t.add_argument("task", help="text, vision, speech or series")
    t.add_argument("--preset", help="a named recipe, e.g. shakespeare-char")
    t.add_argument("--data", help="data to use instead of the preset's: a text file; an .npz, "
                   "a folder of class folders or a CSV of path,label of images; a manifest of "
                   "path,transcript or a LibriSpeech-style folder of recordings")
    t.add_argument("--holdout-speaker", metavar="NAME", help="speech: test on this speaker's "
                   "recordings and train on everyone else's")
    t.add_argument("--target", metavar="COL[,COL...]", help="series: the columns to forecast "
                   "(default: every numeric column)")
    t.add_argument("--time-col", metavar="COL", help="series: the timestamp column (default: "
                   "the first column when it is not numeric)")
    t.add_argument("--horizon", type=int, metavar="H", help="series: steps to forecast")
    t.add_argument("--out", help="the run directory to create (default runs/<preset>)")
    t.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override settings by name, e.g. --set max_steps=500 lr=3e-4")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument("--json", action="store_true", help="print the final figures as JSON")
    t.add_argument("--sample", type=int, default=0, metavar="N",
                   help="after training, print N generated tokens (text)")

    r = sub.add_parser("resume", help="continue a stopped run from its last checkpoint")
    r.add_argument("run")
    r.add_argument("--quiet", action="store_true")
    r.add_argument("--json", action="store_true")
    for cmd in (t, r):
        cmd.add_argument("--strategy", choices=["ddp", "fsdp"], help="under torchrun: "
                         "replicate the model on every process (ddp, the default) or shard it "
                         "(fsdp)")
        cmd.add_argument("--stop-at", type=int, metavar="STEP", help="stop after this step, "
                         "checkpointed; `monotile resume RUN` continues")

    e = sub.add_parser("eval", help="evaluate a run on its validation data")
    e.add_argument("run")
    e.add_argument("--data", help="evaluate on this data instead: images (a folder of class "
                   "folders, an .npz or a CSV of path,label) or recordings (a manifest of "
                   "path,transcript or a LibriSpeech-style folder)")
    e.add_argument("--backtest", type=int, metavar="K", help="series: forecast from K rolling "
                   "origins in the test part, beside naive, seasonal naive and ETS")
    e.add_argument("--checkpoint", default="last", choices=["last", "best"])
    e.add_argument("--json", action="store_true")
    e.add_argument("--quiet", action="store_true", help="no progress bar")

    g = sub.add_parser("generate", help="continue a prompt with a text run")
    g.add_argument("run")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=200)
    g.add_argument("--temperature", type=float, default=0.8, help="0 means greedy")
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--stop", action="append", default=None, metavar="STR",
                   help="end the text before this string (repeatable)")
    g.add_argument("--seed", type=int, default=None, help="same seed, same text")
    g.add_argument("--stream", action="store_true", help="print text as it is produced")
    g.add_argument("--system", metavar="TEXT", help="chat runs: a system message before the "
                   "prompt")
    g.add_argument("--raw", action="store_true", help="chat runs: continue the prompt as plain "
                   "text instead of answering it through the chat template")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="weights while decoding: bfloat16 reads half the bytes a token "
                   "(~1.6x faster on CPU, logits within ~0.04)")
    g.add_argument("--checkpoint", default="last", choices=["last", "best"])
    g.add_argument("--json", action="store_true")

    pr = sub.add_parser("predict", help="classify images, transcribe recordings or forecast "
                        "a series")
    pr.add_argument("run")
    pr.add_argument("inputs", nargs="+", metavar="INPUT", help="image or audio files or folders, "
                    "or the CSV of a series' history")
    pr.add_argument("--horizon", type=int, default=None, metavar="H",
                    help="series: steps to forecast (default: the run's horizon)")
    pr.add_argument("--top-k", type=int, default=3, help="images: classes to show")
    pr.add_argument("--format", choices=["text", "json", "srt"], default="text",
                    help="speech: plain transcripts, JSON with word times, or SubRip subtitles")
    pr.add_argument("--beam", type=int, default=None, metavar="WIDTH",
                    help="speech: prefix beam search of this width (default: the run's decoder)")
    pr.add_argument("--words", metavar="LIST", help="speech: spell only these words (a "
                    "comma-separated list or a file of one word per line)")
    pr.add_argument("--output", help="also write the predictions to this CSV file (series: "
                    "and the plot beside it as a PNG)")
    pr.add_argument("--checkpoint", default="last", choices=["last", "best"])
    pr.add_argument("--json", action="store_true")
    pr.add_argument("--quiet", action="store_true", help="no progress bar")

    f = sub.add_parser("finetune", help="train LoRA adapters of a run on other data of its task")
    f.add_argument("run", help="the base run (it stays as it is)")
    f.add_argument("--data", required=True, help="the data to adapt to, as `train --data` takes "
                   "it for the run's task")
    f.add_argument("--lora-rank", type=int, default=8, metavar="R")
    f.add_argument("--lora-alpha", type=float, default=None, metavar="A",
                   help="the adapter's scale is A / R (default A = R)")
    f.add_argument("--lora-targets", default=None, metavar="NAMES",
                   help="comma-separated linear layers to adapt (default: every linear layer "
                   "of the blocks; q,v is the LoRA paper's choice)")
    f.add_argument("--checkpoint", default="last", choices=["last", "best"],
                   help="which weights of the base run to adapt")
    f.add_argument("--out", help="the run directory to create (default runs/<base>-lora)")
    f.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="training and data settings, e.g. --set max_steps=500 lr=1e-3")
    f.add_argument("--stop-at", type=int, metavar="STEP")
    f.add_argument("--quiet", action="store_true")
    f.add_argument("--json", action="store_true")

    m = sub.add_parser("merge", help="fold a LoRA adapter into its base run's weights")
    m.add_argument("run", help="the base run")
    m.add_argument("adapter", help="a fine-tuning run, or its adapter.safetensors")
    m.add_argument("--out", required=True, help="the merged run directory to create")
    m.add_argument("--checkpoint", default=None, choices=["last", "best"],
                   help="the base's weights (default: those the adapter was trained on)")
    m.add_argument("--json", action="store_true")

    qz = sub.add_parser("quantize", help="a copy of a run with int8 weights, for inference")
    qz.add_argument("run")
    qz.add_argument("--int8", action="store_true", required=True,
                    help="weight-only int8, one scale per output channel")
    qz.add_argument("--out", required=True, help="the quantized run directory to create")
    qz.add_argument("--checkpoint", default="last", choices=["last", "best"])
    qz.add_argument("--json", action="store_true")

    em = sub.add_parser("embed", help="sentence embeddings from an encoder run (e.g. MiniLM)")
    em.add_argument("run")
    em.add_argument("texts", nargs="+", metavar="TEXT")
    em.add_argument("--json", action="store_true", help="one JSON object with the vectors")

    se = sub.add_parser("search", help="semantic search over documents with an encoder run")
    se.add_argument("run")
    se.add_argument("query")
    se.add_argument("--index", required=True, metavar="DOCS", help="a text file (one document "
                    "per line) or a folder of .txt files; their embeddings are kept beside "
                    "them until they change")
    se.add_argument("--top-k", type=int, default=5)
    se.add_argument("--json", action="store_true")

    im = sub.add_parser("import", help="a run from a Hugging Face model folder")
    im.add_argument("format", choices=["hf"])
    im.add_argument("src", metavar="DIR", help="config.json, model.safetensors, and "
                    "tokenizer.json or vocab.txt (text) or preprocessor_config.json (ViT)")
    im.add_argument("--out", help="the run directory to create (default runs/<DIR's name>)")
    im.add_argument("--json", action="store_true")
    ex = sub.add_parser("export", help="a Hugging Face model folder from a run")
    ex.add_argument("format", choices=["hf"])
    ex.add_argument("run")
    ex.add_argument("--out", required=True, help="the folder to write")
    ex.add_argument("--json", action="store_true")

    xp = sub.add_parser("explain", help="attention maps of a run on one input, or its budget "
                        "of parameters, FLOPs and memory (--budget)")
    xp.add_argument("run")
    xp.add_argument("input", nargs="?", help="a prompt (text), an image or audio file, or a "
                    "history CSV (series)")
    xp.add_argument("--layer", type=int, default=None, help="attention layer (default: the "
                    "last; negative counts from the end)")
    xp.add_argument("--head", type=int, default=None, help="one head (default: their mean)")
    xp.add_argument("--out", help="folder for the PNG (default RUN/plots)")
    xp.add_argument("--top-k", type=int, default=5, help="text: next tokens shown per position")
    xp.add_argument("--budget", action="store_true", help="a table of parameters, FLOPs per "
                    "token and training memory per component, at fp32 and bf16")
    xp.add_argument("--batch", type=int, default=None, help="budget: sequences per batch "
                    "(default: the run's batch size)")
    xp.add_argument("--context", type=int, default=None, help="budget: tokens per sequence "
                    "(default: the model's context)")
    xp.add_argument("--json", action="store_true")

    sc = sub.add_parser("scaling", help="train a grid of sizes and lengths, fit L(N, D) = "
                        "E + A/N^alpha + B/D^beta, predict a larger model and check it")
    sc.add_argument("--task", default="text", choices=["text"])
    sc.add_argument("--preset", default="speeches-bpe")
    sc.add_argument("--sizes", default="32,48,64,96", help="model widths (d_model), "
                    "comma-separated")
    sc.add_argument("--tokens", default="250k,500k,1M", help="training tokens per run, "
                    "comma-separated (k, M suffixes)")
    sc.add_argument("--predict", type=int, default=128, help="a larger width to predict, "
                    "then train on the largest budget (0: none)")
    sc.add_argument("--out", default="runs/scaling", help="folder of the runs, the fit and "
                    "the plot (finished runs in it are reused)")
    sc.add_argument("--data", help="another text file to train on")
    sc.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", dest="overrides",
                    help="settings for every run of the sweep")
    sc.add_argument("--json", action="store_true")

    sv = sub.add_parser("serve", help="serve runs over HTTP with OpenAI's API (and a "
                        "playground page at /)")
    sv.add_argument("runs", nargs="+", metavar="RUN", help="run directories; each is served "
                    "under its folder's name, or NAME=RUN")
    sv.add_argument("--host", default="127.0.0.1", help="the address to listen on "
                    "(0.0.0.0 for every interface)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every route "
                    "but /health and the playground page")
    sv.add_argument("--cors-origin", action="append", default=None, metavar="ORIGIN",
                    help="allow browser calls from this origin (repeatable; off by default)")
    sv.add_argument("--max-batch", type=int, default=16, help="sequences decoded together "
                    "per text model")
    sv.add_argument("--max-queue", type=int, default=64, help="generation requests waiting "
                    "beyond the batch before new ones get 429")
    sv.add_argument("--max-body-mb", type=float, default=25.0, help="the largest request body")
    sv.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="text models' weights (bfloat16: ~1.6x faster decoding on CPU)")

    sub.add_parser("data", help="which data sets are present, and where").add_argument(
        "--json", action="store_true")
    sub.add_parser("presets", help="list the named recipes").add_argument(
        "--json", action="store_true")
    return p


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=None, default=str))


def _emit(a, figures: dict, line: str) -> None:
    """The command's figures as one JSON object with --json, else its line for people."""
    if a.json:
        _print_json(figures)
    else:
        print(line)


def _cmd_train(a) -> None:
    from .run import parse_overrides, train
    overrides = parse_overrides(a.overrides)
    if a.holdout_speaker:
        if a.task != "speech":
            raise MonotileError("--holdout-speaker is for speech runs")
        overrides["holdout_speaker"] = a.holdout_speaker
    for flag, key in (("target", "target"), ("time_col", "time_col"), ("horizon", "horizon")):
        if getattr(a, flag) is not None:
            if a.task != "series":
                raise MonotileError(f"--{flag.replace('_', '-')} is for series runs")
            overrides[key] = str(getattr(a, flag))
    if a.strategy:
        overrides["strategy"] = a.strategy
    run = train(a.task, a.preset, out=a.out, data=a.data, overrides=overrides,
                quiet=a.quiet or a.json, until_step=_stop_at(a))
    from .train.distributed import is_main
    if not is_main():  # under torchrun only the main process reports
        return
    _report_training(run, a)
    if a.sample and not a.json and run.meta["task"] == "text":
        print(f"--- sample ({a.sample} tokens, temperature 0.8, seed 0) ---")
        print(run.generate("\n", max_new_tokens=a.sample, temperature=0.8, seed=0))


def _report_training(run, a) -> None:
    figures = {"run": str(run.dir), "step": run.state["step"],
               "interrupted": run.state.get("interrupted", False),
               "train_seconds": round(run.state["elapsed_s"], 1), **run.state.get("last_eval", {})}
    if a.json:
        _print_json(figures)
    elif figures["interrupted"] or figures["step"] < run.train_config.max_steps:
        print(f"stopped at step {figures['step']}; continue with: monotile resume {run.dir}")
    else:
        from .train.trainer import format_metrics
        print(f"done: {run.dir} at step {figures['step']} in {figures['train_seconds']} s; "
              f"{format_metrics(run.state.get('last_eval', {}))}")


def _stop_at(a) -> int | None:
    if a.stop_at is not None and a.stop_at <= 0:
        raise MonotileError(f"--stop-at {a.stop_at} is invalid: give a step >= 1")
    return a.stop_at


def _cmd_resume(a) -> None:
    from .run import resume
    from .train.distributed import is_main
    run = resume(a.run, quiet=a.quiet or a.json, until_step=_stop_at(a), strategy=a.strategy)
    if is_main():
        _report_training(run, a)


def _cmd_finetune(a) -> None:
    from .adapt import finetune
    from .run import parse_overrides
    targets = [t.strip() for t in a.lora_targets.split(",") if t.strip()] \
        if a.lora_targets else None
    run = finetune(a.run, a.data, rank=a.lora_rank, alpha=a.lora_alpha, targets=targets,
                   out=a.out, overrides=parse_overrides(a.overrides), checkpoint=a.checkpoint,
                   quiet=a.quiet or a.json, until_step=_stop_at(a))
    if a.json:
        _print_json({"run": str(run.dir), "step": run.state["step"],
                     "trainable_parameters": run.state["trainable_parameters"],
                     "parameters": run.parameters(), "before": run.state["base_eval"],
                     **run.state.get("last_eval", {})})
        return
    from .train.trainer import format_metrics
    print(f"before (the base model): {format_metrics(run.state['base_eval'])}")
    _report_training(run, a)
    print(f"adapter: {run.dir / 'adapter.safetensors'} "
          f"({(run.dir / 'adapter.safetensors').stat().st_size / 1e3:,.0f} kB)")


def _cmd_merge(a) -> None:
    from .adapt import merge
    run = merge(a.run, a.adapter, out=a.out, checkpoint=a.checkpoint)
    _emit(a, {"run": str(run.dir), "parameters": run.parameters()},
          f"merged: {run.dir} ({run.parameters():,} parameters)")


def _cmd_quantize(a) -> None:
    from .infer.quantize import quantize_run
    f = quantize_run(a.run, a.out, checkpoint=a.checkpoint)
    _emit(a, f, f"quantized: {f['run']}, {f['layers']} layers int8, weights "
                f"{f['bytes_before'] / 1e6:,.2f} MB -> {f['bytes_after'] / 1e6:,.2f} MB")


def _cmd_embed(a) -> None:
    from .run import load
    run = load(a.run).optimize_for_inference()
    vectors = run.embed(a.texts)
    if a.json:
        _print_json({"model": str(run.dir), "dimensions": vectors.size(1),
                     "embeddings": [[round(x, 7) for x in v] for v in vectors.tolist()]})
        return
    for text, v in zip(a.texts, vectors.tolist()):
        print(f"{text[:40]!r}: [{', '.join(f'{x:.4f}' for x in v[:6])}, ...] "
              f"({len(v)} dimensions)")
    if len(a.texts) > 1:
        sims = vectors @ vectors.T
        print("cosine similarities:")
        for i, text in enumerate(a.texts):
            print(f"  {text[:30]:<30} " + " ".join(f"{x:6.3f}" for x in sims[i].tolist()))


def _cmd_search(a) -> None:
    from .infer.search import search
    from .run import load
    found = search(load(a.run).optimize_for_inference(), a.index, a.query, a.top_k)
    if a.json:
        _print_json(found)
        return
    how = "index reused" if found["index_reused"] else "indexed"
    print(f"{found['documents']} documents ({how})")
    for r in found["results"]:
        print(f"{r['score']:.4f}  {r['where']}  {r['text'][:100]}")


def _cmd_explain(a) -> None:
    from .run import load
    run = load(a.run)
    if a.budget:
        from .explain.budget import budget, format_budget
        if a.input is not None:
            raise MonotileError("--budget takes no input; drop the input, or drop --budget to "
                                "draw attention maps")
        b = budget(run, batch=a.batch, context=a.context)
        return _emit(a, b, format_budget(b))
    if a.input is None:
        raise MonotileError("give an input to explain (a prompt, an image or audio file, or a "
                            "history CSV), or --budget for the cost table")
    if a.batch is not None or a.context is not None:
        raise MonotileError("--batch and --context are for --budget")
    from .explain.maps import explain
    result = explain(run, unescape(a.input) if run.meta["task"] == "text" else a.input,
                     layer=a.layer, head=a.head, out=a.out, top_k=a.top_k)
    if a.json:
        _print_json(result)
        return
    print(f"layer {result['layer']}, {result['head']}: {result['plot']}")
    for row in result.get("next_tokens", []):
        tops = "  ".join(f"{t['token']!s:>6} {t['probability']:.2f}" for t in row["top"])
        print(f"  after {row['token']!s:>8}: {tops}")
    if "label" in result:
        print(f"  predicted {result['label']} ({result['probability']:.1%})")


def _cmd_scaling(a) -> None:
    from .run import parse_overrides
    from .scaling import parse_tokens, sweep
    try:
        sizes = [int(x) for x in a.sizes.split(",") if x.strip()]
    except ValueError:
        raise MonotileError(f"--sizes {a.sizes!r} is not a list of widths; write e.g. "
                            "64,96,128") from None
    tokens = [parse_tokens(x) for x in a.tokens.split(",") if x.strip()]
    say = (lambda line: None) if a.json else (lambda line: print(line, file=sys.stderr))
    r = sweep(a.preset, sizes=sizes, tokens=tokens, predict=a.predict or None, out=a.out,
              data=a.data, overrides=parse_overrides(a.overrides), progress=say)
    if a.json:
        _print_json(r)
        return
    print(f"{'d_model':>8} {'N (trunk)':>11} {'D (tokens)':>12} {'val loss':>9}")
    for row in r["runs"]:
        print(f"{row['d_model']:>8} {row['N']:>11,} {row['D']:>12,} {row['val_loss']:>9.4f}")
    f = r["fit"]
    print(f"fit: L(N, D) = {f['E']:.3f} + {f['A']:.4g} / N^{f['alpha']:.3f} + "
          f"{f['B']:.4g} / D^{f['beta']:.3f}")
    if "prediction" in r:
        p = r["prediction"]
        print(f"d_model {p['d_model']} (N = {p['N']:,}) on {p['D']:,} tokens: predicted "
              f"{p['predicted']:.4f}, measured {p['measured']:.4f} ({p['error']:+.1%})")
    print(f"plot: {r['plot']}")


def _cmd_serve(a) -> None:
    from pathlib import Path

    from .serve.app import serve
    names, paths = [], []
    for item in a.runs:
        name, sep, path = item.partition("=")
        if not sep or Path(item).exists():
            name, path = Path(item).resolve().name, item
        if not (Path(path) / "config.json").is_file():
            raise MonotileError(f"{path} is not a monotile run (no config.json); give run "
                                "directories made by `monotile train` or `monotile import`")
        names.append(name)
        paths.append(path)
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise MonotileError(f"two runs would be served as {twice[0]!r}; name them: "
                            f"monotile serve NAME1=RUN1 NAME2=RUN2")
    for flag, value in (("--port", a.port), ("--max-batch", a.max_batch),
                        ("--max-queue", a.max_queue), ("--max-body-mb", a.max_body_mb)):
        if value <= 0 or (flag == "--port" and value > 65535):
            raise MonotileError(f"{flag} {value} is invalid: give a positive number"
                                + (" up to 65535" if flag == "--port" else ""))
    serve(paths, names=names, host=a.host, port=a.port, api_key=a.api_key,
          cors_origins=a.cors_origin, max_batch=a.max_batch, max_queue=a.max_queue,
          max_body_mb=a.max_body_mb, dtype=a.dtype)


def _cmd_import(a) -> None:
    from .interop.hf import import_hf
    from .run import load
    run = load(import_hf(a.src, a.out))
    doc = json.loads((run.dir / "config.json").read_text(encoding="utf-8"))
    kind = doc["imported"]["model_type"]
    _emit(a, {"run": str(run.dir), "parameters": run.parameters(), "model_type": kind},
          f"imported {a.src} ({kind}, {run.parameters():,} parameters) as {run.dir}")


def _cmd_export(a) -> None:
    from .interop.hf import export_hf
    out = export_hf(a.run, a.out)
    _emit(a, {"out": str(out)},
          f"exported {a.run} to {out} (load it with transformers' from_pretrained)")


def _cmd_eval(a) -> None:
    from .run import load
    run = load(a.run, checkpoint=a.checkpoint)
    options = {}
    if a.backtest is not None:
        if run.meta["task"] != "series":
            raise MonotileError(f"--backtest is for series runs; {run.dir} is a "
                                f"{run.meta['task']} run")
        options["backtest"] = a.backtest
    figures = run.report(data=a.data, progress=not (a.quiet or a.json), **options)
    if a.json:
        _print_json({"run": str(run.dir), "checkpoint": a.checkpoint, **figures})
        return
    if "methods" in figures:  # a backtest: one row per method
        print(f"rolling-origin backtest: {figures['origins']} origins x "
              f"{figures['windows'] // figures['origins']} series, horizon {figures['horizon']}, "
              f"season {figures['season']}")
        print(f"{'method':>15}  {'MSE':>8}  {'MAE':>8}  {'MASE':>8}  {'sMAPE':>8}  coverage")
        for name, m in figures["methods"].items():
            cover = f"{m['coverage']:8.1%}" if "coverage" in m else f"{'-':>8}"
            print(f"{name:>15}  {m['mse']:8.4f}  {m['mae']:8.4f}  {m['mase']:8.4f}  "
                  f"{m['smape']:8.3f}  {cover}")
        return
    per_class = figures.pop("per_class", None)
    for k, v in figures.items():
        print(f"{k:>14}  {v:.4f}" if isinstance(v, float) else f"{k:>14}  {v}")
    if per_class:
        print(f"\n{'class':>14}  precision  recall      f1  support")
        for name, m in per_class.items():
            print(f"{name:>14}  {m['precision']:9.4f}  {m['recall']:6.4f}  {m['f1']:6.4f}  "
                  f"{m['support']:7d}")


def unescape(text: str) -> str:
    """\\n, \\t and \\\\ typed on a command line become a newline, a tab and a backslash
    (llama.cpp's --escape), so `--stop "\\n\\n"` means a blank line."""
    return re.sub(r"\\([nt\\])", lambda m: {"n": "\n", "t": "\t", "\\": "\\"}[m.group(1)],
                  text)


def _cmd_generate(a) -> None:
    from .run import load
    run = load(a.run, checkpoint=a.checkpoint).optimize_for_inference(a.dtype)
    a.prompt = unescape(a.prompt)
    stop = [unescape(s) for s in a.stop] if a.stop else None
    options = dict(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k,
                   top_p=a.top_p, repetition_penalty=a.repetition_penalty, stop=stop,
                   seed=a.seed)
    if run.has_chat_template and not a.raw:  # the prompt is the user's message
        messages = ([{"role": "system", "content": unescape(a.system)}] if a.system else [])
        messages.append({"role": "user", "content": a.prompt})
        stream = run.stream_chat(messages, **options)
    else:
        if a.system:
            raise MonotileError(f"--system is for runs trained on chat data; {run.dir} has no "
                                "chat template")
        stream = run.stream(a.prompt, **options)
    if a.json:
        _print_json({"prompt": a.prompt, "text": "".join(stream)})
    elif a.stream:
        for piece in stream:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    else:
        print("".join(stream))


def _cmd_predict(a) -> None:
    from .run import load
    run = load(a.run, checkpoint=a.checkpoint)
    if run.meta["task"] in ("speech", "transcribe"):  # transcribe: an imported Whisper
        return _predict_speech(run, a)
    if run.meta["task"] == "series":
        return _predict_series(run, a)
    if run.meta["task"] != "vision":
        raise MonotileError(f"`predict` does not apply to {run.dir}, a {run.meta['task']} "
                            "run: use `monotile generate` for text")
    result = run.predict(a.inputs, top_k=a.top_k, progress=not (a.quiet or a.json))
    for skip in result["skipped"]:
        print(f"skipped: {skip['error']}", file=sys.stderr)
    if a.output:
        _write_predictions_csv(a.output, result["predictions"])
    if a.json:
        _print_json(result)
        return
    for rec in result["predictions"]:
        tops = "  ".join(f"{label} {p:.3f}" for label, p in zip(rec["labels"], rec["probs"]))
        print(f"{rec['path']}  {tops}")
    if result["accuracy"] is not None:
        print(f"accuracy {result['accuracy']:.2%} on the {result['labelled']} images in folders "
              "named after a class")
    if a.output:
        print(f"wrote {a.output}")


def _predict_speech(run, a) -> None:
    from pathlib import Path

    from .modalities.speech import to_srt
    words = None
    if a.words:
        source = Path(a.words).expanduser()
        words = (source.read_text(encoding="utf-8").split() if source.is_file() else
                 [w for w in a.words.split(",") if w.strip()])
        if not words:
            raise MonotileError(f"--words {a.words!r} names no words; give a comma-separated "
                                "list or a file of one word per line")
    if a.beam is not None and a.beam <= 0:
        raise MonotileError(f"--beam {a.beam} is invalid: give a positive beam width")
    method = "beam" if a.beam or words else None
    result = run.predict(a.inputs, method=method, beam_width=a.beam, words=words,
                         progress=not (a.quiet or a.json or a.format != "text"))
    for skip in result["skipped"]:
        print(f"skipped: {skip['error']}", file=sys.stderr)
    if a.output:
        _write_rows_csv(a.output, ["path", "text", "duration"],
                        [[r["path"], r["text"], f"{r['duration']:.3f}"]
                         for r in result["predictions"]])
    preds = result["predictions"]
    if a.json or a.format == "json":
        _print_json(result)
    elif a.format == "srt":
        single = len(a.inputs) == 1 and Path(a.inputs[0]).expanduser().is_file()
        for i, r in enumerate(preds):
            if not single:
                print(f"{'' if i == 0 else chr(10)}==> {r['path']} <==")
            sys.stdout.write(to_srt(r["segments"] if "segments" in r else r["words"]))
    else:
        single = len(a.inputs) == 1 and Path(a.inputs[0]).expanduser().is_file()
        for r in preds:
            print(r["text"] if single else f"{r['path']}\t{r['text']}")
    if a.output and not (a.json or a.format != "text"):
        print(f"wrote {a.output}", file=sys.stderr)


def _predict_series(run, a) -> None:
    from pathlib import Path
    plot = (Path(a.output).with_suffix(".png") if a.output else run.dir / "plots" / "forecast.png")
    if a.output:  # check the destination before the work
        _check_output(a.output)
    result = run.predict(a.inputs, horizon=a.horizon, plot=plot)
    rows = result["forecast"]
    keys = ["timestamp", "series", "forecast", *[k for k in rows[0] if k.startswith("q")]]
    if a.output:
        _write_rows_csv(a.output, keys, [[r[k] if isinstance(r[k], str) else f"{r[k]:.6g}"
                                          for k in keys] for r in rows])
    if a.json:
        _print_json(result)
        return
    print("  ".join(f"{k:>19}" if k == "timestamp" else f"{k:>10}" for k in keys))
    for r in rows:
        print("  ".join(f"{r[k]:>19}" if k == "timestamp" else
                        f"{r[k]:>10}" if k == "series" else f"{r[k]:10.4g}" for k in keys))
    print(f"plot: {result['plot']}" + (f"; wrote {a.output}" if a.output else ""),
          file=sys.stderr)


def _check_output(path: str):
    """The --output file's Path; an error for a folder or a missing parent folder."""
    from pathlib import Path
    target = Path(path)
    if target.is_dir():
        raise MonotileError(f"--output {path} is a folder; give a file name, e.g. preds.csv")
    if not target.parent.exists():
        raise MonotileError(f"--output {path}: folder {target.parent} does not exist")
    return target


def _write_rows_csv(path: str, header: list[str], rows: list[list]) -> None:
    import csv
    import io

    from .train.checkpoint import atomic_write_text
    target = _check_output(path)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    atomic_write_text(target, buf.getvalue())


def _write_predictions_csv(path: str, predictions: list[dict]) -> None:
    k = max((len(r["labels"]) for r in predictions), default=0)
    header = ["path", *[f"{c}_{i}" for i in range(1, k + 1) for c in ("label", "prob")], "true"]
    rows = [[r["path"], *[v for pair in zip(r["labels"], (f"{p:.6f}" for p in r["probs"]))
                          for v in pair], r.get("true", "")] for r in predictions]
    _write_rows_csv(path, header, rows)


def _cmd_data(a) -> None:
    from .data import status
    rows = status()
    if a.json:
        _print_json(rows)
        return
    for r in rows:
        print(f"{r['name']:<40} {r['path'] or 'missing; source: ' + r['source']}")


def _cmd_presets(a) -> None:
    from .presets import PRESETS
    if a.json:
        _print_json(PRESETS)
        return
    for name, p in PRESETS.items():
        m, task = p["model"], p.get(p["task"], {})
        shape = (f"context {m['context']}" if "context" in m else
                 f"{task.get('image_size')}px images, patches {task.get('patch_size')}"
                 if p["task"] == "vision" else
                 f"look back {task.get('lookback')}, horizon {task.get('horizon')}"
                 if p["task"] == "series" else
                 f"{task.get('sample_rate')} Hz audio, {task.get('n_mels')} mels")
        print(f"{name:<20} {p['task']:<7} {m['n_layer']} layers, width {m['d_model']}, "
              f"{shape}, {p['train']['max_steps']} steps")


COMMANDS = {"train": _cmd_train, "resume": _cmd_resume, "eval": _cmd_eval,
            "finetune": _cmd_finetune, "merge": _cmd_merge, "quantize": _cmd_quantize,
            "serve": _cmd_serve, "explain": _cmd_explain,
            "scaling": _cmd_scaling,
            "import": _cmd_import, "export": _cmd_export, "embed": _cmd_embed,
            "search": _cmd_search,
            "generate": _cmd_generate, "predict": _cmd_predict, "data": _cmd_data,
            "presets": _cmd_presets}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if argv is None and args.command == "serve" and "OMP_WAIT_POLICY" not in os.environ:
        # A server's threads (the event loop, one engine per model, uploads) share the cores
        # with whatever else runs there, and OpenMP workers that spin while they wait starve
        # them: decoding ran 20-30x slower under load (bench/serve.py). Passive workers sleep.
        # libgomp reads the setting when torch loads it, so the server starts again with it.
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        os.execv(sys.executable, [sys.executable, "-m", "monotile", *sys.argv[1:]])
    warnings.formatwarning = lambda msg, cat, *rest: f"warning: {msg}\n"
    try:
        COMMANDS[args.command](args)
    except MonotileError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    finally:
        if "torch" in sys.modules:  # leave torchrun's process group cleanly
            from .train.distributed import shutdown
            shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
