"""Sampling on real logits (``shared/engine/pytorch/sampling.py``), on hand-made logit rows.

Each parameter is checked for what it must do: greedy takes the argmax (lowest id on a tie);
a seeded draw is a function of (seed, position) only; ``top_k``, ``top_p`` and ``min_p`` never
let an excluded token out; temperature sharpens or flattens; penalties and ``logit_bias`` move
the logits by the documented amounts; stop tokens are masked until ``min_new_tokens``; logprobs
are the log-softmax of the distribution sampled from.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import pytest

from shared.engine.cpu.request import SamplingParams

torch = pytest.importorskip("torch")

from shared.engine.pytorch.sampling import SampleRow, sample, uniform  # noqa: E402

VOCAB = 50


def row(position: int = 10, **params: Any) -> SampleRow:
    logprobs = params.pop("logprobs", -1)
    output = params.pop("output", [])
    prompt = params.pop("prompt", [1, 2, 3])
    return SampleRow(
        params=SamplingParams(**params),
        position=position,
        prompt=prompt,
        output=output,
        logprobs=logprobs,
    )


def logits(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def peaked(best: int, *, second: int = 0, gap: float = 1.0) -> list[float]:
    values = [0.0] * VOCAB
    values[best] = 5.0
    values[second] = 5.0 - gap
    return values


def test_greedy_takes_the_argmax_and_the_lowest_id_on_a_tie() -> None:
    tokens, lps = sample(
        logits(peaked(7), peaked(3, second=9, gap=0.0)),
        [row(temperature=0), row(temperature=0)],
    )
    assert tokens == [7, 3]
    assert lps == [None, None]


def test_seeded_draws_depend_on_seed_and_position_only() -> None:
    flat = [0.0] * VOCAB
    a = [sample(logits(flat), [row(p, temperature=1.0, seed=42)])[0][0] for p in range(200)]
    b = [
        sample(logits(flat, flat), [row(p, temperature=1.0, seed=42)] * 2)[0][1] for p in range(200)
    ]
    c = [sample(logits(flat), [row(p, temperature=1.0, seed=43)])[0][0] for p in range(200)]
    assert a == b  # another row in the batch changes nothing
    assert a != c
    # A uniform distribution is sampled uniformly: every token shows up.
    assert len(set(a)) > VOCAB * 0.9
    assert min(uniform(1, p) for p in range(1000)) >= 0.0
    assert max(uniform(1, p) for p in range(1000)) < 1.0


@pytest.mark.parametrize(
    ("params", "allowed"),
    [
        ({"top_k": 3}, {10, 11, 12}),
        ({"top_p": 0.5}, {10}),  # the best token alone holds > half the mass
        ({"min_p": 0.2}, {10, 11}),
    ],
)
def test_truncation_never_lets_an_excluded_token_out(
    params: dict[str, Any], allowed: set[int]
) -> None:
    values = [-10.0] * VOCAB
    values[10], values[11], values[12], values[13] = 3.0, 2.0, 1.0, 0.5
    drawn = Counter(
        sample(logits(values), [row(p, temperature=1.0, seed=7, **params)])[0][0]
        for p in range(400)
    )
    assert set(drawn) == allowed


def test_temperature_sharpens_and_flattens() -> None:
    values = [0.0] * VOCAB
    values[5] = 2.0

    def share(temperature: float) -> float:
        drawn = [
            sample(logits(values), [row(p, temperature=temperature, seed=3)])[0][0]
            for p in range(600)
        ]
        return drawn.count(5) / len(drawn)

    assert share(0.2) > 0.95 > share(1.0) > share(5.0)


def test_penalties_and_logit_bias_move_the_logits() -> None:
    base = peaked(4, second=6, gap=0.5)
    # Greedy picks 4; repeated output of 4 with a frequency penalty of 1 (x2) makes it 6.
    assert sample(logits(base), [row(temperature=0)])[0] == [4]
    assert sample(logits(base), [row(temperature=0, frequency_penalty=1.0, output=[4, 4])])[0] == [
        6
    ]
    assert sample(logits(base), [row(temperature=0, presence_penalty=0.6, output=[4])])[0] == [6]
    # Repetition: 5.0 / 1.2 = 4.17 < 4.5.
    assert sample(logits(base), [row(temperature=0, repetition_penalty=1.2, prompt=[4])])[0] == [6]
    assert sample(logits(base), [row(temperature=0, logit_bias={20: 10.0})])[0] == [20]


def test_stop_tokens_are_masked_until_min_new_tokens() -> None:
    stop = frozenset({4})
    masked = row(temperature=0, min_new_tokens=3, stop_token_ids=stop, output=[9, 9])
    free = row(temperature=0, min_new_tokens=3, stop_token_ids=stop, output=[9, 9, 9])
    assert sample(logits(peaked(4, second=6), peaked(4, second=6)), [masked, free])[0] == [6, 4]


def test_logprobs_are_of_the_sampled_distribution() -> None:
    values = peaked(4, second=6)
    (token,), (entry,) = sample(logits(values), [row(temperature=0, logprobs=3)])
    assert entry is not None
    chosen, top = entry
    expected = torch.log_softmax(torch.tensor(values), dim=-1)
    assert chosen == pytest.approx(float(expected[token]))
    assert top is not None and [t for _, t in top[:2]] == [4, 6]
    assert top[2][0] == pytest.approx(float(expected[0]))  # any of the 48 tied tokens
    assert sum(math.exp(lp) for lp, _ in top) < 1.0
    # After temperature, as SGLang reports them.
    (_,), ((hot, _),) = sample(logits(values), [row(temperature=2.0, seed=1, logprobs=0)])
    assert hot != pytest.approx(chosen)
