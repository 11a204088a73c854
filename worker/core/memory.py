"""Reservoir replay memory over every clip seen (no task boundaries).

Entries are stored field by field in tensors preallocated on the first `add`: one tensor per
field of shape (capacity, *per-clip shape), with the first add's dict keys as the fields and
its dtypes kept. What FLAVA stores per clip (docs/design.md section 4):

    fbank (T, F) and frames (frames, 3, H, W)  the clip itself,
    emb_a, emb_v (D,)                          pooled unimodal embeddings at storage time,
    q_a_hat, q_v_hat (H, d)                    importance-weighted query prototypes,
    C_a, C_v, I_a, I_v (La,) / (Lv,)           correlation and importance scores.

STELLA+ ("patches only") stores a subset of each clip instead of the clip: the selected
patchified tokens `tokens_a` (K_a, P_a), `tokens_v` (K_v, P_v) and their token ids
`ids_a` (K_a,), `ids_v` (K_v,) int64. Selection always returns exactly K tokens per modality,
so these fields have a fixed per-clip shape like any other and cost about K/L of the clip
(half at the default keep ratio). A STELLA+ replay sample's stored tokens *are* its selected
set: `methods.FlavaPlus` scatters them to their ids in an otherwise zero token map and
unpatchifies it into a clip-shaped fbank/frames, then uses `ids` as the keep-set, so the
backbone sees exactly the stored patches at their original positions (20% of L visible, the
rest reconstructed) and never reads the zeros. No re-selection happens, so C/I are not stored.

Checkpoints do not rewrite the whole memory (1.2 GB at `tiny`'s capacity): ``take_changes``
returns only the rows written since the previous call, with the reservoir's counters, and
``apply_changes`` replays such segments in order onto an empty memory.

Reservoir rule: the n-th clip seen (1-based) fills slot n-1 while the memory is not full;
afterwards it replaces a uniformly drawn slot with probability capacity / n. Every clip seen
so far is therefore in memory with probability capacity / n.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class ReplayBatch:
    items: dict[str, Tensor]  # field -> (n, *per-clip shape), on the memory's device
    slots: Tensor  # (n,) int64 memory slots the items were read from


class ReplayMemory:
    """Reservoir-sampled replay memory of per-clip tensors (see module docstring)."""

    def __init__(
        self,
        capacity: int,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self._capacity = capacity
        self._generator = generator if generator is not None else torch.Generator()
        self._device = torch.device(device)
        self._seen = 0
        self._fields: dict[str, Tensor] = {}
        self._changed: set[int] = set()  # slots written since the last take_changes()

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def seen(self) -> int:
        """Clips offered to `add` so far."""
        return self._seen

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(self._fields)

    def __len__(self) -> int:
        return min(self._seen, self._capacity)

    def nbytes(self) -> int:
        """Bytes held by the preallocated field tensors (the full capacity, once allocated)."""
        return sum(t.numel() * t.element_size() for t in self._fields.values())

    def add(self, items: dict[str, Tensor]) -> Tensor:
        """Offer each clip of a batch (field -> (B, ...)) to the reservoir.

        Returns (B,) int64: the slot each clip was written to, -1 if it was not kept (a later
        clip of the same batch may overwrite an earlier one's slot, as in sequential adds).
        """
        batch = self._check(items)
        if not self._fields:
            self._allocate(items)
        slots = [self._reservoir_slot() for _ in range(batch)]
        self._write(items, slots)
        return torch.tensor(slots, dtype=torch.long)

    def sample(self, n: int, generator: torch.Generator | None = None) -> ReplayBatch:
        """min(n, len) distinct stored clips drawn uniformly (memory's generator if none)."""
        if len(self) == 0:
            raise ValueError("cannot sample from an empty memory")
        gen = generator if generator is not None else self._generator
        slots = torch.randperm(len(self), generator=gen, device=gen.device)[:n].cpu()
        return ReplayBatch(items=self.read(slots), slots=slots)

    def read(self, slots: Tensor) -> dict[str, Tensor]:
        """Stored fields at slots (n,) -> field -> (n, ...)."""
        idx = slots.to(self._device)
        return {name: t[idx] for name, t in self._fields.items()}

    def state_dict(self) -> dict:
        """Tensors and plain ints only, so torch.load(weights_only=True) can read it."""
        return {
            "capacity": self._capacity,
            "seen": self._seen,
            "fields": dict(self._fields),
            "rng_state": self._generator.get_state(),
        }

    def take_changes(self, everything: bool = False) -> dict:
        """The rows written since the last call (all stored rows if ``everything``), as a
        segment for ``apply_changes``: {"seen", "rng_state", "slots": (n,) int64,
        "rows": field -> (n, ...) copies}. Clears the record of changes."""
        changed = set(range(len(self))) if everything else self._changed
        slots = torch.tensor(sorted(changed), dtype=torch.long)
        self._changed = set()
        return {
            "capacity": self._capacity,
            "seen": self._seen,
            "rng_state": self._generator.get_state(),
            "slots": slots,
            "rows": {name: t[slots.to(self._device)].cpu() for name, t in self._fields.items()},
        }

    def forget_changes(self) -> None:
        """Treat every row as saved (after rebuilding the memory from its segments)."""
        self._changed = set()

    def apply_changes(self, segment: dict) -> None:
        """Replay a ``take_changes`` segment (segments in the order they were taken)."""
        if segment["capacity"] != self._capacity:
            raise ValueError(f"capacity {segment['capacity']} != this memory's {self._capacity}")
        rows = segment["rows"]
        if rows and not self._fields:
            self._allocate(rows)
        slots = segment["slots"].to(self._device)
        for name, t in self._fields.items():
            t[slots] = rows[name].to(self._device, t.dtype)
        self._seen = int(segment["seen"])
        self._generator.set_state(segment["rng_state"])

    def load_state_dict(self, state: dict) -> None:
        if state["capacity"] != self._capacity:
            raise ValueError(f"capacity {state['capacity']} != this memory's {self._capacity}")
        fields = {k: v.to(self._device) for k, v in state["fields"].items()}
        for name, t in fields.items():
            if t.shape[0] != self._capacity:
                raise ValueError(f"field {name!r} has {t.shape[0]} rows, not {self._capacity}")
        self._fields = fields
        self._seen = int(state["seen"])
        self._generator.set_state(state["rng_state"])
        self._changed = set(range(len(self)))  # not in any segment yet

    def _check(self, items: dict[str, Tensor]) -> int:
        """Validate a batch against the stored fields; returns its batch size."""
        if not items:
            raise ValueError("add() needs at least one field")
        sizes = {t.shape[0] for t in items.values()}
        if len(sizes) != 1:
            raise ValueError(f"fields disagree on batch size: {sorted(sizes)}")
        if self._fields:
            if set(items) != set(self._fields):
                raise ValueError(f"fields {sorted(items)} != stored {sorted(self._fields)}")
            for name, t in items.items():
                if t.shape[1:] != self._fields[name].shape[1:]:
                    raise ValueError(f"field {name!r}: per-clip shape {tuple(t.shape[1:])}")
        return sizes.pop()

    def _allocate(self, items: dict[str, Tensor]) -> None:
        self._fields = {
            name: torch.zeros((self._capacity, *t.shape[1:]), dtype=t.dtype, device=self._device)
            for name, t in items.items()
        }

    def _reservoir_slot(self) -> int:
        """Slot for the next clip seen, or -1 when the reservoir drops it."""
        n = self._seen
        self._seen += 1
        if n < self._capacity:
            return n
        gen = self._generator
        r = int(torch.randint(0, n + 1, (1,), generator=gen, device=gen.device))
        return r if r < self._capacity else -1

    def _write(self, items: dict[str, Tensor], slots: list[int]) -> None:
        """Copy the kept clips in; for a slot drawn twice in one batch the later clip wins."""
        last = {slot: clip for clip, slot in enumerate(slots) if slot >= 0}
        if not last:
            return
        self._changed.update(last)
        dst = torch.tensor(list(last), dtype=torch.long, device=self._device)
        src = torch.tensor(list(last.values()), dtype=torch.long)
        for name, t in self._fields.items():
            value = items[name].detach()
            t[dst] = value[src.to(value.device)].to(self._device, t.dtype)
