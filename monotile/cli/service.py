"""The verbs around runs: import, export, serve, data and presets."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import MonotileError
from .common import emit, finish, print_json


# ---- import, export -----------------------------------------------------------------------------

def import_(sub) -> None:
    p = sub.add_parser("import", help="a run from a Hugging Face model folder")
    p.add_argument("format", choices=["hf"])
    p.add_argument("src", metavar="DIR", help="config.json, model.safetensors, and "
                   "tokenizer.json or vocab.txt (text) or preprocessor_config.json (ViT)")
    p.add_argument("--out", help="the run directory to create (default runs/<DIR's name>)")
    finish(p, _import, json=True)


def _import(a) -> None:
    from ..interop.hf import import_hf
    from ..run import load
    run = load(import_hf(a.src, a.out))
    doc = json.loads((run.dir / "config.json").read_text(encoding="utf-8"))
    kind = doc["imported"]["model_type"]
    emit(a, {"run": str(run.dir), "parameters": run.parameters(), "model_type": kind},
         f"imported {a.src} ({kind}, {run.parameters():,} parameters) as {run.dir}")


def export(sub) -> None:
    p = sub.add_parser("export", help="a Hugging Face model folder from a run")
    p.add_argument("format", choices=["hf"])
    p.add_argument("run")
    p.add_argument("--out", required=True, help="the folder to write")
    finish(p, _export, json=True)


def _export(a) -> None:
    from ..interop.hf import export_hf
    out = export_hf(a.run, a.out)
    emit(a, {"out": str(out)},
         f"exported {a.run} to {out} (load it with transformers' from_pretrained)")


# ---- serve --------------------------------------------------------------------------------------

def serve(sub) -> None:
    p = sub.add_parser("serve", help="serve runs over HTTP with OpenAI's API (and a "
                       "playground page at /)")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories; each is served "
                   "under its folder's name, or NAME=RUN")
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
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="text models' weights (bfloat16: ~1.6x faster decoding on CPU)")
    finish(p, _serve)


def _serve(a) -> None:
    from ..serve.app import serve as serve_runs
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
    serve_runs(paths, names=names, host=a.host, port=a.port, api_key=a.api_key,
               cors_origins=a.cors_origin, max_batch=a.max_batch, max_queue=a.max_queue,
               max_body_mb=a.max_body_mb, dtype=a.dtype)


# ---- data, presets ------------------------------------------------------------------------------

def data(sub) -> None:
    p = sub.add_parser("data", help="which data sets are present, and where")
    finish(p, _data, json=True)


def _data(a) -> None:
    from ..data import status
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
