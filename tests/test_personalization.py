"""Personalisation: Ditto's update, local fine-tuning, the local head, personal state."""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Context, Message, RecordDict
from torch import nn

from client.app import make_client_app
from client.config import SiteConfig
from client.inference import Tiling
from client.inference import predict_classes as trainer_predict_classes
from client.personal import (
    FILE_NAME,
    PersonalModel,
    ditto_objective,
    fit,
    load_personal_model,
    personal_step,
    refuse_under_dp,
    save_personal_model,
    trainable_copy,
    weights_digest,
)
from client.predict import load_site_network
from client.site_check import check_state_dir
from client.trainer import SiteTrainer, finetune_rate
from fedseg.cli import main
from server.app import initial_weights
from server.config import RunConfig
from server.federation import FederationState, run_round
from server.history import MetricsHistory
from server.strategies import build_strategy
from shared.checkpoint import Checkpoint
from shared.config import ModelSpec
from shared.errors import ConfigError, DataError
from shared.networks import NETWORKS, build_network
from shared.partition import local_parameter_names, segmentation_head
from shared.personalization import finetune_parameter_names
from shared.privacy import PrivacySettings
from shared.weights import state_to_numpy
from simulations.phantoms import write_synthetic_federation
from tests.conftest import FakeGrid

# MONAI UNet with channels 8,16 (see shared.networks): its top up-sampling block maps
# the features to class maps (transposed convolution) and its final convolution
# refines them; both are num_classes wide.
UNET_HEAD = {"model.2.0.conv.weight", "model.2.0.conv.bias",
             "model.2.1.conv.unit0.conv.weight", "model.2.1.conv.unit0.conv.bias"}
UNET_NORMS = {f"{prefix}.adn.N.{p}" for prefix in
              ("model.0.conv.unit0", "model.1.submodule.conv.unit0", "model.2.0")
              for p in ("weight", "bias")}


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("personal-sites")
    return write_synthetic_federation(root, num_sites=2, cases_per_site=6, shape=(32, 32))


def run_config(**values: object) -> RunConfig:
    return RunConfig.from_user_config({
        "min-available-nodes": 2, "min-train-nodes": 2, "min-evaluate-nodes": 2,
        "local-steps": 2, "batch-size": 2, "channels": "8,16", "patch-size": "16,16",
        "finetune-steps": 2, "finetune-rounds": "all", **values})


def site(data: Path, state: Path) -> SiteConfig:
    return SiteConfig(data_path=data, state_dir=state, device="cpu", num_threads=1,
                      val_fraction=0.34)


# --- Ditto's update on hand-made tensors ---------------------------------------------

def test_ditto_objective_and_its_gradient_exactly() -> None:
    v = torch.tensor([1.0, 2.0], requires_grad=True)
    w = torch.tensor([0.5, 4.0])
    loss = (v * torch.tensor([1.0, -1.0])).sum()  # -1, gradient (1, -1)
    objective = ditto_objective(loss, [("v", v)], {"v": w}, lam=0.5)
    # -1 + 0.5/2 * (0.5^2 + 2^2) = -1 + 0.25 * 4.25
    assert objective.item() == 0.0625
    objective.backward()
    assert v.grad is not None
    assert v.grad.tolist() == [1.25, -2.0]  # grad loss + lambda * (v - w)
    assert ditto_objective(loss, [("v", v)], {"v": w}, lam=0.0) is loss


def test_personal_step_is_dittos_sgd_update_exactly() -> None:
    net = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[1.0, 2.0]]))
    batch = (torch.tensor([[1.0, -1.0]]), torch.tensor([[1.0]]))

    def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (out * y).sum()  # gradient in the weight: x * y = (1, -1)

    optimiser = torch.optim.SGD(net.parameters(), lr=0.5)
    anchor = {"weight": torch.tensor([[0.5, 4.0]])}
    loss = personal_step(net, batch, loss_fn, optimiser, anchor, 0.5, torch.device("cpu"))
    assert loss == 0.0625
    # v - lr * (grad + lambda * (v - w)) = (1 - 0.5 * 1.25, 2 - 0.5 * -2)
    assert net.weight.tolist() == [[0.375, 3.0]]
    # Without an anchor the step is plain SGD on the loss: (0.375 - 0.5, 3 + 0.5).
    personal_step(net, batch, loss_fn, optimiser, None, 0.5, torch.device("cpu"))
    assert net.weight.tolist() == [[-0.125, 3.5]]


def test_a_large_lambda_holds_the_personal_model_at_the_global_one() -> None:
    # Ditto's two ends: lambda 0 is local training, a large lambda the global model. With
    # lr * lambda = 1 each SGD step lands on w - lr * grad: no drift however many steps.
    net = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[1.0, 2.0]]))
    anchor = {"weight": net.weight.detach().clone()}
    batches = [(torch.tensor([[1.0, -1.0]]), torch.tensor([[1.0]]))] * 5
    losses = fit(net, batches, torch.optim.SGD(net.parameters(), lr=1.0),
                 lambda o, y: (o * y).sum(), torch.device("cpu"), lambda step: 1 / 64, anchor,
                 lam=64.0)
    assert net.weight.tolist() == [[1 - 1 / 64, 2 + 1 / 64]]
    assert len(losses) == 5 and losses[0] == -1.0
    # lambda 0: plain local training walks on, 5 steps of 1/64 along -grad.
    fit(net, batches, torch.optim.SGD(net.parameters(), lr=1.0), lambda o, y: (o * y).sum(),
        torch.device("cpu"), lambda step: 1 / 64, anchor, lam=0.0)
    assert net.weight.tolist() == [[1 - 6 / 64, 2 + 6 / 64]]


# --- the local head, chosen by type and position ---------------------------------------

def test_local_head_is_the_class_map_convolutions_of_every_network() -> None:
    expected = {
        "unet": (ModelSpec(channels=(8, 16), patch_size=(16, 16)), UNET_HEAD),
        "basicunet": (ModelSpec(network="basicunet", channels=(8, 8, 16, 16, 16, 8),
                                patch_size=(32, 32)), {"final_conv.weight", "final_conv.bias"}),
        "segresnet": (ModelSpec(network="segresnet", channels=(8,), patch_size=(16, 16)),
                      {"conv_final.2.conv.weight", "conv_final.2.conv.bias"}),
    }
    assert set(expected) == set(NETWORKS.names())
    for name, (spec, head) in expected.items():
        net = build_network(spec)
        assert local_parameter_names(net, "local-head") == head, name
        # The head's last convolution is the last one the forward pass runs.
        assert last_convolution_run(net, spec) is segmentation_head(net)[-1], name


def last_convolution_run(net: nn.Module, spec: ModelSpec) -> nn.Module:
    ran: list[nn.Module] = []
    hooks = [m.register_forward_hook(lambda m, i, o: ran.append(m)) for m in net.modules()
             if isinstance(m, nn.Conv2d | nn.ConvTranspose2d)]
    net(torch.zeros(1, 1, *spec.patch_size))
    for hook in hooks:
        hook.remove()
    return ran[-1]


def test_local_head_with_an_adapter_is_still_the_output_end() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(2, 2, 1)       # as wide as the output, but not at the end
            self.body = nn.Conv2d(2, 4, 3)
            self.norm = nn.InstanceNorm2d(4, affine=True)
            self.out = nn.Conv2d(4, 2, 1)

    assert local_parameter_names(Net(), "local-head") == {"out.weight", "out.bias"}
    assert local_parameter_names(nn.Sequential(nn.ReLU()), "local-head") == frozenset()


def test_local_head_never_leaves_the_site(sites: list[Path], tmp_path: Path) -> None:
    cfg = run_config(adaptation="local-head", personalization="ditto")
    every = set(state_to_numpy(build_network(cfg.model).state_dict()))
    configs = {n: site(d, tmp_path / d.name) for n, d in zip((1, 2), sites, strict=True)}
    app = make_client_app(lambda ctx: configs[ctx.node_id])
    replies: list[Message] = []

    def responder(node: int):  # type: ignore[no-untyped-def]
        ctx = Context(run_id=1, node_id=node, node_config={}, state=RecordDict(), run_config={})

        def respond(msg: Message) -> Message:
            replies.append(app(msg, ctx))
            return replies[-1]
        return respond

    grid = FakeGrid({n: responder(n) for n in configs})
    state = FederationState(0, initial_weights(cfg), MetricsHistory({}))
    assert set(state.weights) == every - UNET_HEAD  # the server never holds a head
    state = run_round(grid, build_strategy(cfg), cfg, state)
    assert len(replies) == 4 and not any(m.has_error() for m in replies)
    for msg in replies:
        for record in msg.content.array_records.values():
            assert set(record.keys()) == every - UNET_HEAD
        if msg.metadata.message_type == "evaluate":
            assert not msg.content.array_records
    # Ditto's personal steps are reported with the global ones.
    assert [s.train_steps for s in state.history.rounds[0].sites] == [4, 4]
    for d in sites:
        personal = load_personal_model(tmp_path / d.name, cfg.model, {
            k: v.shape for k, v in state_to_numpy(build_network(cfg.model).state_dict()).items()})
        assert personal is not None and set(personal.weights) == every


# --- which parameters a fine-tune may change ------------------------------------------

def test_finetune_scopes_name_exactly_their_parameters() -> None:
    net = build_network(ModelSpec(channels=(8, 16), patch_size=(16, 16)))
    every = {n for n, _ in net.named_parameters()}
    assert finetune_parameter_names(net, "all") == every
    assert finetune_parameter_names(net, "head") == UNET_HEAD
    assert finetune_parameter_names(net, "norm") == UNET_NORMS
    tuned, allowed = trainable_copy(net, "head")
    assert allowed == UNET_HEAD
    assert {n for n, p in tuned.named_parameters() if p.requires_grad} == UNET_HEAD
    assert all(p.requires_grad for p in net.parameters())  # the original is untouched


@pytest.mark.parametrize("scope", ["all", "head", "norm"])
def test_finetune_changes_only_its_scope_and_never_the_weights_sent(
        scope: str, sites: list[Path], tmp_path: Path) -> None:
    cfg = run_config(personalization="finetune", **{"finetune-scope": scope})
    trainer = SiteTrainer(site(sites[0], tmp_path), cfg.model)
    received = trainer.train(initial_weights(cfg), cfg.plan(1)).weights
    before = {n: p.detach().clone() for n, p in trainer.net.named_parameters()}
    tuned = trainer.deployed(received, cfg.plan(1))
    changed = {n for n, p in tuned.named_parameters() if not torch.equal(p, before[n])}
    allowed = finetune_parameter_names(tuned, scope)
    assert changed == allowed  # each allowed parameter moved, no other did
    # The global model is as received: the next update starts from it, not the fine-tune.
    for name, array in trainer.weights().items():
        np.testing.assert_array_equal(array, received[name])
    assert all(torch.equal(p, before[n]) for n, p in trainer.net.named_parameters())


def test_by_default_only_the_last_round_fine_tunes_for_a_rounds_worth_of_steps(
        sites: list[Path], tmp_path: Path) -> None:
    cfg = run_config(personalization="finetune", **{
        "finetune-rounds": "final", "finetune-steps": 0, "num-server-rounds": 3})
    trainer = SiteTrainer(site(sites[0], tmp_path), cfg.model)
    weights = trainer.train(initial_weights(cfg), cfg.plan(1)).weights
    assert trainer.deployed(weights, cfg.plan(2)) is trainer.net  # the global model
    assert trainer.personal_models.get(trainer.net, weights_digest(weights)) is None
    steps: list[int] = []

    def counting(net: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                 *args: Any, **kwargs: Any) -> Any:
        listed = list(batches)
        steps.append(len(listed))
        return fit(net, iter(listed), *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("client.trainer.fit", counting)
        tuned = trainer.deployed(weights, cfg.plan(3))
    assert tuned is not trainer.net and steps == [2]  # local-steps, as finetune-steps is 0
    assert trainer.personal_models.get(trainer.net, weights_digest(weights)) is not None


def test_the_fine_tune_anneals_with_the_run_schedule_from_its_own_peak() -> None:
    plan = run_config(**{"learning-rate": 0.002, "finetune-lr-factor": 0.5,
                         "lr-schedule": "cosine", "num-server-rounds": 9}).plan(9)
    # cosine over the fine-tune's 4 steps from 0.002 x 0.5, whatever the round
    assert [finetune_rate(plan, step, 4) for step in range(4)] == pytest.approx(
        [0.001, 0.001 * (1 + 2 ** -0.5) / 2, 0.0005, 0.001 * (1 - 2 ** -0.5) / 2], abs=1e-15)
    flat = run_config(**{"learning-rate": 0.002, "finetune-lr-factor": 0.25,
                         "lr-schedule": "constant"}).plan(1)
    assert [finetune_rate(flat, step, 3) for step in range(3)] == [0.0005] * 3


def test_a_fine_tune_of_zero_steps_takes_one_round_of_the_site() -> None:
    assert run_config(**{"finetune-steps": 0}).plan(1).finetune_length(37) == 37
    assert run_config(**{"finetune-steps": 5}).plan(1).finetune_length(37) == 5


def test_finetune_is_what_the_site_evaluates_and_predict_deploys(
        sites: list[Path], tmp_path: Path) -> None:
    cfg = run_config(personalization="finetune", **{"finetune-steps": 6, "num-server-rounds": 1})
    trainer = SiteTrainer(site(sites[0], tmp_path / "state"), cfg.model)
    weights = trainer.train(initial_weights(cfg), cfg.plan(1)).weights
    tuned = trainer.evaluate(weights, cfg.plan(1))
    image = trainer.data.val[0].image
    # A restarted site (new trainer, same state folder) predicts with the kept fine-tune.
    again = SiteTrainer(trainer.site, cfg.model, trainer.data)
    expected = trainer.predict(weights, image)
    np.testing.assert_array_equal(again.predict(weights, image), expected)
    assert again.evaluate(weights).dice == tuned.dice
    # ... and fedseg predict applies the same network.
    Checkpoint(cfg.model, weights, 1).save(tmp_path / "final_model.pt")
    site_net = load_site_network(tmp_path / "final_model.pt", tmp_path / "state")
    assert site_net.personal
    kept = again.deployed(weights)
    for name, value in site_net.net.state_dict().items():
        torch.testing.assert_close(value, kept.state_dict()[name], rtol=0, atol=0)
    # A fine-tune of other global weights is refused, by the trainer and by predict.
    other = {k: v + 1.0 for k, v in weights.items()}
    with pytest.raises(DataError, match="holds no fine-tune of these global weights"):
        again.predict(other, image)
    Checkpoint(cfg.model, other, 2).save(tmp_path / "other.pt")
    with pytest.raises(DataError, match=r"fine-tune of another global model \(round 1\).*"
                                        r"checkpoints/round-001.pt"):
        load_site_network(tmp_path / "other.pt", tmp_path / "state")
    with pytest.raises(DataError, match="personalization 'finetune'; pass --site-state"):
        load_site_network(tmp_path / "final_model.pt", None)


# --- Ditto in the trainer ---------------------------------------------------------------

def test_ditto_sends_exactly_the_plain_update_and_keeps_its_own_model(
        sites: list[Path], tmp_path: Path) -> None:
    plain_cfg, ditto_cfg = run_config(), run_config(personalization="ditto")
    plain = SiteTrainer(site(sites[0], tmp_path / "plain"), plain_cfg.model)
    ditto = SiteTrainer(site(sites[0], tmp_path / "ditto"), ditto_cfg.model, plain.data)
    start = initial_weights(plain_cfg)
    a, b = plain.train(start, plain_cfg.plan(1)), ditto.train(start, ditto_cfg.plan(1))
    assert (a.steps, b.steps) == (2, 4)
    for name, array in a.weights.items():
        np.testing.assert_array_equal(b.weights[name], array)  # the update is FedAvg's
    personal = ditto.deployed(b.weights)
    assert personal is not ditto.net
    assert any(not torch.equal(p, q) for p, q in zip(personal.parameters(),
                                                     ditto.net.parameters(), strict=True))
    # Saved atomically (no temporary file left) and reloaded by a restarted site.
    assert sorted(p.name for p in (tmp_path / "ditto").iterdir()) == [FILE_NAME]
    again = SiteTrainer(ditto.site, ditto_cfg.model, plain.data)
    reloaded = again.deployed(b.weights)
    for name, value in personal.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], value)
    # Before any round, Ditto's personal model is the global one.
    fresh = SiteTrainer(site(sites[0], tmp_path / "fresh"), ditto_cfg.model, plain.data)
    assert fresh.deployed(start) is fresh.net


# --- personal state on disk ------------------------------------------------------------

def test_personal_model_file_round_trip_and_refusals(tmp_path: Path) -> None:
    spec = ModelSpec(channels=(8, 16), patch_size=(16, 16), personalization="ditto")
    weights = state_to_numpy(build_network(spec).state_dict())
    shapes = {k: v.shape for k, v in weights.items()}
    assert load_personal_model(tmp_path, spec, shapes) is None
    save_personal_model(tmp_path, spec, PersonalModel(weights, 3, "abc"))
    loaded = load_personal_model(tmp_path, spec, shapes)
    assert loaded is not None and (loaded.server_round, loaded.base) == (3, "abc")
    for name, array in weights.items():
        np.testing.assert_array_equal(loaded.weights[name], array)
    other = ModelSpec(channels=(8, 16), patch_size=(16, 16), personalization="finetune")
    with pytest.raises(DataError, match="other model settings than this run's; move it aside"):
        load_personal_model(tmp_path, other, shapes)
    # A file written before a model key existed (here downsample) fits with its default.
    payload = torch.load(tmp_path / FILE_NAME, weights_only=True)
    older = {k: v for k, v in payload["model"].items() if k != "model-downsample"}
    assert older != payload["model"]
    torch.save({**payload, "model": older}, tmp_path / FILE_NAME)
    assert load_personal_model(tmp_path, spec, shapes) is not None
    # fedseg site check reads it as a round would.
    assert check_state_dir(tmp_path, 1e-5, "rdp")[2] == "personal model ok: ditto, round 3"
    (tmp_path / FILE_NAME).write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match="damaged personal model: cannot be read"):
        load_personal_model(tmp_path, spec, shapes)
    with pytest.raises(DataError, match="damaged personal model: cannot be read"):
        check_state_dir(tmp_path, 1e-5, "rdp")
    torch.save({"format": "something else"}, tmp_path / FILE_NAME)
    with pytest.raises(DataError, match="damaged personal model: not a fedseg personal-model"):
        load_personal_model(tmp_path, spec, shapes)


def test_a_personal_model_is_refused_under_dp() -> None:
    private = PrivacySettings(noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5,
                              max_epsilon=10.0, accountant="rdp")
    for mode in ("ditto", "finetune"):
        spec = ModelSpec(personalization=mode)
        with pytest.raises(ConfigError, match=f"key 'personalization': '{mode}' would train a "
                                              "personal model outside DP-SGD"):
            refuse_under_dp(spec, private)
        refuse_under_dp(spec, None)
    refuse_under_dp(ModelSpec(adaptation="local-head"), private)


def test_unknown_personalization_is_refused_with_the_closest_name() -> None:
    with pytest.raises(ConfigError, match=r"'personalization'.*ditto, finetune, got 'dito' "
                                          r"\(did you mean 'ditto'\?\)"):
        RunConfig.from_user_config({"personalization": "dito"})
    with pytest.raises(ConfigError, match="'finetune-scope'"):
        RunConfig.from_user_config({"finetune-scope": "bias"})
    with pytest.raises(ConfigError, match=r"'finetune-rounds'.*final, all, got 'last'"):
        RunConfig.from_user_config({"finetune-rounds": "last"})


def test_export_folds_in_the_personal_model(tmp_path: Path) -> None:
    spec = ModelSpec(channels=(4, 8), patch_size=(16, 16), personalization="ditto")
    torch.manual_seed(0)
    global_net = build_network(spec).eval()
    Checkpoint(spec, state_to_numpy(global_net.state_dict()), 3).save(tmp_path / "final.pt")
    personal = build_network(spec).eval()  # other initial weights: visibly other logits
    save_personal_model(tmp_path / "state", spec,
                        PersonalModel(state_to_numpy(personal.state_dict()), 3))
    out = tmp_path / "site.pt"
    assert main(["export", "--model", str(tmp_path / "final.pt"), "--site-state",
                 str(tmp_path / "state"), "--format", "torchscript", "--output", str(out)]) == 0
    contract = json.loads(out.with_name("site.pt.json").read_text())
    assert contract["personalization"] == "ditto" and contract["site_layers_folded_in"]
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is deprecated
        exported = torch.jit.load(str(out))
    with torch.no_grad():
        torch.testing.assert_close(exported(x), personal(x), rtol=0, atol=1e-5)
        assert not torch.allclose(exported(x), global_net(x), atol=1e-3)


def test_only_the_last_rounds_evaluation_predicts_with_test_time_flips(
        sites: list[Path], tmp_path: Path) -> None:
    cfg = run_config(**{"num-server-rounds": 3})
    trainer = SiteTrainer(site(sites[0], tmp_path), cfg.model)
    weights = initial_weights(cfg)
    passes: list[int] = []
    original = trainer_predict_classes

    def counting(net: nn.Module, image: np.ndarray, tiling: Tiling,
                 device: torch.device) -> np.ndarray:
        passes.append(len(tiling.flips))
        return original(net, image, tiling, device)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("client.trainer.predict_classes", counting)
        trainer.evaluate(weights, cfg.plan(2))
        assert set(passes) == {1}
        passes.clear()
        trainer.evaluate(weights, cfg.plan(3))
        assert set(passes) == {4}  # 2D patches: every combination of the two axes
