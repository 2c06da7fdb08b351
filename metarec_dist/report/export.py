"""Export a finished run for serving: item vectors, a FAISS index and the sequence encoder.

``export_run`` writes a new directory ``RUN_DIR/exports/<time>-export`` (made
in a hidden staging directory and renamed into place, so a failed export
leaves nothing) holding:

- ``items.parquet``: ``item`` (the domain's id 1..N), ``original_id`` (the id
  in the imported file) and ``vector`` (fp32, the model's item vector);
- ``items.faiss``: a FAISS index over those vectors, row ``r`` = item
  ``r + 1`` (``eval.retrieval``'s index; ``IndexFlatIP`` when that is ``exact``);
- ``encoder.pt2``: a ``torch.export`` program from left-padded item ids
  ``[B, max_length]`` (int64, 0 = padding) to query vectors ``[B, D]``, with
  the item input table inside; it loads with ``torch.export.load`` alone. It
  runs in fp32: for a model trained with ``precision: bf16`` (whose
  evaluation runs the encoder under bf16 autocast) its vectors differ from
  evaluation's by bf16 rounding;
- ``manifest.json``: what each file is and how to score with them.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

from metarec_dist.meta.saved_run import SavedRun
from metarec_dist.model.encoder import SequenceEncoder
from metarec_dist.report.run_directory import unused_path, write_json
from metarec_dist.retrieval.search import build_searcher

INDEX_FOR = {"exact": "flat"}  # the exact searcher is this package's; servers get FAISS's exact index


class QueryEncoder(nn.Module):
    """Left-padded item ids ``[B, L]`` -> the encoder's last state ``[B, D]`` (the query vector)."""

    def __init__(self, encoder: SequenceEncoder, item_inputs: torch.Tensor):
        super().__init__()
        self.encoder = encoder
        self.register_buffer("item_inputs", item_inputs)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.encoder.encode(self.item_inputs[ids], ids == 0)[:, -1]


def query_encoder(saved: SavedRun) -> QueryEncoder:
    """The target's query encoder as one self-contained module (eval mode, fp32)."""
    model, target = saved.model, saved.config.data.target
    with torch.no_grad():
        item_inputs = model.item_tables(target).inputs.detach().float().clone()
    return QueryEncoder(model.encoder, item_inputs).eval()


def export_run(saved: SavedRun) -> Path:
    """Write the export directory of ``saved``; returns its path."""
    config, target = saved.config, saved.config.data.target
    max_length = config.model.encoder.max_length
    items = saved.model.item_vectors(target).numpy()
    exports = saved.run_dir / "exports"
    exports.mkdir(exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=exports, prefix=".partial-"))
    try:
        original = _original_ids(config, target)
        table = pa.table({
            "item": pa.array(np.arange(1, len(items) + 1, dtype=np.int32)),
            "original_id": original,
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(items.reshape(-1)), items.shape[1]),
        })
        pq.write_table(table, staging / "items.parquet")
        index_type = INDEX_FOR.get(config.eval.retrieval.index, config.eval.retrieval.index)
        index_config = config.eval.retrieval.model_copy(update={"index": index_type, "device": "cpu"})
        searcher = build_searcher(items, index_config)
        searcher.save(staging / "items.faiss")
        module = query_encoder(saved)
        example = torch.zeros(2, max_length, dtype=torch.int64)
        program = torch.export.export(
            module, (example,), dynamic_shapes={"ids": {0: torch.export.Dim("batch", min=1)}}
        )
        torch.export.save(program, staging / "encoder.pt2")
        write_json(staging / "manifest.json", {
            "domain": target,
            "items": len(items),
            "width": int(items.shape[1]),
            "max_length": max_length,
            "index": index_type,
            "files": {
                "items.parquet": "item (1..N), original_id, vector (fp32)",
                "items.faiss": "FAISS index over the vectors; search result row r is item r + 1",
                "encoder.pt2": f"torch.export program: int64 ids [B, {max_length}] left-padded with 0 -> [B, "
                               f"{items.shape[1]}] query vectors; score = inner product with item vectors",
            },
            "run": str(saved.run_dir),
        })
        final = unused_path(exports, time.strftime("%Y%m%d-%H%M%S-export", time.gmtime()))
        os.rename(staging, final)
        return final
    except BaseException:
        import shutil

        shutil.rmtree(staging, ignore_errors=True)
        raise


def _original_ids(config, target: str) -> pa.Array:
    from metarec_dist.data.store import DomainStore

    items = DomainStore(config.data.store).open(target).table("items").sort_by("item")
    return items.column("original_id").combine_chunks()


__all__ = ["QueryEncoder", "export_run", "query_encoder"]
