"""LoRA adapters in PEFT's layout, for the Hugging Face export of their base: a folder of
adapter_config.json and adapter_model.safetensors that peft (PeftModel.from_pretrained),
transformers (model.load_adapter) and vLLM (--lora-modules) load.

    ours     h = W x + (alpha / r) B A x          on qkv, wo, gate_up, down, fc1, fc2, head
    theirs   h = W x + (lora_alpha / r) B A x     on q_proj, k_proj, v_proj, o_proj, ...

The scale is the same number (peft without rsLoRA). A fused layer (qkv: rows q | k | v,
gate_up: rows gate | up) is several layers of theirs that read the same x, so each of them
takes the same A and its own block of B's rows: B_part A is exactly the rows of B A its weight
receives. The blocks are in the order their weights are exported in (the Llama family's
rotate-half rows for q and k), and a part none of whose rows was adapted (k, for targets q,v)
is left out; GPT-2's c_attn is one layer there too, its k rows then zeros in B. GPT-2's Conv1D
stores its weight (in, out), yet peft's A and B on it are (r, in) and (out, r) as on a Linear,
with fan_in_fan_out true.

The names come from the tables `export hf` writes with (interop/adapter.py), so the adapter
fits exactly the folder `monotile export hf BASE` makes. Tensors are named as peft's
save_pretrained names them: base_model.model.<module>.lora_A.weight and .lora_B.weight.
Only the causal language models with a Hugging Face architecture (GPT-2, the Llama family)
have this layout; other runs are refused by name (write_peft_beside then writes no
folder).

`monotile finetune` writes RUN/peft/ beside adapter.safetensors; `monotile export peft RUN
--out DIR --base HF_DIR` writes one that names its base. With the base exported (`monotile
export hf runs/smollm2 --out smollm2-hf`), as the guide's Adapting page does:

    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained("smollm2-hf")
    model = PeftModel.from_pretrained(base, "runs/smollm2-lora/peft")
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch

from ..errors import ConfigError
from ..train.checkpoint import atomic_write_json, save_tensors
from .adapter import Adapter, _expand, _size
from .convert import pick
from .gpt2 import GPT2
from .llama import LLAMA

CAUSAL_LMS = (GPT2, LLAMA)
FOLDER = "peft"  # beside a fine-tuning run's adapter.safetensors
QKV = ("q", "k", "v")


def peft_adapter(run_dir: Path, meta: dict, configs: dict) -> Adapter:
    """The family whose Hugging Face export holds the run's model; ConfigError if none."""
    return pick(CAUSAL_LMS, SimpleNamespace(dir=run_dir, meta=meta, configs=configs))


def _module_shapes(adapter: Adapter, cfg, task_cfg) -> dict[str, tuple]:
    """Our weights' shapes, from the model built on the meta device (nothing allocated)."""
    with torch.device("meta"):
        model = adapter.build(cfg, task_cfg)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def _adapted_rows(layer: str, n_rows: int, out: int, dims: dict, targets) -> torch.Tensor:
    """The output rows of our layer the adapter's B holds, as core/lora.py chose them: all of
    them, or the q, k, v spans of a fused qkv that the targets name."""
    if n_rows == out:
        return torch.arange(out)
    q, kv = dims["q"], dims["kv"]
    spans = {"q": (0, q), "k": (q, q + kv), "v": (q + kv, q + 2 * kv)}
    which = [t for t in QKV if t in targets]
    rows = torch.cat([torch.arange(*spans[w]) for w in which]) if which else torch.arange(0)
    if not layer.endswith(".qkv") or len(rows) != n_rows:
        raise ConfigError(f"the adapter on {layer} has {n_rows} rows, which match neither its "
                          f"{out} outputs nor the q, k, v rows of {','.join(targets)}")
    return rows


def _their_order(pair, dims: dict, n: int) -> tuple[torch.Tensor, bool]:
    """Where each of their rows comes from in ours, and whether their weight is stored
    transposed (in, out), found by exporting a column of row numbers the way weights are."""
    index = pair.inverse(torch.arange(n, dtype=torch.float64)[:, None], dims)
    if tuple(index.shape) == (n, 1):
        return index[:, 0].long(), False
    if tuple(index.shape) == (1, n):
        return index[0].long(), True
    raise ConfigError("a weight whose export is not a reordering of its rows has no PEFT layout")


def _target_modules(adapted: list[str], modules: list[str]) -> list[str]:
    """peft's target_modules: for each adapted module the shortest dotted suffix of its name
    (peft matches `name == t or name.endswith("." + t)`) that names adapted modules only."""
    chosen = set()
    done = set(adapted)
    for name in adapted:
        parts = name.split(".")
        for k in range(1, len(parts) + 1):
            suffix = ".".join(parts[-k:])
            if all(m in done for m in modules if m == suffix or m.endswith("." + suffix)):
                chosen.add(suffix)
                break
    return sorted(chosen)


def peft_tensors(adapter: Adapter, cfg, task_cfg, lora: dict,
                 tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict]:
    """(adapter_model.safetensors' tensors, adapter_config.json) from our adapter's tensors
    (…qkv.lora_A, …qkv.lora_B) and its settings (rank, alpha, targets)."""
    dims = adapter.dims(cfg, task_cfg)
    prefix = adapter.prefix if adapter.writes_prefix else ""
    rules = {ours: (rule, names) for rule, ours, names in _expand(adapter.rules, dims, prefix)}
    modules = sorted({n.rsplit(".", 1)[0] for _, names in rules.values() for n in names if n})
    shapes = _module_shapes(adapter, cfg, task_cfg)
    layers = sorted({name.rsplit(".", 1)[0] for name in tensors if name.endswith(".lora_A")})
    out, adapted, transposed = {}, [], False
    for layer in layers:
        A, B = tensors[f"{layer}.lora_A"].float(), tensors[f"{layer}.lora_B"].float()
        if f"{layer}.weight" not in rules:
            raise ConfigError(f"{layer} has no layer in {adapter.name}'s Hugging Face layout")
        rule, names = rules[f"{layer}.weight"]
        n_out = shapes[f"{layer}.weight"][0]
        rows = _adapted_rows(layer, B.size(0), n_out, dims, lora["targets"])
        full = B.new_zeros(n_out, B.size(1)).index_copy(0, rows, B)  # zeros where not adapted
        kept = torch.zeros(n_out, dtype=torch.bool).index_fill(0, rows, True)
        sizes = [_size(p.shape, dims)[0] for p in rule.parts] if len(names) > 1 else [n_out]
        for part, name, chunk, mask in zip(rule.parts, names, full.split(sizes),
                                           kept.split(sizes)):
            if name is None or not mask.any():
                continue  # a part their format lacks, or one the adapter left alone
            order, flipped = _their_order(part.pair, dims, len(chunk))
            transposed |= flipped
            module = name.rsplit(".", 1)[0]
            out[f"base_model.model.{module}.lora_A.weight"] = A.clone()  # one copy each
            out[f"base_model.model.{module}.lora_B.weight"] = chunk[order].contiguous()
            adapted.append(module)
    if not adapted:
        raise ConfigError("the run holds no LoRA adapter (no …lora_A tensors)")
    rank, alpha = lora["rank"], lora["alpha"]
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank,
              "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
              "target_modules": _target_modules(adapted, modules), "lora_dropout": 0.0,
              "bias": "none", "fan_in_fan_out": transposed, "use_rslora": False,
              "use_dora": False, "init_lora_weights": True, "modules_to_save": None,
              "inference_mode": True, "base_model_name_or_path": None, "revision": None}
    return out, config


def write_peft(out: Path, tensors: dict[str, torch.Tensor], config: dict,
               base: str | None = None) -> Path:
    """The folder: adapter_config.json (base_model_name_or_path: `base`, the Hugging Face
    export of the base model, or null) and adapter_model.safetensors."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_tensors(out / "adapter_model.safetensors", tensors, {"format": "pt"})
    atomic_write_json(out / "adapter_config.json",
                      {**config, "base_model_name_or_path": None if base is None else str(base)})
    return out


def export_peft(run_dir: str | Path, out: str | Path, base: str | None = None,
                checkpoint: str = "last") -> Path:
    """A fine-tuning run's adapter as a PEFT folder at `out` (see the module docstring); `base`
    is written as base_model_name_or_path (the folder `monotile export hf BASE` made, or a
    hub name), so AutoPeftModelForCausalLM can find it."""
    from ..rundir import check_run_dir, read_config, weights_file
    from ..train.checkpoint import load_tensors
    run_dir = check_run_dir(run_dir)
    doc, meta, configs = read_config(run_dir)
    if "lora" not in doc:
        raise ConfigError(f"{run_dir} is not a fine-tuning run (no adapter in its config.json);"
                          " give the run `monotile finetune` made")
    if (Path(out) / "adapter_config.json").exists():
        raise ConfigError(f"{out} already holds an adapter; choose another --out")
    adapter = peft_adapter(run_dir, meta, configs)
    weights, _ = load_tensors(run_dir / weights_file(configs["train"], checkpoint))
    tensors, config = peft_tensors(adapter, configs["model"], configs[meta["task"]],
                                   doc["lora"], weights)
    return write_peft(out, tensors, config, base)


def write_peft_beside(run_dir: str | Path) -> Path | None:
    """RUN/peft/ from a fine-tuning run's RUN/adapter.safetensors (rundir.write_adapter wrote
    it): the same adapters in PEFT's layout for the Hugging Face export of the base. None, and
    no folder, for runs that no Hugging Face architecture holds. `monotile finetune` and
    `monotile resume` call it after the adapter file."""
    from ..rundir import ADAPTER, read_config
    from ..train.checkpoint import load_tensors
    run_dir = Path(run_dir)
    doc, meta, configs = read_config(run_dir)
    tensors, _ = load_tensors(run_dir / ADAPTER)
    try:
        adapter = peft_adapter(run_dir, meta, configs)
        theirs, config = peft_tensors(adapter, configs["model"], configs[meta["task"]],
                                      doc["lora"], tensors)
    except ConfigError:  # no Hugging Face architecture holds the model (or this adapter)
        return None
    return write_peft(run_dir / FOLDER, theirs, config)
