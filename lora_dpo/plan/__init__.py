"""`lora-dpo plan`: the memory and time of one training step, predicted in seconds, on any machine.

No weights, no GPU, no download. The UNet is built from its config with no storage (the meta device), given
fake tensors (torch's FakeTensorMode: shapes and dtypes, no data) and run through `step.dpo_step` and
`backward()`: the function the trainer runs, so the plan cannot drift from the code. A dispatch mode
(`StepProbe`) sees every ATen op of that step: it adds up its FLOPs with torch.utils.flop_counter's formulas and
the bytes of every live tensor storage (released when the storage is), per phase (policy forward, reference
forward, backward). One pass measures both: the probe holds only numbers, so counting cannot inflate memory.

Computed from the real parameter shapes, not measured: optimizer state (AdamW 8 bytes per LoRA parameter,
bitsandbytes 8-bit ~2), a 4-bit base (the base's Linear weights at NF4's ~0.52 bytes), the text encoders' weights
and FLOPs (2 x parameters x tokens). Modelled, because this trace runs on the CPU: CUDA autocast runs GroupNorm
and LayerNorm in fp32 where CPU autocast keeps bf16 (`trace._cuda_autocast_norms` makes the trace do what CUDA
does), and the CUDA context and allocator fragmentation (`required`, a stated allowance).

The modules, each importing only those listed before it:
- `gpus`: the GPU table (`Gpu`, `GPUS`, `find_gpu`), `parse_list` for the table options, `PlanError`, and the
  allowance a card needs on top of the tensors (`CONTEXT_GIB`, `FRAGMENTATION`, `required`).
- `bases`: a base's `Architecture` (UNet, VAE, scheduler configs, text encoder sizes) from configs only:
  `architecture` (the known hub ids are the families' `models.KNOWN_BASES`).
- `probe`: `StepProbe`, the dispatch mode that counts FLOPs and live bytes per phase; `cpu_attention_flops`.
- `trace`: one step on fake tensors: `StepKey`, `StepMeasure`, `measure_step`, `measure_encode`, CUDA autocast's
  fp32 norms, and the one cache of traced UNets and steps; generation's passes (`measure_denoise`,
  `measure_decode`).
- `generation`: an `[online]` recipe's rounds priced: images per round and for the run (prompt counts read from
  local files only, as `online.split_prompts` splits them), the denoiser's inference pass and the VAE's decode
  (`trace.measure_denoise`, `trace.measure_decode`), the scorers (`Generation`, `estimate_generation`).
- `estimates`: from measurements to a plan: `Setting`, `optimizer_bytes`, `Estimate`, `estimate`, the changes
  that make a step fit, `Plan` (with an online recipe's generation), `make_plan`, `seconds_per_pair`,
  `generation_hours`, and the trainer's `resolve_checkpointing`.
- `report`: the plan as text (`render`), the rank x resolution table (`grid`) and the memory floor table
  (`floor_table`).
- `measure`: the real step on a device, against the plan: `measure_real_step`, `compare_on_device`.
"""

from lora_dpo.plan.bases import Architecture, architecture
from lora_dpo.plan.estimates import (
    LOWER_RESOLUTIONS,
    NF4_BYTES,
    Change,
    Estimate,
    Plan,
    Setting,
    estimate,
    generation_hours,
    make_plan,
    optimizer_bytes,
    resolve_checkpointing,
    seconds_per_pair,
)
from lora_dpo.plan.generation import ASSUMED_PROMPTS, Generation, PromptCounts, count_prompts, estimate_generation
from lora_dpo.plan.gpus import CONTEXT_GIB, FRAGMENTATION, GPUS, GiB, Gpu, PlanError, find_gpu, parse_list, required
from lora_dpo.plan.measure import RealMeasure, compare_on_device, measure_real_step
from lora_dpo.plan.probe import StepProbe, cpu_attention_flops
from lora_dpo.plan.report import floor_table, grid, render
from lora_dpo.plan.trace import (
    EncodeMeasure,
    InferenceMeasure,
    StepKey,
    StepMeasure,
    measure_decode,
    measure_denoise,
    measure_encode,
    measure_step,
)

__all__ = [
    "ASSUMED_PROMPTS",
    "CONTEXT_GIB",
    "FRAGMENTATION",
    "GPUS",
    "LOWER_RESOLUTIONS",
    "NF4_BYTES",
    "Architecture",
    "Change",
    "EncodeMeasure",
    "Estimate",
    "Generation",
    "GiB",
    "Gpu",
    "InferenceMeasure",
    "Plan",
    "PlanError",
    "PromptCounts",
    "RealMeasure",
    "Setting",
    "StepKey",
    "StepMeasure",
    "StepProbe",
    "architecture",
    "compare_on_device",
    "count_prompts",
    "cpu_attention_flops",
    "estimate",
    "estimate_generation",
    "find_gpu",
    "floor_table",
    "generation_hours",
    "grid",
    "make_plan",
    "measure_decode",
    "measure_denoise",
    "measure_encode",
    "measure_real_step",
    "measure_step",
    "optimizer_bytes",
    "parse_list",
    "render",
    "required",
    "resolve_checkpointing",
    "seconds_per_pair",
]
