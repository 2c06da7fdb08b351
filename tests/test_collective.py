"""The torch.distributed collective, over two real gloo processes (no Ray needed)."""

import json

from conftest import in_two_processes


def _gather_in_rank(rank: int, out: str) -> None:
    import torch.distributed as dist

    from metarec_dist.distributed.collective import SMALL_OBJECT_BYTES, TorchCollective

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


def test_all_gather_object_takes_one_round_for_small_objects_and_two_for_large_ones(tmp_path):
    from metarec_dist.distributed.collective import SMALL_OBJECT_BYTES

    in_two_processes(_gather_in_rank, tmp_path)
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["small"] == [{"rank": 0, "similarities": [0.0, -1.0]}, {"rank": 1, "similarities": [0.5, -1.0]}]
        assert got["small_rounds"] == 1
        assert got["large_lengths"] == [10, SMALL_OBJECT_BYTES * 3]
        assert got["large_rounds"] == 2
        assert got["seconds"] > 0
