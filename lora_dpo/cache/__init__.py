"""The latent cache: every pair encoded once, so that training never loads the VAE or the text encoders.

A cache folder holds, as safetensors shards with a JSON note each and one `manifest.json`:
  train-NNNNN   latents_w, latents_l (n, C, h, w); time_ids_w, time_ids_l (n, 6) for SDXL; labels (n,);
                prompt_ids (n,): the training pairs, each as the live loader draws it in the first pass (key =
                its index: the same crop, flip and micro-conditioning)
  val-NNNNN     the held-out pairs, centre-cropped and unflipped, as validation sees them
  prompts-NNNNN prompt_embeds (m, S, D) and, for SDXL, pooled (m, P), one row per distinct prompt; row 0 is the
                empty prompt. Prompts are stored once: Pick-a-Pic v2 has ~59K prompts for ~850K pairs, and SDXL's
                embedding of one prompt (77 x 2048) is larger than the latents of both images at 1024 px.
Latents are the VAE posterior's mean, computed by the same `models.encode_images` the live path calls, so a cached
pair equals a live one to float tolerance. Later passes reuse the first pass's crop and flip where the live loader
would draw new ones (identical with `crop = "center"` and `random_flip = false`). Caption dropout is not baked in:
each draw decides it as the live loader does (`data.caption_dropped`) and then reads the empty prompt's row.

Modules, each importing only those above it:
  layout      the format number, manifest name, shard kinds and plan, `identity`, `save_shard`
  write       build_cache: encode the recipe's pairs and prompts, resumably, in parallel
  read        LatentCache, CachedPairs, collate_encoded, cached_datasets: a cache read for training
  throughput  measure_data_throughput, format_throughput, text_shapes: how fast each data path feeds the trainer
This package sits on the trainer's floor: it uses `data` (pairs), `models` (to encode) and `step` (`EncodedBatch`,
what it yields, and `make_accelerator`). It re-exports the names the CLI, the trainer and the tests use.
"""

from lora_dpo.cache.layout import MANIFEST
from lora_dpo.cache.read import LatentCache, cached_datasets
from lora_dpo.cache.throughput import format_throughput, measure_data_throughput, text_shapes
from lora_dpo.cache.write import build_cache

__all__ = ["MANIFEST", "LatentCache", "build_cache", "cached_datasets", "format_throughput", "measure_data_throughput",
           "text_shapes"]
