import pytest
import torch

from shared.engine.sampling import RequestSampler, SamplingParams, sample_batch


@pytest.mark.parametrize(
    "bad",
    [
        {"temperature": -0.1},
        {"temperature": float("nan")},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"top_k": -1},
        {"max_tokens": 0},
        {"seed": -3},
    ],
)
def test_invalid_params_are_refused(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)


def test_stop_token_ids_become_a_tuple():
    assert SamplingParams(stop_token_ids=[3, 4]).stop_token_ids == (3, 4)


LOGITS = torch.tensor([0.0, 3.0, 2.5, 2.0, -1.0, 1.0])


def draws(params, n=400):
    sampler = RequestSampler(params)
    return [sampler.sample(LOGITS, step) for step in range(n)]


def test_greedy_is_argmax():
    assert set(draws(SamplingParams(temperature=0.0), n=5)) == {1}


def test_top_k_one_and_tiny_top_p_are_greedy():
    assert set(draws(SamplingParams(temperature=5.0, top_k=1, seed=0))) == {1}
    assert set(draws(SamplingParams(temperature=1.0, top_p=1e-6, seed=0))) == {1}


def test_top_k_and_top_p_restrict_the_support():
    assert set(draws(SamplingParams(top_k=3, seed=1))) == {1, 2, 3}
    # softmax(LOGITS): p1=.43, p2=.26, p3=.16, ... top_p=0.6 keeps {1, 2}.
    assert set(draws(SamplingParams(top_p=0.6, seed=1))) == {1, 2}


def test_frequencies_follow_the_distribution():
    counts = torch.bincount(torch.tensor(draws(SamplingParams(seed=3), n=4000)), minlength=6).float() / 4000
    torch.testing.assert_close(counts, torch.softmax(LOGITS, -1), rtol=0, atol=0.03)


def test_seed_and_step_determine_the_draw():
    params = SamplingParams(temperature=2.0, seed=11)
    assert draws(params) == draws(params)
    assert draws(params) != draws(SamplingParams(temperature=2.0, seed=12))
    assert draws(SamplingParams(temperature=2.0)) != draws(SamplingParams(temperature=2.0))  # unseeded: fresh seeds


def test_logprobs_bounds():
    assert SamplingParams(logprobs=0).logprobs == 0 and SamplingParams(logprobs=5).logprobs == 5
    for bad in (-1, 6):
        with pytest.raises(ValueError):
            SamplingParams(logprobs=bad)


def test_sample_batch_matches_each_row_alone():
    torch.manual_seed(0)
    logits = torch.randn(6, 50) * 3
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.7, top_k=5, seed=1),
        SamplingParams(temperature=0.0, logprobs=3),
        SamplingParams(top_p=0.8, seed=2, logprobs=0),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.3, seed=3),
    ]
    samplers = [RequestSampler(p) for p in params]
    steps = [0, 4, 1, 9, 2, 0]
    choices = sample_batch(logits, samplers, steps)
    fresh = [RequestSampler(p) for p in params]
    assert [c.token_id for c in choices] == [s.sample(row, step) for s, row, step in zip(fresh, logits, steps)]
    logprobs = torch.log_softmax(logits, dim=-1)
    for row, choice in enumerate(choices):
        if params[row].logprobs is None:
            assert choice.logprob is None and choice.top_logprobs == []
            continue
        assert choice.logprob == pytest.approx(float(logprobs[row, choice.token_id]))
        top = torch.topk(logprobs[row], params[row].logprobs)
        assert [t for t, _ in choice.top_logprobs] == top.indices.tolist()
        assert [lp for _, lp in choice.top_logprobs] == pytest.approx(top.values.tolist())
    assert choices[2].token_id == int(logits[2].argmax()) and choices[2].top_logprobs[0][0] == choices[2].token_id
