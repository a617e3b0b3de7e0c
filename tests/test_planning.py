"""Federated self-configuration: exact plans for hand-made fingerprints."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from client.fingerprint import case_statistics, label_classes, site_fingerprint
from server.config import RunConfig
from shared.planning import (
    FINGERPRINT_KEYS,
    Fingerprint,
    PlannerRules,
    PlanningError,
    combine,
    make_plan,
    overridden,
)


def _fp(**kw: object) -> Fingerprint:
    base: dict[str, object] = dict(
        num_cases=100, spatial_dims=2, channels=1, shape=(512, 512), spacing=(1.0, 1.0),
        has_spacing=False, foreground_fraction=0.25, thickness=100.0, dark_fraction=0.05,
        fg_intensity=(20.0, 70.0, 210.0))
    base.update(kw)
    return Fingerprint(**base)  # type: ignore[arg-type]


def test_thick_structures_on_large_radiographs_plan_whole_downsampled_images() -> None:
    plan = make_plan([_fp(), _fp(num_cases=300, dark_fraction=0.01)])
    assert plan.to_run_config() == {
        "in-channels": 1, "num-classes": 2, "resize": "256,256", "downsample": "none",
        "patch-size": "256,256",
        "channels": "16,32,64,128,256", "batch-size": 8, "local-steps": 80,
        "num-server-rounds": 9, "normalization": "zscore", "learning-rate": 0.002,
        "lr-schedule": "cosine", "personalization": "finetune", "finetune-steps": 80,
        "site-weighting": "equal",
    }


def test_thin_structures_keep_native_resolution_in_patches_and_fov_normalisation() -> None:
    plan = make_plan([_fp(channels=3, shape=(584, 568), thickness=6.0, dark_fraction=0.3)])
    assert plan.to_run_config() == {
        "in-channels": 3, "num-classes": 2, "resize": "none", "downsample": "none",
        "patch-size": "96,96",
        "channels": "16,32,64,128", "batch-size": 8, "local-steps": 150,
        "num-server-rounds": 25, "normalization": "zscore-fov", "learning-rate": 0.002,
        "lr-schedule": "cosine", "personalization": "finetune", "finetune-steps": 750,
        "site-weighting": "equal",
    }
    # 25 rounds and 750 fine-tuning steps: the budget's 30 rounds of 150.
    assert plan.budget_rounds == 30
    # The fine-tune is 5 rounds of local steps, the user's when the run config sets them.
    assert plan.to_run_config({"local-steps": 3})["finetune-steps"] == 15
    assert plan.to_run_config({"local-steps": "auto"})["finetune-steps"] == 750
    assert plan.to_run_config({"local-steps": "many"})["finetune-steps"] == 750
    # The user's rounds keep the plan's proportion (5 fine-tuning rounds per 25), at least one.
    assert plan.to_run_config({"num-server-rounds": 50})["finetune-steps"] == 1500
    assert plan.to_run_config({"num-server-rounds": 3})["finetune-steps"] == 150
    assert plan.to_run_config({"num-server-rounds": 3, "local-steps": 3})[
        "finetune-steps"] == 3
    assert plan.to_run_config({"num-server-rounds": 25})["finetune-steps"] == 750
    assert plan.to_run_config({"num-server-rounds": 0})["finetune-steps"] == 750
    # The same share of a budget (federated and fine-tuning rounds): 5 of 30, never all of it.
    assert [plan.finetune_rounds(r, budget=True) for r in (30, 60, 6, 2, 1, 0)] == [
        5, 10, 1, 1, 0, 5]
    assert [plan.finetune_rounds(r) for r in (25, 50, 3, 1, 0)] == [5, 10, 1, 1, 5]


def test_3d_volumes_get_a_budgeted_patch_and_a_narrow_network() -> None:
    # Thin structures in a 3D volume stay at native resolution, in patches.
    plan = make_plan([_fp(spatial_dims=3, shape=(192, 144, 88), spacing=(0.625,) * 3,
                          has_spacing=True, thickness=6.0)])
    assert (plan.resize, plan.downsample) == ((), ())
    assert plan.patch_size == (56, 56, 48)
    assert plan.channels == (8, 16, 32, 64)
    # 1600 steps of batch 2 of 64x64x48 voxels: 2090 of 56x56x48, 14 rounds at most 150.
    assert (plan.batch_size, plan.local_steps, plan.budget_rounds) == (2, 149, 14)
    assert (plan.num_server_rounds, plan.finetune_steps) == (12, 298)


def test_thick_structures_in_volumes_shrink_each_case_by_whole_factors() -> None:
    # The left atrium (26 voxels thick at 0.625 mm): every axis halved, each case's own
    # proportions kept, so the patch holds most of the structure.
    atrium = _fp(spatial_dims=3, shape=(192, 144, 88), spacing=(0.625,) * 3,
                 has_spacing=True, thickness=25.6)
    plan = make_plan([atrium])
    assert plan.to_run_config() == {
        "in-channels": 1, "num-classes": 2, "resize": "none", "downsample": "2,2,2",
        "patch-size": "48,64,40",
        "channels": "8,16,32,64", "batch-size": 2, "local-steps": 142,
        "num-server-rounds": 15, "normalization": "zscore", "learning-rate": 0.002,
        "lr-schedule": "cosine", "personalization": "finetune", "finetune-steps": 426,
        "site-weighting": "equal",
    }
    assert ("structures are 26 voxels thick: shrink every case by 2x2x2 (median 96x72x44); "
            "Dice is still measured at full resolution") in plan.reasons
    # From 1.5 times the minimum thickness (12) a factor of 2; larger ones round, up to 4.
    factors = [make_plan([replace(atrium, thickness=t)]).downsample
               for t in (17.9, 18.0, 29.9, 30.0, 42.0, 200.0)]
    assert factors == [(), (2, 2, 2), (2, 2, 2), (3, 3, 3), (4, 4, 4), (4, 4, 4)]
    # An anisotropic CT (0.7 x 0.7 x 5 mm) keeps its thick slices.
    ct = _fp(spatial_dims=3, shape=(512, 512, 96), spacing=(0.7, 0.7, 5.0), has_spacing=True,
             thickness=60.0)
    assert make_plan([ct]).downsample == (4, 4, 1)
    assert make_plan([replace(ct, spacing=(0.7, 0.7, 1.4))]).downsample == (4, 4, 2)
    # The user's own resampling replaces the plan's, whichever key it is set by.
    mine = {"resize": "96,72,40", "downsample": "auto", "patch-size": "64,64,40"}
    assert plan.to_run_config(mine)["downsample"] == "none"
    model = RunConfig.from_user_config(mine, plan.to_run_config(mine)).model
    assert (model.resize, model.downsample) == ((96, 72, 40), ())
    chest = make_plan([_fp()])
    assert chest.to_run_config({"downsample": "2,2"})["resize"] == "none"
    # Turning one off leaves the plan's other.
    assert plan.to_run_config({"resize": "none"})["downsample"] == "2,2,2"
    # A volume that fits in one patch needs no shrinking; nor does a 2D image without a
    # spacing (it is resized whole instead, see above).
    assert make_plan([replace(atrium, shape=(48, 48, 40))]).downsample == ()
    assert make_plan([_fp()]).downsample == ()
    # A 2D image with a physical spacing is shrunk like a volume.
    assert make_plan([_fp(has_spacing=True, shape=(1024, 1024), thickness=28.0)]
                     ).downsample == (2, 2)


def test_small_images_fit_whole_without_resizing() -> None:
    plan = make_plan([_fp(shape=(96, 96), thickness=20.0)])
    assert plan.resize == ()
    assert plan.patch_size == (96, 96)
    assert plan.channels == (16, 32, 64, 128)
    assert plan.local_steps == 150


def test_sites_under_dp_get_a_small_network_and_large_batches_of_patients() -> None:
    plan = make_plan([_fp(num_cases=94, dp_patients=94), _fp(num_cases=358)])
    assert plan.to_run_config() == {
        "in-channels": 1, "num-classes": 2, "resize": "128,128", "downsample": "none",
        "patch-size": "128,128",
        "channels": "8,16,32,64", "batch-size": 31, "local-steps": 20,
        "num-server-rounds": 5, "normalization": "zscore", "learning-rate": 0.002,
        "lr-schedule": "cosine", "personalization": "none", "finetune-steps": 0,
        "site-weighting": "dp-noise",
    }
    assert "1 site(s) train under DP-SGD, the smallest with 94 patients" in plan.reasons[1]
    # Few patients: the batch stays at its floor; many: at its ceiling.
    assert make_plan([_fp(dp_patients=10)]).batch_size == 8
    assert make_plan([_fp(dp_patients=1000)]).batch_size == 32
    assert make_plan([_fp(spatial_dims=3, shape=(192, 144, 88), spacing=(0.625,) * 3,
                          has_spacing=True, thickness=25.6, dp_patients=16)]).to_run_config()[
        "channels"] == "4,8,16,32"


def test_combine_keeps_the_smallest_private_site() -> None:
    assert combine([_fp(dp_patients=300), _fp(), _fp(dp_patients=40)]).dp_patients == 40
    assert combine([_fp(), _fp()]).dp_patients == 0


def test_combine_weights_sites_by_cases() -> None:
    merged = combine([_fp(num_cases=1, thickness=10.0, shape=(100, 200)),
                      _fp(num_cases=3, thickness=30.0, shape=(300, 400))])
    assert merged.num_cases == 4
    assert merged.thickness == pytest.approx(25.0)
    assert merged.shape == (250, 350)


@pytest.mark.parametrize("values,classes", [
    ([0, 1], 2), ([0, 255], 0), ([0], 1), ([0, 1, 2], 3), ([2, 0, 1, 1], 3),
    ([0.0, 1.0, 2.0, 3.0], 4), ([0, 3, 7], 0), ([1, 2, 3], 0), ([0, 0.5, 1], 0),
    ([1], 0), (list(range(15)), 15), (list(range(16)), 0), (list(range(256)), 0),
])
def test_label_values_give_the_classes_they_code(values: list[float], classes: int) -> None:
    assert label_classes(np.array(values)) == classes


def test_the_plan_has_as_many_classes_as_the_richest_site() -> None:
    # A site without the second structure in any case still gets its output.
    plan = make_plan([_fp(classes=3), _fp(classes=2)])
    assert combine([_fp(classes=3), _fp(classes=2)]).classes == 3
    assert plan.num_classes == 3
    assert plan.to_run_config()["num-classes"] == 3
    assert ("labels code 2 structures (values 0 to 2): one output per class, Dice averaged "
            "over them") in plan.reasons
    binary = make_plan([_fp(), _fp(classes=0), _fp(classes=1)])
    assert binary.to_run_config()["num-classes"] == 2
    assert not any("structures (values" in r for r in binary.reasons)


def test_sites_whose_labels_code_different_things_are_refused_unless_the_user_says() -> None:
    # One site's 0/255 masks cannot be read as the codes 0..2 of another's.
    plan = make_plan([_fp(classes=3), _fp(classes=0), _fp(classes=2)])
    expected = ("1 site(s) label one foreground (0/255, a soft mask or codes with gaps) while "
                "others code 3 classes (0 to 2): remap those sites' labels to 0..2 (or 0/1), or "
                "set num-classes in the run config (2 merges every structure into one "
                "foreground)")
    assert plan.class_conflict == expected
    with pytest.raises(PlanningError) as refused:
        plan.to_run_config()
    assert str(refused.value) == expected
    with pytest.raises(PlanningError):
        plan.to_run_config({"num-classes": "auto"})
    assert plan.to_run_config({"num-classes": 2})["patch-size"] == "256,256"


def test_a_site_fingerprint_counts_the_classes_its_labels_code() -> None:
    raw = np.ones((1, 16, 16))
    one, two = np.zeros((16, 16), dtype=np.uint8), np.zeros((16, 16), dtype=np.uint8)
    one[2:6, 2:6] = 1
    two[8:12, 8:12] = 2
    # Neither case holds every code; the site's labels together do.
    assert site_fingerprint([(raw, one, (1.0, 1.0)), (raw, two, (1.0, 1.0))],
                            has_spacing=False).classes == 3
    assert site_fingerprint([(raw, one, (1.0, 1.0))], has_spacing=False).classes == 2
    assert site_fingerprint([(raw, one * 255, (1.0, 1.0))], has_spacing=False).classes == 0


def test_sites_of_different_kinds_are_refused() -> None:
    with pytest.raises(PlanningError, match="sites disagree"):
        combine([_fp(), _fp(channels=3)])
    with pytest.raises(PlanningError, match="no site sent a fingerprint"):
        combine([])


def test_record_round_trip_and_refusals() -> None:
    fp = _fp(spatial_dims=3, shape=(192, 144, 88), spacing=(0.625,) * 3, has_spacing=True,
             fg_intensity=(-0.5, 1.0, 3.0))
    record = fp.to_record()
    assert tuple(record) == FINGERPRINT_KEYS
    assert Fingerprint.from_record(record, "site x") == fp
    with pytest.raises(PlanningError, match="unexpected keys"):
        Fingerprint.from_record({**record, "case-name": 1}, "site x")
    with pytest.raises(PlanningError, match="'fp-thickness' is"):
        Fingerprint.from_record({**record, "fp-thickness": float("nan")}, "site x")
    with pytest.raises(PlanningError, match="'fp-num-cases' is"):
        Fingerprint.from_record({**record, "fp-num-cases": "12"}, "site x")
    assert Fingerprint.from_record({**record, "fp-classes": 4}, "site x").classes == 4
    assert Fingerprint.from_record({**record, "fp-classes": 0}, "site x").classes == 0
    for bad in (16, 2.5, 100000):
        with pytest.raises(PlanningError, match=r"'fp-classes' is .*a whole number from 0 to 15"):
            Fingerprint.from_record({**record, "fp-classes": bad}, "site x")
    # A site of an earlier version, whose fingerprint has no class count.
    older = {k: v for k, v in record.items() if k != "fp-classes"}
    with pytest.raises(PlanningError, match=r"misses \['fp-classes'\]; every site must run the "
                       "same fedseg version"):
        Fingerprint.from_record(older, "site x")


def test_case_statistics_on_a_strip() -> None:
    raw = np.zeros((1, 20, 20))
    raw[0, 5:15] = 100.0          # a bright band; the rest is a dark frame
    label = np.zeros((20, 20), dtype=np.int64)
    label[8:12, :] = 1            # a strip 4 pixels thick
    stats = case_statistics(raw, label)
    assert stats["foreground"] == pytest.approx(0.2)
    assert stats["thickness"] == pytest.approx(6.0)  # EDT 1,2,2,1: mean 1.5, times 4
    assert stats["dark"] == pytest.approx(0.5)
    assert stats["fg_mid"] == pytest.approx(100.0)


def test_site_fingerprint_holds_only_coarse_aggregates() -> None:
    rng = np.random.default_rng(0)
    cases = []
    for size in (61, 67, 70, 75, 90):
        raw = rng.random((1, size, size)) * 255
        label = np.zeros((size, size), dtype=np.int64)
        label[10:30, 10:30] = 1
        cases.append((raw, label, (1.0, 1.0)))
    fp = site_fingerprint(cases, has_spacing=False)
    record = fp.to_record()
    assert set(record) == set(FINGERPRINT_KEYS)
    assert all(isinstance(v, int | float) and not isinstance(v, bool) for v in record.values())
    assert fp.shape == (72, 72)  # median 70 rounded to a multiple of 8: no case's own size
    assert fp.num_cases == 5
    assert fp.foreground_fraction == round(fp.foreground_fraction, 2)


def test_fingerprint_reply_through_the_client_app_holds_only_aggregates(tmp_path: Path) -> None:
    from flwr.app import Context, Message, RecordDict

    from client.app import make_client_app
    from client.config import SiteConfig
    from client.data_contract import discover_cases
    from shared import protocol as p
    from simulations.phantoms import write_synthetic_federation

    folder = write_synthetic_federation(tmp_path, num_sites=1, cases_per_site=7,
                                        shape=(40, 40))[0]
    app = make_client_app(lambda ctx: SiteConfig(data_path=folder, site_name="site-a",
                                                 state_dir=tmp_path / "state"))
    query = Message(RecordDict(), dst_node_id=1, message_type=p.FINGERPRINT_QUERY)
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    reply = app(query, context)
    assert not reply.has_error()
    content = reply.content
    assert set(content.metric_records) == {p.FINGERPRINT}
    assert not content.array_records
    assert dict(content.config_records[p.SITE]) == {p.SITE_NAME: "site-a"}
    record = content.metric_records[p.FINGERPRINT]
    assert tuple(record.keys()) == FINGERPRINT_KEYS
    assert all(isinstance(v, int | float) and not isinstance(v, bool) for v in record.values())
    text = repr(dict(record))
    for case in discover_cases(folder):      # no case name or path, even inside a number's text
        assert case.case_id not in text and str(case.image) not in text
    assert Fingerprint.from_record(dict(record), "site-a").num_cases == 6  # the train split


def test_every_planned_value_is_a_planned_run_config_key() -> None:
    from server.config import RunConfig
    from shared.settings import planned_keys

    # A misspelt key in the plan would be dropped silently by resolve_planned.
    assert set(make_plan([_fp()]).to_run_config()) == planned_keys(RunConfig)


def test_a_budget_beyond_max_steps_adds_rounds_up_to_max_rounds() -> None:
    thin = _fp(channels=3, shape=(584, 568), thickness=6.0, dark_fraction=0.3)
    patch = 8 * 96 * 96
    # 1600 steps: 10 x 160 would exceed 150 a round, so ceil(1600 / 150) = 11 rounds of 145.
    rules = PlannerRules(voxels_per_site={2: 1600 * patch, 3: 1})
    # The deployed fine-tune takes one of those rounds: 10 rounds, then 145 steps.
    plan = make_plan([thin], rules)
    assert (plan.num_server_rounds, plan.local_steps, plan.finetune_steps) == (10, 145, 145)
    assert "10 rounds x 145 steps of batch 8" in "\n".join(plan.reasons)
    assert "fine-tuned for 145 steps on its own cases (1595 steps per site in all)" in \
        "\n".join(plan.reasons)
    # 1500 steps fit 10 x 150: no extra round (9 rounds, then 150 fine-tuning steps).
    exact = make_plan([thin], PlannerRules(voxels_per_site={2: 1500 * patch, 3: 1}))
    assert (exact.num_server_rounds, exact.local_steps, exact.finetune_steps) == (9, 150, 150)
    # Under DP-SGD the private rounds and steps hold whatever the budget.
    private = make_plan([replace(thin, dp_patients=16)], rules)
    assert (private.num_server_rounds, private.local_steps) == (5, 20)
    assert private.budget_rounds == 5
    assert private.to_run_config({"local-steps": 3})["finetune-steps"] == 0
    assert private.to_run_config({"num-server-rounds": 50})["finetune-steps"] == 0


def test_a_one_round_budget_deploys_the_global_model_within_that_round() -> None:
    plan = make_plan([_fp()], PlannerRules(rounds=1, max_rounds=1))
    assert (plan.num_server_rounds, plan.budget_rounds) == (1, 1)
    assert (plan.personalization, plan.finetune_steps) == ("none", 0)
    assert "a one-round budget leaves no steps for a local fine-tune" in plan.reasons[-1]
    # Two rounds: one federated, one of fine-tuning.
    two = make_plan([_fp()], PlannerRules(rounds=2, max_rounds=2))
    assert (two.num_server_rounds, two.finetune_steps, two.budget_rounds) == (
        1, two.local_steps, 2)


def test_overridden_lists_the_planned_keys_the_run_config_sets_otherwise() -> None:
    planned = {"channels": "8,16,32,64", "patch-size": "96,96", "local-steps": 20,
               "learning-rate": 0.002, "finetune-steps": 0}
    values = {"channels": "16,32,64,128", "patch-size": "96, 96", "local-steps": "auto",
              "learning-rate": 0.002, "finetune-steps": 40, "seed": 3}
    assert overridden(planned, values) == ["channels='16,32,64,128' (planned '8,16,32,64')",
                                           "finetune-steps=40 (planned 0)"]
    assert overridden(planned, values, skip=("finetune-steps",)) == [
        "channels='16,32,64,128' (planned '8,16,32,64')"]
    assert overridden(planned, {}) == []
