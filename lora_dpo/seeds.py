"""The seeding scheme: every random draw of a run is keyed by (seed, where it happens), so a resumed run, a resume
on another launch layout (LoRA dropout aside, `dropout_seed`), and P processes against one draw what an
uninterrupted single-process run would, with no RNG state in the checkpoint. Pure torch. (Data draws: crops,
flips and caption dropout are keyed by (seed, draw) in `data`.)
"""

from __future__ import annotations

import torch


def lora_init_seed(seed: int) -> int:
    """torch's global RNG when the adapters are created (lora_A's init)."""
    return seed


def dropout_seed(seed: int, first_pair: int, batch_size: int) -> int:
    """torch's global RNG for the micro-batch whose first pair is `first_pair` (LoRA dropout), a stream of its own.
    A dropout mask covers a whole micro-batch, so a resume with another batch size draws other masks (the noise,
    per pair, stays the same).
    Keyed by the micro-batch's place in the run's stream of batches, so a resume draws what the run would have."""
    return 2**63 + seed * 1_000_003 + first_pair // batch_size


def first_pair(pairs_before: int, micro_step: int, processes: int, rank: int, batch_size: int) -> int:
    """The place, in the run's stream of draws, of the first pair of micro-batch `micro_step` (counted from where
    this process started) on process `rank`: accelerate deals process r the batches r, r + P, r + 2P, ... of the
    stream, each of `batch_size` pairs; `pairs_before` were consumed before this process started (a resume)."""
    return pairs_before + (micro_step * processes + rank) * batch_size


def noise_generators(seed: int, first: int, pairs: int, device: torch.device) -> list[torch.Generator]:
    """One generator per pair, seeded by (seed, the pair's place in the run's stream of draws: `first` + i). The
    place does not depend on the launch: a resumed run, a resume on another number of processes, and P processes
    x batch B against one process x batch P * B all draw the same noise and timestep for the same pair."""
    return [torch.Generator(device).manual_seed((seed << 32) + first + i) for i in range(pairs)]


def validation_generator(seed: int, batch_index: int, device: torch.device) -> torch.Generator:
    """The same noise for held-out batch i at every evaluation, so the curve moves with the weights only."""
    return torch.Generator(device).manual_seed(seed + 7919 * batch_index)
