"""The verbs around runs: import, export, consolidate, serve, data and presets."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import MonotileError
from ..infer import INFERENCE_DTYPES
from .common import emit, finish, print_json


# ---- import, export -----------------------------------------------------------------------------

def import_(sub) -> None:
    p = sub.add_parser("import", help="a run from a Hugging Face folder or hub name, a GGUF "
                       "file or a CTranslate2 folder")
    p.add_argument("source", nargs="+", metavar="[FORMAT] SRC",
                   help="hf, gguf or ct2 (optional: recognised from SRC), then a Hugging Face "
                   "folder (config.json, model.safetensors, tokenizer.json or vocab.txt, or "
                   "preprocessor_config.json for ViT), a hub name ORG/NAME, a GGUF file, or a "
                   "CTranslate2 Whisper folder (model.bin, config.json, tokenizer.json: "
                   "faster-whisper's)")
    p.add_argument("--revision", help="hub names: a branch, tag or commit (default: main)")
    p.add_argument("--out", help="the run directory to create (default runs/<SRC's name>)")
    finish(p, _import, json=True)


FORMATS = ("hf", "gguf", "ct2")


def _import(a) -> None:
    from ..interop.sources import hub_folder, import_any, is_hub_name, split_revision
    from ..run import load
    if len(a.source) > 2 or (len(a.source) == 2 and a.source[0] not in FORMATS):
        raise MonotileError(f"import takes [FORMAT] SRC, FORMAT one of {', '.join(FORMATS)}; "
                            f"got {' '.join(a.source)}")
    fmt, src = (None, a.source[0]) if len(a.source) == 1 else a.source
    if is_hub_name(src):
        if fmt in ("gguf", "ct2"):
            raise MonotileError(f"{src} is a hub name; import {fmt} takes a local "
                                f"{'.gguf file' if fmt == 'gguf' else 'folder'} (download "
                                "it first), import hf takes hub names")
        name, at = split_revision(src)
        folder = hub_folder(name, a.revision or at)
        out = a.out if a.out is not None else str(Path("runs") / name.split("/")[-1])
        path = import_any(folder, out)
    elif fmt == "gguf":
        from ..interop.gguf import import_gguf
        path = import_gguf(Path(src), a.out)
    elif fmt == "ct2":
        from ..interop.ct2 import import_ct2
        path = import_ct2(Path(src), a.out)
    elif fmt == "hf":
        from ..interop.hf import import_hf
        path = import_hf(src, a.out)
    else:
        path = import_any(Path(src), a.out)
    run = load(path)
    doc = json.loads((run.dir / "config.json").read_text(encoding="utf-8"))
    kind = doc["imported"]["model_type"]
    emit(a, {"run": str(run.dir), "parameters": run.parameters(), "model_type": kind},
         f"imported {src} ({kind}, {run.parameters():,} parameters) as {run.dir}")


def export(sub) -> None:
    p = sub.add_parser("export", help="a Hugging Face model folder, or a GGUF file, from a "
                       "run; a fine-tuning run's adapter as a PEFT folder")
    p.add_argument("format", choices=(*FORMATS, "peft"))
    p.add_argument("run")
    p.add_argument("--out", required=True, help="the folder (hf, peft) or file (gguf) to write")
    p.add_argument("--type", default="f32", choices=["f32", "f16", "bf16", "q8_0", "q4_0"],
                   help="gguf: the tensors' type (norms stay f32, as llama.cpp keeps them)")
    p.add_argument("--base", help="peft: the base's Hugging Face folder (`monotile export hf "
                   "BASE` made it) or hub name, written as base_model_name_or_path")
    finish(p, _export, json=True)


def _export(a) -> None:
    if a.base is not None and a.format != "peft":
        raise MonotileError("--base is for export peft; the other formats hold the whole model")
    if a.format == "peft":
        if a.type != "f32":
            raise MonotileError("--type is for export gguf; a PEFT folder is written in float32")
        from ..interop.peft import export_peft
        out = export_peft(a.run, a.out, a.base)
        how = "load it with peft's PeftModel.from_pretrained on the base's Hugging Face export"
    elif a.format == "gguf":
        from ..interop.gguf import export_gguf
        out = export_gguf(a.run, Path(a.out), a.type)
        how = "llama.cpp and ollama load it"
    else:
        if a.type != "f32":
            raise MonotileError("--type is for export gguf; a Hugging Face folder is written "
                                "in float32")
        from ..interop.hf import export_hf
        out = export_hf(a.run, a.out)
        how = "load it with transformers' from_pretrained"
    emit(a, {"out": str(out)}, f"exported {a.run} to {out} ({how})")


# ---- consolidate ---------------------------------------------------------------------------------

def consolidate(sub) -> None:
    p = sub.add_parser("consolidate", help="an FSDP run's sharded checkpoint as the usual "
                       "model.safetensors, optimizer.safetensors and best.safetensors")
    p.add_argument("run")
    p.add_argument("--out", metavar="FILE", help="write the weights alone to FILE (a "
                   ".safetensors file) and leave the run as it is (default: convert the run's "
                   "checkpoint in place)")
    finish(p, _consolidate, checkpoint="with --out: the last checkpoint's weights (default) "
           "or the best evaluation's", json=True)


def _consolidate(a) -> None:
    from ..run import consolidate as consolidate_run
    from ..train.checkpoint import sharded_folder
    sharded = [w for w in ("last", "best") if sharded_folder(Path(a.run), w) is not None]
    out = consolidate_run(a.run, out=a.out, checkpoint=a.checkpoint)
    if a.out is not None:
        line = f"wrote the {a.checkpoint} weights of {a.run} to {out}"
    elif sharded:
        line = f"{a.run}: its sharded checkpoint is safetensors files now"
    else:
        line = f"{a.run}: nothing to do, its checkpoint is safetensors files already"
    emit(a, {"run": str(a.run), "out": str(out), "sharded": sharded}, line)


# ---- serve --------------------------------------------------------------------------------------

def serve(sub) -> None:
    p = sub.add_parser("serve", help="serve runs over HTTP with OpenAI's API (and a "
                       "playground page at /)")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories, model folders, "
                   "GGUF files or hub names ORG/NAME; each is served under its own name (the "
                   "folder's, the file's, the repository's), or NAME=RUN")
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on "
                   "(0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every route "
                   "but /health and the playground page")
    p.add_argument("--cors-origin", action="append", default=None, metavar="ORIGIN",
                   help="allow browser calls from this origin (repeatable; off by default)")
    p.add_argument("--max-batch", type=int, default=16, help="sequences decoded together "
                   "per text model")
    p.add_argument("--max-queue", type=int, default=64, help="generation requests waiting "
                   "beyond the batch before new ones get 429")
    p.add_argument("--max-body-mb", type=float, default=25.0, help="the largest request body")
    p.add_argument("--request-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="seconds a client has to send a request's headers, and again its "
                   "body; a connection that takes longer is answered 408 and closed "
                   "(an idle keep-alive connection closes after 5 s)")
    p.add_argument("--dtype", default="float32", choices=INFERENCE_DTYPES,
                   help="text models' weights: bfloat16, int8 or int4 read less a token")
    finish(p, _serve, machine=True)


def _serve(a) -> None:
    from ..interop.sources import is_hub_name, run_dir_for
    from ..serve.app import serve as serve_runs
    names, specs = [], []
    for item in a.runs:
        name, sep, spec = item.partition("=")
        if not sep or Path(item).exists():
            name, spec = _name_of(item), item
        path = Path(spec).expanduser()
        if not (is_hub_name(spec) or (path / "config.json").is_file() or path.is_file()):
            raise MonotileError(f"{spec} is not a monotile run (no config.json), a model "
                                "folder, a GGUF file or a hub name; give run directories made "
                                "by `monotile train` or `monotile import`")
        names.append(name)
        specs.append(spec)
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise MonotileError(f"two runs would be served as {twice[0]!r}; name them: "
                            f"monotile serve NAME1=RUN1 NAME2=RUN2")
    for flag, value in (("--port", a.port), ("--max-batch", a.max_batch),
                        ("--max-queue", a.max_queue), ("--max-body-mb", a.max_body_mb),
                        ("--request-timeout", a.request_timeout)):
        if value <= 0 or (flag == "--port" and value > 65535):
            raise MonotileError(f"{flag} {value} is invalid: give a positive number"
                                + (" up to 65535" if flag == "--port" else ""))
    paths = [str(run_dir_for(spec)) for spec in specs]  # imported once, after every check
    serve_runs(paths, names=names, host=a.host, port=a.port, api_key=a.api_key,
               cors_origins=a.cors_origin, max_batch=a.max_batch, max_queue=a.max_queue,
               max_body_mb=a.max_body_mb, dtype=a.dtype, device=a.device,
               request_timeout=a.request_timeout)


# ---- data, presets ------------------------------------------------------------------------------

def _name_of(spec: str) -> str:
    """The name a model is served under: its folder's, its file's, its repository's."""
    from ..interop.sources import is_hub_name, split_revision
    if is_hub_name(spec):
        return split_revision(spec)[0].split("/")[-1]
    path = Path(spec).expanduser().resolve()
    return path.stem if path.is_file() else path.name


def data(sub) -> None:
    p = sub.add_parser("data", help="which data sets are present, and where; --fetch gets them")
    p.add_argument("--fetch", metavar="NAME|all", help="download a data set (tinyshakespeare, "
                   "mnist, fsdd, ett, m4, ...) or all of them into ~/.cache/monotile, checked "
                   "against its SHA-256; one already found is left as it is")
    finish(p, _data, json=True)


def _data(a) -> None:
    from ..data import fetch, status
    if a.fetch is not None:
        rows = fetch(a.fetch)
        got = [(name, path) for name, path in rows if isinstance(path, Path)]
        if a.json:
            print_json([{"name": name, "path": str(path)} for name, path in got])
        else:
            for name, path in got:
                print(f"{name:<40} {path}")
        failed = [str(e) for _, e in rows if not isinstance(e, Path)]
        if failed:
            raise MonotileError(failed[0] if len(failed) == 1 else f"{len(failed)} of "
                                f"{len(rows)} data sets could not be fetched; the first: "
                                f"{failed[0]}")
        return
    rows = status()
    if a.json:
        print_json(rows)
        return
    for r in rows:
        print(f"{r['name']:<40} {r['path'] or 'missing; source: ' + r['source']}")


def presets(sub) -> None:
    p = sub.add_parser("presets", help="list the named recipes")
    finish(p, _presets, json=True)


def _presets(a) -> None:
    from ..presets import PRESETS
    if a.json:
        print_json(PRESETS)
        return
    for name, p in PRESETS.items():
        m, task = p["model"], p.get(p["task"], {})
        shape = f"context {m['context']}, " if "context" in m else ""
        print(f"{name:<20} {p['task']:<7} {m['n_layer']} layers, width {m['d_model']}, "
              f"{shape}data {task.get('data', '-')}, {p['train']['max_steps']} steps")
