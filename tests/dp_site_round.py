"""Run one DP round of a site in a fresh process; print its epsilon (used by test_privacy)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from client.config import SiteConfig
from client.trainer import SiteTrainer
from shared.config import ModelSpec, TrainPlan
from shared.privacy import PrivacyRequest, SitePrivacy, resolve_privacy


def main() -> None:
    site_dir, state_dir, server_round = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    site = SiteConfig(data_path=site_dir, state_dir=state_dir, device="cpu", num_threads=1,
                      val_fraction=0.25,
                      privacy=SitePrivacy(enabled=True, noise_multiplier=1.1, max_epsilon=50.0))
    trainer = SiteTrainer(site, ModelSpec(channels=(8, 16), patch_size=(16, 16)))
    privacy = resolve_privacy(site.privacy, PrivacyRequest())
    result = trainer.train(trainer.weights(),
                           TrainPlan(server_round=server_round, local_steps=3, batch_size=2),
                           privacy)
    print(json.dumps({"epsilon": result.epsilon, "steps": result.steps}))


if __name__ == "__main__":
    main()
