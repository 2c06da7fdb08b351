"""The target's item table split by rows over workers: each holds one block of rows and its Adam state.

The plan is data, the same in every worker: rows 0..N (padding included) in W
contiguous blocks of near-equal size, ``row_blocks(N + 1, W)``, block r on worker r.

A step that reads the table, every exchange explicit and at the step's boundaries
(never inside ``forward``):

1. ``load(ids)`` before it: every worker's ids are gathered, each owner answers
   with those of its rows, and each worker's table then holds only the rows it
   asked for (``DomainItems.hold_rows``);
2. forward and backward on those rows, as on a whole table;
3. ``step()`` after it: every worker's (ids, row gradients) are gathered; each
   owner sums the ones in its block and takes a row-sparse Adam step there; the
   table then holds no rows until the next ``load``.

What travels is the rows read, never the catalog. ``all_gather_object`` hands
every worker every worker's part (W times the rows read): fine for the few
workers of one run. Validation, checkpoints and the best state read the whole
table: ``whole()`` assembles it from the blocks for a block of code (one
all-reduce) and gives the memory back afterwards.

Versus a replica in every worker (values and both Adam moments: 3 x 4 x width
bytes per item each), a worker holds 1/W of that between validations, plus the
rows it reads; a step pays three collectives of those rows
(``benchmarks/bench_catalog_scale.py`` measures both).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from metarec_dist.meta.row_sparse_adam import RowSparseAdam, adam_state
from metarec_dist.meta.step import Collective
from metarec_dist.model.recommender import PAD, DomainItems


def row_blocks(rows: int, workers: int) -> list[tuple[int, int]]:
    """``workers`` contiguous blocks [start, stop) covering ``rows`` rows, sizes differing by at most one."""
    edges = [rows * worker // workers for worker in range(workers + 1)]
    return list(zip(edges[:-1], edges[1:]))


class ShardedItemTable:
    """One domain's item table, split by rows over the workers of ``collective`` (see the module docstring)."""

    def __init__(self, items: DomainItems, name: str, collective: Collective, learning_rate: float,
                 weight_decay: float):
        """``items``: the module whose table is split (it holds the whole table now and only the rows
        a step reads from here on); ``name``: the table parameter's name, for checkpoints."""
        self.items, self.name, self.collective = items, name, collective
        weight = items.embedding.weight
        self.shape = tuple(weight.shape)
        self.start, self.stop = row_blocks(self.shape[0], collective.world_size)[collective.rank]
        self.own_rows = torch.nn.Parameter(weight.detach()[self.start : self.stop].clone())
        self.adam = RowSparseAdam([self.own_rows], lr=learning_rate, weight_decay=weight_decay)
        self._hold_padding_only()

    # --- a step ---------------------------------------------------------------------

    @torch.no_grad()
    def load(self, ids: torch.Tensor) -> None:
        """Hold the rows of ``ids`` (sorted, unique) for this worker's next step (a collective)."""
        # Pickled tensors travel on the CPU: a GPU tensor would unpickle onto the sender's device index.
        device = self.own_rows.device
        requests = self.collective.all_gather_object(ids.cpu())
        answers = {}
        for rank, wanted in enumerate(requests):
            mine = wanted[(wanted >= self.start) & (wanted < self.stop)]
            answers[rank] = (mine, self.own_rows[(mine - self.start).to(device)].cpu())
        everyone = self.collective.all_gather_object(answers)  # [owner][requester] -> (ids, rows)
        parts = [owner[self.collective.rank] for owner in everyone]
        held = torch.cat([part_ids for part_ids, _ in parts])  # blocks in rank order: still sorted
        if not torch.equal(held, ids.cpu()):
            raise ValueError(f"{self.name}: rows asked for must be sorted, unique and within the table")
        self.items.hold_rows(ids, torch.cat([rows for _, rows in parts]).to(device))

    @torch.no_grad()
    def step(self) -> None:
        """Every worker's gradients of the rows it held to their owners; each owner updates its block
        (a collective; every worker calls it, with or without a gradient)."""
        weight = self.items.embedding.weight
        part = None
        if weight.grad is not None:
            gradient = (weight.grad if weight.grad.is_sparse else weight.grad.to_sparse(1)).coalesce()
            part = (self.items.resident[gradient.indices()[0]].cpu(), gradient.values().cpu())
        everyone = [p for p in self.collective.all_gather_object(part) if p is not None]
        weight.grad = None
        self._hold_padding_only()
        if not everyone:
            return
        rows = torch.cat([ids for ids, _ in everyone]).to(self.own_rows.device)
        values = torch.cat([values for _, values in everyone]).to(self.own_rows.device)
        inside = (rows >= self.start) & (rows < self.stop)
        if len(rows) and not bool(inside.any()):
            self.adam.count_step(self.own_rows)  # the table stepped elsewhere: keep the bias correction in step
            return
        self.own_rows.grad = torch.sparse_coo_tensor((rows[inside] - self.start).unsqueeze(0), values[inside],
                                                  self.own_rows.shape)
        self.adam.step()
        self.own_rows.grad = None

    # --- the whole table ------------------------------------------------------------

    @contextlib.contextmanager
    def whole(self, keep_changes: bool = False) -> Iterator[None]:
        """The whole table in the module for the block of code (a collective); ``keep_changes``: the
        values it holds at the end become the blocks' (loading a checkpoint)."""
        table = self.own_rows.new_zeros(self.shape)
        table[self.start : self.stop] = self.own_rows.detach()
        self.collective.all_reduce_sum_([table])  # every row has one owner: the sum is the table
        self.items.hold_rows(None, table)
        try:
            yield
        finally:
            if keep_changes:
                with torch.no_grad():
                    self.own_rows.copy_(self.items.embedding.weight[self.start : self.stop])
            self._hold_padding_only()

    def moments(self) -> dict[str, torch.Tensor]:
        """Adam's state at full size, keyed ``<name>/<step|exp_avg|exp_avg_sq>`` (a collective)."""
        state = self.adam.state.get(self.own_rows, {})
        steps = self.collective.all_gather_object(float(state["step"]) if state else None)
        if all(step is None for step in steps):
            return {}
        entries = {f"{self.name}/step": torch.tensor(max(step for step in steps if step is not None))}
        for key in ("exp_avg", "exp_avg_sq"):
            full = self.own_rows.new_zeros(self.shape)
            if state:
                full[self.start : self.stop] = state[key]
            self.collective.all_reduce_sum_([full])
            entries[f"{self.name}/{key}"] = full
        return entries

    def load_moments(self, entries: dict[str, torch.Tensor]) -> None:
        """Restore ``moments()``'s output (saved with any number of workers)."""
        if f"{self.name}/step" not in entries:
            return
        self.adam.state[self.own_rows] = adam_state(
            entries[f"{self.name}/step"],
            *(entries[f"{self.name}/{key}"][self.start : self.stop] for key in ("exp_avg", "exp_avg_sq")),
            like=self.own_rows,
        )

    def block(self) -> tuple[int, int] | None:
        """The rows [start, stop) this worker owns."""
        return self.start, self.stop

    def numel(self) -> int:
        """Values held here: the block and its moments."""
        return self.own_rows.numel() + sum(v.numel() for v in self.adam.state.get(self.own_rows, {}).values()
                                        if torch.is_tensor(v) and v.dim())

    def _hold_padding_only(self) -> None:
        padding = torch.tensor([PAD], device=self.own_rows.device)
        self.items.hold_rows(padding, self.own_rows.new_zeros(1, self.shape[1]))
