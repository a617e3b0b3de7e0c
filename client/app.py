"""The Flower ClientApp: a thin adapter between messages and the site trainer.

Each message carries the global weights and the round's instructions; the reply
carries the updated shared weights and a few numbers. Images, labels, file paths
and site-local state never enter a reply.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from threading import Lock

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from client.config import SiteConfig
from client.fingerprint import fingerprint_site
from client.personal import refuse_under_dp
from client.trainer import SiteTrainer, TrainResult
from shared import protocol as p
from shared.config import ModelSpec, TrainPlan
from shared.errors import ConfigError, DataError
from shared.privacy import PrivacyRequest, resolve_privacy
from shared.weights import TRANSFER_DTYPES, as_float32, for_wire, from_record, to_record

log = logging.getLogger("fedseg.client")

SiteResolver = Callable[[Context], SiteConfig]


def site_from_node_config(context: Context) -> SiteConfig:
    """Read the site's settings from the SuperNode's node config."""
    return SiteConfig.from_node_config(context.node_config)


class TrainerCache:
    """Keep one trainer per (site, model) so data is read once per process."""

    def __init__(self) -> None:
        self._trainers: dict[tuple[SiteConfig, ModelSpec], SiteTrainer] = {}
        self._lock = Lock()

    def __getstate__(self) -> dict[str, object]:
        # The simulation ships the ClientApp to worker processes; trainers and the
        # lock stay behind and are rebuilt there.
        return {}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__init__()  # type: ignore[misc]

    def get(self, site: SiteConfig, spec: ModelSpec) -> SiteTrainer:
        """Return the cached trainer for ``site`` and ``spec``, building it once."""
        with self._lock:
            key = (site, spec)
            if key not in self._trainers:
                self._trainers[key] = SiteTrainer(site, spec)
            return self._trainers[key]


_GENERIC = {
    p.ERROR_DATA: "a file of the site's data cannot be used",
    p.ERROR_CONFIG: "the site's configuration or this round's config cannot be used",
    p.ERROR_MEMORY: "the site ran out of memory",
    p.ERROR_INTERNAL: "the site failed",
}


def error_code(exc: BaseException) -> int:
    """Return the error code a site reports for ``exc`` (its text is never sent)."""
    if isinstance(exc, DataError):
        return p.ERROR_DATA
    if isinstance(exc, ConfigError):
        return p.ERROR_CONFIG
    if isinstance(exc, MemoryError | torch.OutOfMemoryError):
        return p.ERROR_MEMORY
    return p.ERROR_INTERNAL


def private_errors_mod(msg: Message, context: Context,
                       call_next: ClientAppCallable) -> Message:
    """Turn a failure at the site into an error reply that names no file or case.

    Flower would send the exception's text to the server, and fedseg's own messages
    name files, whose names may hold patients' names. The reply carries a code and
    a generic reason; the full message goes to the site's own log.
    """
    try:
        return call_next(msg, context)
    except Exception as exc:
        code = error_code(exc)
        log.exception("fedseg site error %d in %s", code, msg.metadata.message_type)
        reason = (f"{_GENERIC[code]} ({type(exc).__name__}, code {code}); the details are "
                  "in the site's own log")
        return Message(Error(code=code, reason=reason), reply_to=msg)


def clip_update_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Apply Flower's ``fixedclipping_mod`` when the server asks for client-side clipping.

    A refused round carries no weights to clip, so its explicit refusal is passed
    through instead of being turned into an error by the mod. With a ``dp-trainable``
    group the reply holds only the parameters the site trained; the update is then
    clipped against the global values of those same parameters (the others did not
    move), since Flower's mod needs the same names on both sides.
    """
    config = msg.content.config_records.get(p.CONFIG)
    if config is None or KEY_CLIPPING_NORM not in config:
        return call_next(msg, context)
    reply = call_next(msg, context)
    if reply.has_error() or p.ARRAYS not in reply.content.array_records:
        return reply
    sent = reply.content.array_records[p.ARRAYS]
    received = msg.content.array_records[p.ARRAYS]
    if all(k in received and np.array_equal(sent[k].numpy(), received[k].numpy())
           for k in sent):
        # A zero update is its own clip; Flower's mod would divide by its norm.
        return reply
    if list(sent.keys()) != list(received.keys()):
        # Training is done with the message; the mod reads only its reference values.
        msg.content[p.ARRAYS] = ArrayRecord({k: received[k] for k in sent})
    return fixedclipping_mod(msg, context, lambda m, c: reply)


def transfer_dtype_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Convert the shared weights at the site's edge: float32 inside, transfer-dtype outside.

    The incoming weights (whatever precision the server sent) become float32 before
    anything at the site sees them, and a train reply's weights are cast to the
    round's ``transfer-dtype`` after everything else, client-side clipping included,
    so the site trains and clips in float32.
    """
    record = msg.content.array_records.get(p.ARRAYS)
    if record is not None and any(a.dtype != "float32" for a in record.values()):
        msg.content.array_records[p.ARRAYS] = to_record(as_float32(from_record(record)))
    out = call_next(msg, context)
    config = msg.content.config_records.get(p.CONFIG)
    if out.has_error() or config is None or p.ARRAYS not in out.content.array_records:
        return out
    transfer = TrainPlan.from_config(config).transfer_dtype
    if TRANSFER_DTYPES[transfer] is not None:
        weights = from_record(out.content.array_records[p.ARRAYS])
        out.content.array_records[p.ARRAYS] = to_record(for_wire(weights, transfer))
    return out


def train_reply(msg: Message, site: SiteConfig, result: TrainResult,
                uniform_weights: bool) -> Message:
    """Build the reply to a train message: shared weights (unless refused) and numbers."""
    metrics = MetricRecord({
        # Central DP's sensitivity analysis needs every update weighted equally.
        p.NUM_EXAMPLES: 1 if uniform_weights else result.num_examples,
        p.TRAIN_CASES: result.num_examples,
        p.TRAIN_LOSS: 0.0 if result.refused else result.train_loss,
        p.TRAIN_STEPS: result.steps,
    })
    privacy = ConfigRecord({
        p.DP: result.epsilon is not None,
        p.EPSILON: result.epsilon or 0.0,
        p.DELTA: result.delta or 0.0,
        p.NOISE_STD: result.noise_std,
        p.REFUSED: bool(result.refused),
        p.REASON: result.refused,
    })
    content = RecordDict({p.METRICS: metrics, p.SITE: ConfigRecord({p.SITE_NAME: site.site_name}),
                          p.PRIVACY: privacy})
    if not result.refused:
        content[p.ARRAYS] = to_record(result.weights)
    return Message(content=content, reply_to=msg)


def make_client_app(resolve_site: SiteResolver = site_from_node_config) -> ClientApp:
    """Build the ClientApp.

    Parameters
    ----------
    resolve_site : callable
        Maps Flower's ``Context`` to the site's :class:`SiteConfig`. Deployments use
        the node config; the simulation maps each virtual node to a site folder.

    Returns
    -------
    flwr.clientapp.ClientApp
        An app answering ``train``, ``evaluate`` and ``query.fingerprint`` messages.
    """
    app = ClientApp(mods=[private_errors_mod])
    cache = TrainerCache()

    # The dtype mod is outermost, so clipping and training see float32 weights.
    @app.train(mods=[transfer_dtype_mod, clip_update_mod])
    def train(msg: Message, context: Context) -> Message:
        site = resolve_site(context)
        config = msg.content.config_records[p.CONFIG]
        spec = ModelSpec.from_config(config)
        plan = TrainPlan.from_config(config)
        # The site's own settings bound whatever the coordinator requests.
        privacy = resolve_privacy(site.privacy, PrivacyRequest.from_config(config))
        trainer = cache.get(site, spec)
        result = trainer.train(from_record(msg.content.array_records[p.ARRAYS]), plan, privacy)
        if result.refused:
            log.warning("site %s refused round %d: %s", site.site_name, plan.server_round,
                        result.refused)
        return train_reply(msg, site, result, plan.uniform_weights)

    @app.query("fingerprint")
    def fingerprint(msg: Message, context: Context) -> Message:
        # Only the declared aggregate numbers leave: no case names, paths or values.
        site = resolve_site(context)
        record = fingerprint_site(site).to_record()
        content = RecordDict({
            p.FINGERPRINT: MetricRecord(dict(record)),
            p.SITE: ConfigRecord({p.SITE_NAME: site.site_name}),
        })
        return Message(content=content, reply_to=msg)

    @app.evaluate(mods=[transfer_dtype_mod])
    def evaluate(msg: Message, context: Context) -> Message:
        site = resolve_site(context)
        config = msg.content.config_records[p.CONFIG]
        spec = ModelSpec.from_config(config)
        # A fine-tune before evaluating is training too: refused under DP like a personal model.
        refuse_under_dp(spec, resolve_privacy(site.privacy, PrivacyRequest.from_config(config)))
        trainer = cache.get(site, spec)
        result = trainer.evaluate(from_record(msg.content.array_records[p.ARRAYS]),
                                  TrainPlan.from_config(config))
        metrics = MetricRecord({
            p.NUM_EXAMPLES: result.num_examples,
            p.VAL_DICE: result.dice if result.num_examples else 0.0,
            # Each structure's Dice only where there are several: aggregate numbers, as
            # val-dice is.
            **({f"{p.VAL_DICE_CLASS}{c}": v for c, v in enumerate(result.per_class, 1)}
               if len(result.per_class) > 1 else {}),
        })
        content = RecordDict({
            p.METRICS: metrics,
            p.SITE: ConfigRecord({p.SITE_NAME: site.site_name}),
        })
        return Message(content=content, reply_to=msg)

    return app


app = make_client_app()
