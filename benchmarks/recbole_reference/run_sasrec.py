"""RecBole 1.2.1's SASRec on a sequence dataset (CPU), printing each epoch's wall time.

The reference for the time-to-quality target of docs/RESULTS.md. Runs in its
own virtual environment (see README.md here), never in the project's.

Usage:
  python run_sasrec.py --workdir WORKDIR --dataset Beauty --epochs 12 --train-batch-size 2048 --stop-at 0.048
  python run_sasrec.py --workdir WORKDIR --dataset Beauty --build-only

Compatibility monkeypatches (no site-packages edits):
  * torch>=2.6 defaults torch.load(weights_only=True); RecBole's own checkpoint
    (used at the test step, load_best_model=True) holds a config object, so we
    default weights_only=False.
  * numpy removed np.float / np.int / ... aliases; RecBole 1.2.1 still uses them.
  * recbole.quick_start imports ray at module level; we do not import it, so ray
    is not needed.
"""
import argparse
import functools
import os
import sys
import time

T_START = time.perf_counter()

import numpy as np

# Names numpy removed that RecBole 1.2.1 still reads (np.float, ...; np.float_ etc. went in numpy 2).
# Looked up in np.__dict__: numpy's module __getattr__ would warn or raise for them.
REMOVED_NUMPY_NAMES = {"float": float, "int": int, "bool": bool, "object": object, "str": str,
                       "complex": complex, "long": int, "unicode": str,
                       "float_": np.float64, "complex_": np.complex128, "unicode_": np.str_}
for _name, _value in REMOVED_NUMPY_NAMES.items():
    if _name not in np.__dict__:
        setattr(np, _name, _value)

import torch

_orig_torch_load = torch.load


@functools.wraps(_orig_torch_load)
def _torch_load(*args, **kwargs):
    kwargs.setdefault("weights_only", False)
    return _orig_torch_load(*args, **kwargs)


torch.load = _torch_load

from logging import getLogger  # noqa: E402

from recbole.config import Config  # noqa: E402
from recbole.data import create_dataset, data_preparation  # noqa: E402
from recbole.model.sequential_recommender import SASRec  # noqa: E402
from recbole.trainer import Trainer  # noqa: E402
from recbole.utils import init_logger, init_seed  # noqa: E402


def out(msg):
    print(msg, flush=True)


class TimedTrainer(Trainer):
    """Trainer that prints per-epoch training / validation wall time to stdout,
    and ends the process once validation NDCG@10 reaches ``stop_at`` (if set)."""

    stop_at: float | None = None
    fit_start: float = 0.0

    def _train_epoch(self, train_data, epoch_idx, loss_func=None, show_progress=False):
        t0 = time.perf_counter()
        loss = super()._train_epoch(train_data, epoch_idx, loss_func=loss_func,
                                    show_progress=show_progress)
        dt = time.perf_counter() - t0
        loss_v = sum(loss) if isinstance(loss, tuple) else loss
        out(f"[timing] epoch {epoch_idx} train_time_s={dt:.3f} train_loss={float(loss_v):.4f}")
        self._last_epoch = epoch_idx
        return loss

    def _valid_epoch(self, valid_data, show_progress=False):
        t0 = time.perf_counter()
        score, result = super()._valid_epoch(valid_data, show_progress=show_progress)
        dt = time.perf_counter() - t0
        out(f"[timing] epoch {getattr(self, '_last_epoch', -1)} valid_time_s={dt:.3f} "
            f"valid_ndcg@10={result['ndcg@10']:.4f} since_fit_start_s={time.perf_counter() - self.fit_start:.1f}")
        if self.stop_at is not None and result["ndcg@10"] >= self.stop_at:
            out(f"[reached] valid_ndcg@10={result['ndcg@10']:.4f} >= {self.stop_at} "
                f"after {time.perf_counter() - self.fit_start:.1f} s")
            os._exit(0)  # the time to quality is measured: skip the rest and the test step
        return score, result


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--workdir", required=True, help="holds dataset/<name>/<name>.inter; logs and checkpoints go here")
    p.add_argument("--dataset", default="Beauty")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--train-batch-size", type=int, default=2048, help="RecBole's default")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads value (default: leave torch's default)")
    p.add_argument("--stopping-step", type=int, default=10)
    p.add_argument("--stop-at", type=float, default=None, help="exit once validation NDCG@10 reaches this")
    p.add_argument("--build-only", action="store_true",
                   help="only build the dataset/splits and print statistics")
    args = p.parse_args()
    sys.argv = sys.argv[:1]  # RecBole's Config also parses sys.argv ("--key=value"); keep it out

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    WORK = os.path.abspath(args.workdir)
    os.chdir(WORK)  # RecBole writes log/, log_tensorboard/ and saved/ relative to cwd

    config_dict = {
        "data_path": f"{WORK}/dataset",
        "checkpoint_dir": f"{WORK}/saved",
        "USER_ID_FIELD": "user_id",
        "ITEM_ID_FIELD": "item_id",
        "TIME_FIELD": "timestamp",
        "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
        "user_inter_num_interval": "[0,inf)",
        "item_inter_num_interval": "[0,inf)",
        "MAX_ITEM_LIST_LENGTH": 50,
        # model
        "hidden_size": 64,
        "inner_size": 256,
        "n_layers": 2,
        "n_heads": 2,
        "hidden_dropout_prob": 0.5,
        "attn_dropout_prob": 0.5,
        "loss_type": "CE",
        # training
        "epochs": args.epochs,
        "train_batch_size": args.train_batch_size,
        "learning_rate": 0.001,
        "train_neg_sample_args": None,
        "eval_step": 1,
        "stopping_step": args.stopping_step,
        # evaluation
        "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO",
                      "mode": "full", "group_by": "user"},
        "metrics": ["Recall", "NDCG", "MRR", "Hit"],
        "topk": [5, 10, 20],
        "valid_metric": "NDCG@10",
        # environment
        "device": "cpu",
        "use_gpu": False,
        "seed": 0,
        "reproducibility": True,
        "show_progress": False,
        "worker": 0,
    }

    config = Config(model="SASRec", dataset=args.dataset, config_dict=config_dict)
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    logger = getLogger()

    t0 = time.perf_counter()
    dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    t_data = time.perf_counter() - t0
    with open(f"{WORK}/dataset/{args.dataset}/{args.dataset}.inter") as fh:
        raw_inters = sum(1 for _ in fh) - 1
    # RecBole's SequentialDataset augments: inter_num counts (prefix -> target) pairs,
    # i.e. raw interactions minus each user's first item.
    out(f"[data] dataset={args.dataset} raw_interactions={raw_inters} "
        f"recbole_inters_after_augmentation={dataset.inter_num} "
        f"users={dataset.user_num - 1} items={dataset.item_num - 1} "
        f"(RecBole counts incl. [PAD]: user_num={dataset.user_num} item_num={dataset.item_num}) "
        f"train_sequences={len(train_data.dataset)} valid_users={len(valid_data.dataset)} "
        f"test_users={len(test_data.dataset)} build_time_s={t_data:.3f}")
    out(f"[config] train_batch_size={config['train_batch_size']} epochs={config['epochs']} "
        f"torch_threads={torch.get_num_threads()} torch={torch.__version__} numpy={np.__version__}")
    if args.build_only:
        logger.info(dataset)
        out(f"[timing] total_wall_s={time.perf_counter() - T_START:.3f}")
        return

    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    model = SASRec(config, train_data.dataset).to(config["device"])
    n_params = sum(p.numel() for p in model.parameters())
    out(f"[model] SASRec params={n_params}")

    trainer = TimedTrainer(config, model)
    trainer.stop_at = args.stop_at
    t_fit = trainer.fit_start = time.perf_counter()
    best_valid_score, best_valid_result = trainer.fit(
        train_data, valid_data, saved=True, show_progress=False)
    t_fit = time.perf_counter() - t_fit
    out(f"[timing] fit_total_s={t_fit:.3f} best_valid_ndcg@10={best_valid_score:.4f}")

    t0 = time.perf_counter()
    test_result = trainer.evaluate(test_data, load_best_model=True, show_progress=False)
    t_test = time.perf_counter() - t0
    out(f"[timing] test_time_s={t_test:.3f}")
    out("[result] best_valid " + " ".join(f"{k}={v:.4f}" for k, v in best_valid_result.items()))
    out("[result] test " + " ".join(f"{k}={v:.4f}" for k, v in test_result.items()))
    out(f"[timing] total_wall_s={time.perf_counter() - T_START:.3f}")


if __name__ == "__main__":
    main()
