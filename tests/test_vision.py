"""Images: patch embedding, positions, metrics, data formats, the CLI and bad input."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import monotile
from monotile.core.layers import DropPath
from monotile.core.transformer import ModelConfig
from monotile.data import find_data
from monotile.modalities.metrics import confusion_matrix, precision_recall_f1
from monotile.modalities.vision import (ImageClassifier, VisionConfig, VisionTask, affine,
                                        patchify, resample_pos_emb)
from monotile.modalities.vision_io import read_image
from monotile.train.ema import EMA

from conftest import cli, set_args

# a ViT that trains in seconds on 2 cores
TINY = {"n_layer": "2", "n_head": "2", "d_model": "32", "d_ff": "64", "batch_size": "32",
        "max_steps": "60", "eval_interval": "30", "log_interval": "10", "warmup_steps": "10",
        "lr": "3e-3",
        "ema": "0", "seed": "0"}


# ---- the pieces, against independent references ---------------------------------------------

def test_patch_embedding_is_a_strided_convolution():
    torch.manual_seed(0)
    images = torch.randn(2, 3, 12, 8)
    conv = torch.nn.Conv2d(3, 16, kernel_size=4, stride=4)
    linear = torch.nn.Linear(3 * 4 * 4, 16)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.flatten(1))
        linear.bias.copy_(conv.bias)
    expected = conv(images).flatten(2).transpose(1, 2)  # (B, N, d), patches row-major
    torch.testing.assert_close(linear(patchify(images, 4)), expected, rtol=1e-5, atol=1e-5)


def test_position_resampling_matches_transformers_vit():
    from transformers import ViTConfig
    from transformers.models.vit.modeling_vit import ViTEmbeddings

    torch.manual_seed(0)
    emb = ViTEmbeddings(ViTConfig(image_size=28, patch_size=4, hidden_size=24, num_channels=1))
    pos = torch.randn(1, 1 + 49, 24)
    emb.position_embeddings.data.copy_(pos)
    for size in (32, 20):
        tokens = torch.zeros(1, 1 + (size // 4) ** 2, 24)
        expected = emb.interpolate_pos_encoding(tokens, size, size)
        ours = resample_pos_emb(pos, (7, 7), (size // 4, size // 4), n_prefix=1)
        torch.testing.assert_close(ours, expected)
    assert resample_pos_emb(pos, (7, 7), (7, 7), 1) is pos


def test_a_model_runs_at_another_image_size():
    cfg = ModelConfig(n_layer=1, n_head=2, d_model=16, positions="none", context=50)
    model = ImageClassifier(cfg, channels=1, image_size=28, patch_size=4, num_classes=3)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 3)
    assert model(torch.randn(2, 1, 40, 36)).shape == (2, 3)
    mean_pool = ImageClassifier(cfg, channels=1, image_size=28, patch_size=4, num_classes=3,
                                pool="mean")
    assert mean_pool(torch.randn(2, 1, 32, 32)).shape == (2, 3)


def test_metrics_match_scikit_learn():
    from sklearn import metrics

    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 300)
    pred = np.where(rng.random(300) < 0.7, y, rng.integers(0, 5, 300))
    pred[pred == 4] = 3  # class 4 is never predicted: precision 0 by convention
    cm = confusion_matrix(torch.tensor(y), torch.tensor(pred), 5)
    np.testing.assert_array_equal(cm.numpy(), metrics.confusion_matrix(y, pred, labels=range(5)))
    p, r, f1 = precision_recall_f1(cm)
    sp, sr, sf, _ = metrics.precision_recall_fscore_support(y, pred, labels=range(5),
                                                            zero_division=0)
    np.testing.assert_allclose(p.numpy(), sp)
    np.testing.assert_allclose(r.numpy(), sr)
    np.testing.assert_allclose(f1.numpy(), sf)


def test_label_smoothing_loss_is_the_formula():
    logits, y, eps = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 0, 1]), 0.1
    target = (1 - eps) * F.one_hot(y, 4) + eps / 4
    expected = -(target * logits.log_softmax(-1)).sum(-1).mean()
    torch.testing.assert_close(F.cross_entropy(logits, y, label_smoothing=eps), expected)


def test_drop_path_drops_whole_samples_and_keeps_the_expectation():
    torch.manual_seed(0)
    x = torch.ones(4000, 3, 5)
    drop = DropPath(0.25)
    assert drop.eval()(x) is x
    y = drop.train()(x)
    per_sample = y.flatten(1)
    assert set(per_sample.unique().tolist()) <= {0.0, torch.tensor(1 / 0.75).item()}
    assert (per_sample == per_sample[:, :1]).all()  # a sample is dropped whole or kept whole
    assert abs(y.mean().item() - 1.0) < 0.05
    assert abs((per_sample[:, 0] == 0).float().mean().item() - 0.25) < 0.03


def test_ema_is_the_moving_average_formula():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, decay=0.9)
    expected = [p.detach().clone() for p in model.parameters()]
    for step in range(30):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update(model, step)
        d = min(0.9, (1 + step) / (10 + step))
        expected = [d * e + (1 - d) * p.detach() for e, p in zip(expected, model.parameters())]
    for got, want in zip(ema.model.parameters(), expected):
        torch.testing.assert_close(got, want)


def test_augmentation_off_is_identity_and_on_is_seeded():
    plain = VisionTask(VisionConfig(data="digits", image_size=8, patch_size=2))
    images = torch.rand(5, 1, 8, 8)
    assert plain.augment(images, torch.Generator().manual_seed(0)) is images
    aug = VisionTask(VisionConfig(data="digits", image_size=8, patch_size=2, rotate=15,
                                  shift=0.1, scale=0.1, flip=True))
    a = aug.augment(images, torch.Generator().manual_seed(1))
    b = aug.augment(images, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.allclose(a, images)


def test_affine_moves_rotates_and_mirrors_pixels_exactly():
    images = torch.rand(1, 2, 8, 8)
    one = torch.ones(1)
    # reading the input one pixel to the right (2/8 in [-1, 1] coordinates) shifts it left
    shifted = affine(images, torch.zeros(1), one, torch.tensor([[2 / 8, 0.0]]), one < 0)
    torch.testing.assert_close(shifted[..., :-1], images[..., 1:])
    assert shifted[..., -1].abs().max() == 0  # zeros come in
    turned = affine(images, torch.tensor([math.pi / 2]), one, torch.zeros(1, 2), one < 0)
    torch.testing.assert_close(turned, torch.rot90(images, 1, dims=(2, 3)), atol=1e-5, rtol=0)
    mirrored = affine(images, torch.zeros(1), one, torch.zeros(1, 2), one > 0)
    torch.testing.assert_close(mirrored, images.flip(-1), atol=1e-5, rtol=0)


# ---- real image files -----------------------------------------------------------------------

@pytest.fixture(scope="session")
def digit_folder(tmp_path_factory):
    """scikit-learn's digits as PNG/JPEG files in class folders, in assorted sizes and modes,
    as users have them: 60 images per class, some RGB, some 16-bit, some larger."""
    from sklearn.datasets import load_digits

    d = load_digits()
    root = tmp_path_factory.mktemp("digit_folder")
    counts: dict[int, int] = {}
    for image, label in zip(d.images, d.target):
        n = counts.get(label, 0)
        if n >= 60:
            continue
        counts[label] = n + 1
        a = np.uint8(np.round(image * 255 / 16))
        im = Image.fromarray(a, "L")
        folder = root / str(label)
        folder.mkdir(exist_ok=True)
        if n % 4 == 0:
            im.resize((24, 24), Image.Resampling.NEAREST).convert("RGB").save(folder / f"{n}.jpg",
                                                                              quality=95)
        elif n % 4 == 1:
            Image.fromarray(np.uint16(a) * 257).save(folder / f"{n}.png")  # 16-bit grey
        elif n % 4 == 2:
            im.convert("RGBA").save(folder / f"{n}.png")
        else:
            im.save(folder / f"{n}.png")
    return root


def test_read_image_converts_any_mode_and_size(digit_folder):
    for path in sorted(digit_folder.rglob("*"))[:12]:
        if path.is_file():
            for channels in (1, 3):
                t = read_image(path, channels, 8)
                assert t.shape == (channels, 8, 8) and t.dtype == torch.uint8
                assert t.float().max() > 100  # the digit is there, not washed out
    big = next(digit_folder.rglob("*.jpg"))
    for fit in ("squash", "crop", "pad"):
        assert read_image(big, 1, 16, fit).shape == (1, 16, 16)


def test_train_on_a_folder_predict_and_eval(tmp_path, digit_folder):
    run = monotile.train("vision", "digits", out=tmp_path / "run", data=digit_folder,
                         overrides=dict(TINY, max_steps="300", eval_interval="300"), quiet=True)
    assert run.task.config.labels == tuple(str(i) for i in range(10))
    assert run.state["last_eval"]["accuracy"] > 0.5  # 120 held-out images, 10 classes
    report = run.report()
    assert set(report["per_class"]) == set(run.task.config.labels)
    assert (tmp_path / "run" / "plots" / "confusion.png").stat().st_size > 1000
    result = monotile.load(tmp_path / "run").predict([digit_folder / "3"], top_k=2)
    assert len(result["predictions"]) == 60 and result["labelled"] == 60
    assert all(len(p["labels"]) == 2 and p["true"] == "3" for p in result["predictions"])


def test_train_without_a_preset_on_a_folder(tmp_path, digit_folder):
    run = monotile.train("vision", out=tmp_path / "run", data=digit_folder,
                         overrides=dict(TINY, max_steps="5", eval_interval="5"), quiet=True)
    assert run.configs["vision"].image_size == 28 and run.configs["model"].positions == "none"
    assert monotile.load(tmp_path / "run").predict([digit_folder / "0"])["labelled"] == 60


def test_train_from_a_csv_list(tmp_path, digit_folder):
    files = sorted(p for p in digit_folder.rglob("*") if p.is_file())
    lines = ["path,label"] + [f"{p.relative_to(digit_folder)},{p.parent.name}" for p in files]
    (digit_folder / "list.csv").write_text("\n".join(lines) + "\n")
    try:
        run = monotile.train("vision", "digits", out=tmp_path / "run",
                             data=digit_folder / "list.csv",
                             overrides=dict(TINY, max_steps="20", eval_interval="20"), quiet=True)
    finally:
        (digit_folder / "list.csv").unlink()
    assert run.state["last_eval"]["test_images"] == 120


def test_train_from_an_npz_of_rgb_images(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (40, 10, 10, 3), dtype=np.uint8)
    y = np.arange(40) % 2
    x[y == 1, :5] = 255  # class 1: a bright top half
    np.savez(tmp_path / "d.npz", x_train=x[:30], y_train=y[:30], x_test=x[30:], y_test=y[30:])
    run = monotile.train("vision", "digits", out=tmp_path / "run", data=tmp_path / "d.npz",
                         overrides=dict(TINY, max_steps="20", channels="3", image_size="8",
                                        stem="patch", patch_size="2"),
                         quiet=True)
    assert run.model.patch_emb.proj.in_features == 3 * 2 * 2
    assert run.state["last_eval"]["test_images"] == 10


def test_digits_preset_learns(tmp_path):
    """A short run of the digits preset on its stratified 80/20 split: far above chance."""
    run = monotile.train("vision", "digits", out=tmp_path / "run",
                         overrides={"max_steps": 300, "eval_interval": 300}, quiet=True)
    assert run.state["last_eval"]["accuracy"] >= 0.93


def test_vision_resume_is_bit_identical(tmp_path):
    over = dict(TINY, max_steps="40", eval_interval="20", ema="0.9", drop_path="0.1",
                rotate="10", shift="0.1")
    straight = monotile.train("vision", "digits", out=tmp_path / "a", overrides=over,
                              quiet=True)
    monotile.train("vision", "digits", out=tmp_path / "b", overrides=over, quiet=True,
                   until_step=20)
    resumed = monotile.resume(tmp_path / "b", quiet=True)
    for name in ("model.safetensors", "ema.safetensors"):
        from safetensors.torch import load_file
        a, b = load_file(tmp_path / "a" / name), load_file(tmp_path / "b" / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert resumed.state["step"] == straight.state["step"] == 40


# ---- the command line, on MNIST files -------------------------------------------------------

@pytest.fixture(scope="session")
def mnist_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "mnist"
    over = dict(TINY, max_steps="400", eval_interval="400", batch_size="64")
    proc = cli("train", "vision", "--preset", "mnist", "--out", str(out), "--quiet",
               *set_args(over))
    assert proc.returncode == 0, proc.stderr
    return out


def test_cli_predict_on_real_png_files(mnist_run, tmp_path):
    sample = find_data("mnist/test_png_sample")
    out_csv = tmp_path / "preds.csv"
    proc = cli("predict", str(mnist_run), str(sample), "--top-k", "3", "--json",
               "--output", str(out_csv))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert len(result["predictions"]) == 300 and result["labelled"] == 300
    assert result["accuracy"] > 0.6  # a 400-step model; the preset's figure is in bench/
    first = result["predictions"][0]
    assert len(first["labels"]) == 3 and abs(sum(first["probs"]) - 1) < 0.5
    assert first["probs"] == sorted(first["probs"], reverse=True)
    rows = out_csv.read_text().splitlines()
    assert rows[0] == "path,label_1,prob_1,label_2,prob_2,label_3,prob_3,true"
    assert len(rows) == 301
    text = cli("predict", str(mnist_run), str(sample / "7"))
    assert text.returncode == 0 and "accuracy" in text.stdout
    # the CLI lays the weights out for this CPU: the same classes as the model as loaded;
    # int8 weights keep the accuracy within two points
    import monotile
    plain = monotile.load(mnist_run).predict([str(sample)], top_k=1)["predictions"]
    assert [p["labels"][0] for p in plain] == [p["labels"][0] for p in result["predictions"]]
    int8 = cli("predict", str(mnist_run), str(sample), "--json", "--dtype", "int8")
    assert int8.returncode == 0, int8.stderr
    assert abs(json.loads(int8.stdout)["accuracy"] - result["accuracy"]) <= 0.02


def test_cli_eval_prints_per_class_figures_and_a_confusion_matrix(mnist_run):
    proc = cli("eval", str(mnist_run), "--json")
    assert proc.returncode == 0, proc.stderr
    figures = json.loads(proc.stdout)
    assert figures["test_images"] == 10000
    assert set(figures["per_class"]) == {str(i) for i in range(10)}
    assert math.isclose(sum(c["support"] for c in figures["per_class"].values()), 10000)
    assert (mnist_run / "plots" / "confusion.png").exists()
    on_files = cli("eval", str(mnist_run), "--data", str(find_data("mnist/test_png_sample")),
                   "--json")
    assert on_files.returncode == 0, on_files.stderr
    assert json.loads(on_files.stdout)["test_images"] == 300


def test_a_broken_file_in_a_folder_is_skipped(mnist_run, tmp_path):
    sample = find_data("mnist/test_png_sample/4")
    folder = tmp_path / "mixed"
    folder.mkdir()
    for p in sorted(sample.iterdir())[:5]:
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    proc = cli("predict", str(mnist_run), str(folder), "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert len(result["predictions"]) == 5
    assert [s["path"] for s in result["skipped"]] == [str(folder / "broken.png")]
    assert "broken.png" in proc.stderr


def _one_line_error(proc, *words):
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for word in words:
        assert word in lines[0], lines[0]


def test_bad_images_given_alone_are_refused(mnist_run, tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("this is not an image")
    _one_line_error(cli("predict", str(mnist_run), str(text)), "notes.png", "not a readable")
    good = next(find_data("mnist/test_png_sample/1").iterdir()).read_bytes()
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(good[: len(good) // 2])
    _one_line_error(cli("predict", str(mnist_run), str(truncated)), "cut.png")
    empty = tmp_path / "empty"
    empty.mkdir()
    _one_line_error(cli("predict", str(mnist_run), str(empty)), "no image files")
    _one_line_error(cli("predict", str(mnist_run), str(tmp_path / "nothing.png")),
                    "does not exist")


def test_bad_training_data_is_refused_and_nothing_is_written(tmp_path, digit_folder):
    cases = []
    empty = tmp_path / "empty"
    empty.mkdir()
    cases.append((empty, "empty"))
    x = np.zeros((4, 8, 8), np.uint8)
    np.savez(tmp_path / "missing.npz", x_train=x, y_train=np.zeros(4))
    cases.append((tmp_path / "missing.npz", "x_test"))
    np.savez(tmp_path / "lengths.npz", x_train=x, y_train=np.zeros(3), x_test=x,
             y_test=np.zeros(4))
    cases.append((tmp_path / "lengths.npz", "same length"))
    for data, word in cases:
        out = tmp_path / f"run-{data.stem}"
        _one_line_error(cli("train", "vision", "--preset", "digits", "--data", str(data),
                            "--out", str(out)), word)
        assert not out.exists()
    _one_line_error(cli("train", "vision", "--preset", "digits", "--set", "patch_size=3"),
                    "patch_size")
    _one_line_error(cli("train", "vision", "--preset", "digits", "--set", "positions=rope"),
                    "positions")


def test_eval_on_a_folder_of_other_classes_is_refused(mnist_run, tmp_path):
    folder = tmp_path / "animals"
    for name in ("cat", "dog"):
        (folder / name).mkdir(parents=True)
        Image.new("L", (28, 28), 128).save(folder / name / "a.png")
    _one_line_error(cli("eval", str(mnist_run), "--data", str(folder)), "cat", "not the model")
