"""Server-side trust: how far each client update agrees with an update the server made
itself (FLTrust's idea, Cao et al. 2021, in a form that leaves honest rounds alone).

Each round the server trains a copy of the global model on a small labelled root set it
holds (by default the first ``defence-trust-examples`` examples of its validation split)
with the clients' own training settings; the result minus the global model is the
*reference update*. A client update ``u`` is scored by its cosine with the reference:

* ``cos <= 0`` -- the update points away from what the server's own data asks for
  (inner-product manipulation, sign flips, label flipping): it is left out of this round's
  aggregate (weight 0). Not a verdict on the node -- honest updates on skewed data land
  here now and then, mostly next to the random initial model, and the cosine cannot tell
  them from a liar's -- so it is not counted as a rejected reply;
* ``0 < cos < ratio x m`` (``m`` = the round's median positive cosine): its weight is
  scaled by ``cos / (ratio x m)``;
* otherwise the reply is untouched.

Unlike FLTrust, updates keep their own magnitude (the norm bound handles that) and their
example weights, so an honest round, where every cosine sits near the median, aggregates
as it did without the defence. Colluders cannot move the reference (the server computes it
alone) and cannot lift the median above the honest clients' unless they are the majority.
The cosine is taken over the float tensors, accumulated in float64.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence

import torch

from fedslim.strategies.aggregate import State

TRUST_STREAM = 1 << 40  # seeds the reference's shuffling apart from every partition's

ReferenceFn = Callable[[State, int], State]
"""``reference(base, server_round)``: the server's own update from ``base`` (float keys)."""


def cosine(update: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]
           ) -> float:
    """Cosine of two updates over ``reference``'s keys (0.0 when either is zero)."""
    dot = na = nb = 0.0
    for k, r in reference.items():
        a, b = update[k].double().flatten(), r.double().flatten()
        dot += float(a @ b)
        na += float(a @ a)
        nb += float(b @ b)
    if na <= 0 or nb <= 0:
        return 0.0
    return dot / math.sqrt(na * nb)


def trust_factors(cosines: Sequence[float], ratio: float) -> list[float]:
    """Per update: 0.0 (left out this round), a weight factor in (0, 1), or 1.0
    (untouched). Without any positive cosine the reference says nothing this round (next
    to a random initial model every honest update can point away from it: measured with
    two clients in round 1): every factor is 1.0 and the norm rules alone apply."""
    positive = [c for c in cosines if c > 0]
    if not positive:
        return [1.0] * len(cosines)
    floor = ratio * statistics.median(positive)
    return [0.0 if c <= 0 else 1.0 if c >= floor else c / floor for c in cosines]


class ServerReference:
    """The server's own update: ``train_fn(model, server_round)`` trains a model loaded
    with the global weights on the root set; returns trained weights minus ``base``."""

    def __init__(self, model: torch.nn.Module,
                 train_fn: Callable[[torch.nn.Module, int], None]) -> None:
        self.model, self.train_fn = model, train_fn
        self.seconds = 0.0

    def __call__(self, base: State, server_round: int) -> State:
        t0 = time.perf_counter()
        self.model.load_state_dict(base)
        self.train_fn(self.model, server_round)
        trained = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        self.seconds = time.perf_counter() - t0
        return {k: trained[k].float() - base[k].float() for k, v in base.items()
                if v.is_floating_point()}
