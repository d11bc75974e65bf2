"""Loading for inference layer by layer (monotile.load(RUN, dtype=...), infer/convert.py): the
same model as loading whole, then optimize_for_inference; the file never written; bad input
refused as a whole load refuses it."""

import copy
import hashlib
import json
import mmap
import os
import pickle
import shutil
from collections import Counter

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import monotile
from monotile.errors import CheckpointError, ConfigError
from monotile.infer import native
from monotile.core.attention import rope_frequencies
from monotile.core.transformer import ModelConfig
from monotile.infer.convert import ROPE_POSITIONS, FileEmbedding, convert
from monotile.infer.generate import Sampling, compile_decoding, generate_ids
from monotile.infer.packed import PackedLinear
from monotile.infer.quantize import Int4Linear, Int8Embedding, Int8Linear, quantize_rows
from monotile.modalities.text import LanguageModel
from monotile.train.checkpoint import WeightReader

from conftest import cli


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8", "int4"])
def test_a_run_loaded_layer_by_layer_equals_one_loaded_whole_then_converted(tiny_run, dtype):
    weights = tiny_run.dir / "model.safetensors"
    before = digest(weights)
    ids = torch.tensor([[5, 9, 14, 3, 27, 8, 1, 30]])
    whole = monotile.load(tiny_run.dir).optimize_for_inference(dtype)
    streamed = monotile.load(tiny_run.dir, dtype=dtype)
    with torch.no_grad():
        assert torch.equal(streamed.model(ids), whole.model(ids))
    assert streamed.parameters() == monotile.load(tiny_run.dir).parameters()
    assert not streamed.model.training
    table, head = streamed.model.tok_emb, streamed.model.head
    if dtype in ("int8", "int4") and native.available():  # a text model's int8 and int4
        # layers in the native kernels (Run.optimize_for_inference): one packed Q and s
        assert isinstance(table, native.NativeInt8Embedding)
        assert table.packed is head.packed and table.scale is head.scale
    elif dtype in ("int8", "int4"):  # the tied head and the embedding share one Q and s
        assert isinstance(table, Int8Embedding)
        assert table.weight_int8 is head.weight_int8
    elif isinstance(head, native.NativeLinear):  # bf16 in the native kernels' layout: the
        # table reads its rows there
        assert isinstance(table, native.NativeEmbedding) and table.packed is head.packed
    elif type(head) is nn.Linear:  # the plain head's W (bf16, or fp32 in the file's pages)
        assert type(table) is nn.Embedding and table.weight is head.weight
    else:  # a head packed for oneDNN: the table read from the file, in the model's dtype
        assert isinstance(table, FileEmbedding) and table.rows is not None
        assert table.dtype == (torch.bfloat16 if dtype == "bfloat16" else torch.float32)
    if dtype == "int4":  # the head at 8 bits
        assert isinstance(head, (Int8Linear, native.NativeInt8Linear))
        assert any(isinstance(m, (Int4Linear, native.NativeInt4Linear))
                   for m in streamed.model.modules())
    prompt = "ROMEO:"
    assert streamed.generate(prompt, max_new_tokens=20, temperature=0.0) == \
        whole.generate(prompt, max_new_tokens=20, temperature=0.0)
    assert digest(weights) == before  # the mapped pages are copy-on-write: the file is read only


def resident_kb(path) -> int:
    """This process's resident KB of the mappings of file `path` (/proc/self/smaps)."""
    total, inside = 0, False
    for line in open("/proc/self/smaps"):
        head = line.split()
        if "-" in head[0] and ":" not in head[0]:  # a mapping's first line
            inside = head[-1] == str(path)
        elif inside and head[0] == "Rss:":
            total += int(head[1])
    return total


def test_a_tied_fp32_table_reads_the_heads_file_pages_and_saves_as_an_embedding(tiny_run):
    run = monotile.load(tiny_run.dir, dtype="float32")
    table = run.model.tok_emb
    plain = monotile.load(tiny_run.dir).model.tok_emb.weight
    assert torch.equal(table.weight, plain)
    ids = torch.tensor([[0, 3, plain.size(0) - 1]])
    assert torch.equal(table(ids), nn.functional.embedding(ids, plain))
    assert torch.equal(run.model.state_dict()["tok_emb.weight"], plain)


@pytest.mark.parametrize("pread", [False, True])
def test_a_file_embedding_reads_rows_without_mapping_the_file(tmp_path, pread):
    # a 4 MB table of an untied embedding: 200 lookups spread over it. Through the mapping
    # each faults at least a page in (the row, and what the system maps about it: 64 KB of
    # fault-around, or a page-cache folio of up to 2 MB); read with pread, none is mapped
    torch.manual_seed(0)
    model = nn.Embedding(4096, 256)
    path = tmp_path / "model.safetensors"
    save_file({"weight": model.weight.detach()}, path)
    with WeightReader(model, path) as reader:
        mapped = reader.mapped(model.weight)
        table = FileEmbedding(mapped, torch.float32, reader.rows(mapped) if pread else None)
    ids = torch.randperm(4096)[:200].view(4, 50)
    assert torch.equal(table(ids), nn.functional.embedding(ids, model.weight))
    kb = resident_kb(path)
    assert kb == 0 if pread else kb >= 200 * 4, kb
    assert torch.equal(table(ids[0, 0]), model.weight[ids[0, 0]])  # one id, no batch
    assert table(torch.zeros(0, dtype=torch.long)).shape == (0, 256)
    for bad in (4096, -1):  # refused as nn.Embedding refuses it, not read from elsewhere
        with pytest.raises(IndexError, match="index out of range"):
            table(torch.tensor([[3, bad]]))
    assert torch.equal(nn.Module.state_dict(table)["weight"], model.weight)
    if not pread:
        return
    # the file loaded is read, though another is written over its path, and a copy of the
    # model reads it too once the original is gone; pickling it is refused by name
    save_file({"weight": torch.zeros(4096, 256)}, tmp_path / "new.safetensors")
    os.replace(tmp_path / "new.safetensors", path)  # as a checkpoint is written
    twin = copy.deepcopy(table)
    del table
    assert torch.equal(twin(ids), nn.functional.embedding(ids, model.weight))
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(twin)


def test_a_file_embedding_in_bf16_reads_the_fp32_rows_and_rounds_them(tmp_path):
    model = nn.Embedding(64, 32)
    path = tmp_path / "model.safetensors"
    save_file({"weight": model.weight.detach()}, path)
    with WeightReader(model, path) as reader:
        mapped = reader.mapped(model.weight)
        table = FileEmbedding(mapped, torch.bfloat16, reader.rows(mapped))
    ids = torch.tensor([[1, 63, 1]])
    assert table(ids).dtype == torch.bfloat16
    assert torch.equal(table(ids), model.weight.detach()[ids].bfloat16())


def test_int8_rows_quantized_in_pieces_equal_the_whole_matrix(tiny_run, monkeypatch):
    # a table is quantized a few rows at a time (CHUNK_WEIGHTS weights): the same Q and s
    monkeypatch.setattr("monotile.infer.convert.CHUNK_WEIGHTS", 1)  # a row a piece
    run = monotile.load(tiny_run.dir, dtype="int8")
    q, s = quantize_rows(monotile.load(tiny_run.dir).model.tok_emb.weight)
    table, rows = run.model.tok_emb, q.size(0)
    if isinstance(table, native.NativeInt8Embedding):  # the native kernels' layout
        kept_q, kept_s = native.unpack_q8(table.packed, rows), table.scale[:rows]
    else:
        kept_q, kept_s = table.weight_int8, table.scale
    assert rows > 1
    assert torch.equal(kept_q, q) and torch.equal(kept_s, s)


def test_load_for_inference_refuses_a_bad_dtype_and_a_damaged_file(tiny_run, tmp_path):
    with pytest.raises(ConfigError, match="choose float32, bfloat16, int8, int4"):
        monotile.load(tiny_run.dir, dtype="float16")
    copy = tmp_path / "run"
    shutil.copytree(tiny_run.dir, copy)
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])  # truncated
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        monotile.load(copy, dtype="int4")


def test_only_the_lent_weights_stay_mapped_and_reading_them_maps_nothing_more(tmp_path):
    # three 1 MB weights, a small one first so that none begins at a page: the first and last
    # read to convert them and let go, the middle one lent. keep_only maps the lent one's
    # pages in, and only those; reading it then maps no neighbour (the system's fault-around
    # would map up to 64 KB of each, the page cache's large folios more)
    model = nn.Sequential(nn.Linear(3, 5), nn.Linear(512, 512), nn.Linear(512, 512),
                          nn.Linear(512, 512))
    path = tmp_path / "model.safetensors"
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, path)
    with WeightReader(model, path) as reader:
        first, lent, last = (reader.mapped(model[i].weight) for i in (1, 2, 3))
        for part in (first, last):
            assert part.sum().isfinite()
            reader.release(part)
        reader.keep_only([model[0].weight, lent])  # a tensor not lent is passed over
        offset, page = lent.data_ptr() - reader.base.data_ptr(), mmap.PAGESIZE
        assert offset % page
        pages = -(-(offset + lent.nbytes) // page) - offset // page
        assert resident_kb(path) == pages * page // 1024  # mapped in already, whole pages
        assert torch.equal(lent, model[2].weight)  # read: nothing more mapped
        assert resident_kb(path) == pages * page // 1024
        reader.keep_only([])
        assert resident_kb(path) == 0


def test_a_weight_reader_names_a_tied_weight_by_the_file_s_name(tiny_run):
    model = monotile.load(tiny_run.dir).model
    with WeightReader(model, tiny_run.dir / "model.safetensors") as reader:
        assert reader.name_of(model.head.weight) == reader.name_of(model.tok_emb.weight)
        assert reader.name_of(torch.zeros(3)) is None
        mapped = reader.mapped(model.head.weight)
        assert torch.equal(mapped, model.tok_emb.weight)
        reader.release(mapped)  # its pages let go: read again from the file, the same
        assert torch.equal(mapped, model.tok_emb.weight)


@pytest.mark.parametrize("dtype", ["int4", "int8", "bfloat16"])
def test_a_compiled_decoding_step_makes_the_tokens_of_the_eager_one(tiny_run, dtype):
    # load(compile=True): the one-token step is torch.compile'd (weights frozen in), its
    # layers in native.py's kernels where they build; the same greedy tokens as the eager
    # model with the same layers, through the CLI's path (generate_ids steps through it).
    # One process compiles the three in turn: each must run its own program (int8's and
    # int4's steps take the same inputs)
    compiled = monotile.load(tiny_run.dir, dtype=dtype, compile=True)
    eager = monotile.load(tiny_run.dir)
    convert(eager.model, dtype, pack=False, native=native.available())
    assert compiled.compile_seconds > 0 and callable(compiled.model.decode_step)
    assert not any(isinstance(m, PackedLinear) for m in compiled.model.modules())
    trunk = compiled.model.trunk  # every position's rotations baked in: none made after
    assert trunk.rope.size(0) == trunk.cfg.context
    if native.available():
        kinds = {type(m).__name__ for m in compiled.model.modules()}
        assert kinds >= {"int4": {"NativeInt4Linear", "NativeInt8Linear"},
                         "int8": {"NativeInt8Linear", "NativeInt8Embedding"},
                         "bfloat16": {"NativeLinear", "NativeEmbedding"}}[dtype], kinds
    prompt = "ROMEO:"
    text = compiled.generate(prompt, max_new_tokens=24, temperature=0.0)  # within the context
    assert text == eager.generate(prompt, max_new_tokens=24, temperature=0.0)
    # a state dict saves as the eager model's (the compiled step holds no module of its own)
    assert compiled.model.state_dict().keys() == eager.model.state_dict().keys()
    if dtype != "int4":
        return
    # the command line's flag: the text of the API, and the compile reported
    done = cli("generate", str(tiny_run.dir), "--prompt", prompt, "--dtype", dtype,
               "--compile", "--temperature", "0", "--max-new-tokens", "24", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["text"] == text
    assert "compiled the decoding step in" in done.stderr


@pytest.mark.skipif(not native.available(), reason="the native kernels could not be built")
def test_a_compiled_fp32_step_multiplies_in_native_kernels_where_they_measured_faster(
        tiny_run, tmp_path, monkeypatch):
    # verdicts that the native kernels win for every shape (as the measurement finds for
    # SmolLM2's layers on some Xeons): the compiled step's layers are NativeLinear, the tied
    # embedding reads the head's packed rows, and the tokens are the eager model's with the
    # same layers
    from monotile.infer import packed
    monkeypatch.setattr(packed, "_verdicts_file", lambda: tmp_path / "layouts.json")
    plain = monotile.load(tiny_run.dir).model
    shapes = Counter((m.in_features, m.out_features) for m in plain.modules()
                     if type(m) is nn.Linear)
    for (n_in, n_out), count in shapes.items():
        for other in ("mkl", "plain"):
            packed.remember_all({native.float32_key((n_in, n_out), count, other): 1})
    compiled = monotile.load(tiny_run.dir, dtype="float32", compile=True)
    kinds = Counter(type(m).__name__ for m in compiled.model.modules())
    assert kinds["NativeLinear"] == sum(shapes.values()) and kinds["Linear"] == 0, kinds
    assert kinds["NativeEmbedding"] == 1, kinds
    eager = monotile.load(tiny_run.dir)
    convert(eager.model, "float32", pack=False, native=True)
    assert Counter(type(m).__name__ for m in eager.model.modules()) == kinds
    prompt = "ROMEO:"
    assert (compiled.generate(prompt, max_new_tokens=24, temperature=0.0)
            == eager.generate(prompt, max_new_tokens=24, temperature=0.0))


def test_a_compiled_fp32_step_hands_its_products_rows_without_copying_them(tiny_run):
    # the norms read x as (B T, d) rows (Block.forward): compiled, a (1, 1, d) view of them
    # had a 0 stride that PyTorch's matrix product copied its input for, every call
    run = monotile.load(tiny_run.dir)
    convert(run.model, "float32", pack=False)
    compile_decoding(run.model, prepack=False)  # plain products on every CPU
    steps = generate_ids(run.model, torch.tensor([[5, 9, 14, 3]]), 6, Sampling(temperature=0.0))
    next(steps), next(steps)
    with torch.profiler.profile() as prof:
        next(steps), next(steps)
    calls = {e.key: e.count for e in prof.key_averages()}
    assert any(key.startswith("Torch-Compiled Region") for key in calls), calls  # it ran
    assert calls.get("aten::clone", 0) == 0, calls


def test_compiling_is_for_runs_that_generate_text(tiny_en_run):
    with pytest.raises(ConfigError, match="does not generate text"):
        monotile.load(tiny_en_run, dtype="float32", compile=True)


def test_an_inference_model_makes_its_rotations_as_positions_are_reached():
    # a converted model keeps the RoPE table's first ROPE_POSITIONS rows (not the context's:
    # 32 MiB at 131,072 positions); a longer prompt, or a cache for more positions, makes the
    # rows it reaches, each bit for bit the whole table's, and the outputs are the same
    cfg = ModelConfig(vocab_size=64, n_layer=2, n_head=2, n_kv_head=1, d_model=32, context=1024,
                      norm="rmsnorm", mlp="swiglu", positions="rope", bias=False)
    torch.manual_seed(0)
    whole = LanguageModel(cfg).eval()
    model = copy.deepcopy(whole)
    convert(model, "float32", pack=False)
    trunk, full = model.trunk, rope_frequencies(cfg.head_dim, cfg.context, cfg.rope_theta)
    assert trunk.rope.size(0) == ROPE_POSITIONS < cfg.context
    ids = torch.randint(0, 64, (1, 600))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), whole(ids), atol=1e-5, rtol=1e-5)
        assert 600 <= trunk.rope.size(0) < cfg.context
        assert torch.equal(trunk.rope, full[:trunk.rope.size(0)])
        trunk.keep_positions(ROPE_POSITIONS)
        cache = trunk.make_cache(1, 900)  # what a generation can reach, made before it
        assert trunk.rope.size(0) >= 900 and torch.equal(trunk.rope, full[:trunk.rope.size(0)])
        steps = torch.cat([model(ids[:, :500], cache=cache, pos=0)]
                          + [model(ids[:, t:t + 1], cache=cache, pos=t) for t in range(500, 600)],
                          dim=1)
        torch.testing.assert_close(steps, whole(ids), atol=1e-4, rtol=1e-4)
    model.to(torch.float64)  # moved or cast: the table made anew, as long as it was, in fp32
    assert trunk.rope.dtype == torch.float32 and torch.equal(trunk.rope,
                                                             full[:trunk.rope.size(0)])


@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_a_16_bit_cache_is_cast_for_the_kernel_where_this_cpu_measured_that_faster(
        dtype, tmp_path, monkeypatch):
    # the verdict is measured once per machine and shape and kept; each self-attention gets it;
    # where it says cast, a one-query step hands PyTorch's kernel fp32 keys and values (a
    # prompt's many queries, and a cache already in fp32, as they are), and the logits are
    # those of the uncast step to bf16's rounding
    from monotile.core.attention import SelfAttention
    from monotile.infer import convert as convert_module, packed
    verdicts_file = tmp_path / "layouts.json"
    monkeypatch.setattr(packed, "_verdicts_file", lambda: verdicts_file)
    cfg = ModelConfig(vocab_size=50, n_layer=2, n_head=4, n_kv_head=2, d_model=64, context=32,
                      norm="rmsnorm", mlp="swiglu", positions="rope", bias=False)
    torch.manual_seed(0)
    model = LanguageModel(cfg).eval()
    convert(model, dtype, pack=False)
    (machine, verdicts), = json.loads(verdicts_file.read_text()).items()
    key = f"attention 4/2x16 q {'bfloat16' if dtype == 'bfloat16' else 'float32'} cache bfloat16"
    (kept,) = [v for k, v in verdicts.items() if k.startswith(key)]
    layers = [m for m in model.modules() if isinstance(m, SelfAttention)]
    assert [m.upcast_cache for m in layers] == [bool(kept)] * 2
    # read, not measured again
    monkeypatch.setattr(convert_module, "attention", lambda *a, **k: pytest.fail("measured"))
    assert convert_module.upcasting_wins(4, 2, 16, layers[0].qkv.weight.dtype
                                         if dtype == "bfloat16" else torch.float32,
                                         torch.bfloat16) == bool(kept)
    monkeypatch.undo()
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recorded(q, k, v, **options):
        seen.append((q.size(2), k.dtype))
        return sdpa(q, k, v, **options)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recorded)

    def steps(upcast: bool) -> torch.Tensor:
        for m in layers:
            m.upcast_cache = upcast
        cache = model.trunk.make_cache(1, 16)
        with torch.no_grad():
            out = [model(ids[:, :4], cache=cache, pos=0)[:, -1]]
            out += [model(ids[:, t:t + 1], cache=cache, pos=t)[:, -1] for t in range(4, 8)]
        return torch.stack(out, 1).float()
    as_they_are = steps(False)
    assert seen == [(4, torch.bfloat16)] * 2 + [(1, torch.bfloat16)] * 8
    seen.clear()
    cast = steps(True)
    assert seen == [(4, torch.bfloat16)] * 2 + [(1, torch.float32)] * 8
    torch.testing.assert_close(cast, as_they_are, rtol=0, atol=2e-2 * cast.abs().max().item())
