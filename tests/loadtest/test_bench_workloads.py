"""Length mixes, trace loading, exact-length prompts from the corpus, deterministic schedules."""

import itertools
import json

import numpy as np
import pytest

from loadtest import schedule, workloads
from loadtest.arrivals import ClosedLoop, OpenLoop
from loadtest.prompts import CORPUS_PATH, PromptSource


def sample(mix, n=4000, seed=0):
    rng = np.random.default_rng(seed)
    return np.array([mix.sample(rng) for _ in range(n)])


def test_fixed_lengths_are_exact():
    lengths = sample(workloads.fixed(300, 20), n=50)
    assert set(lengths[:, 0]) == {300} and set(lengths[:, 1]) == {20}


def test_random_lengths_stay_in_range_and_cover_it():
    lengths = sample(workloads.uniform_around(200, 40, 0.5))
    assert lengths[:, 0].min() == 100 and lengths[:, 0].max() == 300
    assert lengths[:, 1].min() == 20 and lengths[:, 1].max() == 60
    assert lengths[:, 0].mean() == pytest.approx(200, rel=0.03)


def test_long_prompt_mix_is_scaled_for_a_cpu():
    lengths = sample(workloads.LONG_PROMPT)
    assert 512 <= lengths[:, 0].min() and lengths[:, 0].max() <= 1024
    assert 32 <= lengths[:, 1].min() and lengths[:, 1].max() <= 64


def test_chat_mix_has_a_quarter_long_context_requests():
    lengths = sample(workloads.CHAT_MIX)
    long_share = (lengths[:, 0] >= 512).mean()
    assert long_share == pytest.approx(0.25, abs=0.03)
    assert lengths[:, 0].min() >= 32


def test_trace_is_sorted_rebased_converted_and_scaled(tmp_path):
    path = tmp_path / "trace.jsonl"
    rows = [
        {"timestamp": 5000, "input_length": 800, "output_length": 100, "hash_ids": [1, 2]},
        {"timestamp": 2000, "input_length": 400, "output_length": 3},
        {"timestamp": 3500, "input_length": 1, "output_length": 50},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    records = workloads.load_trace(path, time_unit="ms", length_scale=0.5)
    assert [r.timestamp_s for r in records] == [0.0, 1.5, 3.0]
    assert [(r.input_len, r.output_len) for r in records] == [(200, 2), (1, 25), (400, 50)]  # never below 1


def test_trace_errors_name_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"timestamp": 0, "input_length": 5, "output_length": 5}\n{"timestamp": 1, "input_length": 5}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        workloads.load_trace(path)


def test_token_id_prompts_have_exact_lengths_even_longer_than_the_corpus(char_tokenizer):
    source = PromptSource(char_tokenizer, "abcdefghij")
    rng = np.random.default_rng(0)
    for length in (1, 7, 10, 25):
        ids = source.token_ids(length, rng)
        assert len(ids) == length
        text = char_tokenizer.decode(ids)
        assert text in "abcdefghij" * 4  # consecutive corpus text, wrapping around


def test_corpus_is_real_english_text():
    text = CORPUS_PATH.read_text()
    assert 4000 < len(text.encode()) < 20000
    assert "Call me Ishmael" in text and text.count(" the ") > 50


def test_text_prompts_reencode_to_the_exact_length_with_the_real_tokenizer():
    tokenizer_module = pytest.importorskip("shared.engine.tokenizer")
    try:
        tokenizer = tokenizer_module.load_tokenizer("tiny-llama")
    except (FileNotFoundError, ValueError) as exc:
        pytest.skip(f"tokenizer unavailable: {exc}")
    source = PromptSource(tokenizer)
    rng = np.random.default_rng(1)
    for length in (1, 16, 100, 513, 1024, 3000):
        assert len(tokenizer.encode(source.text(length, rng))) == length
        assert len(source.token_ids(length, rng)) == length


def first(n, specs):
    return list(itertools.islice(specs, n))


def test_same_seed_gives_the_identical_schedule(char_tokenizer):
    source = PromptSource(char_tokenizer)
    make = lambda seed: first(30, schedule.synthetic(workloads.CHAT_MIX, OpenLoop(3.0, 0.5), source, seed))  # noqa: E731
    a, b, c = make(11), make(11), make(12)
    assert a == b
    assert [s.send_at for s in a] != [s.send_at for s in c]
    assert all(len(s.prompt) == s.input_len for s in a)
    assert [s.index for s in a] == list(range(30))


def test_closed_loop_schedule_has_no_send_times(char_tokenizer):
    specs = first(5, schedule.synthetic(workloads.fixed(8, 4), ClosedLoop(2), PromptSource(char_tokenizer), 0))
    assert [s.send_at for s in specs] == [0.0] * 5


def test_trace_replay_uses_trace_times_and_speedup(char_tokenizer):
    trace = workloads.Trace("t", (workloads.TraceRecord(0.0, 5, 2), workloads.TraceRecord(4.0, 9, 3)), speedup=2.0)
    specs = list(schedule.build(trace, OpenLoop(1.0), PromptSource(char_tokenizer), 0))
    assert [(s.send_at, s.input_len, s.output_len, len(s.prompt)) for s in specs] == [(0.0, 5, 2, 5), (2.0, 9, 3, 9)]
