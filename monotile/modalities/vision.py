"""Images: patches become tokens, the trunk runs bidirectionally, a head reads the CLS token.

Patches:   an image (C, H, W) is cut into N = (H/p)(W/p) patches of C p^2 pixels, and
           token_i = W_e patch_i + b_e      (a p x p convolution with stride p, as unfold + Linear)
Tokens:    z = [cls; token_1 ... token_N] + E_pos                     (Dosovitskiy et al. 2021)
Head:      logits = W_h z_L[cls]  (pool="cls") or W_h mean_i z_L[i]  (pool="mean")
Loss:      cross-entropy against (1 - eps) onehot(y) + eps / K  (label smoothing eps, K classes)
Positions: E_pos is learned on the (H/p, W/p) grid; at another image size it is resized
           bicubically to the new grid (the CLS position is kept), as timm and transformers do.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..core.transformer import ModelConfig, Transformer, init_weights
from ..data import find_data
from ..errors import ConfigError, DataError, check_positive, invalid
from .base import TaskBase, register
from .metrics import confusion_matrix, per_class_figures
from .vision_io import BUILTIN, IMAGE_SUFFIXES, load_image_data, read_image


@dataclass(frozen=True, kw_only=True)
class VisionConfig:
    data: str = "mnist"           # digits | mnist | a path: .npz, a folder of class folders, .csv
    image_size: int = 28          # images are resized to image_size x image_size
    channels: int = 1             # 1 (grey) or 3 (RGB)
    patch_size: int = 4
    stem: str = "patch"           # patch: one linear map per patch (ViT) | conv: 3x3 stride-2
                                  #   convolutions down to the patch grid (Xiao et al. 2021)
    pool: str = "cls"             # cls | mean
    fit: str = "squash"           # another shape becomes square by: squash | crop | pad
    val_fraction: float = 0.2     # held out (stratified) when the data has no test split
    split_seed: int = 0
    rotate: float = 0.0           # augmentation: random rotation up to +-rotate degrees,
    shift: float = 0.0            #   translation up to +-shift of the image size,
    scale: float = 0.0            #   zoom by a factor in [1 - scale, 1 + scale],
    flip: bool = False            #   horizontal flips (not for digits or text)
    label_smoothing: float = 0.0
    eval_batch_size: int = 500
    labels: tuple = ()            # class names, filled from the data at train time
    mean: tuple = ()              # per-channel pixel mean and std of the training images,
    std: tuple = ()               #   filled from the data at train time

    def __post_init__(self):
        for name in ("labels", "mean", "std"):  # config.json gives lists
            object.__setattr__(self, name, tuple(getattr(self, name)))

        check_positive(self, ("image_size", "patch_size", "eval_batch_size"))
        if self.image_size % self.patch_size:
            invalid(self, "patch_size", f"it must divide image_size={self.image_size}")
        if self.channels not in (1, 3):
            invalid(self, "channels", "choose 1 (grey) or 3 (RGB)")
        if self.stem not in ("patch", "conv"):
            invalid(self, "stem", "choose patch or conv")
        if self.stem == "conv" and self.patch_size & (self.patch_size - 1):
            invalid(self, "patch_size", "a conv stem halves the image per layer: use a power of 2")
        if self.pool not in ("cls", "mean"):
            invalid(self, "pool", "choose cls or mean")
        if self.fit not in ("squash", "crop", "pad"):
            invalid(self, "fit", "choose squash, crop or pad")
        if not 0 < self.val_fraction < 1:
            invalid(self, "val_fraction", "it must be in (0, 1)")
        if self.rotate < 0 or not 0 <= self.shift < 1 or not 0 <= self.scale < 1:
            invalid(self, "rotate" if self.rotate < 0 else
                    "shift" if not 0 <= self.shift < 1 else "scale",
                "rotate must be >= 0 degrees, shift and scale in [0, 1)")
        if not 0 <= self.label_smoothing < 1:
            invalid(self, "label_smoothing", "it must be in [0, 1)")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def n_tokens(self) -> int:
        return self.grid ** 2 + (self.pool == "cls")


# ---- the model ----------------------------------------------------------------------------

def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, (H/p)(W/p), C p p): patches in row-major order, each flattened
    channel-major, the layout of Conv2d(C, d, p, stride=p).weight.flatten(1)."""
    B, C, H, W = images.shape
    if H % patch or W % patch:
        raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {patch}")
    return F.unfold(images, patch, stride=patch).transpose(1, 2)


def resample_pos_emb(pos: torch.Tensor, old: tuple[int, int], new: tuple[int, int],
                     n_prefix: int) -> torch.Tensor:
    """(1, n_prefix + h w, d) -> (1, n_prefix + h' w', d): the grid part resized bicubically
    from (h, w) to (h', w') (align_corners=False); prefix (CLS) positions are kept."""
    if tuple(old) == tuple(new):
        return pos
    prefix, grid = pos[:, :n_prefix], pos[:, n_prefix:]
    d = grid.size(-1)
    grid = grid.reshape(1, old[0], old[1], d).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=tuple(new), mode="bicubic", align_corners=False)
    grid = grid.to(pos.dtype).permute(0, 2, 3, 1).reshape(1, new[0] * new[1], d)
    return torch.cat([prefix, grid], dim=1)


class ConvStem(nn.Module):
    """log2(p) convolutions 3x3, stride 2, padding 1, each followed by GELU, then a linear map
    to d: (B, C, H, W) -> (B, (H/p)(W/p), d), the token grid of p x p patches, but each token
    sees an overlapping neighbourhood (Xiao et al. 2021, "Early convolutions help
    transformers see better"; CCT, Hassani et al. 2021)."""

    def __init__(self, channels: int, patch_size: int, d: int):
        super().__init__()
        layers, c = [], channels
        for i in range(int(math.log2(patch_size))):
            out = max(8, d // 2 ** (int(math.log2(patch_size)) - i))  # widths double to d/2
            layers += [nn.Conv2d(c, out, 3, stride=2, padding=1), nn.GELU()]
            c = out
        self.convs = nn.Sequential(*layers)
        self.proj = nn.Linear(c, d)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(self.convs(images).flatten(2).transpose(1, 2))


class PatchEmbedding(nn.Module):
    """token_i = W_e patch_i + b_e, patches of p x p pixels (patchify)."""

    def __init__(self, channels: int, patch_size: int, d: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Linear(channels * patch_size ** 2, d)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(patchify(images, self.patch_size))


class ImageClassifier(nn.Module):
    """Patch embedding + learned 2-D positions -> bidirectional trunk -> class head (ViT)."""

    def __init__(self, cfg: ModelConfig, *, channels: int, image_size: int, patch_size: int,
                 num_classes: int, pool: str = "cls", stem: str = "patch"):
        super().__init__()
        self.patch_size, self.grid, self.pool = patch_size, image_size // patch_size, pool
        d = cfg.d_model
        self.patch_emb = (PatchEmbedding if stem == "patch" else ConvStem)(channels, patch_size, d)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d)) if pool == "cls" else None
        self.n_prefix = int(pool == "cls")
        self.pos_emb = nn.Parameter(torch.zeros(1, self.n_prefix + self.grid ** 2, d))
        self.trunk = Transformer(cfg)
        self.head = nn.Linear(d, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W), normalised, H and W multiples of the patch size -> logits (B, K)."""
        if images.size(2) % self.patch_size or images.size(3) % self.patch_size:
            raise ValueError(f"image size {tuple(images.shape[2:])} is not a multiple of the "
                             f"patch size {self.patch_size}")
        x = self.patch_emb(images)  # (B, N, d)
        h, w = images.size(2) // self.patch_size, images.size(3) // self.patch_size
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.size(0), -1, -1), x], dim=1)
        x = x + resample_pos_emb(self.pos_emb, (self.grid, self.grid), (h, w), self.n_prefix)
        x = self.trunk(x, causal=False)
        return self.head(x[:, 0] if self.cls_token is not None else x.mean(dim=1))



# ---- the task -----------------------------------------------------------------------------

@register
class VisionTask(TaskBase):
    """Image classification: a ViT on the shared trunk, evaluated by accuracy on held-out images."""

    name = "vision"
    Config = VisionConfig
    best_metric = ("accuracy", "max")
    what = "image"
    suffixes = IMAGE_SUFFIXES
    routes = ("classifications",)

    @property
    def inference_rows(self) -> int:
        """An image is its patches (and class token) at once."""
        return self.config.n_tokens

    def __init__(self, config: VisionConfig):
        self.config = config
        self._splits: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    # ---- setting up -------------------------------------------------------------------------
    @classmethod
    def prepare(cls, config: VisionConfig, model_cfg: ModelConfig, data: str | None = None):
        """Read the images, name the classes, measure the pixel statistics; returns the task and
        the model config with its sequence length filled in."""
        path = None
        if data is not None:
            path = find_data(config.data, data)
            config = dataclasses.replace(config, data=str(path))
        elif config.data not in BUILTIN:
            path = find_data(config.data)
        splits = load_image_data(config, path)
        labels = sorted(set(splits["train"][1]), key=_natural)
        unknown = sorted(set(splits["test"][1]) - set(labels))
        if unknown:
            raise DataError(f"test images have classes the training images lack: {unknown[:5]}; "
                            "every class needs training images")
        if len(labels) < 2:
            raise DataError(f"the data has {len(labels)} class; a classifier needs at least 2")
        x = splits["train"][0].float() / 255
        mean = x.mean(dim=(0, 2, 3)).tolist()
        std = x.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()
        config = dataclasses.replace(config, labels=tuple(labels), mean=tuple(mean),
                                     std=tuple(std))
        task = cls(config)
        task._set_splits(splits)
        return task, _model_config(config, model_cfg)

    def build_model(self, cfg: ModelConfig) -> nn.Module:
        c = self.config
        model = ImageClassifier(_model_config(c, cfg), channels=c.channels,
                                image_size=c.image_size, patch_size=c.patch_size,
                                num_classes=len(c.labels), pool=c.pool, stem=c.stem)
        # ViT's init (transformers' ViTPreTrainedModel): every weight N(0, 0.02), biases 0, no
        # smaller residual projections, a random head. On the digits split it learns far
        # faster than GPT-2's scaled residuals with a zero head (96 % vs 57 % after 300 steps).
        init_weights(model, cfg.n_layer, scaled_residuals=False)
        for layer in model.patch_emb.modules():
            if isinstance(layer, nn.Conv2d):  # a conv stem keeps its signal: He init
                nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
        return model

    # ---- data -------------------------------------------------------------------------------
    def _set_splits(self, splits: dict) -> None:
        index = {name: i for i, name in enumerate(self.config.labels)}
        for split, (x, names) in splits.items():
            unknown = sorted(set(names) - set(index), key=_natural)
            if unknown:
                raise DataError(f"classes {unknown[:5]} are not the model's classes "
                                f"({', '.join(self.config.labels[:12])}); give images of the "
                                "classes the model was trained on")
            self._splits[split] = (x, torch.tensor([index[n] for n in names]))

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        if not self._splits:
            if not self.config.data:
                raise DataError("this run has no data of its own (it was imported); give "
                                "images with --data FOLDER (a folder of class folders)")
            path = None if self.config.data in BUILTIN else find_data(self.config.data)
            self._set_splits(load_image_data(self.config, path))
        return self._splits[name]

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 or [0, 1] images -> (x - mean) / std per channel."""
        if images.dtype == torch.uint8:
            images = images.float() / 255
        mean = torch.tensor(self.config.mean, device=images.device)[None, :, None, None]
        std = torch.tensor(self.config.std, device=images.device)[None, :, None, None]
        return (images - mean) / std

    def augment(self, images: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
        """A random affine map per image (see `affine`): angle up to +-rotate degrees, zoom in
        [1 - scale, 1 + scale], shift up to +-shift of the image size, a mirror if flip."""
        c = self.config
        if not (c.rotate or c.shift or c.scale or c.flip):
            return images
        B = images.size(0)

        def uniform(*shape):
            return torch.rand(*shape, generator=rng) * 2 - 1
        angle = uniform(B) * math.radians(c.rotate)
        zoom = 1 + uniform(B) * c.scale
        shift = uniform(B, 2) * 2 * c.shift  # normalised coordinates span 2
        mirror = (torch.rand(B, generator=rng) < 0.5) if c.flip else torch.zeros(B, dtype=bool)
        return affine(images, angle, zoom, shift, mirror)

    def batches(self, split: str, rng: torch.Generator, batch_size: int
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Images drawn uniformly with replacement (so a run resumes exactly from the RNG
        state alone), augmented in training, normalised."""
        x, y = self.split(split)
        while True:
            idx = torch.randint(len(x), (batch_size,), generator=rng)
            images = x[idx].float() / 255
            if split == "train":
                images = self.augment(images, rng)
            yield self.normalise(images), y[idx]

    def loss(self, model, batch) -> torch.Tensor:
        images, y = batch
        return F.cross_entropy(model(images), y, label_smoothing=self.config.label_smoothing)

    def tokens(self, batch) -> int:
        return batch[0].size(0) * self.config.n_tokens

    # ---- metrics ----------------------------------------------------------------------------
    @torch.no_grad()
    def logits(self, model, images: torch.Tensor, progress: bool = False) -> torch.Tensor:
        """Logits for uint8 images (N, C, H, W), in batches of eval_batch_size."""
        device = next(model.parameters()).device
        bs = self.config.eval_batch_size
        out = [model(self.normalise(images[i:i + bs].to(device))).float().cpu()
               for i in tqdm(range(0, len(images), bs), disable=not progress, desc="eval",
                             unit="batch")]
        return torch.cat(out) if out else torch.zeros(0, len(self.config.labels))

    def evaluate(self, model, progress: bool = False) -> dict[str, float | int]:
        """Accuracy and mean cross-entropy (no smoothing) on the held-out images."""
        x, y = self.split("test")
        logits = self.logits(model, x, progress)
        return {"accuracy": (logits.argmax(1) == y).float().mean().item(),
                "loss": F.cross_entropy(logits, y).item(), "test_images": len(y)}

    def report(self, model, run_dir: Path, *, data: str | None = None,
               progress: bool = False) -> dict:
        """evaluate() plus per-class precision, recall and F1 and plots/confusion.png; on the
        run's test split, or on all images of `data` (a folder of class folders, .npz, CSV)."""
        if data is not None:
            path = Path(data).expanduser()
            if not path.exists():
                raise DataError(f"{path} does not exist; give a folder of class folders, an "
                                ".npz or a CSV of path,label")
            splits = load_image_data(self.config, path, split=False)
            task = VisionTask(self.config)
            task._set_splits({"test": splits["test"]})
            x, y = task._splits["test"]
        else:
            x, y = self.split("test")
        logits = self.logits(model, x, progress)
        pred = logits.argmax(1)
        K = len(self.config.labels)
        cm = confusion_matrix(y, pred, K)
        out = {"accuracy": (pred == y).float().mean().item(),
               "loss": F.cross_entropy(logits, y).item(), "test_images": len(y),
               **per_class_figures(cm, self.config.labels)}
        from ..train.plots import plot_confusion
        out["confusion_png"] = str(plot_confusion(Path(run_dir), cm, self.config.labels))
        return out

    # ---- using the model --------------------------------------------------------------------
    def read(self, source) -> torch.Tensor:
        """An image file (or its bytes) -> uint8 (channels, size, size) as the run sees it."""
        c = self.config
        if not isinstance(source, (bytes, bytearray)):
            source = Path(source).expanduser()
        return read_image(source, c.channels, c.image_size, c.fit)

    def predict(self, model, items: list[torch.Tensor], *, top_k: int = 3,
                progress: bool = False) -> list[dict]:
        """The top_k classes of each image, most probable first: {"labels", "probs"}."""
        if top_k <= 0:
            raise ConfigError(f"top_k={top_k} is invalid: it must be a positive integer")
        probs = torch.softmax(self.logits(model, torch.stack(items), progress), dim=-1)
        top = probs.topk(min(top_k, probs.size(1)), dim=-1)
        return [{"labels": [self.config.labels[j] for j in i], "probs": p}
                for p, i in zip(top.values.tolist(), top.indices.tolist())]

    def summarize(self, results: list[dict], sources: list, skipped: list[dict]) -> dict:
        """The predictions with their paths; an image in a folder named after a class has a
        known answer ("true"), and "accuracy" is over those (None when there are none)."""
        out = super().summarize(results, sources, skipped)
        right = known = 0
        for rec, source in zip(out["predictions"], sources):
            parent = Path(source).parent.name if isinstance(source, Path) else None
            if parent in self.config.labels:
                rec["true"] = parent
                known += 1
                right += rec["labels"][0] == parent
        return {**out, "accuracy": right / known if known else None, "labelled": known}

    def format_predictions(self, summary: dict, fmt: str = "text") -> str:
        lines = ["{}  {}".format(r["path"], "  ".join(f"{label} {p:.3f}" for label, p in
                                                      zip(r["labels"], r["probs"])))
                 for r in summary["predictions"]]
        if summary["accuracy"] is not None:
            lines.append(f"accuracy {summary['accuracy']:.2%} on the {summary['labelled']} "
                         "images in folders named after a class")
        return "\n".join(lines)

    def rows(self, summary: dict) -> tuple[list[str], list[list]]:
        """path, label_1, prob_1, ..., label_k, prob_k, true."""
        preds = summary["predictions"]
        k = max((len(r["labels"]) for r in preds), default=0)
        header = ["path", *[f"{c}_{i}" for i in range(1, k + 1) for c in ("label", "prob")],
                  "true"]
        return header, [[r["path"], *[v for pair in zip(r["labels"], (f"{p:.6f}" for p in
                                                                      r["probs"]))
                                      for v in pair], r.get("true", "")] for r in preds]

    # ---- explaining ---------------------------------------------------------------------------
    def example_inputs(self, model_cfg, batch: int, length: int | None):
        c = self.config
        return (torch.randn(batch, c.channels, c.image_size, c.image_size),), model_cfg.context

    def attention_inputs(self, item: torch.Tensor) -> tuple:
        return (self.normalise(item[None]),)

    def draw_attention(self, item, weights, outputs, title, *, top_k: int = 5):
        """The class token's attention over the patches (without one: the attention each
        patch receives, averaged over the queries), resized onto the image."""
        from ..train.plots import figure
        c = self.config
        grid = c.image_size // c.patch_size
        if c.pool == "cls":
            over, what = weights[0, 1:], "the class token's attention"
        else:
            over, what = weights.mean(0), "mean attention received"
        heat = F.interpolate(over.reshape(1, 1, grid, grid), size=(c.image_size, c.image_size),
                             mode="bilinear", align_corners=False)[0, 0]
        fig, axes = figure(8, 4, columns=2)
        shown = item.permute(1, 2, 0).numpy()
        shown, cmap = (shown.squeeze(-1), "gray") if c.channels == 1 else (shown, None)
        for ax in axes:
            ax.imshow(shown, cmap=cmap)
            ax.axis("off")
        axes[0].set_title("input", fontsize=9)
        axes[1].imshow(heat.numpy(), cmap="inferno", alpha=0.55)
        axes[1].set_title(f"{title}: {what}", fontsize=9)
        probs = outputs[0].float().softmax(-1)
        best = int(probs.argmax())
        return fig, {"grid": [grid, grid], "attention": over.reshape(grid, grid).tolist(),
                     "label": c.labels[best], "probability": float(probs[best])}

    def format_explanation(self, result: dict) -> str:
        return (super().format_explanation(result)
                + f"\n  predicted {result['label']} ({result['probability']:.1%})")


def affine(images: torch.Tensor, angle: torch.Tensor, zoom: torch.Tensor, shift: torch.Tensor,
           mirror: torch.Tensor) -> torch.Tensor:
    """Per image b, the output pixel at u (coordinates in [-1, 1], x right, y down) reads the
    input at R(angle_b) M_b u / zoom_b + shift_b, M_b = diag(-1, 1) if mirror_b; bilinear,
    zeros outside the image. images (B, C, H, W); angle, zoom (B,); shift (B, 2); mirror (B,)."""
    sign = 1.0 - 2.0 * mirror.float()
    cos, sin = angle.cos() / zoom, angle.sin() / zoom
    theta = torch.stack([torch.stack([cos * sign, -sin, shift[:, 0]], 1),
                         torch.stack([sin * sign, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros",
                         align_corners=False)


def _model_config(config: VisionConfig, model_cfg: ModelConfig) -> ModelConfig:
    """The trunk of an image model: no position table of its own (the encoder adds learned
    positions on the patch grid, which is what positions="learned" means here)."""
    if model_cfg.positions == "rope":
        raise ConfigError("positions='rope' is invalid for images: the patch embedding adds "
                          "its own learned 2-D positions; leave positions=none")
    return model_cfg.replace(context=config.n_tokens, vocab_size=0, positions="none")


def _natural(name: str):
    """Sort "2" before "10", and names after numbers."""
    return (0, int(name), "") if name.isdigit() else (1, 0, name)
