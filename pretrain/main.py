"""Entry point: `deepspeed pretrain/main.py +exp=NAME [key=value ...]`.

Works unchanged under `torchrun` and plain `python`. No logic lives here: configuration,
distributed setup and the trainer each live in their own module.
"""

from __future__ import annotations

import logging
import os
import sys

from pretrain.checkpoint.manager import NOT_COMMITTED_EXIT_CODE, NotCommitted
from pretrain.config import load_config
from pretrain.distributed import init_distributed, shutdown, strip_launcher_args
from pretrain.engines import check_engine_config
from pretrain.errors import UserError
from pretrain.heartbeat import LOST_RANK_EXIT_CODE, LostRank
from pretrain.preemption import PREEMPTED_EXIT_CODE, Preempted
from pretrain.trainer import Trainer


def main(argv: list[str] | None = None) -> int:
    overrides = strip_launcher_args(sys.argv[1:] if argv is None else argv)
    rank = int(os.environ.get("RANK", "0"))
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    log = logging.getLogger("pretrain")  # ours only: libraries keep their own log settings
    log.addHandler(handler)
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    try:
        cfg = load_config(overrides)
        check_engine_config(cfg, world_size=int(os.environ.get("WORLD_SIZE", "1")))
        dist_info = init_distributed(cfg.train.collective_timeout_s)
        try:
            Trainer(cfg, dist_info).fit()
        finally:
            shutdown()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Preempted:
        return PREEMPTED_EXIT_CODE
    except NotCommitted as e:
        print(f"error: {e}", file=sys.stderr)
        return NOT_COMMITTED_EXIT_CODE
    except LostRank as e:
        print(f"error: {e}", file=sys.stderr)
        return LOST_RANK_EXIT_CODE
    return 0


if __name__ == "__main__":
    code = main()
    # Everything the run owns is done by now: checkpoints committed, metrics sent or kept, loader
    # workers and the process group shut down. Skip the interpreter's teardown, which spends
    # seconds freeing torch's, DeepSpeed's and MLflow's modules, on every rank of every start.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
