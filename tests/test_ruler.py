"""ruler.py: RULER's scoring, and prompts that fit their length, hold their answer and are reproducible.

The tokenizer is dolma2; lengths are a few hundred tokens."""

import json
import re
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import data
import ruler


@pytest.fixture(scope="module")
def tokenizer():
    return data.get_tokenizer()


# ----------------------------------------------------------------------------------------------
# Scoring: RULER's string_match_all / string_match_part and HELMET's substring exact match


def test_string_match_all_is_the_mean_fraction_of_gold_strings_found():
    predictions = ["The numbers are 1234567 and 7654321.", "nothing here", "UUID ABC-def"]
    references = [["1234567", "7654321", "1111111"], ["42"], ["abc-DEF"]]
    # 2/3, 0, 1 (case-insensitive): mean 5/9.
    assert ruler.string_match_all(predictions, references) == pytest.approx(100 * (2 / 3 + 0 + 1) / 3)


def test_string_match_part_counts_a_sample_when_any_gold_string_is_found():
    predictions = ["Paris, France", "in 1990", "no idea"]
    references = [["paris", "lyon"], ["1989", "1991"], ["x"]]
    assert ruler.string_match_part(predictions, references) == pytest.approx(100 / 3)


def test_substring_exact_match_normalizes_case_punctuation_and_articles():
    assert ruler.substring_exact_match(["The value is: 'A1B2'."], [["a1b2"]]) == 100.0
    assert ruler.substring_exact_match(["a1b"], [["a1b2"]]) == 0.0


# ----------------------------------------------------------------------------------------------
# Prompts: fit their length, hold the answer where the task says, reproducible from the seed


def solve(task: str, prompt: str) -> str:
    """An oracle that reads the answer out of the prompt text the way each task defines it."""
    if task.startswith("niah"):
        query = re.findall(r"What (?:is|are all) the special magic \w+ for (.+) mentioned in the provided text\?", prompt)[-1]
        keys = re.split(r", and |, ", query)
        values = [v for key in keys for v in re.findall(rf"One of the special magic \w+ for {re.escape(key)} is: (\S+)\.",
                                                        prompt)]
        return " ".join(values)
    if task == "vt":
        main = prompt[prompt.rindex("Memorize and track"):]
        value = re.findall(r"assigned the value (\d+) in the text above", main)[0]
        names = [re.search(rf"VAR (\w+) = {value}\n", main).group(1)]
        while (step := re.search(rf"VAR (\w+) = VAR {names[-1]} ", main)) is not None:
            names.append(step.group(1))
        return " ".join(names)
    if task == "cwe":
        listed = prompt[prompt.rindex("Memorize the ones that appear most often.\n"):prompt.rindex("\nQuestion:")]
        counts = Counter(re.findall(r"\d+\. (\S+)", listed))
        return " ".join(w for w, _ in counts.most_common(10))
    if task == "fwe":
        coded = prompt[prompt.rindex("coded words. ") + len("coded words. "):prompt.rindex("\nQuestion:")]
        counts = Counter(w for w in coded.split() if w != "...")
        return " ".join(w for w, _ in counts.most_common(3))
    if task == "json_kv":
        pairs = json.loads(prompt[prompt.index("JSON data:\n") + 11:prompt.index("\n\nExtract the value")])
        return pairs[json.loads(re.search(r"Key: (\".*\")\n", prompt).group(1))]
    raise AssertionError(task)


@settings(max_examples=12)
@given(task=st.sampled_from([t for t in ruler.TASKS if t != "cwe"]), length=st.integers(450, 1500),
       seed=st.integers(0, 10 ** 6))
def test_prompt_fits_its_length_holds_the_answer_and_is_reproducible(tokenizer, task, length, seed):
    samples = ruler.build_samples(task, length, 2, seed, tokenizer, data.EOS_ID)
    again = ruler.build_samples(task, length, 2, seed, tokenizer, data.EOS_ID)
    other = ruler.build_samples(task, length, 2, seed + 1, tokenizer, data.EOS_ID)
    for sample, same, different in zip(samples, again, other):
        assert len(sample.tokens) + ruler.TASKS[task].max_new_tokens <= length
        assert sample.tokens[0] == data.EOS_ID and sample.tokens[1:] == tokenizer.encode(sample.prompt)
        assert (same.prompt, same.answers) == (sample.prompt, sample.answers)
        assert different.prompt != sample.prompt
        assert ruler.score(task, solve(task, sample.prompt), sample.answers) == 100.0
        for needle in sample.needles:  # each answer's needle sits once in the context, before the question
            assert sample.prompt.count(needle) == 1
            assert sample.prompt.index(needle) < sample.prompt.rindex("\n")


def test_cwe_prompt_repeats_the_ten_common_words_most(tokenizer):
    sample = ruler.build_samples("cwe", 1500, 1, 0, tokenizer, data.EOS_ID)[0]
    assert len(sample.tokens) + 120 <= 1500 and len(sample.answers) == 10
    assert set(solve("cwe", sample.prompt).split()) == set(sample.answers)


def test_a_prompt_that_cannot_fit_is_refused_with_the_fix(tokenizer):
    with pytest.raises(ruler.EvaluationError, match="does not fit length 300"):
        ruler.build_samples("cwe", 300, 1, 0, tokenizer, data.EOS_ID)


# ----------------------------------------------------------------------------------------------
# Generation caps: RULER's, plus what a vocabulary needs beyond dolma2 to spell the answers


class OneTokenPerByte:
    def encode(self, text):
        return list(text.encode())


class OneTokenPerWord:
    def encode(self, text):
        return text.split()


def test_the_cap_grows_by_the_extra_tokens_a_vocabulary_needs_for_the_answers_and_never_shrinks():
    vt = ruler.TASKS["vt"]
    answers = [["AB", "CD"], ["EFGH"]]  # " AB, CD": 7 bytes, 2 words; " EFGH": 5 bytes, 1 word
    assert ruler.generation_cap(vt, answers, OneTokenPerByte(), reference=OneTokenPerWord()) == 30 + 5
    assert ruler.generation_cap(vt, answers, OneTokenPerWord(), reference=OneTokenPerByte()) == 30
    assert ruler.generation_cap(vt, answers, OneTokenPerByte(), reference=None) == 30


def test_dolma2_keeps_rulers_caps_and_prompts(tokenizer):
    for task in ("vt", "niah_multikey_3", "json_kv"):
        plain = ruler.build_samples(task, 1024, 2, 0, tokenizer, data.EOS_ID)
        referenced = ruler.build_samples(task, 1024, 2, 0, tokenizer, data.EOS_ID, reference=tokenizer)
        assert [s.max_new_tokens for s in referenced] == [ruler.TASKS[task].max_new_tokens] * 2
        assert [(s.prompt, s.tokens) for s in referenced] == [(s.prompt, s.tokens) for s in plain]
