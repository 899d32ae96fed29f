"""`pdserve plan` end to end on the rack presets: the seed's claims as the planner sees them, JSON shape, bad flags.

Searches are cut down (few probe requests, one candidate per mode, no curve) to keep the
test short; the recommendations they check hold by wide margins (docs/planner.md has the
full runs).
"""

import dataclasses
import json

import pytest

from planner import cli
from planner.hardware import GB200_NVL72, H200_HGX8
from planner.metrics import Slo
from planner.model_spec import load_model_spec
from planner.cost_model import CostModel, decode_batch
from planner.deployment import Deployment, Pool, kv_tokens
from planner.scenario import Scenario
from planner.search import goodput
from planner.workload import RequestSource
from loadtest.workloads import fixed
from services.cli import build_parser
from services.scheduler.policy import Mode, Policy
from shared.layouts import DecoderLayout, PrefillLayout
from shared.protocol import Role

QUICK = ["--search-requests", "40", "--top-k", "1", "--num-requests", "80", "--no-plot", "--no-progress"]
MODE_KEYS = {"p50_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "p99_itl_ms", "output_throughput_per_device", "goodput_per_device"}


def run_json(capsys, tmp_path, *argv):
    assert cli.main([*argv, *QUICK, "--json", "--out-dir", str(tmp_path)]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def seed_plan(tmp_path_factory):
    """The seed's scenario on a whole NVL72 rack (rack scale: this must finish, in seconds)."""
    out = tmp_path_factory.mktemp("seed")
    argv = ["--model", "qwen3-235b-a22b", "--hardware", "gb200-nvl72", "--input-len", "6144", "--output-len", "512",
            "--policy", *QUICK, "--json", "--out-dir", str(out)]
    assert cli.main(argv) == 0
    return json.loads((out / "plan.json").read_text())


def test_the_seeds_scenario_recommends_disaggregation(seed_plan):
    assert seed_plan["recommendation"] == "disagg"
    modes = seed_plan["modes"]
    assert modes["disagg"]["goodput_per_device"] > 1.05 * modes["colocated"]["goodput_per_device"]


def test_json_shape_is_stable_for_scripts(seed_plan):
    assert set(seed_plan["modes"]) == {"colocated", "disagg"}
    for mode in seed_plan["modes"].values():
        assert MODE_KEYS <= set(mode)
        assert all(isinstance(mode[k], float) for k in MODE_KEYS)
        assert isinstance(mode["devices"], int) and isinstance(mode["layout"], str)
    disagg = seed_plan["modes"]["disagg"]
    for pool in ("prefill", "decode"):
        assert {"devices", "layout"} <= set(disagg[pool])
    assert disagg["prefill"]["devices"] + disagg["decode"]["devices"] == disagg["devices"] <= 72
    assert seed_plan["model"]["params"] == pytest.approx(235e9, rel=0.01)


def parsed_policy(command: str) -> Policy:
    """The command through `pdserve`'s own argument parser, its settings through the scheduler's Policy."""
    argv = command.split()
    assert argv[0] == "pdserve"
    args = build_parser().parse_args(argv[1:])
    assert (args.command, args.admin_command, args.mode) == ("admin", "policy", "auto")
    return Policy().updated(dict(item.split("=", 1) for item in args.settings) | {"mode": args.mode})


def test_policy_command_is_one_the_admin_cli_and_scheduler_accept(seed_plan):
    policy = parsed_policy(seed_plan["policy_command"])
    assert policy.mode is Mode.AUTO and 0 < policy.remote_min_prompt_tokens <= 6144  # disagg: long prompts go remote


def test_a_small_model_with_short_chat_prompts_recommends_colocated(capsys, tmp_path):
    document = run_json(capsys, tmp_path, "--model", "llama-3.1-8b", "--hardware", "h100-hgx8",
                        "--input-len", "256", "--output-len", "256", "--policy")
    assert document["recommendation"] == "colocated"
    assert document["modes"]["colocated"]["goodput_per_device"] > document["modes"]["disagg"]["goodput_per_device"]
    policy = parsed_policy(document["policy_command"])
    assert policy.remote_min_prompt_tokens == 131072  # the whole context: auto keeps every prefill local


def test_an_8_gpu_nvlink_domain_gains_less_from_disaggregation_than_nvl72(capsys, tmp_path, seed_plan):
    """The seed's third rule, one NVLink domain against another (each the planner's default
    --devices): the 8-GPU HGX H200 box gains less than the NVL72 rack, for cost-model reasons
    checked here first. The bf16 weights (470 GB) need 4 of the box's 141 GB GPUs, so the box
    splits only 4 + 4; the decode half keeps KV for ~29 six-thousand-token requests (the whole
    box ~212), and every decode step reads twice the weights per GPU. NVL72 sizes its pools to the
    workload (docs/planner.md)."""
    model = load_model_spec("qwen3-235b-a22b")
    half, whole = DecoderLayout(tp=4, ep=4), DecoderLayout(tp=8, ep=8)
    assert kv_tokens(model, H200_HGX8, DecoderLayout(tp=2, ep=2)) == 0  # 2 GPUs do not hold it
    assert 7 * kv_tokens(model, H200_HGX8, half) < kv_tokens(model, H200_HGX8, whole)
    steps = [CostModel(model, H200_HGX8, layout).step_time(decode_batch(16, 6400)) for layout in (half, whole)]
    assert steps[0] > 1.6 * steps[1]

    box = run_json(capsys, tmp_path, "--model", "qwen3-235b-a22b", "--hardware", "h200-hgx8",
                   "--input-len", "6144", "--output-len", "512")
    gain = {name: plan["modes"]["disagg"]["goodput_per_device"] / plan["modes"]["colocated"]["goodput_per_device"]
            for name, plan in (("nvl72", seed_plan), ("hgx8", box))}
    assert box["modes"]["disagg"]["devices"] <= 8 and box["recommendation"] == "colocated"
    assert gain["hgx8"] < 1.0 < gain["nvl72"]


def test_a_decode_pool_past_an_8_gpu_nvlink_domain_loses_to_one_inside_nvl72():
    """The mechanism of the seed's third rule: the seed's decode pool (dp=4, ep=16), on the same
    GPUs with an 8-GPU NVLink domain instead of 72, runs its expert all-to-alls over the NIC;
    where decode binds (a tight TPOT SLO, long outputs) the deployment loses goodput.
    (Whether disaggregation then *gains* less than on NVL72 is a different question, and the
    planner's answer differs from the seed's: docs/planner.md.)"""
    model = load_model_spec("qwen3-235b-a22b")
    eight = dataclasses.replace(GB200_NVL72, name="gb200-8gpu-domain", nvlink_domain=8)
    seed_pools = Deployment(Mode.DISAGG, (Pool(Role.PREFILL, PrefillLayout(tp=4, ep=4), 1),
                                          Pool(Role.DECODE, DecoderLayout(dp=4, ep=16), 1)))
    steps = {hw.nvlink_domain: CostModel(model, hw, DecoderLayout(dp=4, ep=16)).step_time(decode_batch(256, 1500))
             for hw in (GB200_NVL72, eight)}
    assert steps[8] > 1.3 * steps[72]
    rates = {}
    for hardware in (GB200_NVL72, eight):
        scenario = Scenario(model, hardware, RequestSource(fixed(1024, 256)), 20, Slo(2000, 12), search_requests=40)
        rates[hardware.nvlink_domain] = goodput(scenario, seed_pools, 20.0).rate
    assert rates[8] < 0.9 * rates[72]


@pytest.mark.parametrize(("argv", "flag"), [
    (["--slo", "ttft=100"], "--slo"),
    (["--slo", "tpot:-3"], "--slo"),
    (["--split", "4-16"], "--split"),
    (["--modes", "colocated,magic"], "--modes"),
    (["--prefill-layout", "tp=3"], "--prefill-layout"),
    (["--decode-layout", "dp=4,ep=5"], "--decode-layout"),
    (["--split", "40:40"], "--split"),
])
def test_bad_flags_exit_2_naming_the_flag(capsys, tmp_path, argv, flag):
    base = ["--model", "qwen3-235b-a22b", "--hardware", "gb200-nvl72", "--out-dir", str(tmp_path), "--no-progress"]
    assert cli.main(base + argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"pdserve plan: {flag}: "), err


def test_an_unknown_model_names_the_flag_and_the_choices(capsys, tmp_path):
    assert cli.main(["--model", "gpt-9", "--hardware", "h100-hgx8", "--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--model" in err and "qwen3-235b-a22b" in err


def test_argparse_rejects_an_unknown_hardware(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--model", "llama-3.1-8b", "--hardware", "tpu-v9"])
    assert exit_info.value.code == 2
    assert "--hardware" in capsys.readouterr().err


def test_an_hf_config_json_is_a_model(tmp_path, capsys):
    config = {"model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
              "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": True}
    (tmp_path / "config.json").write_text(json.dumps(config))
    spec = load_model_spec(str(tmp_path))
    assert spec.total_params == pytest.approx(1.24e9, rel=0.01)  # Llama-3.2-1B's shape
    assert spec.kv_bytes_per_token(2) == 16 * 2 * 8 * 64 * 2


def test_text_output_and_the_png_of_latency_against_rate(tmp_path, capsys):
    argv = ["--model", "llama-3.1-8b", "--hardware", "h100-hgx8", "--devices", "2", "--input-len", "512", "--output-len", "64",
            "--search-requests", "30", "--top-k", "1", "--num-requests", "40", "--no-progress", "--out-dir", str(tmp_path)]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    for text in ("P50 TTFT (ms)", "Goodput per device (req/s)", "recommendation:", "plan.png"):
        assert text in out, text
    assert (tmp_path / "plan.png").stat().st_size > 10000
    document = json.loads((tmp_path / "plan.json").read_text())
    for mode in ("colocated", "disagg"):
        curve = document["modes"][mode]["curve"]
        rates = [point["request_rate"] for point in curve]
        assert len(rates) >= 4 and rates == sorted(rates)
        assert curve[-1]["p99_ttft_ms"] > curve[0]["p99_ttft_ms"]  # queues grow with the load


def test_a_steady_state_run_keeps_queues_pooled_as_deployed():
    """4 prefill + 2 decode is simulated whole, not as two units of 2 + 1 (whose prefill queues
    would each serve half the traffic with half the instances); big deployments still shrink."""
    from planner.scenario import pooled_part

    prefill, decode = PrefillLayout(tp=4, ep=4), DecoderLayout(dp=8, ep=8)
    four_two = Deployment(Mode.DISAGG, (Pool(Role.PREFILL, prefill, 4), Pool(Role.DECODE, decode, 2)))
    assert pooled_part(four_two) == (four_two, 1.0)
    many = Deployment(Mode.DISAGG, (Pool(Role.PREFILL, prefill, 36), Pool(Role.DECODE, decode, 12)))
    part, fraction = pooled_part(many)
    assert [p.count for p in part.pools] == [6, 2] and fraction == pytest.approx(1 / 6)


def test_the_search_finds_a_deployment_at_least_as_good_as_one_known_to_fit():
    """At 32 GPUs of NVL72 the search once settled on 4 prefill [tp=4] + 2 decode [dp=8, ep=8]
    and missed 4 prefill [tp=4] + 1 decode [dp=4, tp=4, ep=16], the split it picks on HGX B200
    and that runs all over NVLink here: simulated as two units of 2 + 1, the first one's
    prefill queue looked ~10% worse than it is, and candidates tied on capacity were dropped
    as equals. The winner must now do at least as well (within the goodput search's ~4%)."""
    model = load_model_spec("qwen3-235b-a22b")
    from planner import plan as planning
    from planner.search import best, disagg_candidates

    source = RequestSource(fixed(6144, 512))
    slo = planning.default_slo(model, GB200_NVL72, source, 32)
    scenario = Scenario(model, GB200_NVL72, source, 32, slo, search_requests=60)
    winner, _ = best(scenario, disagg_candidates(scenario), top_k=2)
    known = Deployment(Mode.DISAGG, (Pool(Role.PREFILL, PrefillLayout(tp=4, ep=4), 4, 8192),
                                     Pool(Role.DECODE, DecoderLayout(dp=4, tp=4, ep=16), 1)))
    assert known.devices == 32
    # Both searched from the same start: the goodput search's grid (15% brackets, ~4% bisections)
    # depends on where it starts, which alone moved the winner's own figure by ~7% (38.1 vs 40.9).
    reference = goodput(scenario, known, winner.goodput.rate)
    mine = goodput(scenario, winner.deployment, winner.goodput.rate)
    assert mine.rate >= 0.96 * reference.rate
