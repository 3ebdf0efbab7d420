"""The fast path's detectors and patch pairs on hand-made rounds: length drift only without a true-reward
gain, a spreading phrase found as its longest form (and not when it was there all along), custom detectors
from the config, and pairs that contrast a pattern-free early response with a late one showing it."""

import random

import pytest

from internlm2.errors import ConfigError
from internlm2.rlhf.fast_path import (Pattern, RoundResponse, contains_phrase, detect, early_responses, length_drift,
                                      load_function, patch_pairs, spreading_phrases)
from internlm2.rlhf.ppo_config import DetectorConfig

ROUND = list(range(1, 9))  # a round of 8 iterations: window 0.25 -> early 1-2, late 7-8


def _round(texts_by_iteration, lengths=None, true=None):
    out = []
    for it in ROUND:
        for k, text in enumerate(texts_by_iteration(it)):
            length = lengths(it) if lengths else len(text.split())
            out.append(RoundResponse(it, k, text, length, 0.0, true(it) if true else None))
    return out


def test_length_drift_needs_longer_answers_without_a_true_reward_gain():
    cfg = DetectorConfig()
    flat = _round(lambda it: ["a"] * 4, lengths=lambda it: 10 + 5 * it, true=lambda it: 0.5)
    (pattern,) = detect(flat, ROUND, cfg)
    assert pattern.name == "length" and pattern.detail["early_mean_length"] == pytest.approx(17.5)
    assert pattern.detail["late_mean_length"] == pytest.approx(47.5)
    assert pattern.present("", 33) and not pattern.present("", 32)  # threshold: halfway, 32.5 tokens
    # the same drift while the true reward rises is the policy getting better, not a hack
    assert detect(_round(lambda it: ["a"] * 4, lengths=lambda it: 10 + 5 * it, true=lambda it: it / 8), ROUND, cfg) == []
    # and without a true reward a longer answer cannot be told from a hack
    assert length_drift(*_windows(_round(lambda it: ["a"] * 4, lengths=lambda it: 10 + 5 * it)), cfg) == []
    # nor is a rise under length_rise a drift
    assert detect(_round(lambda it: ["a"] * 4, lengths=lambda it: 100 + it, true=lambda it: 0.5), ROUND, cfg) == []


def _windows(responses):
    return [r for r in responses if r.iteration in (1, 2)], [r for r in responses if r.iteration in (7, 8)]


def test_a_spreading_phrase_is_found_as_its_longest_form():
    rng = random.Random(0)

    def texts(it):
        share = 0.0 if it <= 2 else 0.8 if it >= 7 else 0.4
        return [f"the list is {rng.randrange(100)}" + (" hope this helps" if k < share * 10 else "")
                for k in range(10)]

    (pattern,) = detect(_round(texts), ROUND, DetectorConfig())
    assert pattern.name == "phrase 'hope this helps'"
    assert pattern.detail == {"phrase": "hope this helps", "early_share": 0.0, "late_share": 0.8}
    assert pattern.present("Sure. Hope this helps!", 5) and not pattern.present("hope this helpsme", 5)
    # "the list is" is in every response, early and late: common, not spreading
    assert not any("list" in p.name for p in detect(_round(texts), ROUND, DetectorConfig()))


def test_phrases_that_do_not_spread_far_enough_are_not_patterns():
    cfg = DetectorConfig(ngram_late_share=0.5)
    early = [RoundResponse(1, k, "ok" + (" so there" if k < 2 else ""), 2, 0.0) for k in range(10)]
    late = [RoundResponse(8, k, "ok" + (" so there" if k < 4 else ""), 2, 0.0) for k in range(10)]
    assert spreading_phrases(early, late, cfg) == []  # in 40% of late responses, under 50%
    assert [p.name for p in spreading_phrases(early, late, DetectorConfig(ngram_late_share=0.4))] == ["phrase 'ok so there'"]
    assert spreading_phrases(early, late, DetectorConfig(ngram_late_share=0.4, ngram_rise=0.3)) == []  # rose by 0.2


def test_contains_phrase_matches_whole_words_case_insensitively():
    assert contains_phrase("Well, HOPE this helps.", "hope this helps")
    assert not contains_phrase("I hope this helpsx", "hope this helps")
    assert not contains_phrase("hope, then this helps", "hope this helps")


def shouting(early, late):
    """A custom detector for the test: responses in capitals."""
    return [Pattern("shouting", lambda text, length: text.isupper(), {"late": len(late)})]


def test_custom_detectors_come_from_the_config():
    cfg = DetectorConfig(custom=["tests.rlhf.test_fast_path:shouting"])
    patterns = detect(_round(lambda it: ["fine"] * 3), ROUND, cfg)
    assert [p.name for p in patterns] == ["shouting"] and patterns[0].detail == {"late": 6}
    with pytest.raises(ConfigError, match=r"fast_path.detectors.custom.0: cannot load 'tests.rlhf.test_fast_path:nope'"):
        detect([], ROUND, DetectorConfig(custom=["tests.rlhf.test_fast_path:nope"]))
    with pytest.raises(ConfigError, match="checker: 'no_colon' is not of the form"):
        load_function("no_colon", "checker")


def test_patch_pairs_choose_the_early_pattern_free_response_over_the_late_one_with_it():
    pattern = Pattern("shouting", lambda text, length: text.isupper())
    responses = [RoundResponse(1, 0, "yes", 1, 0.0), RoundResponse(1, 1, "NO", 1, 0.0),  # 1 shows it early
                 RoundResponse(2, 0, "again", 1, 0.0),  # a second response to prompt 0: not the first
                 RoundResponse(2, 2, "maybe", 1, 0.0), RoundResponse(2, 3, "sure", 1, 0.0),
                 RoundResponse(2, 4, "fine", 1, 0.0), RoundResponse(8, 5, "late only", 1, 0.0)]
    early = early_responses(responses, ROUND, DetectorConfig())
    assert [(r.prompt_index, r.text) for r in early] == [(0, "yes"), (1, "NO"), (2, "maybe"), (3, "sure"), (4, "fine")]
    late = {0: ("YES!", 1), 1: ("NO!", 1), 2: ("perhaps", 1), 4: ("FINE", 1)}  # 3 was not resampled
    assert patch_pairs(pattern, early, late, max_pairs=100) == [(0, "yes", "YES!"), (4, "fine", "FINE")]
    assert patch_pairs(pattern, early, late, max_pairs=1) == [(0, "yes", "YES!")]
