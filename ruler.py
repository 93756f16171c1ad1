"""RULER-style synthetic tasks: prompts sized to a length, and their scoring.

    samples = build_samples("niah_single_1", 4096, n=100, seed=0, tokenizer=tokenizer, eos_id=eos_id)
    score("niah_single_1", prediction, samples[0].answers)   # 0..100

The tasks are RULER's (NVIDIA/RULER, Hsieh et al. 2024, scripts/data/synthetic/*.py: templates,
needles, haystacks, generation caps) and HELMET's JSON KV (Yen et al. 2024), scored as those
benchmarks score them (RULER's string_match_all, HELMET's substring exact match). A prompt is a
function of (seed, task, length, index) and the tokenizer: its haystack is the largest that fits
the length with the task's generation cap, found by binary search as RULER does. The deviations
from the benchmarks (a local essay haystack, JSON KV built here) are named by `deviations`, and
docs/evaluation.md defines every task and metric with its source.

Imports only the standard library, numpy and wonderwords (RULER's word lists); evaluate.py runs
the prompts through the models.
"""

from __future__ import annotations

import functools
import json
import random
import re
import string
import uuid
from dataclasses import dataclass, field

import numpy as np

RULER_TASK_COUNT = 13  # RULER's full suite: 8 NIAH, vt, cwe, fwe, qa_1, qa_2


class EvaluationError(ValueError):
    """A problem with the evaluation's inputs: the message names the value and the fix."""


# ----------------------------------------------------------------------------------------------
# Scoring (RULER scripts/eval/synthetic/constants.py; HELMET's substring exact match)


def string_match_all(predictions: list[str], references: list[list[str]]) -> float:
    """RULER: per sample, the fraction of gold strings found (case-insensitive substring); mean x100."""
    return 100.0 * sum(sum(r.lower() in p.lower() for r in refs) / len(refs)
                       for p, refs in zip(predictions, references)) / len(predictions)


def string_match_part(predictions: list[str], references: list[list[str]]) -> float:
    """RULER (QA): per sample, 1 if any gold string is found (case-insensitive substring); mean x100."""
    return 100.0 * sum(max(r.lower() in p.lower() for r in refs)
                       for p, refs in zip(predictions, references)) / len(predictions)


def normalize_answer(text: str) -> str:
    """SQuAD's normalization, which HELMET's substring_exact_match applies to both sides."""
    text = "".join(c for c in text.lower() if c not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def substring_exact_match(predictions: list[str], references: list[list[str]]) -> float:
    """HELMET (JSON KV): 1 if any normalized gold string is inside the normalized output; mean x100."""
    return 100.0 * sum(max(normalize_answer(r) in normalize_answer(p) for r in refs)
                       for p, refs in zip(predictions, references)) / len(predictions)


def postprocess_prediction(text: str) -> str:
    """RULER's postprocess_pred: control characters become newlines, then strip."""
    return re.sub(r"[\x00-\x1f]", "\n", text.strip()).strip()


# ----------------------------------------------------------------------------------------------
# Tasks: RULER's synthetic generators (scripts/data/synthetic/*.py) and HELMET's JSON KV

NIAH_TEMPLATE = ("Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
                 "I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special magic "
                 "{type_needle_v} for {query} mentioned in the provided text?")
NIAH_ANSWER_PREFIX = " The special magic {type_needle_v} for {query} mentioned in the provided text are"
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
VT_TEMPLATE = ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
               "Question: Find all variables that are assigned the value {query} in the text above.")
VT_ANSWER_PREFIX = (" Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables "
                    "are assigned the value {query}, they are: ")
CWE_TEMPLATE = ("Below is a numbered list of words. In these words, some appear more often than others. Memorize the "
                "ones that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above list?")
CWE_ANSWER_PREFIX = " Answer: The top 10 words that appear most often in the list are:"
FWE_TEMPLATE = ("Read the following coded text and track the frequency of each coded word. Find the three most "
                "frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore "
                "the dots '....'. What are the three most frequently appeared words in the above coded text?")
FWE_ANSWER_PREFIX = " Answer: According to the coded text above, the three most frequently appeared words are:"
# HELMET data.py load_json_kv (after lost-in-the-middle's kv_retrieval prompt), zero-shot.
JSON_KV_TEMPLATE = ("{context}\n\nExtract the value corresponding to the specified key in the JSON object below.\n\n"
                    "Key: {query}\nCorresponding value:")
DEPTHS = [int(d) for d in np.round(np.linspace(0, 100, num=40, endpoint=True))]  # RULER's needle depths (%)

ESSAY_DEVIATION = "essay haystack = Python's pydoc help topics, not Paul Graham's essays"
JSON_KV_DEVIATION = "JSON KV built here (json.dumps of uuid pairs), not HELMET's data files"


@dataclass(frozen=True)
class Task:
    name: str
    kind: str  # "niah" | "vt" | "cwe" | "fwe" | "json_kv"
    max_new_tokens: int  # RULER's tokens_to_generate; HELMET's generation_max_length for JSON KV
    metric: str = "string_match_all"
    haystack: str = "noise"  # niah: "noise" | "essay" | "needle"
    key_type: str = "words"
    value_type: str = "numbers"
    num_keys: int = 1
    num_values: int = 1
    num_queries: int = 1
    deviation: str | None = None


TASKS = {t.name: t for t in [
    Task("niah_single_1", "niah", 128, haystack="noise"),
    Task("niah_single_2", "niah", 128, haystack="essay", deviation=ESSAY_DEVIATION),
    Task("niah_single_3", "niah", 128, haystack="essay", value_type="uuids", deviation=ESSAY_DEVIATION),
    Task("niah_multikey_1", "niah", 128, haystack="essay", num_keys=4, deviation=ESSAY_DEVIATION),
    Task("niah_multikey_2", "niah", 128, haystack="needle"),
    Task("niah_multikey_3", "niah", 128, haystack="needle", key_type="uuids", value_type="uuids"),
    Task("niah_multivalue", "niah", 128, haystack="essay", num_values=4, deviation=ESSAY_DEVIATION),
    Task("niah_multiquery", "niah", 128, haystack="essay", num_keys=4, num_queries=4, deviation=ESSAY_DEVIATION),
    Task("vt", "vt", 30),
    Task("cwe", "cwe", 120),
    Task("fwe", "fwe", 50),
    Task("json_kv", "json_kv", 100, metric="substring_exact_match", deviation=JSON_KV_DEVIATION),
]}
TASK_GROUPS = {"ruler": [n for n in TASKS if n != "json_kv"], "exact": ["niah_single_1", "niah_multikey_2",
               "niah_multikey_3", "vt", "cwe", "fwe"], "all": list(TASKS)}
METRICS = {"string_match_all": string_match_all, "string_match_part": string_match_part,
           "substring_exact_match": substring_exact_match}


@dataclass
class Sample:
    task: str
    length: int
    index: int
    prompt: str  # the input and RULER's answer prefix: the model continues this text
    answers: list[str]
    max_new_tokens: int  # the generation cap in this tokenizer's tokens (generation_cap)
    needles: list[str] = field(default_factory=list)  # needle sentences holding the answers (NIAH)
    tokens: list[int] = field(default_factory=list)  # the prompt as the model reads it


@functools.cache
def word_lists() -> dict[str, list[str]]:
    """wonderwords' noun, adjective and verb lists (RULER's source), deduplicated and sorted."""
    from importlib.resources import files
    assets = files("wonderwords") / "assets"
    read = lambda name: sorted({w.strip() for w in (assets / name).read_text().splitlines() if w.strip()})  # noqa: E731
    words = {"nouns": read("nounlist.txt"), "adjectives": read("adjectivelist.txt"), "verbs": read("verblist.txt")}
    words["cwe"] = sorted(set(words["nouns"] + words["adjectives"] + words["verbs"]))
    return words


@functools.cache
def essay_words() -> list[str]:
    """The local stand-in for RULER's essay haystack: pydoc's help topics (prose every Python ships), as words."""
    from pydoc_data.topics import topics
    return re.sub(r"\s+", " ", " ".join(topics[name] for name in sorted(topics))).split(" ")


def split_sentences(text: str) -> list[str]:
    """A regular-expression stand-in for nltk's sent_tokenize."""
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]


def random_value(kind: str, rng: random.Random) -> str:
    """RULER's needle keys and values: 7-digit numbers, adjective-noun words, uuid4 strings."""
    if kind == "numbers":
        return str(rng.randint(10 ** 6, 10 ** 7 - 1))
    if kind == "words":  # uniform over adjective-noun pairs, as RULER's sorted list of all pairs
        words = word_lists()
        return f"{rng.choice(words['adjectives'])}-{rng.choice(words['nouns'])}"
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise EvaluationError(f"unknown needle type {kind!r}; use numbers, words or uuids")


def make_niah(task: Task, size: int, rng: random.Random) -> tuple[str, list[str], list[str]]:
    num_keys = max(task.num_keys, task.num_queries)
    keys, values, needles = [], [], []
    for _ in range(num_keys):
        keys.append(random_value(task.key_type, rng))
        values.append([])
        for _ in range(task.num_values):
            values[-1].append(random_value(task.value_type, rng))
            needles.append(NEEDLE.format(type_needle_v=task.value_type, key=keys[-1], value=values[-1][-1]))
    rng.shuffle(needles)
    if task.haystack == "essay":
        words = essay_words()
        text = " ".join((words * (size // len(words) + 1))[:size])
        sentences = split_sentences(text)
        cuts = [0] + sorted(int(len(sentences) * d / 100) for d in rng.sample(DEPTHS, len(needles))) + [len(sentences)]
        pieces = []
        for i in range(1, len(cuts)):
            pieces.append(" ".join(sentences[cuts[i - 1]:cuts[i]]))
            if i - 1 < len(needles):
                pieces.append(needles[i - 1])
        context = " ".join(pieces)
    else:
        if task.haystack == "noise":
            sentences = [NOISE] * size
        else:  # "needle": the haystack is distractor needles with their own random keys and values
            sentences = [NEEDLE.format(type_needle_v=task.value_type, key=random_value(task.key_type, rng),
                                       value=random_value(task.value_type, rng)) for _ in range(size)]
        for index, needle in zip(sorted(rng.sample(range(size), len(needles)), reverse=True), needles):
            sentences.insert(index, needle)
        context = "\n".join(sentences)
    asked = rng.sample(range(num_keys), task.num_queries)
    queries = [keys[i] for i in asked]
    answers = [a for i in asked for a in values[i]]
    query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
    template, type_needle_v = NIAH_TEMPLATE + NIAH_ANSWER_PREFIX, task.value_type
    if task.num_queries * task.num_values == 1:  # RULER's singular wording
        for plural, singular in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
            template = template.replace(plural, singular)
        type_needle_v = type_needle_v[:-1]
    prompt = template.format(type_needle_v=type_needle_v, context=context, query=query)
    held = [n for n in needles if any(f"for {q} is:" in n for q in queries)]
    return prompt, answers, held


def vt_chain(rng: random.Random, num_hops: int, name_length: int) -> tuple[list[str], list[str], str]:
    names = []
    while len(set(names)) < num_hops + 1:
        names.append("".join(rng.choices(string.ascii_uppercase, k=name_length)))
    names = list(dict.fromkeys(names))[:num_hops + 1]
    value = str(rng.randint(10000, 99998))  # numpy randint(10000, 99999): the high end is exclusive
    chain = [f"VAR {names[0]} = {value}"] + [f"VAR {names[j + 1]} = VAR {names[j]} " for j in range(num_hops)]
    return names, chain, value


def vt_text(rng: random.Random, size: int, num_hops: int, name_length: int) -> tuple[str, list[str]]:
    names, chain, value = vt_chain(rng, num_hops, name_length)
    sentences = [NOISE] * size
    for j, position in enumerate(sorted(rng.sample(range(len(sentences)), len(chain)))):
        sentences.insert(position + j, chain[j])
    context = "\n".join(sentences).replace(". \n", ".\n")
    return (VT_TEMPLATE + VT_ANSWER_PREFIX).format(context=context, query=value, num_v=num_hops + 1), names


def make_vt(task: Task, size: int, rng: random.Random, example: str) -> tuple[str, list[str], list[str]]:
    prompt, names = vt_text(rng, size, num_hops=4, name_length=5)
    return example + "\n" + prompt, names, []


def vt_example(rng: random.Random, tokenizer, budget: int) -> str:
    """RULER's one-shot example: a chain of 3-letter names in noise sized to `budget` tokens, answered."""
    state = rng.getstate()

    def example(size):
        rng.setstate(state)
        prompt, names = vt_text(rng, size, num_hops=4, name_length=3)
        return prompt + " " + " ".join(names)

    size = largest_fitting(lambda s: len(tokenizer.encode(example(s))) <= budget, 5, 1000)
    return example(size or 5)


def cwe_list(rng: random.Random, num_words: int, common_repeats: int, uncommon_repeats: int) -> tuple[str, list[str]]:
    words = word_lists()["cwe"]
    if num_words > len(words):
        raise EvaluationError(f"cwe needs {num_words} distinct words; the word list holds {len(words)}: lower --lengths")
    chosen = rng.sample(words, num_words)
    common, uncommon = chosen[:10], chosen[10:]
    listed = common * common_repeats + uncommon * uncommon_repeats
    rng.shuffle(listed)
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(listed)), common


def make_cwe(task: Task, size: int, rng: random.Random, length: int) -> tuple[str, list[str], list[str]]:
    # RULER: below 4K, the one-shot example has 20 words (3x / 1x) and the list repeats 6x / 1x.
    (ex_words, ex_common, ex_rare), (common_x, rare_x) = ((20, 3, 1), (6, 1)) if length < 4096 else ((40, 10, 3), (30, 3))
    example_context, example_answer = cwe_list(rng, ex_words, ex_common, ex_rare)
    example = (CWE_TEMPLATE + CWE_ANSWER_PREFIX).format(context=example_context) + " " + " ".join(
        f"{i + 1}. {w}" for i, w in enumerate(example_answer))
    context, common = cwe_list(rng, size, common_x, rare_x)
    return example + "\n" + (CWE_TEMPLATE + CWE_ANSWER_PREFIX).format(context=context), common, []


def riemann_zeta(alpha: float, terms: int = 100_000) -> float:
    k = np.arange(1, terms + 1, dtype=np.float64)
    return float((k ** -alpha).sum() + terms ** (1 - alpha) / (alpha - 1) - 0.5 * terms ** -alpha)


def make_fwe(task: Task, size: int, rng: random.Random, length: int, alpha: float = 2.0) -> tuple[str, list[str], list[str]]:
    vocab_size = (length - task.max_new_tokens) // 50  # RULER: max_seq_length // 50 coded words
    if vocab_size < 4:
        raise EvaluationError(f"fwe at length {length} has {vocab_size} coded words; it needs 4: use a length >= "
                              f"{4 * 50 + task.max_new_tokens}")
    vocab = []
    while len(set(vocab)) < vocab_size:
        vocab.append("".join(rng.choices(string.ascii_lowercase, k=6)))
    vocab = sorted(set(vocab))
    rng.shuffle(vocab)
    vocab[0] = "..."  # the top rank is noise
    counts = (size * np.arange(1, vocab_size + 1, dtype=np.float64) ** -alpha / riemann_zeta(alpha)).astype(int)
    words = [w for w, n in zip(vocab, counts) for _ in range(n)]
    rng.shuffle(words)
    return (FWE_TEMPLATE + FWE_ANSWER_PREFIX).format(context=" ".join(words)), vocab[1:4], []


def make_json_kv(task: Task, size: int, rng: random.Random) -> tuple[str, list[str], list[str]]:
    pairs = {random_value("uuids", rng): random_value("uuids", rng) for _ in range(size)}
    key = rng.choice(list(pairs))
    prompt = JSON_KV_TEMPLATE.format(context="JSON data:\n" + json.dumps(pairs), query=json.dumps(key))
    return prompt, [pairs[key]], [f"{json.dumps(key)}: {json.dumps(pairs[key])}"]


# ----------------------------------------------------------------------------------------------
# Prompts sized to a length, reproducible from the seed

def largest_fitting(fits, low: int, high: int) -> int | None:
    """The largest n in [low, high] with fits(n), assuming fits is monotone (RULER's binary search)."""
    best = None
    while low <= high:
        mid = (low + high) // 2
        if fits(mid):
            best, low = mid, mid + 1
        else:
            high = mid - 1
    return best


def sample_rng(seed: int, task: str, length: int, index: int) -> random.Random:
    return random.Random(f"olmpool-eval/{seed}/{task}/{length}/{index}")  # str seeds are hashed stably (SHA-512)


def prompt_maker(task: Task, length: int, seed: int, tokenizer):
    """generate(index, size) -> (prompt, answers, needles): sample `index` of the task at `length` with a haystack
    of `size` units (sentences, words, pairs), a function of (seed, task, length, index) and the tokenizer."""
    vt_examples = {}
    example_budget = min(500, (length - task.max_new_tokens - 1) // 4)  # RULER: 500 tokens; scaled at toy lengths

    def generate(index: int, size: int):
        rng = sample_rng(seed, task.name, length, index)
        if task.kind == "niah":
            return make_niah(task, size, rng)
        if task.kind == "vt":
            if index not in vt_examples:
                vt_examples[index] = vt_example(sample_rng(seed, "vt-example", length, index), tokenizer, example_budget)
            return make_vt(task, size, rng, vt_examples[index])
        if task.kind == "cwe":
            return make_cwe(task, size, rng, length)
        if task.kind == "fwe":
            return make_fwe(task, size, rng, length)
        return make_json_kv(task, size, rng)
    return generate


def answer_text(answers: list[str]) -> str:
    """The answers as a model lists them after the prompt's answer prefix: a space, then comma-separated."""
    return " " + ", ".join(answers)


def generation_cap(task: Task, answers: list[list[str]], tokenizer, reference=None) -> int:
    """RULER's cap, plus the tokens this tokenizer needs beyond `reference` (dolma2) to spell these answers.

    RULER's caps count the tokens of a BPE like dolma2's and leave room beside the answer; a vocabulary that
    spells the answers in more tokens (a compact one: vt's 5 names in 1.7x as many) would otherwise lose that
    room, and with it part of the answer. The extra is the most over the given answers; None: RULER's cap."""
    if reference is None:
        return task.max_new_tokens
    extra = max(len(tokenizer.encode(answer_text(a))) - len(reference.encode(answer_text(a))) for a in answers)
    return task.max_new_tokens + max(0, extra)


def build_samples(task_name: str, length: int, n: int, seed: int, tokenizer, eos_id: int,
                  reference=None) -> list[Sample]:
    """n prompts of one task that fit `length` tokens with the task's generation cap, reproducible from seed.

    The cap is RULER's, widened for a tokenizer that spells the answers longer than `reference` (generation_cap). As
    RULER: one binary search (on sample 0) fixes the haystack size; a sample that still overflows shrinks its
    haystack step by step."""
    if task_name not in TASKS:
        raise EvaluationError(f"unknown task {task_name!r}; choose from {', '.join(TASKS)} or a group "
                              f"({', '.join(TASK_GROUPS)})")
    task = TASKS[task_name]
    generate = prompt_maker(task, length, seed, tokenizer)
    smallest = {"niah": 1, "vt": 5, "cwe": 11, "fwe": 10, "json_kv": 1}[task.kind]
    cap = generation_cap(task, [generate(i, smallest)[1] for i in range(n)], tokenizer, reference)
    size = haystack_size(task, length, cap, lambda s: len(tokenizer.encode(generate(0, s)[0])), smallest)
    samples = []
    for index in range(n):
        used = size
        while True:
            prompt, answers, needles = generate(index, used)
            tokens = [eos_id] + tokenizer.encode(prompt)
            if len(tokens) + cap <= length or used <= smallest:
                break
            used = max(smallest, used - max(1, size // 50))
        if len(tokens) + cap > length:
            raise EvaluationError(f"{task_name} sample {index} overflows length {length}; use a longer length")
        samples.append(Sample(task_name, length, index, prompt, answers, cap, needles, tokens))
    return samples


def haystack_size(task: Task, length: int, cap: int, n_tokens, smallest: int) -> int:
    """The largest haystack whose prompt (n_tokens(size) tokens), the leading end-of-document token and the
    generation cap fit `length`: RULER's binary search."""
    budget = length - cap - 1
    if n_tokens(smallest) > budget:
        raise EvaluationError(f"{task.name} does not fit length {length}: its smallest prompt is "
                              f"{n_tokens(smallest)} tokens, plus {cap} to generate; use a longer length")
    # An upper bound: tokens grow at least about one per haystack unit.
    high = smallest
    while n_tokens(high) <= budget and high < 10_000_000:
        high *= 2
    if task.kind == "cwe":
        high = min(high, len(word_lists()["cwe"]))
    return largest_fitting(lambda s: n_tokens(s) <= budget, smallest, high)


def score(task_name: str, prediction: str, answers: list[str]) -> float:
    return METRICS[TASKS[task_name].metric]([prediction], [answers])


def oracle_score(sample: Sample, tokenizer) -> float:
    """The score of a reply that is the answers themselves (answer_text), cut at the sample's generation cap:
    100 unless the cap is too short for the answer in this tokenizer."""
    reply = tokenizer.decode(tokenizer.encode(answer_text(sample.answers))[:sample.max_new_tokens])
    return score(sample.task, postprocess_prediction(reply), sample.answers)


def cut_at_eos(ids: list[int], eos_id: int) -> list[int]:
    """A generation up to (without) its end-of-sequence token."""
    return ids[:ids.index(eos_id)] if eos_id in ids else ids


def mean_ci(values: list[float]) -> tuple[float, float | None]:
    """Mean and the half-width of a 95% confidence interval (normal approximation; None for n < 2)."""
    values = np.asarray(values, dtype=np.float64)
    mean = float(values.mean())
    if len(values) < 2:
        return mean, None
    return mean, float(1.96 * values.std(ddof=1) / np.sqrt(len(values)))


def score_samples(batch: list[Sample], outputs: list[list[int]], tokenizer, eos_id: int) -> dict:
    """One recall cell: each sample's prediction and score, their mean and 95% CI, and the oracle's score."""
    predictions = [postprocess_prediction(tokenizer.decode(cut_at_eos(o, eos_id))) for o in outputs]
    scores = [score(s.task, p, s.answers) for p, s in zip(predictions, batch)]
    mean, ci = mean_ci(scores)
    return {"n": len(scores), "mean": mean, "ci95": ci, "scores": scores, "predictions": predictions,
            "answers": [s.answers for s in batch], "prompt_tokens": [len(s.tokens) for s in batch],
            "max_new_tokens": batch[0].max_new_tokens, "oracle": float(np.mean([oracle_score(s, tokenizer)
                                                                               for s in batch])),
            "ruler_max_new_tokens": TASKS[batch[0].task].max_new_tokens}


# ----------------------------------------------------------------------------------------------
# Task names and what a table must say about them

def parse_tasks(text: str) -> list[str]:
    """Comma-separated task names or groups (TASK_GROUPS) -> task names, each once, in the order given."""
    names = []
    for part in text.split(","):
        part = part.strip()
        if part in TASK_GROUPS:
            names += TASK_GROUPS[part]
        elif part in TASKS:
            names.append(part)
        elif part:
            raise EvaluationError(f"--tasks: unknown task {part!r}; choose from {', '.join(TASKS)} or a group "
                                  f"({', '.join(TASK_GROUPS)})")
    return list(dict.fromkeys(names))


def deviations(tasks: list[str]) -> list[str]:
    """What a table over these tasks must say: how much of RULER ran, and each deviation from the benchmarks."""
    found = sorted({TASKS[t].deviation for t in tasks if TASKS[t].deviation})
    ruler = [t for t in tasks if t != "json_kv"]
    return [f"RULER-offline ({len(ruler)} of {RULER_TASK_COUNT} tasks)"] + found
