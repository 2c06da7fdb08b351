"""The torch.distributed collective, over two real gloo processes (no Ray needed)."""

import json
import socket

import torch.multiprocessing as mp


def _gather_in_rank(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from metarec_dist.distributed.collective import SMALL_OBJECT_BYTES, TorchCollective

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    calls, real = [], dist.all_gather

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    dist.all_gather = counted
    collective = TorchCollective()
    small = collective.all_gather_object({"rank": rank, "similarities": [0.5 * rank, -1.0]})
    small_rounds = len(calls)
    # Rank 1's payload is past the one-round buffer, rank 0's is not: both must take the second round.
    large = collective.all_gather_object("x" * (SMALL_OBJECT_BYTES * 3 if rank else 10))
    with open(f"{out}/rank{rank}.json", "w") as file:
        json.dump({"small": small, "small_rounds": small_rounds, "large_lengths": [len(s) for s in large],
                   "large_rounds": len(calls) - small_rounds, "seconds": collective.seconds}, file)
    dist.destroy_process_group()


def test_all_gather_object_takes_one_round_for_small_objects_and_two_for_large_ones(tmp_path):
    from metarec_dist.distributed.collective import SMALL_OBJECT_BYTES

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(_gather_in_rank, args=(port, str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["small"] == [{"rank": 0, "similarities": [0.0, -1.0]}, {"rank": 1, "similarities": [0.5, -1.0]}]
        assert got["small_rounds"] == 1
        assert got["large_lengths"] == [10, SMALL_OBJECT_BYTES * 3]
        assert got["large_rounds"] == 2
        assert got["seconds"] > 0
