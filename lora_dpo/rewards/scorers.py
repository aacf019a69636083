"""Reward models that score (prompt, image) pairs: the `Scorer` protocol, the CLIP-family `ClipScorer`
(PickScore, HPS v2, CLIP score), the LAION `AestheticScorer` and its `AestheticMLP` head, the demo's
`ShapesScorer` (pixels only, no weights), and the `KIND[@SOURCE][:WEIGHT]` specs that build them
(`parse_scorer_spec`, `build_scorer`, `build_scorers`).

Score conventions (per image given its prompt, higher is better):

* ``pickscore``: ``logit_scale.exp() * cos(image, text)``, as in the PickScore reference code (~20).
* ``hps``: ``100 * cos(image, text)``. The official HPS v2 code returns the raw cosine (~0.27) and its
  benchmark tables report it x100; x100 puts it on the CLIP/PickScore scale. Rankings are unaffected.
* ``clip``: ``100 * cos(image, text)``, *not* clipped at 0 as torchmetrics' CLIPScore is: clipping only
  turns distinct negative scores into artificial ties, and only the ranking matters here.
* ``aesthetic``: LAION improved-aesthetic-predictor output (~1-10) on the L2-normalised CLIP ViT-L/14
  image embedding; the prompt is ignored.
* ``shapes``: the offline demo's built-in judge (~0-3, no download): how close the shape's colour is to the
  prompt's colour word, how bright the background is, whether one shape stands out, minus pixel clutter.
* ``brightness``: the image's mean brightness (0-1), the prompt ignored. A scorer made to be gamed: what an
  adapter trained on it learns (wash everything out), and how far the reference keeps it from the base, is the
  reward-hacking check of docs/ai-feedback.md.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from transformers import CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPVisionModelWithProjection

from lora_dpo import hub, synthetic
from lora_dpo.rewards.errors import RewardError

SCORER_KINDS: tuple[str, ...] = ("pickscore", "hps", "clip", "aesthetic", "shapes", "brightness")
LAION_VIT_H14 = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
OPENAI_VIT_L14 = "openai/clip-vit-large-patch14"
# hps has no default: the official weights are an open_clip pickle that has to be converted first;
# aesthetic has none because LAION publishes its MLP only as a .pth pickle.
DEFAULT_SOURCES: dict[str, str | None] = {
    "pickscore": "yuvalkirstain/PickScore_v1", "clip": LAION_VIT_H14, "hps": None, "aesthetic": None,
    "shapes": None, "brightness": None,
}
# What one score means, for reports (the conventions above, in a reader's words): a win rate compares images of
# one prompt; a mean difference is in these units, so differences of two scorers are not comparable.
UNITS: dict[str, str] = {
    "pickscore": "PickScore: the model's logit scale x the cosine of image and prompt (around 20); higher is the "
                 "image people would more likely pick, and only differences between images of one prompt mean much",
    "hps": "HPS v2: 100 x the cosine of image and prompt (around 27, the unit of HPS v2's benchmark tables); higher "
           "is the image people would more likely prefer",
    "clip": "CLIP score: 100 x the cosine of image and prompt, not clipped at 0; higher matches the prompt better, "
            "which is not the same as a better image",
    "aesthetic": "LAION aesthetic predictor: a rating of the image alone on a 1-10 scale (the prompt is ignored)",
    "shapes": "the demo's pixel judge, about 0-3: colour match + background brightness + one clear shape - clutter",
    "brightness": "the image's mean brightness, 0 (black) to 1 (white); the prompt is ignored",
}
_CLIP_KINDS = ("pickscore", "hps", "clip")
_PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt")
_SPEC_HELP = (f"expected KIND[@SOURCE][:WEIGHT] with KIND one of {', '.join(SCORER_KINDS)} "
              "(e.g. 'pickscore', 'aesthetic@owner/repo/mlp.safetensors:0.3', 'hps@/models/hps-v2-hf:1')")


@runtime_checkable
class Scorer(Protocol):
    """Anything that scores (prompt, image) pairs; ``name`` becomes the parquet column suffix. The built-in ones
    also say what a score means (``unit``, from ``UNITS``), which reports print; a scorer of your own may not."""

    name: str

    def score(self, prompts: list[str], images: list[Image.Image]) -> torch.Tensor:
        """Return a float tensor [N] on CPU, higher = better, computed without autograd."""
        ...


def _embedding(output: Any) -> torch.Tensor:
    """The projected embedding, whether transformers returned a tensor (v4) or an output object (v5)."""
    if isinstance(output, torch.Tensor):
        return output
    image_embeds = getattr(output, "image_embeds", None)  # CLIPVisionModelWithProjection
    return image_embeds if image_embeds is not None else output.pooler_output


def _unit(x: torch.Tensor) -> torch.Tensor:
    """L2-normalise in float32 so fp16/bf16 models do not lose the cosine's precision."""
    return nn.functional.normalize(x.float(), dim=-1)


@torch.no_grad()
def _chunked(fn: Callable[[list[str], list[Image.Image]], torch.Tensor], prompts: list[str],
             images: list[Image.Image], batch_size: int) -> torch.Tensor:
    """Score in chunks of ``batch_size`` so one big call cannot run out of memory."""
    if len(prompts) != len(images):
        raise RewardError(f"got {len(prompts)} prompts but {len(images)} images")
    rgb = [im if im.mode == "RGB" else im.convert("RGB") for im in images]
    out = [fn(prompts[i:i + batch_size], rgb[i:i + batch_size]) for i in range(0, len(rgb), batch_size)]
    return torch.cat(out).float().cpu() if out else torch.empty(0)


def _reject_open_clip(source: str) -> None:
    """Fail early with the fix, instead of with a confusing from_pretrained error."""
    path = Path(source)
    open_clip_dir = path.is_dir() and not (path / "config.json").is_file() and any(path.glob("*.pt"))
    if path.suffix in _PICKLE_SUFFIXES or open_clip_dir:
        raise RewardError(
            f"{source!r} looks like an open_clip checkpoint (HPS v2 ships as HPS_v2_compressed.pt); "
            "ClipScorer needs a transformers-format CLIP (config.json + model.safetensors). Convert the "
            "open_clip weights to transformers' CLIPModel layout first and pass that directory.")


def _processor_source(kind: str, source: str) -> str:
    """PickScore and HPS v2 are fine-tuned ViT-H-14s: they share LAION's tokenizer and preprocessing."""
    if kind == "pickscore" and source == DEFAULT_SOURCES["pickscore"]:
        return LAION_VIT_H14
    path = Path(source)
    has_processor = any((path / f).is_file() for f in ("processor_config.json", "preprocessor_config.json"))
    return LAION_VIT_H14 if path.is_dir() and not has_processor else source


class ClipScorer:
    """CLIP-family text-image scorer: PickScore, HPS v2 or plain CLIP score (see the module docstring).

    Pass ``model`` + ``processor`` to use objects already in memory; otherwise both come from
    ``from_pretrained(source)`` (the processor from ``processor_source`` if given). ``kind="hps"`` needs a
    ``source``: the official HPS v2 weights are an open_clip ``.pt`` file and must first be converted to a
    transformers CLIP checkpoint.
    """

    def __init__(self, kind: str = "pickscore", source: str | Path | None = None, *,
                 model: CLIPModel | None = None, processor: CLIPProcessor | None = None,
                 processor_source: str | None = None, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, batch_size: int = 32, name: str | None = None) -> None:
        if kind not in _CLIP_KINDS:
            raise RewardError(f"ClipScorer kind must be one of {', '.join(_CLIP_KINDS)}, got {kind!r}")
        if model is None or processor is None:
            src = str(source or DEFAULT_SOURCES[kind] or "")
            if not src:
                raise RewardError(f"scorer {kind!r} needs a source: a transformers-format CLIP id or path "
                                 f"(spec '{kind}@PATH'); the official HPS v2 .pt must be converted first")
            _reject_open_clip(src)
            model = model or CLIPModel.from_pretrained(src)
            processor_source = processor_source or _processor_source(kind, src)
            processor = processor or CLIPProcessor.from_pretrained(processor_source)
        self.kind, self.name, self.batch_size, self.unit = kind, name or kind, batch_size, UNITS[kind]
        self.device, self.dtype = torch.device(device), dtype
        self.model, self.processor = model.to(device=self.device, dtype=dtype).eval(), processor
        # Pad every caption to the full context so a score never depends on what it was batched with.
        self.max_length = int(model.config.text_config.max_position_embeddings)

    def score(self, prompts: list[str], images: list[Image.Image]) -> torch.Tensor:
        return _chunked(self._score, prompts, images, self.batch_size)

    def _score(self, prompts: list[str], images: list[Image.Image]) -> torch.Tensor:
        text = self.processor.tokenizer(list(prompts), padding="max_length", truncation=True,
                                        max_length=self.max_length, return_tensors="pt").to(self.device)
        pixels = self.processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
        pixels = pixels.to(self.device, self.dtype)
        image_emb = _unit(_embedding(self.model.get_image_features(pixel_values=pixels)))
        text_emb = _unit(_embedding(self.model.get_text_features(input_ids=text["input_ids"],
                                                                 attention_mask=text["attention_mask"])))
        scale = self.model.logit_scale.exp().float() if self.kind == "pickscore" else 100.0
        return scale * (image_emb * text_emb).sum(-1)  # [N]


class AestheticMLP(nn.Module):
    """LAION improved-aesthetic-predictor head. Layer indices match its state dict (``layers.0``, ``.2``,
    ``.4``, ``.6``, ``.7``) so converted weights load unchanged; like the original it has no activations,
    and the dropouts only act in training."""

    def __init__(self, dims: Sequence[int] = (768, 1024, 128, 64, 16, 1)) -> None:
        super().__init__()
        if len(dims) != 6:
            raise RewardError(f"AestheticMLP needs 6 layer widths, got {list(dims)}")
        d = list(dims)
        self.layers = nn.Sequential(
            nn.Linear(d[0], d[1]), nn.Dropout(0.2), nn.Linear(d[1], d[2]), nn.Dropout(0.2),
            nn.Linear(d[2], d[3]), nn.Dropout(0.1), nn.Linear(d[3], d[4]), nn.Linear(d[4], d[5]))

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(embeddings)

    @classmethod
    def from_safetensors(cls, path: str | Path) -> AestheticMLP:
        """Widths are read from the file, so the same class serves other backbones and tiny test heads."""
        state = load_file(str(path))
        try:
            widths = [state[f"layers.{i}.weight"].shape[0] for i in (0, 2, 4, 6, 7)]
            mlp = cls([state["layers.0.weight"].shape[1], *widths])
        except KeyError as err:
            raise RewardError(f"{path} is not an improved-aesthetic-predictor state dict (no {err})") from None
        mlp.load_state_dict(state)
        return mlp.eval()


def resolve_weights_file(source: str | Path) -> Path:
    """A local file, or ``owner/repo/path/in/repo.safetensors`` fetched (and cached) from the HF hub."""
    path = Path(source)
    if path.suffix in _PICKLE_SUFFIXES:
        raise RewardError(f"{source!r} is a pickle checkpoint and only safetensors are loaded; convert it "
                         "once with safetensors.torch.save_file(torch.load(p, weights_only=True), out_path)")
    if path.is_file():
        return path
    parts = str(source).split("/")
    if len(parts) >= 3 and not path.is_absolute() and not str(source).startswith("."):
        from huggingface_hub import hf_hub_download  # lazy: only hub files need it

        return Path(hf_hub_download(repo_id="/".join(parts[:2]), filename="/".join(parts[2:])))
    raise RewardError(f"aesthetic weights {source!r}: no such local file, and not 'owner/repo/file'")


class AestheticScorer:
    """LAION aesthetic score: CLIP image embedding, L2-normalised, through :class:`AestheticMLP`.

    ``model`` may be a ``CLIPVisionModelWithProjection`` (the default load: no text tower needed) or a full
    ``CLIPModel``; ``processor`` a ``CLIPImageProcessor`` or a ``CLIPProcessor``.
    """

    def __init__(self, weights: str | Path | AestheticMLP, clip_source: str = OPENAI_VIT_L14, *,
                 model: CLIPModel | CLIPVisionModelWithProjection | None = None,
                 processor: CLIPImageProcessor | CLIPProcessor | None = None,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, batch_size: int = 32,
                 name: str = "aesthetic") -> None:
        if not isinstance(weights, AestheticMLP):
            weights = AestheticMLP.from_safetensors(resolve_weights_file(weights))
        model = model or CLIPVisionModelWithProjection.from_pretrained(clip_source)
        processor = processor or CLIPImageProcessor.from_pretrained(clip_source)
        in_dim = weights.layers[0].in_features
        if model.config.projection_dim != in_dim:
            raise RewardError(f"aesthetic MLP expects {in_dim}-d embeddings but the CLIP model projects to "
                             f"{model.config.projection_dim}-d (LAION's head needs CLIP ViT-L/14)")
        self.name, self.batch_size, self.device, self.dtype = name, batch_size, torch.device(device), dtype
        self.unit = UNITS["aesthetic"]
        self.mlp = weights.to(self.device).eval()  # stays float32: it is tiny, so precision is free
        self.model = model.to(device=self.device, dtype=dtype).eval()
        self.image_processor = getattr(processor, "image_processor", processor)

    def score(self, prompts: list[str], images: list[Image.Image]) -> torch.Tensor:
        return _chunked(self._score, prompts, images, self.batch_size)

    def _score(self, prompts: list[str], images: list[Image.Image]) -> torch.Tensor:
        pixels = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        pixels = pixels.to(self.device, self.dtype)
        if isinstance(self.model, CLIPModel):
            features = self.model.get_image_features(pixel_values=pixels)
        else:
            features = self.model(pixel_values=pixels)
        return self.mlp(_unit(_embedding(features))).squeeze(-1)  # [N]


class ShapesScorer:
    """The shapes demo's judge, from pixels alone (no weights, no download): what `synthetic` prefers. Per image:

    * colour: 1 - distance of the shape's mean colour to the prompt's colour word (`synthetic.COLOURS`), in
      RGB on [0, 1] scaled by 0.6 and floored at 0; 0.5 when the prompt names no colour;
    * brightness: the background's mean brightness (the border pixels), 0..1;
    * shape: 1 when 5-70 % of the pixels stand apart from the background, falling off linearly outside;
    * clutter: 4 x the mean absolute difference of neighbouring background pixels (noise), subtracted.

    Images are scored at 64 px, so a score does not depend on the resolution it was generated at."""

    SIZE = 64

    def __init__(self, name: str = "shapes") -> None:
        self.name, self.unit = name, UNITS["shapes"]

    def score(self, prompts: list[str], images: list[Image.Image]) -> torch.Tensor:
        if len(prompts) != len(images):
            raise ValueError(f"got {len(prompts)} prompts but {len(images)} images")
        return torch.tensor([self._score(p, im) for p, im in zip(prompts, images, strict=True)], dtype=torch.float32)

    @staticmethod
    def target_colour(prompt: str) -> torch.Tensor | None:
        words = re.findall(r"[a-z]+", prompt.lower())
        colour = next((synthetic.COLOURS[w] for w in words if w in synthetic.COLOURS), None)
        return None if colour is None else torch.tensor(colour, dtype=torch.float32) / 255.0

    def _score(self, prompt: str, image: Image.Image) -> float:
        rgb = image.convert("RGB").resize((self.SIZE, self.SIZE), Image.Resampling.BILINEAR)
        pixels = torch.tensor(np.asarray(rgb), dtype=torch.float32) / 255.0  # (64, 64, 3)
        border = torch.cat([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]])
        background = border.median(dim=0).values
        apart = (pixels - background).norm(dim=-1) > 0.2  # the shape: pixels far from the background colour
        share = float(apart.float().mean())
        shape = 1.0 - max(0.0, 0.05 - share) / 0.05 - max(0.0, share - 0.7) / 0.3
        target = self.target_colour(prompt)
        if target is None:
            colour = 0.5
        elif apart.any():
            colour = max(0.0, 1.0 - float((pixels[apart].mean(dim=0) - target).norm()) / 0.6)
        else:
            colour = 0.0
        steps = torch.cat([(pixels[1:] - pixels[:-1]).abs().sum(-1)[~(apart[1:] | apart[:-1])],
                           (pixels[:, 1:] - pixels[:, :-1]).abs().sum(-1)[~(apart[:, 1:] | apart[:, :-1])]])
        clutter = 4.0 * float(steps.mean()) / 3.0 if len(steps) else 0.0
        return colour + float(background.mean()) + shape - clutter


class BrightnessScorer:
    """The mean brightness of the image's pixels on [0, 1], whatever the prompt: a reward that is easy to game."""

    def __init__(self, name: str = "brightness") -> None:
        self.name, self.unit = name, UNITS["brightness"]

    def score(self, prompts: list[str], images: list[Image.Image]) -> torch.Tensor:
        if len(prompts) != len(images):
            raise ValueError(f"got {len(prompts)} prompts but {len(images)} images")
        return torch.tensor([float(np.asarray(im.convert("L"), dtype=np.float32).mean()) / 255.0 for im in images],
                            dtype=torch.float32)


def parse_scorer_spec(spec: str) -> tuple[str, str | None, float]:
    """``KIND[@SOURCE][:WEIGHT]`` -> (kind, source or None, weight); ``=`` works in place of ``@``.

    The weight is only split off the last ``:`` when it parses as a number, so ``C:\\...`` paths survive.
    """
    text, weight = spec.strip(), 1.0
    head, colon, tail = text.rpartition(":")
    if colon:
        try:
            weight, text = float(tail), head
        except ValueError:
            if not re.search(r"[@=]", head):
                raise RewardError(f"bad weight {tail!r} in scorer spec {spec!r}; {_SPEC_HELP}") from None
    cut = re.search(r"[@=]", text)
    kind, sep, source = (text[:cut.start()], cut[0], text[cut.end():]) if cut else (text, "", "")
    kind, source = kind.strip().lower(), source.strip()
    if kind not in SCORER_KINDS:
        raise RewardError(f"unknown scorer kind {kind!r} in spec {spec!r}; {_SPEC_HELP}")
    if sep and not source:
        raise RewardError(f"empty source after {sep!r} in scorer spec {spec!r}; {_SPEC_HELP}")
    if not math.isfinite(weight) or weight <= 0:
        raise RewardError(f"weight must be a positive finite number in scorer spec {spec!r}; {_SPEC_HELP}")
    return kind, source or None, weight


def build_scorer(kind: str, source: str | None = None, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> Scorer:
    """Factory behind the specs: ``source`` is a CLIP id or dir, or the MLP weights for ``aesthetic``. Every
    failure is a `RewardError` naming the scorer: a wrong path or an offline hub reaches the user as one line."""
    shown = source or DEFAULT_SOURCES.get(kind)
    # offline, the hub libraries fail at once (cached weights still load) instead of retrying for a minute
    online = kind in ("shapes", "brightness") or shown is None or not hub.is_hub_id(shown) or hub.prepare()
    try:
        return _build_scorer(kind, source, device, dtype)
    except RewardError:
        raise
    except (OSError, ValueError, SafetensorError) as err:  # from_pretrained, the hub, a damaged weights file
        if not online:
            raise hub.unavailable(str(shown), f"the {kind} scorer") from None
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise RewardError(f"scorer {kind!r} from {shown!r}: cannot load it ({first})") from None


def _build_scorer(kind: str, source: str | None, device: str | torch.device, dtype: torch.dtype) -> Scorer:
    """Factory behind the specs: ``source`` is a CLIP id or dir, or the MLP weights for ``aesthetic``;
    ``shapes`` takes none."""
    if kind in ("shapes", "brightness"):
        if source is not None:
            raise RewardError(f"the {kind} scorer is built in and takes no source (got {source!r}); use {kind!r}")
        return ShapesScorer() if kind == "shapes" else BrightnessScorer()
    if kind == "aesthetic":
        if source is None:
            raise RewardError("the aesthetic scorer needs its MLP weights: 'aesthetic@PATH.safetensors' or "
                             "'aesthetic@owner/repo/file.safetensors'")
        return AestheticScorer(source, device=device, dtype=dtype)
    if kind in _CLIP_KINDS:
        return ClipScorer(kind, source, device=device, dtype=dtype)
    raise RewardError(f"unknown scorer kind {kind!r}; valid kinds: {', '.join(SCORER_KINDS)}")


def build_scorers(specs: Iterable[str], device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32) -> list[tuple[Scorer, float]]:
    """Parse and build several specs, e.g. ``["pickscore:0.7", "aesthetic@mlp.safetensors:0.3"]``. Every spec is
    parsed before any model loads: a typo in the last one fails at once."""
    parsed = [parse_scorer_spec(spec) for spec in specs]
    return [(build_scorer(kind, source, device, dtype), weight) for kind, source, weight in parsed]
