"""The trainable part: LoRA adapters on the frozen UNet, the adapters-off reference, and the QLoRA-style 4-bit base.

One UNet lives in memory. The policy is the UNet with its LoRA adapters on; the reference model of DPO is the
same UNet with them off (`adapters_disabled`), so the reference costs no memory at all.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from lora_dpo.models.families import Family, denoiser_family
from lora_dpo.models.parts import ModelError
from lora_dpo.recipe import LoraRecipe

# --------------------------------------------------------------------------------------------------
# QLoRA-style 4-bit base


def quantize_nf4(unet: Any, compute_dtype: torch.dtype, device: torch.device) -> int:
    """Swap every `nn.Linear` of the frozen UNet for a bitsandbytes NF4 `Linear4bit` (QLoRA, Dettmers et al.
    2023) and move it to `device`, where bitsandbytes quantises it; matmuls run in `compute_dtype`. Call it
    before `add_lora`: peft puts its adapters on `Linear4bit` layers. Convolutions and norms stay as they are.
    Layer by layer, so the full-precision copy of one layer at a time is all the extra memory. Returns the
    number of layers swapped."""
    try:
        import bitsandbytes as bnb
    except ImportError as err:
        raise ModelError(f"[model].quantize = 'nf4' needs bitsandbytes ({err}); pip install bitsandbytes") from None
    swapped = 0
    for module in list(unet.modules()):
        for name, child in list(module.named_children()):
            if type(child) is not torch.nn.Linear:
                continue
            layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=compute_dtype, quant_type="nf4", device="meta")
            layer.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4")
            if child.bias is not None:
                layer.bias = torch.nn.Parameter(child.bias.data.to(compute_dtype), requires_grad=False)
            layer.register_forward_hook(_output_in_autocast_dtype)
            # bitsandbytes repacks the weight in place for a faster CPU kernel at the first forward in eval mode
            # without grad (validation, samples), and that packing rejects widths that are not multiples of 32: keep
            # the one layout that training uses
            layer.support_avx512bf16_for_cpu = False
            setattr(module, name, layer.to(device))
            swapped += 1
    unet.is_loaded_in_4bit = True  # as diffusers' own 4-bit loader marks it: peft then uses its 4-bit LoRA layer
    return swapped


def _output_in_autocast_dtype(module: torch.nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
    """Under autocast nn.Linear returns the autocast dtype; bitsandbytes' Linear4bit returns its input's. CUDA
    autocast hides the difference (it runs norms in fp32 whatever they are fed); CPU autocast does not, and a
    GroupNorm with bf16 weights refuses the fp32 activations. Matching nn.Linear makes the 4-bit base run the
    same on both."""
    device = output.device.type
    return output.to(torch.get_autocast_dtype(device)) if torch.is_autocast_enabled(device) else output


# --------------------------------------------------------------------------------------------------
# LoRA and the reference


def target_modules(cfg: LoraRecipe, family: Family) -> tuple[str, ...]:
    """[lora].target_modules, or where the recipe leaves it unset the base family's `default_target_modules`."""
    return family.default_target_modules if cfg.target_modules is None else tuple(cfg.target_modules)


def lora_config(cfg: LoraRecipe, family: Family) -> Any:
    """peft's LoraConfig of the recipe's [lora] on a denoiser of `family` (its default targets where unset)."""
    from peft import LoraConfig

    return LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                      target_modules=list(target_modules(cfg, family)), init_lora_weights=True)


class _CastOutsideAutocast:
    """peft's `cast_input_dtype_enabled` flag, which a LoRA layer reads as a bool at every forward: cast the input
    to the adapter's dtype (fp32) only where no autocast runs. Under autocast the cast is a round trip: peft makes
    an fp32 copy of the bf16 input and autocast casts it back for lora_A's matmul, a second bf16 copy of the same
    values that lora_A keeps for backward (1.7 GiB of an SDXL 1024 px step). Without it lora_A reads the input the
    base layer already holds: same values, same matmul, one copy. Read at every forward, so a checkpointed block
    recomputes what it ran (torch.utils.checkpoint restores the autocast state)."""

    def __bool__(self) -> bool:
        return not any(torch.is_autocast_enabled(device) for device in ("cuda", "cpu"))


def add_lora(unet: Any, cfg: LoraRecipe) -> Any:
    """Attach trainable LoRA adapters (fp32, whatever the base's dtype) to the frozen UNet. Under autocast their
    matmuls run in the autocast dtype on the input as it comes (`_CastOutsideAutocast`)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    config = lora_config(cfg, denoiser_family(unet.config))
    try:
        unet.add_adapter(config)
    except ValueError as err:
        raise ModelError(f"[lora].target_modules {list(config.target_modules)}: {err}") from None
    for param in unet.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    for module in unet.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = _CastOutsideAutocast()
    return config


def lora_parameters(unet: Any) -> list[torch.nn.Parameter]:
    return [p for p in unet.parameters() if p.requires_grad]


# Each model's peft tuner layers, found once. diffusers' disable_adapters()/enable_adapters() walk every module of
# the UNet (1,417 on the tiny one), read peft's version from its package metadata, and switch requires_grad on every
# adapter weight, twice per step: 8 ms of a ~120 ms tiny CPU step, where the switch itself is one flag per layer.
# Weak keys: a model that is gone takes its entry with it. The adapter names are kept with the layers, so adding
# or deleting an adapter finds the layers again.
_TUNER_LAYERS: weakref.WeakKeyDictionary[Any, tuple[tuple[str, ...], list[Any]]] = weakref.WeakKeyDictionary()


def _tuner_layers(unet: Any) -> list[Any]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    names = tuple(getattr(unet, "peft_config", None) or ())
    found = _TUNER_LAYERS.get(unet)
    if found is None or found[0] != names:
        found = (names, [module for module in unet.modules() if isinstance(module, BaseTunerLayer)])
        _TUNER_LAYERS[unet] = found
    return found[1]


@contextmanager
def eval_mode(module: Any) -> Iterator[None]:
    """The module in eval mode (no LoRA dropout: what it draws is the adapter as it stands), then back in the mode
    it was in, however the block exits."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


@contextmanager
def adapters_disabled(unet: Any) -> Iterator[None]:
    """The DPO reference: the same UNet with its adapters off, restored however the block exits.
    (peft's disable_adapters()/enable_adapters() are plain calls, not a context manager.) Each tuner layer's own
    switch is turned (peft's `disable_adapters` property reads `_disable_adapters`) and turned back to what it
    was; requires_grad stays as it is, which nothing reads while the reference runs in inference mode. Should a
    peft version keep the switch elsewhere, the check below sees it and the layers are switched peft's way."""
    layers = _tuner_layers(unet)
    if not layers:
        unet.disable_adapters()  # diffusers' own error for a model without adapters
    before = [layer.disable_adapters for layer in layers]
    for layer in layers:
        layer._disable_adapters = True
    flagged = all(layer.disable_adapters for layer in layers)
    if not flagged:
        for layer in layers:
            layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer, was in zip(layers, before, strict=True):
            if flagged:
                layer._disable_adapters = was
            else:
                layer.enable_adapters(not was)


def lora_state_dict(unet: torch.nn.Module) -> dict[str, Tensor]:
    """The UNet's LoRA weights under diffusers' names (`...to_q.lora_A.weight`), without the `unet.` prefix."""
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(unet).items()}
