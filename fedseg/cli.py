"""The ``fedseg`` command: one entry point for the project's verbs.

Each verb imports its implementation lazily, so ``fedseg --help`` is instant and
an error in one verb's input never needs the others' dependencies.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from shared.errors import FedsegError

EXIT_BAD_INPUT = 2


_RUN_CONFIG_EXAMPLE = "use e.g. --run-config \"num-server-rounds=5 strategy='fedprox'\""
# Flower's own KEY=VALUE pattern; whatever it does not match it drops without a word.
_KEY_VALUE = re.compile(r"(\S+?)=('[^']*'|\"[^\"]*\"|\S+)")


def _refuse_unparsed(text: list[str]) -> None:
    """Name the first part of ``--run-config`` that Flower's parser would skip.

    ``num-server-rounds=`` (empty value) or a lone ``num-server-rounds`` would
    otherwise vanish and the run would go ahead with the default.
    """
    if len(text) == 1 and text[0].endswith(".toml"):
        return
    for line in text:
        for token in _KEY_VALUE.sub(" ", line).split():
            if token.endswith("="):
                key = token.rstrip("=")
                raise FedsegError(f"--run-config key '{key}': has an empty value; give it a value, "
                                  f"e.g. {key}=VALUE, or leave the key out")
            raise FedsegError(f"--run-config: '{token}' is not KEY=VALUE; "
                              f"{_RUN_CONFIG_EXAMPLE}")


def _parse_overrides(text: list[str] | None) -> dict[str, Any]:
    from flwr.common.config import parse_config_args

    _refuse_unparsed(text or [])
    try:
        return parse_config_args(text)
    except Exception as exc:  # flwr raises click/TOML errors with their own wording
        raise FedsegError(
            f"--run-config: {getattr(exc, 'message', exc)}; {_RUN_CONFIG_EXAMPLE}"
        ) from None


def _simulate(args: argparse.Namespace) -> int:
    from fedseg.report import write_report
    from server.history import MetricsHistory
    from server.report import format_summary
    from shared.run_files import RunFiles
    from simulations.simulate import SimulationRequest, run_simulation
    from simulations.sites import read_site_settings

    if args.resume is not None and args.data is not None:
        raise FedsegError("fedseg simulate: --resume continues on the sites the run recorded; "
                          "drop --data")
    if args.resume is not None and args.site_config is not None:
        raise FedsegError("fedseg simulate: --resume keeps the site settings the run recorded; "
                          "drop --site-config")
    site_settings = read_site_settings(args.site_config) if args.site_config else {}
    overrides = _parse_overrides(args.run_config)
    if args.rounds is not None:
        overrides["num-server-rounds"] = args.rounds
    request = SimulationRequest(
        data=args.data, num_sites=args.sites, output=args.output, overrides=overrides,
        synthetic_dims=args.dims, cases_per_site=args.cases, synthetic_size=args.size,
        seed=args.seed, resume=args.resume, site_settings=site_settings,
    )
    outcome = run_simulation(request)
    history = MetricsHistory.read(outcome.metrics_json)
    print("\nsummary: validation Dice per site (foreground, per case, full resolution)")
    for line in format_summary(history):
        print("  " + line)
    print(f"\nwall time   {outcome.wall_seconds:.0f} s")
    print(f"final model {outcome.final_model}")
    print(f"metrics     {outcome.metrics_json}")
    print(f"            {outcome.metrics_csv}")
    print(f"checkpoints {RunFiles(outcome.run_dir).checkpoints}")
    print(f"report      {write_report(outcome.run_dir)}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from fedseg.report import write_report

    print(f"report {write_report(args.run_dir, args.output)}")
    return 0


def _plan(args: argparse.Namespace) -> int:
    from shared.planning import make_plan
    from simulations.sites import find_site_folders, read_site_settings, site_fingerprints
    from simulations.starting import starting_model

    folders = find_site_folders(args.data)
    site_settings = read_site_settings(args.site_config) if args.site_config else {}
    fingerprints = site_fingerprints(folders, site_settings)
    plan = make_plan(fingerprints)
    print(f"plan for {len(folders)} site(s) in {args.data} "
          f"({', '.join(f.name for f in folders)}), from their data fingerprints:")
    for line in plan.reasons:
        print(f"  {line}")
    if any(fp.dp_patients for fp in fingerprints):
        print(f"  {starting_model(fingerprints)}")
    print("run config (any key can be overridden with --run-config):")
    for key, value in plan.to_run_config().items():
        print(f"  {key} = {value!r}" if isinstance(value, str) else f"  {key} = {value}")
    return 0


def _site_check(args: argparse.Namespace) -> int:
    from client.site_check import (
        check_site,
        check_state_dir,
        format_reports,
        planned_classes,
        read_site_config,
    )
    from simulations.sites import probe_layout

    # The daemon's own node config: check exactly what the SuperNode will use.
    site = read_site_config(args.config) if args.config is not None else None
    if site is not None:
        data, val_fraction, pattern = site.data_path, site.val_fraction, site.patient_pattern
        print(f"site '{site.site_name}': data {data}, state {site.state_dir}, "
              f"device {site.device}, DP-SGD {'on' if site.privacy.enabled else 'off'}")
    else:
        data, val_fraction, pattern = args.data, args.val_fraction, args.patient_pattern
    dims, channels = probe_layout(data)
    classes = args.num_classes
    if not classes:
        classes = planned_classes(data, args.dims or dims, val_fraction, pattern)
        print(f"labels: {classes} classes, background included, as the planner counts this "
              "site's training labels (--num-classes to check others)")
    reports = check_site(data, args.in_channels or channels, classes,
                         args.dims or dims, val_fraction, pattern)
    for line in format_reports(reports):
        print(line)
    bad = any(r.problem for r in reports)
    if site is not None:
        # A damaged state folder is a problem found at this site, like a bad case:
        # exit 1 after the case table, so IT sees every problem in one run.
        try:
            for line in check_state_dir(site.state_dir, site.privacy.delta,
                                        site.privacy.accountant):
                print(line)
        except FedsegError as exc:
            print(f"fedseg: error: {exc}", file=sys.stderr)
            return 1
    return 1 if bad else 0


def _site_keygen(args: argparse.Namespace) -> int:
    from fedseg.credentials import write_node_key

    key = write_node_key(args.out, args.name, args.force)
    print(f"private key {key.private_key}  (keep it on this machine; mode 0600)")
    print(f"public key  {key.public_key}  (send this file to the coordinator)")
    print(f"fingerprint {key.fingerprint}  (read it to the coordinator by phone to confirm)")
    return 0


def _coordinator_certs(args: argparse.Namespace) -> int:
    from fedseg.credentials import write_coordinator_credentials

    made = write_coordinator_credentials(args.out, tuple(args.host), args.days, args.force,
                                         args.renew, args.ca_key)
    if args.renew:
        print(f"CA certificate        {made.ca_cert}  (unchanged: sites keep their ca.crt)")
    else:
        print(f"CA certificate        {made.ca_cert}  (give to every site and to flwr CLI users)")
        print(f"CA key                {made.ca_key}  (move it offline before the SuperLink "
              "starts; needed only for --renew)")
    print(f"SuperLink certificate {made.server_cert}  (names: {', '.join(made.hosts)})")
    print(f"SuperLink key         {made.server_key}  (mode 0600)")
    print(f"valid until           {made.not_after:%Y-%m-%d}")
    return 0


def _coordinator_signing_key(args: argparse.Namespace) -> int:
    from fedseg.credentials import write_signing_key

    key = write_signing_key(args.out, args.name, args.force)
    print(f"private key {key.private_key}  (signs every app the sites may run; keep it off "
          "the SuperLink's machine; mode 0600)")
    print(f"public key  {key.public_key}  (send to every hospital)")
    print(f"fingerprint {key.fingerprint}  (read it to each hospital by phone to confirm)")
    print(f"trust file  {key.trust_file}  (send to every hospital: their "
          "FEDSEG_TRUSTED_ENTITIES, e.g. /etc/fedseg/trusted-entities.yaml; or they add "
          "this line to theirs:)")
    print(f"  {key.trusted_entity}")
    return 0


def _coordinator_sign_app(args: argparse.Namespace) -> int:
    from fedseg.app_index import sign_app

    signed = sign_app(args.app, args.key, args.index, args.key_id)
    print(f"signed   {signed.app_id}=={signed.version}  sha256 {signed.fab_sha256}")
    print(f"filed    {signed.fab}  (signed by: {', '.join(signed.key_ids)})")
    print(f"run it   {signed.run_command} --run-config \"...\"")
    return 0


def _coordinator_app_index(args: argparse.Namespace) -> int:
    from fedseg.app_index import API_ROOT, make_server

    server = make_server(args.index, args.host, args.port)
    if not args.index.is_dir():
        print(f"fedseg app index: {args.index} does not exist yet; sign an app into it with "
              "'fedseg coordinator sign-app'", file=sys.stderr)
    print(f"fedseg app index: signed apps from {args.index} on "
          f"http://{args.host}:{args.port}{API_ROOT} (the SuperLink's FLWR_SUPERGRID_API_URL)",
          flush=True)
    with server:
        server.serve_forever()
    return 0


def _predict(args: argparse.Namespace) -> int:
    # Before PyTorch loads its OpenMP runtime, which reads this once: waiting threads
    # sleep instead of spinning. On cores busy with other work, spinning threads starve
    # the ones computing: a fundus image took 1.7-4.6 s instead of 0.18-0.58 s with 2
    # threads (2 cores at load 5-9). The price on free cores is 90 -> 110-150 ms.
    # OMP_WAIT_POLICY=ACTIVE in the environment keeps spinning on a dedicated machine.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from client.predict import UNCERTAINTY_CSV, predict_folder

    written = predict_folder(args.model, args.input, args.output, args.site_state, args.device,
                             args.uncertainty)
    for item in written:
        case = item.uncertainty
        if case is None:
            print(f"{item.image} -> {item.mask}")
        else:
            print(f"{item.image} -> {item.mask}, {case.map.name} "
                  f"(mean uncertainty {case.mean:.3f})")
    print(f"{len(written)} masks written to {args.output}")
    if args.uncertainty:
        print(f"uncertainty maps beside them; cases by mean uncertainty, most uncertain "
              f"first: {args.output / UNCERTAINTY_CSV}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from fedseg.export import ExportRequest, export_model

    result = export_model(ExportRequest(args.model, args.output, args.format, args.site_state,
                                        args.force))
    size_mb = result.model.stat().st_size / 1e6
    print(f"model    {result.model}  ({args.format}, {size_mb:.1f} MB, "
          f"sha256 {result.contract['sha256'][:16]}…)")
    print(f"contract {result.contract_path}")
    print(f"checked  max |logit difference| vs PyTorch {result.max_abs_diff:.1e}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the ``fedseg`` command."""
    parser = argparse.ArgumentParser(
        prog="fedseg", description="Federated medical image segmentation across hospitals.")
    verbs = parser.add_subparsers(dest="verb", required=True)

    sim = verbs.add_parser(
        "simulate", help="run a local multi-site federation through Flower's simulation engine",
        description="Train one segmentation network across several sites on this machine. "
                    "Without --data, synthetic sites with different 'scanners' are generated.")
    sim.add_argument("--data", type=Path, default=None,
                     help="folder with one Decathlon-layout sub-folder per site "
                          "(e.g. ../shared/data/retina); default: built-in synthetic sites")
    sim.add_argument("--sites", type=int, default=3, help="synthetic sites (default 3)")
    sim.add_argument("--dims", type=int, choices=(2, 3), default=2,
                     help="synthetic data: 2D images or 3D NIfTI volumes (default 2)")
    sim.add_argument("--cases", type=int, default=24, help="synthetic cases per site (default 24)")
    sim.add_argument("--size", type=int, default=0,
                     help="synthetic image side in pixels (default 96 for 2D, 48 for 3D)")
    sim.add_argument("--rounds", type=int, default=None, help="federated rounds")
    sim.add_argument("--output", type=Path, default=Path("runs"),
                     help="folder for run folders (default ./runs)")
    sim.add_argument("--seed", type=int, default=0, help="synthetic data seed")
    sim.add_argument("--run-config", action="append", default=None, metavar="'KEY=VALUE ...'",
                     help="run-config overrides, same syntax as flwr run --run-config")
    sim.add_argument("--site-config", type=Path, default=None, metavar="FILE",
                     help="a .toml file of node-config keys every simulated site takes, as a "
                          "hospital's site.toml (e.g. dp-enabled = true, dp-target-epsilon = 8, "
                          "dp-max-epsilon = 8); data-path, site-name, state-dir and seed are "
                          "set per site")
    sim.add_argument("--resume", type=Path, default=None, metavar="RUN_DIR",
                     help="continue the simulation in RUN_DIR (e.g. after a crash) at its next "
                          "round, on the sites and settings it recorded; --rounds N above its "
                          "rounds extends a finished one")
    sim.set_defaults(func=_simulate)

    report = verbs.add_parser(
        "report", help="write a run's report: one self-contained HTML file",
        description="Reads a run folder (metrics.json, and plan.json, cross-site.json and "
                    "overlays/ where present) and writes one HTML file with plots of Dice "
                    "and loss per round and site, the per-site table, privacy budget, "
                    "failures and refusals, and phase times. It loads nothing from the "
                    "network; open it in any browser. 'fedseg simulate' writes it too.")
    report.add_argument("run_dir", type=Path, metavar="RUN_DIR",
                        help="a run folder, e.g. runs/run-20250101-120000")
    report.add_argument("--output", type=Path, default=None, metavar="FILE",
                        help="the HTML file to write (default RUN_DIR/report.html)")
    report.set_defaults(func=_report)

    plan = verbs.add_parser(
        "plan", help="print the training plan for a folder of sites, without training",
        description="Compute each site's data fingerprint (aggregate numbers only) and print "
                    "the plan the coordinator would make from them: resolution, patch, "
                    "network, normalisation, rounds and learning-rate schedule.")
    plan.add_argument("--data", type=Path, required=True,
                      help="folder with one Decathlon-layout sub-folder per site, or one site")
    plan.add_argument("--site-config", type=Path, default=None, metavar="FILE",
                      help="TOML of node-config keys every site takes, as for fedseg simulate "
                           "(e.g. dp-enabled = true: sites under DP-SGD change the plan)")
    plan.set_defaults(func=_plan)

    site = verbs.add_parser("site", help="site-side tools for hospital IT")
    site_verbs = site.add_subparsers(dest="site_verb", required=True)
    check = site_verbs.add_parser(
        "check", help="read every case through the data contract; nothing leaves this machine",
        description="Prints one line per case (patient, split, shape, spacing, label values, "
                    "problem) and exits 1 if any case has a problem, or, with --config, "
                    "if the site's privacy ledger or local layers are damaged.")
    source = check.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=Path, help="the site's data folder")
    source.add_argument("--config", type=Path,
                        help="the SuperNode's node-config TOML (e.g. /etc/fedseg/site.toml): "
                             "validates it and checks its data-path and state-dir "
                             "(privacy ledger, local layers)")
    check.add_argument("--in-channels", type=int, default=0,
                       help="channels the model expects (default: as the images are)")
    check.add_argument("--num-classes", type=int, default=0,
                       help="classes including background (default: as the planner counts "
                            "them from the labels: codes 0..K-1 give K, anything else 2)")
    check.add_argument("--dims", type=int, choices=(2, 3), default=0,
                       help="2D or 3D (default: from the first image)")
    check.add_argument("--val-fraction", type=float, default=0.2)
    check.add_argument("--patient-pattern", default="",
                       help="regex whose first group is the patient id of a case name")
    check.set_defaults(func=_site_check)
    keygen = site_verbs.add_parser(
        "keygen", help="make this hospital's SuperNode authentication key pair",
        description="Writes NAME.key (private, stays here) and NAME.pub (send it to the "
                    "coordinator, who registers it with 'flwr supernode register').")
    keygen.add_argument("--out", type=Path, required=True, help="folder for the key pair")
    keygen.add_argument("--name", required=True, help="this site's name, e.g. hospital-a")
    keygen.add_argument("--force", action="store_true", help="replace an existing key pair")
    keygen.set_defaults(func=_site_keygen)

    coord = verbs.add_parser("coordinator", help="coordinator-side tools")
    coord_verbs = coord.add_subparsers(dest="coordinator_verb", required=True)
    certs = coord_verbs.add_parser(
        "certs", help="make the federation's private CA and the SuperLink's TLS certificate",
        description="Writes ca.crt, ca.key, superlink.crt and superlink.key. Every --host "
                    "goes into the certificate's subject alternative names, with localhost, "
                    "127.0.0.1 and ::1 (the SuperLink connects to itself over TLS).")
    certs.add_argument("--out", type=Path, required=True, help="folder for the four files")
    certs.add_argument("--host", action="append", default=[], required=True,
                       help="DNS name or IP address sites use to reach the SuperLink "
                            "(repeat for each)")
    certs.add_argument("--days", type=int, default=825,
                       help="SuperLink certificate validity (default 825 days; the CA gets "
                            "at least ten years)")
    certs.add_argument("--force", action="store_true",
                       help="replace existing files (every site then needs the new ca.crt)")
    certs.add_argument("--renew", action="store_true",
                       help="keep the CA; re-issue only superlink.crt and superlink.key "
                            "(e.g. before expiry or for a new --host)")
    certs.add_argument("--ca-key", type=Path, default=None,
                       help="the CA's key when it is kept elsewhere (with --renew)")
    certs.set_defaults(func=_coordinator_certs)
    signing = coord_verbs.add_parser(
        "signing-key", help="make the coordinator's app-signing key (Ed25519)",
        description="Writes NAME.key (private; signs the apps sites may run) and NAME.pub, and "
                    "prints the line each hospital adds to its SuperNode's trusted-entities "
                    "file. NAME is the key's id in that file.")
    signing.add_argument("--out", type=Path, required=True, help="folder for the key pair")
    signing.add_argument("--name", default="fedseg-coordinator",
                         help="the key's id in the sites' trust files "
                              "(default fedseg-coordinator)")
    signing.add_argument("--force", action="store_true", help="replace an existing key pair")
    signing.set_defaults(func=_coordinator_signing_key)
    sign = coord_verbs.add_parser(
        "sign-app", help="sign an app and file it in the app index the SuperLink fetches from",
        description="Builds the app's FAB as 'flwr run DIR' would (or takes a .fab), signs its "
                    "SHA-256 with the Ed25519 key as Flower Hub signatures are made, and writes "
                    "INDEX/<publisher>/<name>/<version>.fab and .json. Then start the run with "
                    "'flwr run @publisher/name==version': sites whose trusted-entities file "
                    "holds the key run it, every other app is refused.")
    sign.add_argument("app", type=Path, help="the app's folder (e.g. /opt/fedseg) or a .fab")
    sign.add_argument("--key", type=Path, required=True,
                      help="the signing key from 'fedseg coordinator signing-key'")
    sign.add_argument("--key-id", default=None,
                      help="the key's id in the sites' trust files (default: the key file's "
                           "name without .key)")
    sign.add_argument("--index", type=Path, required=True,
                      help="the app index folder, e.g. /var/lib/fedseg/coordinator/apps")
    sign.set_defaults(func=_coordinator_sign_app)
    index = coord_verbs.add_parser(
        "app-index", help="serve signed apps to the SuperLink (its Flower Hub stand-in)",
        description="Answers the SuperLink's Flower Hub requests (POST /v1/hub/fetch-fab and "
                    "the FAB download) from the index folder; start the SuperLink with "
                    "FLWR_SUPERGRID_API_URL=http://HOST:PORT/v1 (deploy/bin/fedseg-superlink "
                    "does, from FEDSEG_APP_INDEX).")
    index.add_argument("--index", type=Path, required=True, help="the app index folder")
    index.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default 127.0.0.1: only the SuperLink on "
                            "this machine needs it)")
    index.add_argument("--port", type=int, default=8001, help="port (default 8001)")
    index.set_defaults(func=_coordinator_app_index)

    pred = verbs.add_parser(
        "predict", help="segment new images with a global model and this site's own layers")
    pred.add_argument("--model", type=Path, required=True, help="final_model.pt of a run")
    pred.add_argument("--site-state", type=Path, default=None,
                      help="the site's state folder (needed when the run used adaptation)")
    pred.add_argument("--input", type=Path, required=True, help="folder of images")
    pred.add_argument("--output", type=Path, required=True, help="folder for the masks")
    pred.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    pred.add_argument("--uncertainty", action="store_true",
                      help="predict every image flipped along each combination of axes (4 "
                           "passes in 2D, 8 in 3D) and average: masks are then the averaged "
                           "prediction, and NAME_uncertainty.png/.nii.gz beside each mask holds "
                           "the per-voxel normalised entropy (0 certain, 1 undecided; PNG "
                           "0-255); uncertainty.csv lists the cases, most uncertain first")
    pred.set_defaults(func=_predict)

    export = verbs.add_parser(
        "export", help="write a global model plus this site's own layers as one TorchScript "
                       "or ONNX file",
        description="Builds the network as 'fedseg predict' does, exports it, checks it "
                    "reproduces PyTorch's logits, and writes OUTPUT.json beside it with the "
                    "input contract (channels, patch size, normalisation, output).")
    export.add_argument("--model", type=Path, required=True, help="final_model.pt of a run")
    export.add_argument("--site-state", type=Path, default=None,
                        help="the site's state folder; its local layers are folded in "
                             "(needed when the run used adaptation)")
    # Checked by fedseg.export rather than argparse choices, so a typo gets the usual
    # one-line error.
    export.add_argument("--format", required=True, metavar="{torchscript,onnx}",
                        help="torchscript (torch.jit.load) or onnx (ONNX Runtime)")
    export.add_argument("--output", type=Path, required=True,
                        help="file to write, e.g. site-model.onnx")
    export.add_argument("--force", action="store_true",
                        help="replace an existing OUTPUT and OUTPUT.json")
    export.set_defaults(func=_export)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``fedseg`` command and return its exit status."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except FedsegError as exc:
        print(f"fedseg: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("fedseg: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
