"""Incremental detokenization and stop-string matching (services/processor/detokenize.py)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from services.processor.detokenize import IncrementalDetokenizer, StopStringMatcher

FFFD = "\ufffd"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "héllo wörld 日本語 🙂",
    "The quick brown fox jumps over the lazy dog.",
    "Grüße aus München! Ça va? Ñandú, señor.",
    "日本語のテキストと中文文本 and emoji 🙂🚀👍🏽",
    "hello world, hello there: 12345 + 67890 = 80235",
    "    indented code():\n\treturn {'key': [1, 2, 3]}\n",
]
TEXT = "héllo wörld 日本語 🙂 — Grüße 🚀!"
SMOLLM2 = Path.home() / ".cache/sglmesh/models/smollm2-135m-instruct/tokenizer.json"
# No example database: the run writes nothing into the working tree.
HYPOTHESIS = settings(
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def _train(model: Any, pre: Any, decoder: Any, trainer: Any) -> Tokenizer:
    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = pre
    tokenizer.decoder = decoder
    tokenizer.train_from_iterator(CORPUS * 4, trainer=trainer)
    return tokenizer


@pytest.fixture(scope="module")
def byte_level() -> Tokenizer:
    """A tiny GPT-2-style byte-level BPE: spaces as `Ġ`, every byte a token of its own."""
    return _train(
        models.BPE(),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
        decoders.ByteLevel(),
        trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=SPECIALS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )


@pytest.fixture(scope="module")
def metaspace() -> Tokenizer:
    """A tiny SentencePiece-style BPE: word-initial `▁`, stripped at the start of a decode."""
    return _train(
        models.BPE(unk_token="<unk>"),
        pre_tokenizers.Metaspace(),
        decoders.Metaspace(),
        trainers.BpeTrainer(
            vocab_size=400, special_tokens=[*SPECIALS, "<unk>"], show_progress=False
        ),
    )


@pytest.fixture(scope="module")
def smollm2() -> Tokenizer:
    if not SMOLLM2.is_file():
        pytest.skip(f"default model tokenizer not cached at {SMOLLM2}")
    return Tokenizer.from_file(str(SMOLLM2))


def expected(
    tokenizer: Tokenizer, prompt: Sequence[int], generated: Sequence[int], skip: bool = True
) -> str:
    """The documented invariant: the generated ids decoded as a continuation of the prompt."""
    full: str = tokenizer.decode([*prompt, *generated], skip_special_tokens=skip)
    base: str = tokenizer.decode(list(prompt), skip_special_tokens=skip) if prompt else ""
    common = next(
        (i for i, (a, b) in enumerate(zip(base, full, strict=False)) if a != b),
        min(len(base), len(full)),
    )
    return full[common:]


def stream(
    tokenizer: Any,
    generated: Sequence[int],
    prompt: Sequence[int] = (),
    chunks: Sequence[int] = (1,),
    skip: bool = True,
) -> tuple[list[str], str]:
    """Push `generated` in chunks of the given sizes (cycled); return (push outputs, flush)."""
    detok = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens=skip)
    outputs, i, k = [], 0, 0
    while i < len(generated):
        size = max(chunks[k % len(chunks)], 1)
        outputs.append(detok.push(generated[i : i + size]))
        i, k = i + size, k + 1
    return outputs, detok.flush()


def splits_a_character(tokenizer: Tokenizer, ids: Sequence[int]) -> bool:
    return any(FFFD in tokenizer.decode([i]) for i in ids)


# --- IncrementalDetokenizer ----------------------------------------------------------------


def test_byte_level_multibyte_text_token_by_token(byte_level: Tokenizer) -> None:
    ids = byte_level.encode(TEXT).ids
    assert splits_a_character(byte_level, ids), "the test needs a character split over tokens"
    assert any("Ġ" in _token(byte_level, i) for i in ids)
    outputs, tail = stream(byte_level, ids)
    assert "".join(outputs) + tail == TEXT == byte_level.decode(ids)
    assert tail == ""
    assert all(FFFD not in out for out in outputs)
    assert "" in outputs  # bytes of a split character were held back


def test_characters_are_emitted_as_soon_as_they_complete(byte_level: Tokenizer) -> None:
    detok = IncrementalDetokenizer(byte_level)
    emoji = "🙂".encode()
    byte_ids = [_id(byte_level, _byte_token(b)) for b in emoji]
    assert detok.push(byte_level.encode("ok").ids) == "ok"
    assert [detok.push([i]) for i in byte_ids] == ["", "", "", "🙂"]
    assert detok.flush() == ""


def test_text_before_an_incomplete_character_is_not_held(byte_level: Tokenizer) -> None:
    detok = IncrementalDetokenizer(byte_level)
    lead = _id(byte_level, _byte_token("日".encode()[0]))
    assert detok.push([*byte_level.encode("ab").ids, lead]) == "ab"
    rest = [_id(byte_level, _byte_token(b)) for b in "日".encode()[1:]]
    assert detok.push(rest) == "日"


def test_flush_releases_an_incomplete_character_as_the_full_decode_does(
    byte_level: Tokenizer,
) -> None:
    ids = [*byte_level.encode("x").ids, *_byte_ids(byte_level, "日".encode()[:2])]
    outputs, tail = stream(byte_level, ids)
    assert "".join(outputs) == "x"
    assert tail == byte_level.decode(ids)[1:] == FFFD
    lone = _byte_ids(byte_level, b"\x80")  # a genuinely invalid byte, then valid text
    outputs, tail = stream(byte_level, [*lone, *byte_level.encode("ok").ids])
    assert outputs[0] == ""  # held: it might have been the start of a character
    assert (
        "".join(outputs) == FFFD + "ok" == byte_level.decode([*lone, *byte_level.encode("ok").ids])
    )
    assert tail == ""


def test_prompt_continuation_byte_level(byte_level: Tokenizer) -> None:
    prompt = byte_level.encode("hello world, the quick").ids
    generated = byte_level.encode(" brown fox 🙂 日本語").ids
    outputs, tail = stream(byte_level, generated, prompt)
    assert "".join(outputs) + tail == " brown fox 🙂 日本語"


def test_prompt_ending_inside_a_character(byte_level: Tokenizer) -> None:
    ids = byte_level.encode("hello 🦀 world").ids
    cut = next(i for i in range(1, len(ids)) if byte_level.decode(ids[:i]).endswith(FFFD))
    prompt, generated = ids[:cut], ids[cut:]
    outputs, tail = stream(byte_level, generated, prompt)
    assert "".join(outputs) + tail == expected(byte_level, prompt, generated) == "🦀 world"


def test_prompt_of_skipped_special_tokens(byte_level: Tokenizer) -> None:
    specials = [_id(byte_level, t) for t in SPECIALS]
    prompt = [*_byte_ids(byte_level, "日".encode()[:1]), *specials, *specials]
    generated = _byte_ids(byte_level, "日".encode()[1:])
    outputs, tail = stream(byte_level, generated, prompt)
    assert "".join(outputs) + tail == expected(byte_level, prompt, generated) == "日"


def test_metaspace_leading_space(metaspace: Tokenizer) -> None:
    ids = metaspace.encode("hello world there").ids
    assert _token(metaspace, ids[0]).startswith("▁")
    # From the start, the first word has no leading space, exactly as in the full decode.
    outputs, tail = stream(metaspace, ids)
    assert "".join(outputs) + tail == metaspace.decode(ids) == "hello world there"
    assert outputs[0] == "hello"
    # As a continuation of a prompt, the first generated word keeps its space.
    prompt, generated = ids[:1], ids[1:]
    outputs, tail = stream(metaspace, generated, prompt)
    assert "".join(outputs) + tail == " world there"
    assert outputs[0].startswith(" ")


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens(byte_level: Tokenizer, skip: bool) -> None:
    end = _id(byte_level, "<|im_end|>")
    ids = [*byte_level.encode("hi 🙂").ids, end, *byte_level.encode(" there").ids]
    outputs, tail = stream(byte_level, ids, skip=skip)
    text = "".join(outputs) + tail
    assert text == byte_level.decode(ids, skip_special_tokens=skip)
    assert ("<|im_end|>" in text) is not skip


def test_push_after_flush_and_empty_push(byte_level: Tokenizer) -> None:
    detok = IncrementalDetokenizer(byte_level, byte_level.encode("a b").ids)
    assert detok.push([]) == ""
    assert detok.push(byte_level.encode(" c").ids) == " c"
    assert detok.flush() == ""
    assert detok.flush() == ""
    with pytest.raises(RuntimeError):
        detok.push([1])


def test_cost_per_token_is_bounded_by_the_window(byte_level: Tokenizer) -> None:
    class Counting:
        def __init__(self) -> None:
            self.longest = 0

        def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
            self.longest = max(self.longest, len(ids))
            out: str = byte_level.decode(ids, skip_special_tokens=skip_special_tokens)
            return out

    ids = byte_level.encode(" ".join(CORPUS) * 30).ids
    assert len(ids) > 2000
    counting = Counting()
    prompt, generated = ids[:1000], ids[1000:]
    outputs, tail = stream(counting, generated, prompt)
    assert "".join(outputs) + tail == expected(byte_level, prompt, generated)
    assert counting.longest <= 12


@HYPOTHESIS
@given(data=st.data())
def test_property_random_ids_byte_level(byte_level: Tokenizer, data: st.DataObject) -> None:
    _check_random_ids(byte_level, data)


@HYPOTHESIS
@given(data=st.data())
def test_property_random_ids_metaspace(metaspace: Tokenizer, data: st.DataObject) -> None:
    _check_random_ids(metaspace, data)


@settings(HYPOTHESIS, max_examples=100)
@given(data=st.data())
def test_property_random_ids_smollm2(smollm2: Tokenizer, data: st.DataObject) -> None:
    _check_random_ids(smollm2, data)


@HYPOTHESIS
@given(text=st.text(max_size=40), data=st.data())
def test_property_valid_text_never_emits_replacement(
    byte_level: Tokenizer, text: str, data: st.DataObject
) -> None:
    ids = byte_level.encode(text).ids
    chunks = data.draw(st.lists(st.integers(1, 4), min_size=1, max_size=8))
    outputs, tail = stream(byte_level, ids, chunks=chunks)
    assert "".join(outputs) + tail == byte_level.decode(ids) == text
    assert all(FFFD not in out for out in outputs)


def test_smollm2_real_text(smollm2: Tokenizer) -> None:
    text = "Hello, wörld! 日本語のテキスト 🙂🚀👍🏽 — naïve café\n  def f(x): return x**2"
    ids = smollm2.encode(text).ids
    assert splits_a_character(smollm2, ids)
    outputs, tail = stream(smollm2, ids)
    assert "".join(outputs) + tail == smollm2.decode(ids) == text
    assert all(FFFD not in out for out in outputs)
    prompt = smollm2.encode("<|im_start|>user\nSay hi<|im_end|>\n<|im_start|>assistant\n").ids
    outputs, tail = stream(smollm2, ids, prompt, chunks=(3, 1, 2))
    assert "".join(outputs) + tail == expected(smollm2, prompt, ids) == text


def _check_random_ids(tokenizer: Tokenizer, data: st.DataObject) -> None:
    vocab = tokenizer.get_vocab_size()
    ids = data.draw(st.lists(st.integers(0, vocab - 1), max_size=40), label="ids")
    cut = data.draw(st.integers(0, len(ids)), label="prompt length")
    chunks = data.draw(st.lists(st.integers(1, 5), min_size=1, max_size=8), label="chunks")
    skip = data.draw(st.booleans(), label="skip_special_tokens")
    prompt, generated = ids[:cut], ids[cut:]
    outputs, tail = stream(tokenizer, generated, prompt, chunks, skip)
    want = expected(tokenizer, prompt, generated, skip)
    assert "".join(outputs) + tail == want
    if FFFD not in want:
        assert all(FFFD not in out for out in [*outputs, tail])
    # Whatever was emitted before the end never ends inside a character.
    assert all(not out.endswith(FFFD) for out in outputs)


def _byte_token(byte: int) -> str:
    """The byte-level BPE token for one raw byte (GPT-2's byte-to-unicode map)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping[byte]


def _byte_ids(tokenizer: Tokenizer, raw: bytes) -> list[int]:
    return [_id(tokenizer, _byte_token(b)) for b in raw]


def _id(tokenizer: Tokenizer, token: str) -> int:
    found = tokenizer.token_to_id(token)
    assert found is not None, token
    return found


def _token(tokenizer: Tokenizer, token_id: int) -> str:
    found = tokenizer.id_to_token(token_id)
    assert found is not None, token_id
    return found


# --- StopStringMatcher ---------------------------------------------------------------------


def run(matcher: StopStringMatcher, chunks: Sequence[str]) -> tuple[list[str], str | None, str]:
    """Feed chunks until a match; return (emitted per chunk, match, flush)."""
    emitted, match = [], None
    for chunk in chunks:
        out, match = matcher.feed(chunk)
        emitted.append(out)
        if match is not None:
            break
    return emitted, match, matcher.flush()


def test_stop_across_chunk_boundaries() -> None:
    emitted, match, tail = run(StopStringMatcher(["</end>"]), ["hello </", "en", "d> junk"])
    assert emitted == ["hello ", "", ""]
    assert match == "</end>"
    assert tail == ""


def test_held_back_then_released() -> None:
    matcher = StopStringMatcher(["STOP"])
    assert matcher.feed("abc ST") == ("abc ", None)
    assert matcher.feed("O") == ("", None)
    assert matcher.feed("P!") == ("", "STOP")
    assert matcher.matched == "STOP"
    matcher = StopStringMatcher(["STOP"])
    assert matcher.feed("abc ST") == ("abc ", None)
    assert matcher.feed("OW") == ("STOW", None)
    assert matcher.feed("ST") == ("", None)
    assert matcher.flush() == "ST"
    assert matcher.done


def test_multiple_stops_first_to_end_wins() -> None:
    matcher = StopStringMatcher(["world", "lo w"])
    assert matcher.feed("hello world") == ("hel", "lo w")
    matcher = StopStringMatcher(["b", "ab"])  # both end at the same place: the longer wins
    assert matcher.feed("xab") == ("x", "ab")
    matcher = StopStringMatcher(["abc", "b"])  # "b" ends first, even in one chunk
    assert matcher.feed("xabc") == ("xa", "b")


def test_overlapping_prefixes() -> None:
    matcher = StopStringMatcher(["aab"])
    assert matcher.feed("a") == ("", None)
    assert matcher.feed("a") == ("", None)
    assert matcher.feed("a") == ("a", None)  # "aaa": only the last "aa" can still start it
    assert matcher.feed("b") == ("", "aab")
    matcher = StopStringMatcher(["abcd", "bce"])
    assert matcher.feed("xabc") == ("x", None)
    assert matcher.feed("e") == ("a", "bce")


def test_include_stop() -> None:
    matcher = StopStringMatcher(["</s>", "\n\n"], include_stop=True)
    emitted, match, _ = run(matcher, ["answer: 4", "2\n", "\nmore"])
    assert "".join(emitted) == "answer: 42\n\n"
    assert match == "\n\n"


def test_stop_at_the_very_start() -> None:
    assert StopStringMatcher(["###"]).feed("### after") == ("", "###")
    matcher = StopStringMatcher(["###"])
    assert matcher.feed("#") == ("", None)
    assert matcher.feed("##") == ("", "###")


def test_after_a_match_everything_is_discarded() -> None:
    matcher = StopStringMatcher(["x"])
    assert matcher.feed("axb") == ("a", "x")
    assert matcher.feed("more") == ("", None)
    assert matcher.flush() == ""


def test_flush_and_no_stops() -> None:
    matcher = StopStringMatcher([])
    assert matcher.feed("anything") == ("anything", None)
    assert matcher.flush() == ""
    matcher = StopStringMatcher(["xyz"])
    assert matcher.feed("abcx") == ("abc", None)
    assert matcher.flush() == "x"
    with pytest.raises(ValueError):
        StopStringMatcher([""])
    with pytest.raises(TypeError):
        StopStringMatcher("stop")


def test_only_a_bounded_suffix_is_held() -> None:
    matcher = StopStringMatcher(["abcde", "zz"])
    for _ in range(100):
        _, match = matcher.feed("abcd")
        assert match is None
        assert len(matcher._held) <= 4


def _reference(text: str, stops: Sequence[str], include: bool) -> tuple[str, str | None]:
    """Character by character: the first position where some stop ends."""
    for end in range(1, len(text) + 1):
        for stop in sorted(stops, key=len, reverse=True):
            if text[:end].endswith(stop):
                return text[: end if include else end - len(stop)], stop
    return text, None


@HYPOTHESIS
@given(
    text=st.text(alphabet="abc\n", max_size=30),
    stops=st.lists(st.text(alphabet="abc\n", min_size=1, max_size=4), max_size=3),
    cuts=st.lists(st.integers(0, 30), max_size=6),
    include=st.booleans(),
)
def test_property_stop_matching_is_independent_of_chunking(
    text: str, stops: list[str], cuts: list[int], include: bool
) -> None:
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    chunks = [text[a:b] for a, b in itertools.pairwise(bounds)]
    emitted, match, tail = run(StopStringMatcher(stops, include_stop=include), chunks)
    assert ("".join(emitted) + tail, match) == _reference(text, stops, include)
