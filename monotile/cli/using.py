"""The verbs that use a run: eval, generate, predict, embed, search and explain."""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import MonotileError
from ..infer import COMPILE_HELP, INFERENCE_DTYPES
from .common import apart, check_output, emit, finish, print_json, unescape, write_rows_csv

# predict's options: (flag, the option of Task.predict it sets); a task refuses by name an
# option its predict does not take
PREDICT_OPTIONS = (("top_k", "top_k"), ("beam", "beam_width"), ("words", "words"),
                   ("horizon", "horizon"), ("language", "language"), ("task", "task"),
                   ("word_timestamps", "word_timestamps"))


# ---- eval ---------------------------------------------------------------------------------------

def eval_(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a run on its validation data")
    p.add_argument("run")
    p.add_argument("--data", help="evaluate on this data instead: images (a folder of class "
                   "folders, an .npz or a CSV of path,label) or recordings (a manifest of "
                   "path,transcript or a LibriSpeech-style folder)")
    p.add_argument("--backtest", type=int, metavar="K", help="series: forecast from K rolling "
                   "origins in the test part, beside naive, seasonal naive and ETS")
    finish(p, _eval, checkpoint=True, json=True, quiet=True, machine=True)


def _eval(a) -> None:
    from ..run import load
    run = load(a.run, checkpoint=a.checkpoint, device=a.device)
    options = {} if a.backtest is None else {"backtest": a.backtest}
    figures = run.report(data=a.data, progress=not (a.quiet or a.json), **options)
    training = _training_now(run.dir)
    if a.json:
        print_json({"run": str(run.dir), "checkpoint": a.checkpoint, **figures,
                    **({"training": training} if training else {})})
    else:
        if training:
            print(f"note: {run.dir} is training now (pid {training['pid']}); these figures are "
                  f"of its checkpoint at step {training['step']}", file=sys.stderr)
        print(run.task.format_report(figures))


def _training_now(run_dir) -> dict | None:
    """{"pid", "step"} of the process training the run now (its last committed step), or
    None when nothing trains it."""
    import json

    from ..rundir import writer_pid
    pid = writer_pid(run_dir)
    if pid is None:
        return None
    try:
        step = json.loads((run_dir / "trainer_state.json").read_text())["step"]
    except (OSError, ValueError, KeyError, TypeError):
        step = None
    return {"pid": pid, "step": step}


# ---- generate -----------------------------------------------------------------------------------

def generate(sub) -> None:
    p = sub.add_parser("generate", help="continue a prompt with a text run")
    p.add_argument("run", help="a run directory, a Hugging Face folder, a GGUF file or a hub "
                   "name ORG/NAME (imported once, then cached)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 means greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--stop", action="append", default=None, metavar="STR",
                   help="end the text before this string (repeatable)")
    p.add_argument("--seed", type=int, default=None, help="same seed, same text")
    p.add_argument("--stream", action="store_true", help="print text as it is produced")
    p.add_argument("--system", metavar="TEXT", help="chat runs: a system message before the "
                   "prompt")
    p.add_argument("--raw", action="store_true", help="chat runs: continue the prompt as plain "
                   "text instead of answering it through the chat template")
    p.add_argument("--dtype", default="float32", choices=INFERENCE_DTYPES,
                   help="weights while decoding: bfloat16 reads half the bytes a token, int8 a "
                   "quarter, int4 an eighth (llama.cpp's Q4_1 blocks)")
    p.add_argument("--ignore-eos", action="store_true", help="go on past the model's end "
                   "tokens, so exactly --max-new-tokens are decoded (benchmarks; llama.cpp's "
                   "flag)")
    p.add_argument("--compile", action="store_true", help=COMPILE_HELP)
    finish(p, _generate, checkpoint=True, json=True, machine=True)


def _generate(a) -> None:
    from ..interop.sources import run_dir_for
    from ..run import load
    from ..tokenizers import Tokenizer
    a.prompt = unescape(a.prompt)
    stop = [unescape(s) for s in a.stop] if a.stop else []
    if a.max_new_tokens < 0:
        raise MonotileError(f"--max-new-tokens {a.max_new_tokens} is invalid: give a count >= 0")
    prompt: list[int] = []

    def encode(run) -> None:
        """The prompt's ids, before the model is built or any weight read, in a child process
        (`apart`) that hands back the tokenizer let go (Tokenizer.let_go: decoding reads a
        table of its tokens' bytes): this process never holds the tokenizer, and its peak,
        with the weights, none of the tokenizer's memory."""
        task = run.generator  # a run that makes no text is refused here
        chat = run.has_chat_template and not a.raw  # the prompt is the user's message
        if a.system and not chat:
            raise MonotileError(f"--system is for runs trained on chat data; {run.dir} has no "
                                "chat template")

        def ids() -> tuple[list[int], dict | None]:
            if chat:
                messages = ([{"role": "system", "content": unescape(a.system)}] if a.system
                            else [])
                messages.append({"role": "user", "content": a.prompt})
                encoded = task.encode_prompt(task.chat_prompt(messages))
            else:
                encoded = task.encode_prompt(a.prompt)
            if not task.tokenizer.let_go():  # decoding needs it whole: read here too
                return encoded, None
            return encoded, task.tokenizer.decoding_state()
        encoded, state = apart(ids)
        if state is not None:
            task.tokenizer = Tokenizer.from_decoding_state(state)
        prompt.extend(encoded)
        if chat:
            stop[:] = run.chat_stops(stop, a.ignore_eos)

    # each layer read, then laid out (or rounded) for this machine: the float weights are
    # never whole in memory (infer/convert.py)
    run = load(run_dir_for(a.run), checkpoint=a.checkpoint, device=a.device, dtype=a.dtype,
               compile=a.compile, before_weights=encode)
    if a.compile:
        print(f"compiled the decoding step in {run.compile_seconds:.1f} s", file=sys.stderr)
    context = run.configs["model"].context
    if a.max_new_tokens > context and not a.stream:  # nothing shows until the end: bound it
        import warnings
        warnings.warn(f"--max-new-tokens {a.max_new_tokens:,} is more than the model's context "
                      f"({context} tokens); generating {context} (--stream writes longer text "
                      "as it comes)", stacklevel=1)
        a.max_new_tokens = context
    options = dict(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k,
                   top_p=a.top_p, repetition_penalty=a.repetition_penalty, stop=stop or None,
                   seed=a.seed, ignore_eos=a.ignore_eos, timings={})
    stream = run.stream(prompt, **options)
    if a.json:  # with the figures llama.cpp prints: prompt and decode tokens/s
        text = "".join(stream)
        print_json({"prompt": a.prompt, "text": text, **options["timings"]})
    elif a.stream:
        for piece in stream:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    else:
        print("".join(stream))


# ---- predict ------------------------------------------------------------------------------------

def predict(sub) -> None:
    p = sub.add_parser("predict", help="classify images, transcribe recordings, forecast a "
                       "series, or answer whatever the run's task answers")
    p.add_argument("run")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image or audio files or folders, "
                   "the CSV of a series' history, or prompts for a text run")
    p.add_argument("--format", default="text", metavar="FORMAT", help="text (default) or json; "
                   "speech also txt, vtt, srt, tsv (as openai-whisper writes them) and, with "
                   "--output-dir, all")
    p.add_argument("--top-k", type=int, default=None, help="images: classes to show (3)")
    p.add_argument("--beam", type=int, default=None, metavar="WIDTH",
                   help="speech: prefix beam search of this width (default: the run's decoder)")
    p.add_argument("--words", metavar="LIST", help="speech: spell only these words (a "
                   "comma-separated list or a file of one word per line)")
    p.add_argument("--language", default=None, metavar="CODE", help="Whisper: the spoken "
                   "language (en, fr, ...; multilingual checkpoints)")
    p.add_argument("--task", default=None, choices=["transcribe", "translate"],
                   help="Whisper: transcribe (default), or translate into English "
                   "(multilingual checkpoints)")
    p.add_argument("--word-timestamps", action="store_true", default=None,
                   help="Whisper: each word's start and end (subtitles are timed by them)")
    p.add_argument("--horizon", type=int, default=None, metavar="H",
                   help="series: steps to forecast (default: the run's horizon)")
    p.add_argument("--output", help="also write the predictions to this CSV file (series: "
                   "and the plot beside it as a PNG)")
    p.add_argument("--output-dir", metavar="DIR", help="speech: write each recording's "
                   "transcript in --format (txt for text) into DIR, named from the audio "
                   "(talk.wav -> DIR/talk.srt); the text is printed")
    p.add_argument("--dtype", default="float32", choices=INFERENCE_DTYPES,
                   help="weights while predicting: float32 as trained, bfloat16 half the "
                   "bytes, int8 a quarter, int4 an eighth")
    finish(p, _predict, checkpoint=True, quiet=True, machine=True,
           json="print everything as one JSON object (the same as --format json)")


def _words(value: str | None) -> list[str] | None:
    """--words: a file of one word per line, or a comma-separated list."""
    if value is None:
        return None
    source = Path(value).expanduser()
    words = (source.read_text(encoding="utf-8").split() if source.is_file() else
             [w for w in value.split(",") if w.strip()])
    if not words:
        raise MonotileError(f"--words {value!r} names no words; give a comma-separated list "
                            "or a file of one word per line")
    return words


def _predict(a) -> None:
    from ..modalities import takes
    from ..run import load
    run = load(a.run, checkpoint=a.checkpoint, device=a.device)
    task = run.task
    fmt = a.format if a.output_dir else "json" if a.json else a.format  # --output-dir's files
    if fmt not in ("json", *task.formats):
        raise MonotileError(f"--format {fmt} is not one of a {run.kind} run's formats: "
                            f"{', '.join(dict.fromkeys(('json', *task.formats)))}")
    shown = "json" if a.json else "text" if a.output_dir else fmt  # what stdout shows
    if a.output:  # check the destinations before the work
        check_output(a.output)
    if a.output_dir:
        _check_output_dir(a.output_dir, fmt, task, run.kind, a.inputs)
    elif fmt == "all":
        raise MonotileError("--format all writes every file format; give --output-dir DIR")
    a.words = _words(a.words)
    options = {option: getattr(a, flag) for flag, option in PREDICT_OPTIONS
               if getattr(a, flag) is not None}
    for flag, option in PREDICT_OPTIONS:
        if option in options and not takes(task.predict, option):
            raise MonotileError(f"--{flag.replace('_', '-')} does not apply to {run.kind} runs")
    if task.picture:  # a task that draws its predictions: beside --output, or in RUN/plots
        options["plot"] = (Path(a.output).with_suffix(".png") if a.output else
                           run.dir / "plots" / task.picture)
    run.optimize_for_inference(a.dtype)  # weights laid out (or rounded) for this machine
    summary = run.predict(a.inputs, progress=not (a.quiet or shown != "text"), **options)
    for skip in summary.get("skipped", []):
        print(f"skipped: {skip['error']}", file=sys.stderr)
    if a.output:
        write_rows_csv(a.output, *task.rows(summary))
    written = _write_output_dir(a.output_dir, task.output_files(summary, fmt)) \
        if a.output_dir else []
    if shown == "json":
        print_json(summary)
    else:
        text = task.format_predictions(summary, shown)
        if text:
            print(text)
    for r in [summary, *summary.get("predictions", [])]:
        if isinstance(r, dict) and r.get("plot"):
            print(f"plot: {r['plot']}", file=sys.stderr)
    for path in ([a.output] if a.output else []) + written:
        print(f"wrote {path}", file=sys.stderr)


def _check_output_dir(value: str, fmt: str, task, kind: str, inputs: list) -> None:
    """--output-dir: a task that writes files, a format it writes, a folder (or a path one can
    be made at) whose nearest existing parent is a folder, inputs of different stems (the
    files are named by them)."""
    if not task.file_formats:
        raise MonotileError(f"--output-dir is not supported by {kind} runs; print the "
                            "predictions, or write them as CSV with --output")
    if fmt not in ("text", "all", *task.file_formats):
        raise MonotileError(f"--format {fmt} is not a file format; with --output-dir choose "
                            f"{', '.join(task.file_formats)} or all")
    target = Path(value).expanduser()
    parent = next(p for p in (target, *target.parents) if p.exists())
    if not parent.is_dir():
        raise MonotileError(f"--output-dir {value}: {parent} is a file, not a folder")
    seen: dict[str, str] = {}
    for source in task.sources(list(inputs)):
        stem = Path(str(source)).stem
        if stem in seen:
            raise MonotileError(f"{seen[stem]} and {source} would both be written as "
                                f"{stem}.*; transcribe them into different --output-dir "
                                "folders")
        seen[stem] = str(source)


def _write_output_dir(value: str, files: dict[str, str]) -> list[str]:
    """Each file written atomically into the folder (made if need be); their paths."""
    from ..train.checkpoint import atomic_write_text
    target = Path(value).expanduser()
    target.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        atomic_write_text(target / name, text)
    return [str(target / name) for name in files]


# ---- embed, search ------------------------------------------------------------------------------

def embed(sub) -> None:
    p = sub.add_parser("embed", help="sentence embeddings from an encoder run (e.g. MiniLM)")
    p.add_argument("run")
    p.add_argument("texts", nargs="+", metavar="TEXT")
    finish(p, _embed, json="one JSON object with the vectors", machine=True)


def _embed(a) -> None:
    from ..interop.sources import run_dir_for
    from ..run import load
    run = load(run_dir_for(a.run), device=a.device, dtype="float32")
    vectors = run.embed(a.texts)
    if a.json:
        print_json({"model": str(run.dir), "dimensions": vectors.size(1),
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


def search(sub) -> None:
    p = sub.add_parser("search", help="semantic search over documents with an encoder run")
    p.add_argument("run")
    p.add_argument("query")
    p.add_argument("--index", required=True, metavar="DOCS", help="a text file (one document "
                   "per line) or a folder of .txt files; their embeddings are kept beside "
                   "them until they change")
    p.add_argument("--top-k", type=int, default=5)
    finish(p, _search, json=True, machine=True)


def _search(a) -> None:
    from ..search import search as search_documents
    from ..run import load
    run = load(a.run, device=a.device, dtype="float32")
    found = search_documents(run, a.index, a.query, a.top_k)
    if a.json:
        print_json(found)
        return
    how = "index reused" if found["index_reused"] else "indexed"
    print(f"{found['documents']} documents ({how})")
    for r in found["results"]:
        print(f"{r['score']:.4f}  {r['where']}  {r['text'][:100]}")


# ---- explain ------------------------------------------------------------------------------------

def explain(sub) -> None:
    p = sub.add_parser("explain", help="attention maps of a run on one input, or its budget "
                       "of parameters, FLOPs and memory (--budget), also of a preset before "
                       "any run (--preset NAME --budget)")
    p.add_argument("run", nargs="?", help="a run directory (none with --preset)")
    p.add_argument("input", nargs="?", help="a prompt (text), an image or audio file, or a "
                   "history CSV (series)")
    p.add_argument("--layer", type=int, default=None, help="attention layer (default: the "
                   "last; negative counts from the end)")
    p.add_argument("--head", type=int, default=None, help="one head (default: their mean)")
    p.add_argument("--out", help="folder for the PNG (default RUN/plots)")
    p.add_argument("--top-k", type=int, default=5, help="text: next tokens shown per position")
    p.add_argument("--budget", action="store_true", help="a table of parameters, FLOPs per "
                   "token and training memory per component, at fp32 and bf16")
    p.add_argument("--batch", type=int, default=None, help="budget: sequences per batch "
                   "(default: the run's batch size)")
    p.add_argument("--context", type=int, default=None, help="budget: tokens per sequence "
                   "(default: the model's context)")
    p.add_argument("--preset", help="budget: a preset's model, built on the meta device "
                   "(nothing allocated), instead of a run's")
    p.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   dest="overrides", help="budget of a preset: override its settings by name")
    p.add_argument("--gpus", type=int, default=None, metavar="N", help="budget: plan training "
                   "on N GPUs: memory per GPU and time per step (default 1 with --preset)")
    p.add_argument("--gpu", default=None, metavar="NAME", help="budget: the GPU, by its "
                   "published dense bf16 peak: a100 (312 TFLOP/s), h100 or h200 (989)")
    p.add_argument("--peak-tflops", type=float, default=None, metavar="X",
                   help="budget: another GPU's dense bf16 peak, in TFLOP/s")
    p.add_argument("--mfu", type=float, default=None, metavar="F", help="budget: the share of "
                   "the peak training reaches (default 0.4)")
    p.add_argument("--strategy", choices=["ddp", "fsdp"], default="ddp", help="budget: how "
                   "the GPUs hold the model (default ddp)")
    finish(p, _explain, json=True, machine=True)


def _explain(a) -> None:
    planning = any(v is not None for v in (a.gpus, a.gpu, a.peak_tflops, a.mfu))
    if (a.preset or planning or a.overrides) and not a.budget:
        raise MonotileError("--preset, --set, --gpus, --gpu, --peak-tflops and --mfu are for "
                            "--budget; add --budget")
    if a.preset is not None:
        return _preset_budget(a)
    if a.run is None:
        raise MonotileError("give a run to explain, or --preset NAME --budget for a preset's "
                            "budget before any run")
    if a.overrides:
        raise MonotileError("--set changes a preset's settings (--preset NAME); a run's "
                            "settings are its own")
    from ..run import load
    run = load(a.run, device=a.device)
    if a.budget:
        from ..explain.budget import budget, format_budget, format_plan
        if a.input is not None:
            raise MonotileError("--budget takes no input; drop the input, or drop --budget to "
                                "draw attention maps")
        b = budget(run, batch=a.batch, context=a.context)
        text = format_budget(b)
        if planning:
            b["plan"] = _plan(a, b, run.model, run.train_config)
            text += "\n" + format_plan(b["plan"])
        return emit(a, b, text)
    if a.input is None:
        raise MonotileError("give an input to explain (a prompt, an image or audio file, or a "
                            "history CSV), or --budget for the cost table")
    if a.batch is not None or a.context is not None:
        raise MonotileError("--batch and --context are for --budget")
    from ..explain.maps import explain as explain_run
    source = a.input if Path(a.input).exists() else unescape(a.input)  # a prompt typed here
    result = explain_run(run, source, layer=a.layer, head=a.head, out=a.out, top_k=a.top_k)
    emit(a, result, run.task.format_explanation(result))


def _preset_budget(a) -> None:
    """explain --preset NAME --budget: the preset's table and its plan on --gpus GPUs."""
    from ..explain.budget import format_budget, format_plan, preset_budget
    from ..run import parse_overrides
    if a.run is not None or a.input is not None:
        raise MonotileError("--preset sizes a preset, not a run; drop the run (or drop "
                            "--preset to size the run)")
    b, model, train_cfg = preset_budget(a.preset, parse_overrides(a.overrides), batch=a.batch,
                                        context=a.context)
    b["plan"] = _plan(a, b, model, train_cfg)
    emit(a, b, format_budget(b) + "\n" + format_plan(b["plan"]))


def _plan(a, b: dict, model, train_cfg) -> dict:
    from ..explain.budget import MFU, plan
    return plan(b, model, train_cfg, gpus=a.gpus or 1, strategy=a.strategy,
                gpu=a.gpu.lower() if a.gpu else None,
                peak_tflops=a.peak_tflops, mfu=MFU if a.mfu is None else a.mfu)
