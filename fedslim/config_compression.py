"""The ``CompressionConfig`` section of the run configuration: the wire and the server step.

Part of :mod:`fedslim.config` (which re-exports it); its own module only to keep each file
readable.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fedslim.compression.auto import DOWNLINK_AUTO, UPLINK_AUTO, AutoSpec, compresses
from fedslim.compression.grammar import parse_spec
from fedslim.compression.spec import PipelineSpec
from fedslim.config_enums import ErrorFeedbackMode, ServerOpt
from fedslim.config_fields import key, validate_fields
from fedslim.errors import ConfigError

KEYFRAME_SPEC = parse_spec("q:8|ans")
ADAM_SERVER_LR = 0.1  # Flower's FedAdam default eta


@dataclass(frozen=True)
class CompressionConfig:
    """Update compression on the wire and the server-side optimizer."""

    uplink: PipelineSpec | AutoSpec = field(default=UPLINK_AUTO, metadata=key(
        "uplink", "Client-to-server pipeline: `auto` (= `" + str(UPLINK_AUTO.spec) + "`: "
        "each tensor keeps the fewest values holding " + f"{UPLINK_AUTO.energy:.0%}" + " of "
        "its update's energy, so the bytes follow the model; `auto:energy=0.6,bits=4` "
        "changes the level; see docs/compression.md), `none` (plain float32 arrays, exactly "
        "as stock Flower), or a fixed spec (e.g. `topk:0.01|q:4`, "
        "`budget:x250|q:4|ans|pass:0`, `lowrank:4|q:8`)."))
    downlink: PipelineSpec | AutoSpec | None = field(default=None, metadata=key(
        "downlink", "Server-to-client pipeline for the global model's steps: `auto` (`none` "
        "when `uplink` is `none`, else the pipeline of `uplink=auto`), `none` (the full "
        "float32 model every round), or a spec. The server decodes its own payload, so "
        "clients and server hold bit-identical weights with any pipeline."))
    stream_aggregation: bool = field(default=True, metadata=key(
        "stream-aggregation", "The server validates each reply, keeps it as sent and folds "
        "its decoded update into a running sum one at a time (memory O(model), not O(clients "
        "x model)); with fedslim's own strategy only (stock strategies need every reply at "
        "once). false decodes all replies up front, as before."))
    bind_replies: bool = field(default=True, metadata=key(
        "bind-replies", "Every reply must carry the header binding it to the round and "
        "version it answers (replay protection, CRC of the node's copy), also with uplink "
        "and downlink `none`; false lets ClientApps without compression_mod take part."))
    shared_init: bool = field(default=True, metadata=key(
        "shared-init", "With a compressing `downlink`, nodes build the seeded round-0 model "
        "themselves (checked by CRC) instead of downloading it. fedslim's ClientApp can; "
        "set false for a ClientApp whose compression_mod has no `initial_state`."))
    keyframe_every: int = field(default=0, metadata=key(
        "keyframe-every", "Every this many versions, the global model the downlink sends is "
        "a keyframe: its drift from the round-0 model through the `keyframe` pipeline, which "
        "nodes too far behind for a catch-up chain get instead of the full float32 model. "
        "For low participation (measured: at fraction-train 0.01 total traffic 2.0x -> "
        "10.5x below FedAvg with 16; at 0.1 about neutral): no chain crosses a keyframe, so "
        "every node older than the newest one downloads it, not a short chain. "
        "Needs a compressing `downlink` and `shared-init`. 0: none.", low=0, high=32))
    keyframe: PipelineSpec = field(default=KEYFRAME_SPEC, metadata=key(
        "keyframe", "Pipeline for keyframes (see `keyframe-every`); what it rounds off joins "
        "the downlink's residual and is sent in the following steps."))
    error_feedback: ErrorFeedbackMode = field(default=ErrorFeedbackMode.AUTO, metadata=key(
        "error-feedback", "Clients add what compression dropped to their next update: "
        "`true`, `false`, or `auto` = true when fraction-train >= 0.1, false below (measured "
        "to help at 100% and 10% per round, no better at 1%, where it still costs a "
        "model-sized residual per client)."))
    spill_client_state: bool = field(default=True, metadata=key(
        "spill-client-state", "fedslim's ClientApp keeps its copy of the global model and "
        "its residual in files under output-dir/client-state instead of Flower's node "
        "context (which the simulation engine holds in the server process for every node: "
        "two models per node)."))
    ef_reset_after: int = field(default=0, metadata=key(
        "ef-reset-after", "A client that last trained more than this many rounds ago drops "
        "its error-feedback residual instead of adding it (0: never).", low=0, high=63))
    warmup_rounds: int = field(default=0, metadata=key(
        "warmup-rounds", "DGC-style sparsity warm-up: top-k density decays exponentially "
        "from 25% to the target over this many rounds.", low=0))
    server_opt: ServerOpt = field(default=ServerOpt.AVG, metadata=key(
        "server-opt", "How the averaged update is applied: `avg`, `avgm` (momentum) or "
        "`adam`."))
    server_lr: float | None = field(default=None, metadata=key(
        "server-lr", "Server learning rate applied to the averaged update: `auto` = 1.0 for "
        "`avg` / `avgm` and FedAvgM, 0.1 for Adam (`server-opt=adam`, `strategy=fedadam`: "
        "Flower's FedAdam default; 1.0 drives the digits CNN to chance), or a number.",
        low=0.0, low_open=True))
    server_momentum: float = field(default=0.9, metadata=key(
        "server-momentum", "Momentum for `avgm`; beta1 for `adam`.", low=0.0, high=0.999))
    defence_clip_ratio: float = field(default=3.0, metadata=key(
        "defence-clip-ratio", "Server defence: an update whose L2 norm exceeds this many "
        "times the round's median update norm is scaled down to it (needs 3+ replies); 0 "
        "disables.", low=0.0))
    defence_reject_ratio: float = field(default=10.0, metadata=key(
        "defence-reject-ratio", "Server defence: a reply whose update L2 norm, or whose "
        "num-examples, exceeds this many times the round's median is rejected as hostile "
        "(needs 3+ replies); 0 disables.", low=0.0))
    defence_max_norm: float = field(default=0.0, metadata=key(
        "defence-max-norm", "Server defence: a fixed bound on every update's L2 norm "
        "(combined with the ratio: the smaller wins); 0 = none.", low=0.0))
    defence_trust_ratio: float = field(default=0.5, metadata=key(
        "defence-trust-ratio", "Server defence: each round the server trains the global "
        "model on its own root set (the validation split's first `defence-trust-examples`)"
        " and scores every update by its cosine with that reference update: <= 0 is "
        "rejected, below this many times the round's median positive cosine loses weight "
        "in proportion. Needs val-fraction > 0; 0 disables.", low=0.0, high=1.0))
    defence_trust_examples: int = field(default=256, metadata=key(
        "defence-trust-examples", "Server defence: size of the root set the reference "
        "update is trained on (taken from the validation split).", low=1))
    defence_weight_ratio: float = field(default=2.0, metadata=key(
        "defence-weight-ratio", "Server defence: a reply's num-examples above this many "
        "times the round's median is lowered to it; 0 disables.", low=0.0))

    def __post_init__(self) -> None:
        validate_fields(self)
        if self.keyframe_every and (not compresses(self.downlink_spec) or not self.shared_init):
            raise ConfigError(
                f"keyframe-every={self.keyframe_every} needs a compressing downlink and "
                f"shared-init=true (downlink={self.downlink_spec}, shared-init="
                f"{str(self.shared_init).lower()})")
        if self.warmup_rounds and not isinstance(self.uplink, PipelineSpec):
            raise ConfigError(f"warmup-rounds={self.warmup_rounds} decays a topk fraction; "
                              f"uplink={self.uplink} sets its own level (use warmup-rounds=0)")

    def server_lr_for(self, adam: bool) -> float:
        """``server-lr`` with ``auto`` resolved: 0.1 for an Adam server step, else 1.0."""
        if self.server_lr is not None:
            return self.server_lr
        return ADAM_SERVER_LR if adam else 1.0

    @property
    def downlink_spec(self) -> PipelineSpec | AutoSpec:
        """``downlink`` with ``auto`` resolved against ``uplink``."""
        if self.downlink is not None:
            return self.downlink
        return DOWNLINK_AUTO if compresses(self.uplink) else PipelineSpec()
