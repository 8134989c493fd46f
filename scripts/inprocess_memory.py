"""Server-stack memory without Flower's simulation engine: one process, Flower's
serialization on every message (tests/loopback.py), fedslim's ClientApp and server stack.

    python scripts/inprocess_memory.py 10 && python scripts/inprocess_memory.py 100

Prints the process's peak RSS above its baseline after set-up (data, model) for N clients
of ``wide32`` on ``synthetic32`` (60 examples per client), 2 rounds, topk:0.01|q:4 up,
downlink topk:0.05|q:4|ans, streaming aggregation and spilled client state. The clients run
in the same process, one after another, so the peak also holds one client's training.
"""

from __future__ import annotations

import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Message

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedslim.client.app import make_client_app  # noqa: E402
from fedslim.config import parse_run_config  # noqa: E402
from fedslim.strategies import Compressed, FedslimFedAvg  # noqa: E402
from fedslim.strategies.guard import Guarded  # noqa: E402
from fedslim.task.data import load_splits  # noqa: E402
from fedslim.task.models import seeded_model  # noqa: E402
from tests.loopback import LoopbackGrid  # noqa: E402


class Forgetful(LoopbackGrid):
    """A LoopbackGrid that does not keep every message it carried."""

    def send_and_receive(self, messages: object, *, timeout: float | None = None
                         ) -> list[Message]:
        out = list(super().send_and_receive(messages, timeout=timeout))  # type: ignore[arg-type]
        self.sent.clear()
        self.received.clear()
        return out


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        ov = {"model": "wide32", "dataset": "synthetic32", "synthetic-samples": 60 * n,
              "partitioning": "iid", "output-dir": tmp, "client-eval-fraction": 0.0}
        cfg = parse_run_config(ov)
        splits = load_splits(cfg.data, cfg.fed.seed)
        init = seeded_model(cfg.train.model, cfg.fed.seed, splits.input_shape,
                            splits.num_classes)
        grid = Forgetful(make_client_app(ov), n, run_config=ov)
        strategy = Compressed(Guarded(FedslimFedAvg(fraction_evaluate=0.0, seed=1,
                                                    min_available_nodes=n)),
                              uplink="topk:0.01|q:4", downlink="topk:0.05|q:4|ans",
                              shared_init=True, bind=True)
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        t0 = time.time()
        strategy.start(grid, ArrayRecord(init.state_dict()), num_rounds=2)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{n} clients: baseline {base:.0f} MB, peak {peak:.0f} MB, +{peak - base:.0f} MB "
          f"({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
