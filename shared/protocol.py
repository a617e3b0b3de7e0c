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
# Followed by a class index 1..K-1: each structure's mean Dice, sent when K > 2.
VAL_DICE_CLASS = "val-dice-class-"
SITE_NAME = "site-name"
TRAIN_CASES = "train-cases"     # training cases, also when num-examples is a uniform weight of 1

PRIVACY = "privacy"        # ConfigRecord: a site's DP status after the round
DP = "dp"                  # bool: the round was trained with DP-SGD
EPSILON = "epsilon"        # cumulative epsilon of the site (0.0 without DP)
DELTA = "delta"
# float: standard deviation of the DP-SGD noise in the site's mean gradient per step
# (shared.privacy.gradient_noise_std; 0.0 without DP); site-weighting 'dp-noise' uses it.
NOISE_STD = "noise-std"
REFUSED = "refused"        # bool: the site declined to train this round
REASON = "reason"          # why it declined

FINGERPRINT = "fingerprint"    # MetricRecord: a site's data fingerprint (aggregates only)
FINGERPRINT_QUERY = "query.fingerprint"  # message type asking a site for its fingerprint

# Error codes a site replies with instead of its exception's text, which can name files
# (and so patients); the full message stays in the site's own log.
ERROR_INTERNAL = 9100      # any other failure at the site
ERROR_DATA = 9101          # a file of the site's data set cannot be used
ERROR_CONFIG = 9102        # a bad node config, or a round config the site cannot follow
ERROR_MEMORY = 9103        # out of memory (GPU or CPU)
