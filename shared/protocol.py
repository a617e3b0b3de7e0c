"""Names of the records and metrics exchanged between the server and sites.

One place for the wire vocabulary, so the ClientApp, the ServerApp and the tests
cannot drift apart.
"""

from __future__ import annotations

ARRAYS = "arrays"          # ArrayRecord: the shared weights (Flower strategies' default key)
CONFIG = "config"          # ConfigRecord: round instructions from the server
METRICS = "metrics"        # MetricRecord: numbers a site reports
SITE = "site"              # ConfigRecord: the site's self-chosen display name

NUM_EXAMPLES = "num-examples"   # training cases (FedAvg weight) or validation cases
TRAIN_LOSS = "train-loss"
TRAIN_STEPS = "train-steps"
VAL_DICE = "val-dice"
SITE_NAME = "site-name"
