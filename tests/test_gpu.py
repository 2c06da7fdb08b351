"""On a CUDA device: training, collectives, search and checkpoints agree with the CPU.

Skipped where torch sees no GPU (CI's machines); run on a GPU machine with
``pytest -m gpu`` (README, "GPU machines"). The two-process NCCL test needs two GPUs.
"""

import json

import numpy as np
import pytest
import torch
from conftest import in_two_processes, write_config

from metarec_dist.config import load_config
from metarec_dist.meta.config import ExperimentConfig
from metarec_dist.meta.trainer import Trainer
from metarec_dist.meta.training_data import load_training_data
from metarec_dist.retrieval.config import RetrievalConfig
from metarec_dist.retrieval.exact import ExactSearcher
from metarec_dist.retrieval.search import build_searcher

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CUDA = torch.device("cuda", 0)
CPU = torch.device("cpu")


def _trainers(synthetic_store, tmp_path, precision: str) -> tuple[Trainer, Trainer]:
    config = load_config(ExperimentConfig, write_config(tmp_path, synthetic_store), [f"model.precision={precision}"])
    data = load_training_data(config)
    return (Trainer(config, data, progress=False, device=CPU),
            Trainer(config, data, progress=False, device=CUDA))


@pytest.mark.parametrize(("precision", "tolerance"), [("fp32", 1e-4), ("bf16", 3e-2)])
def test_a_meta_step_on_cuda_equals_the_cpu_step(synthetic_store, tmp_path, precision, tolerance):
    on_cpu, on_cuda = _trainers(synthetic_store, tmp_path, precision)
    assert all(p.device.type == "cuda" for p in on_cuda.model.parameters())
    for step in (1, 2):
        cpu_loss, cuda_loss = on_cpu.steps.meta(step), on_cuda.steps.meta(step)
        assert cuda_loss == pytest.approx(cpu_loss, rel=tolerance, abs=tolerance)
    cpu_state = on_cpu.model.state_dict()
    for name, value in on_cuda.model.state_dict().items():
        torch.testing.assert_close(value.cpu(), cpu_state[name], rtol=tolerance, atol=tolerance, msg=name)
    assert on_cuda.evaluate("valid")["NDCG@10"] == pytest.approx(on_cpu.evaluate("valid")["NDCG@10"], abs=0.02)


def test_a_checkpoint_written_on_cuda_loads_on_the_cpu_and_back(synthetic_store, tmp_path):
    on_cpu, on_cuda = _trainers(synthetic_store, tmp_path, "fp32")
    on_cuda.steps.meta(1)
    saved = {"model": on_cuda.model.state_dict(), "trainer": on_cuda.state_dict()}
    assert "cuda" in saved["trainer"]["random"]
    torch.save(saved, tmp_path / "state.pt")
    loaded = torch.load(tmp_path / "state.pt", map_location="cpu", weights_only=False)
    on_cpu.model.load_state_dict(loaded["model"])
    on_cpu.load_state_dict(loaded["trainer"])
    for name, value in on_cpu.model.state_dict().items():
        torch.testing.assert_close(value, saved["model"][name].cpu(), msg=name)
    back = Trainer(on_cpu.config, on_cpu.data, progress=False, device=CUDA)
    back.model.load_state_dict(on_cpu.model.state_dict())
    back.load_state_dict(on_cpu.state_dict())  # a CPU checkpoint: CUDA's stream starts from the seed
    assert all(p.device.type == "cuda" for p in back.model.parameters())


def test_the_exact_searcher_on_cuda_ranks_like_the_cpu():
    rng = np.random.default_rng(0)
    items, queries = rng.standard_normal((20_000, 64), np.float32), rng.standard_normal((300, 64), np.float32)
    targets = rng.integers(0, len(items), len(queries))
    on_cpu = ExactSearcher(items, precision="fp32", device="cpu")
    on_cuda = ExactSearcher(items, precision="auto", device="cuda")
    np.testing.assert_array_equal(on_cuda.ranks(queries, targets), on_cpu.ranks(queries, targets))
    np.testing.assert_array_equal(on_cuda.search(queries, 10).rows, on_cpu.search(queries, 10).rows)


@pytest.mark.parametrize("index", ["flat", "ivf_flat", "ivf_pq"])
def test_faiss_gpu_search_equals_the_cpu_search(index):
    import faiss

    if not faiss.get_num_gpus():
        pytest.skip("faiss-cpu is installed (see README, GPU machines)")
    rng = np.random.default_rng(1)
    items, queries = rng.standard_normal((50_000, 64), np.float32), rng.standard_normal((500, 64), np.float32)
    config = RetrievalConfig(index=index, nlist=256, nprobe=32, pq_m=16, refine_factor=4)
    on_gpu = build_searcher(items, config.model_copy(update={"device": "gpu"}))
    on_cpu = build_searcher(items, config.model_copy(update={"device": "cpu"}))
    assert on_gpu.on_gpu and not on_cpu.on_gpu
    found, expected = on_gpu.search(queries, 10).rows, on_cpu.search(queries, 10).rows
    agreement = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, expected)])
    assert agreement == 1.0 if index == "flat" else agreement >= 0.95
    with pytest.warns(UserWarning, match="searched on the CPU index"):
        deep = on_gpu.search(queries[:5], 3000)
    np.testing.assert_array_equal(deep.rows, on_cpu.search(queries[:5], 3000).rows)


def _nccl_collectives(rank: int, out: str) -> None:
    from metarec_dist.distributed.collective import TorchCollective

    collective = TorchCollective()
    tensor = torch.full((4,), float(rank + 1), device=collective.device)
    collective.all_reduce_sum_([tensor])
    gathered = collective.all_gather_object({"rank": rank})
    broadcast = torch.full((2,), float(rank), device=collective.device)
    collective.broadcast_(broadcast, source=1)
    with open(f"{out}/rank{rank}.json", "w") as file:
        json.dump({"sum": tensor.tolist(), "gathered": gathered, "broadcast": broadcast.tolist(),
                   "device": str(collective.device)}, file)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL between two processes needs two GPUs")
def test_nccl_collectives_between_two_processes(tmp_path):
    in_two_processes(_nccl_collectives, tmp_path, backend="nccl")
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got == {"sum": [3.0] * 4, "gathered": [{"rank": 0}, {"rank": 1}], "broadcast": [1.0, 1.0],
                       "device": f"cuda:{rank}"}
