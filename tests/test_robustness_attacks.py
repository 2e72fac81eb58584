"""PromptBench-style attacks change prompts as specified; PDR is exact on a hand-made case."""

from __future__ import annotations

import pytest

from mergeflow.errors import MergeflowError
from mergeflow.robustness import attacks
from mergeflow.robustness.pdr import performance_drop_rate

PROMPT = "Analyze the tone of this statement and respond with either 'positive' or 'negative':"
LABELS = {"positive", "negative"}
KEY = ("Analyze", "tone", "statement", "respond")


def key_objective(prompt: str) -> tuple[float, float]:
    """A stand-in victim: accurate while the key words are intact, slightly worse per lost one."""
    intact = sum(w in prompt for w in KEY)
    return (1.0 if intact == len(KEY) else 0.5, intact / len(KEY))


def test_levenshtein_reference():
    assert attacks.levenshtein("kitten", "sitting") == 3
    assert attacks.levenshtein("", "abc") == 3
    assert attacks.levenshtein("abc", "abc") == 0


def test_char_edits_are_single_character_edits_and_seeded():
    import random

    cands = attacks.char_edits("statement", random.Random(3))
    assert 3 <= len(cands) <= 4 and "statement" not in cands
    for c in cands:  # swap = 2 substitutions, the others 1
        assert 1 <= attacks.levenshtein("statement", c) <= 2
        assert abs(len(c) - len("statement")) <= 1
    assert cands == attacks.char_edits("statement", random.Random(3))


def test_deepwordbug_edits_characters_within_budget_and_spares_labels():
    res = attacks.deepwordbug(PROMPT, key_objective, LABELS, seed=0, max_edit_distance=30)
    assert res.edits, "the objective rewards breaking key words: some must be edited"
    before, after = attacks.words(PROMPT), attacks.words(res.prompt)
    assert len(before) == len(after)  # character edits keep the word count
    changed = [i for i, (b, a) in enumerate(zip(before, after)) if b[2] != a[2]]
    assert sorted(e["index"] for e in res.edits) == changed
    for i in changed:
        assert before[i][2].lower() not in attacks.STOPWORDS | LABELS
        assert attacks.levenshtein(before[i][2], after[i][2]) <= 2
    assert attacks.levenshtein(PROMPT, res.prompt) <= 30
    assert "'positive'" in res.prompt and "'negative'" in res.prompt
    assert key_objective(res.prompt) < key_objective(PROMPT)
    again = attacks.deepwordbug(PROMPT, key_objective, LABELS, seed=0)
    assert again.prompt == res.prompt  # seeded


def test_deepwordbug_respects_a_small_edit_budget():
    res = attacks.deepwordbug(PROMPT, key_objective, LABELS, seed=1, max_edit_distance=1)
    assert attacks.levenshtein(PROMPT, res.prompt) <= 1
    assert len(res.edits) <= 1


@pytest.mark.slow
def test_bertattack_substitutes_masked_lm_candidates(tmp_path):
    from mergeflow.robustness.demo import build_tiny_mlm

    mlm = attacks.MaskedLMCandidates(build_tiny_mlm(tmp_path / "mlm"), max_candidates=20)
    # reference: candidates for each word of the original prompt, computed independently
    first = attacks.modifiable(PROMPT, LABELS)[0]
    assert mlm(PROMPT, first), "the tiny MLM should propose whole-word candidates"
    res = attacks.bertattack(PROMPT, key_objective, LABELS, seed=0, mlm=mlm, max_words_perturbed=0.1)
    assert 1 <= len(res.edits) <= max(1, int(0.1 * len(attacks.words(PROMPT))))
    edit = res.edits[0]
    assert edit["to"] in mlm(PROMPT, edit["index"])  # a substitution from the MLM's candidates
    assert edit["from"].lower() not in attacks.STOPWORDS | LABELS
    assert attacks.replace_word(PROMPT, edit["index"], edit["to"]) == res.prompt


def test_stresstest_appends_the_most_damaging_distractor_after_the_last_word():
    def objective(prompt):  # the victim is fooled most by "false is not true"
        return (0.0 if "false is not true" in prompt else 1.0, 0.0)

    res = attacks.stresstest(PROMPT, objective)
    expected = PROMPT[: -len("':")] + "  and false is not true ':"
    assert res.prompt == expected
    assert res.prompt.replace(" " + attacks.STRESS_DISTRACTORS[1], "") == PROMPT
    assert res.queries == 3


def test_stresstest_on_a_prompt_without_words_is_an_error():
    with pytest.raises(MergeflowError, match="no words"):
        attacks.stresstest("?!", lambda p: (1.0, 1.0))


def test_pdr_exact_on_a_hand_made_case():
    clean = [True, True, True, True, False]
    attacked = [True, False, False, True, True]  # 3 right of 5, 4 right clean
    assert performance_drop_rate(clean, attacked) == pytest.approx(1 - 3 / 4)
    assert performance_drop_rate(clean, clean) == 0.0
    assert performance_drop_rate([True, False], [True, True]) == pytest.approx(-1.0)  # the attack helped
    assert performance_drop_rate([False, False], [True, False]) is None
    with pytest.raises(MergeflowError, match="same examples"):
        performance_drop_rate([True], [True, False])


def _fake_mlm(substitutes):
    """A stand-in masked LM: fixed substitutes for some words, none for the rest."""
    return lambda text, index: list(substitutes.get(attacks.words(text)[index][2], []))


def _topic_encoder(texts):
    """A hand-made sentence encoder: 'tone' and 'mood' mean the same, anything else is orthogonal."""
    return [[1.0, 0.0] if ("tone" in t or "mood" in t) else [0.0, 1.0] for t in texts]


def _tone_objective(prompt):
    # "colour" fools the victim completely, "mood" only a little: an unconstrained search takes "colour"
    if "colour" in prompt:
        return (0.0, 0.0)
    return (0.5, 0.4) if "mood" in prompt else (1.0, 1.0)


def test_sentence_similarity_rejects_a_candidate_under_the_threshold_and_keeps_one_above():
    sim = attacks.SentenceSimilarity(_topic_encoder, threshold=0.8)
    index = [w[2] for w in attacks.words(PROMPT)].index("tone")
    cands = [attacks.replace_word(PROMPT, index, w) for w in ("mood", "colour")]
    assert sim.scores(PROMPT, cands, index) == [pytest.approx(1.0), pytest.approx(0.0)]
    assert sim(PROMPT, cands, index) == [True, False]

    mlm = _fake_mlm({"tone": ["mood", "colour"]})
    free = attacks.bertattack(PROMPT, _tone_objective, LABELS, seed=0, mlm=mlm)
    assert [e["to"] for e in free.edits] == ["colour"] and free.rejected == 0
    res = attacks.bertattack(PROMPT, _tone_objective, LABELS, seed=0, mlm=mlm, similarity=sim)
    assert [(e["from"], e["to"]) for e in res.edits] == [("tone", "mood")]
    assert res.rejected == 1  # "colour" was dropped before it was queried
    assert res.queries == free.queries - 1
    assert "colour" not in res.prompt and "mood" in res.prompt


def test_sentence_similarity_threshold_is_inclusive_and_compares_against_the_original():
    def encoder(texts):  # cos(original, x) = 0.8 exactly for "mood", 0.6 for "feel"
        table = {"mood": [4.0, 3.0], "feel": [3.0, 4.0]}  # vs [5, 0]: 20/25 and 15/25, exact in floats
        return [next((v for k, v in table.items() if k in t), [5.0, 0.0]) for t in texts]

    sim = attacks.SentenceSimilarity(encoder, threshold=0.8)
    i = 2  # "tone"
    assert attacks.words(PROMPT)[i][2] == "tone"
    cands = [attacks.replace_word(PROMPT, i, w) for w in ("mood", "feel")]
    assert sim.scores(PROMPT, cands, i) == [0.8, 0.6]
    assert sim(PROMPT, cands, i) == [True, False]


def test_text_window_around_the_substituted_word():
    text = "w0 w1 w2 w3 w4 w5 w6"
    assert attacks.text_window(text, 3, 3) == "w2 w3 w4"
    assert attacks.text_window(text, 0, 3) == "w0 w1 w2"  # shifted inwards at the start
    assert attacks.text_window(text, 6, 3) == "w4 w5 w6"  # and at the end
    assert attacks.text_window(text, 3, 4) == "w1 w2 w3 w4"  # even windows: one more word before
    assert attacks.text_window(text, 3, None) == text
    assert attacks.text_window(text, 3, 50) == text

    seen = []

    def encoder(texts):
        seen.extend(texts)
        return [[1.0, 0.0]] * len(texts)

    attacks.SentenceSimilarity(encoder, 0.8, window=3)(text, [attacks.replace_word(text, 3, "zz")], 3)
    assert seen == ["w2 w3 w4", "w2 zz w4"]
    with pytest.raises(MergeflowError, match="window"):
        attacks.SentenceSimilarity(encoder, 0.8, window=0)


def test_sentence_encoder_mean_pools_the_tiny_mlm(tmp_path):
    from mergeflow.robustness.demo import build_tiny_mlm

    enc = attacks.SentenceEncoder(build_tiny_mlm(tmp_path / "mlm"))
    a, b, c = enc([PROMPT, PROMPT, "a waste of time and money ."])
    assert len(a) == 32  # the tiny MLM's hidden size
    assert attacks.cosine(a, b) == pytest.approx(1.0, abs=1e-6)
    assert attacks.cosine(a, c) < 1.0
