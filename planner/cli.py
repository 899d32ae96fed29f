"""`pdserve plan`: argument parsing and the command.

Wiring: `register(plan_parser)` adds the flags, `run(args)` executes them and returns the
exit code (2 for a bad flag, with a message naming it). Standalone:
`python -m planner.cli --model qwen3-235b-a22b --hardware gb200-nvl72 --input-len 6144 --output-len 512`.
The workload and arrival flags are `pdserve bench`'s own (loadtest/cli.py), so they mean the same.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from loadtest.cli import add_arrivals, add_lengths

DEFAULT_REQUESTS = 600
MODE_NAMES = ("colocated", "disagg")


class FlagError(ValueError):
    def __init__(self, flag: str, message: str):
        super().__init__(f"{flag}: {message}")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def register(parser: argparse.ArgumentParser) -> None:
    from planner.hardware import hardware_names

    parser.add_argument("--model", required=True, help="qwen3-235b-a22b, llama-3.1-8b, llama-3.1-70b, a pdserve preset, or an HF config.json")
    parser.add_argument("--hardware", required=True, choices=hardware_names(), help="accelerator preset, or local (profiles this machine once)")
    parser.add_argument("--devices", type=_positive_int, help="devices to deploy on (default: one NVLink domain; local: 2 worker processes)")
    parser.add_argument("--modes", default="colocated,disagg", help="comma-separated: colocated, disagg (default both)")
    parser.add_argument("--slo", nargs="+", default=[], metavar="KEY:MS", help="ttft:MS tpot:MS (default: 5x one request alone)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.add_argument("--policy", action="store_true", help="also print the `pdserve admin policy` command for --mode auto")
    lengths = parser.add_argument_group("workload (as in pdserve bench)")
    add_lengths(lengths, default="fixed")
    arrivals = parser.add_argument_group("load (as in pdserve bench)")
    add_arrivals(arrivals, None, None, "open-loop arrivals per second (default: 70%% of the colocated goodput)",
                 f"simulate exactly this many requests from an empty system, as the bench sends them (default: steady state, {DEFAULT_REQUESTS} measured)")
    pinned = parser.add_argument_group("pin instead of search")
    pinned.add_argument("--colocated-layout", help="colocated instances' layout, e.g. dp=4,tp=4,ep=16")
    pinned.add_argument("--prefill-layout", help="prefill instances' layout, e.g. tp=4,ep=4")
    pinned.add_argument("--decode-layout", help="decode instances' layout, e.g. dp=4,ep=16")
    pinned.add_argument("--split", metavar="P:D", help="prefill devices : decode devices, e.g. 4:16")
    pinned.add_argument("--max-num-batched-tokens", type=_positive_int, help="tokens per engine step in every pool (default: searched)")
    search = parser.add_argument_group("search and output")
    search.add_argument("--search-requests", type=_positive_int, default=200, help="requests per simulated probe (default 200)")
    search.add_argument("--top-k", type=_positive_int, default=2, help="best-ranked deployments per mode to simulate (default 2)")
    search.add_argument("--out-dir", type=Path, default=Path("pdserve-plan"), help="plan.json and plan.png (default ./pdserve-plan)")
    search.add_argument("--no-plot", dest="plot", action="store_false", help="skip the rate sweep and the PNG")
    search.add_argument("--no-progress", dest="progress", action="store_false", help="no progress lines on stderr")
    local = parser.add_argument_group("--hardware local")
    local.add_argument("--threads", type=_positive_int, help="torch threads per worker (default: cores / devices, as pdserve up)")
    local.add_argument("--reprofile", action="store_true", help="measure this machine again instead of using the cached profile")


def parse_slo(items: list[str]) -> dict[str, float]:
    limits = {}
    for item in items:
        key, sep, value = item.partition(":")
        if not sep or key not in ("ttft", "tpot"):
            raise FlagError("--slo", f"{item!r}: expected ttft:MS or tpot:MS")
        try:
            limits[key] = float(value)
        except ValueError:
            raise FlagError("--slo", f"{item!r}: {value!r} is not a number of milliseconds") from None
        if not limits[key] > 0:
            raise FlagError("--slo", f"{item!r}: must be > 0")
    return limits


def parse_modes(text: str):
    from services.scheduler.policy import Mode

    names = [m.strip() for m in text.split(",") if m.strip()]
    bad = [n for n in names if n not in MODE_NAMES]
    if bad or not names or len(set(names)) != len(names):
        raise FlagError("--modes", f"{text!r}: give distinct modes out of {', '.join(MODE_NAMES)}")
    return [Mode(n) for n in names]


def parse_split(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    p, sep, d = text.partition(":")
    if not (sep and p.isdigit() and d.isdigit() and int(p) > 0 and int(d) > 0):
        raise FlagError("--split", f"{text!r}: expected PREFILL_DEVICES:DECODE_DEVICES, e.g. 4:16")
    return int(p), int(d)


def _layout(flag: str, text: str | None, kind: str, model):
    from planner.deployment import layout_errors
    from shared.layouts import LayoutError, parse_layout

    if text is None:
        return None
    try:
        layout = parse_layout(text, kind)
    except LayoutError as exc:
        raise FlagError(flag, str(exc)) from None
    problems = layout_errors(model, layout)
    if problems:
        raise FlagError(flag, f"{text!r} does not fit {model.name}: {'; '.join(problems)}")
    return layout


def _hardware(args: argparse.Namespace, progress):
    from planner.hardware import LOCAL, get_preset

    if args.hardware != LOCAL:
        return get_preset(args.hardware), {}
    from planner.profile import local_hardware
    from services.scheduler.policy import Mode

    by_mode = local_hardware(args.model, args.devices or 2, args.threads, refresh=args.reprofile, progress=progress)
    return by_mode[Mode.COLOCATED], by_mode


def _source(args: argparse.Namespace):
    from loadtest.cli import workload_from_args
    from planner.workload import RequestSource

    try:
        workload = workload_from_args(args)
    except FileNotFoundError as exc:
        raise FlagError("--trace", str(exc)) from None
    return RequestSource(workload, args.seed, args.burstiness)


def _plan(args: argparse.Namespace) -> dict:
    from loadtest.workloads import Trace
    from planner import plan as planning
    from planner.advice import auto_policy, policy_command
    from planner.metrics import Slo
    from planner.model_spec import load_model_spec
    from planner.report import plan_json
    from planner.scenario import STEP_BUDGETS, Scenario
    from services.scheduler.policy import Mode

    progress = (lambda text: print(f"pdserve plan: {text}", file=sys.stderr, flush=True)) if args.progress else (lambda _: None)
    modes = parse_modes(args.modes)
    slo_flags = parse_slo(args.slo)
    split = parse_split(args.split)
    try:
        model = load_model_spec(args.model)
    except ValueError as exc:
        raise FlagError("--model", str(exc)) from None
    fixed = planning.Fixed(
        _layout("--colocated-layout", args.colocated_layout, "decode", model),
        _layout("--prefill-layout", args.prefill_layout, "prefill", model),
        _layout("--decode-layout", args.decode_layout, "decode", model),
        split,
    )
    hardware, mode_hardware = _hardware(args, progress)
    devices = args.devices or hardware.default_devices
    if split is not None and sum(split) > devices:
        raise FlagError("--split", f"{args.split} needs {sum(split)} devices; --devices is {devices}")
    source = _source(args)
    if source.max_request_tokens() > model.max_context:
        raise FlagError("--input-len", f"requests of {source.max_request_tokens()} tokens exceed {model.name}'s context of {model.max_context}")
    default = planning.default_slo(model, hardware, source, devices)
    slo = Slo(slo_flags.get("ttft", default.ttft_ms), slo_flags.get("tpot", default.tpot_ms))
    budgets = dict(STEP_BUDGETS) if args.max_num_batched_tokens is None else {r: (args.max_num_batched_tokens,) for r in STEP_BUDGETS}
    scenario = Scenario(model, hardware, source, devices, slo, budgets, search_requests=args.search_requests,
                        mode_hardware=mode_hardware)
    replay = isinstance(source.workload, Trace) and args.request_rate is None
    exact = args.num_requests is not None  # a bench-shaped run of exactly these requests
    num_requests = args.num_requests if exact else DEFAULT_REQUESTS
    load = planning.Load(args.request_rate, args.concurrency, num_requests, args.duration, replay, exact)
    outcome = planning.plan(scenario, modes, load, fixed, args.top_k, args.plot, progress)
    command = None
    if args.policy:
        if Mode.DISAGG not in outcome.modes:
            raise FlagError("--policy", "needs the disagg mode in --modes (auto mode chooses between its pools)")
        disagg = outcome.modes[Mode.DISAGG].winner.deployment
        mean_in, _ = source.mean_lengths()
        policy = auto_policy(model, scenario.hardware_for(Mode.DISAGG), disagg, int(mean_in), outcome.recommendation is Mode.DISAGG)
        command = policy_command(policy)
    return plan_json(outcome, command)


def run(args: argparse.Namespace) -> int:
    from planner.plots import save_plan_plot
    from planner.report import format_plan
    from loadtest.report import write_json

    try:
        document = _plan(args)
    except FlagError as exc:
        print(f"pdserve plan: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"pdserve plan: {exc}", file=sys.stderr)
        return 2
    files = [args.out_dir / "plan.json"]
    write_json(files[0], document)
    if args.plot:
        files.append(save_plan_plot(document, args.out_dir / "plan.png"))
    if args.json:
        print(json.dumps(document, indent=1))
    else:
        print(format_plan(document))
    for path in files:
        print(f"{path.suffix[1:]}: {path}", file=sys.stderr if args.json else sys.stdout)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdserve plan", description="Colocated vs disaggregated serving, simulated.")
    register(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
