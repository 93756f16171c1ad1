"""
Synthetic retrieval documents: the three kinds of sequence in which a token is predictable only by
finding an earlier one, built at the token level so they fit any vocabulary and any length.

    copy     spans of random tokens that come back later, at random distances (induction)
    mqar     key-value pairs, then some of the keys again, each asking for its value
             (multi-query associative recall, Arora et al. 2023, arXiv 2312.04927)
    needle   one key-value "needle" in a haystack at a uniform depth, asked for at the end
             (a short template, so that prompt and answer fit the pretraining length)

Every generator takes a numpy Generator and returns the tokens with the positions a probe scores, so
a document is a pure function of its seed. The ids come from one block of the vocabulary
(`SyntheticIds`): three marker ids, then keys, values and filler. Training and probe instances are
disjoint by construction: an instance's key (its first two tokens, for a copied span) is a probe key
or a training key by a fixed rule on the ids (`is_probe_key`), and each side draws only its own.
"""

from dataclasses import dataclass

import numpy as np

PROBE_KEY_MODULUS = 7  # one key pair in 7 is held out for probes


@dataclass(frozen=True)
class SyntheticIds:
    """The block [first, first + size) of a vocabulary that synthetic tokens use: ids first, first+1,
    first+2 are the needle, value and query markers; the rest is split in thirds into keys, values
    and filler (filler fills space when no haystack text is given)."""
    first: int
    size: int

    def __post_init__(self):
        if self.first < 0 or self.size < 3 + 3 * 8:
            raise ValueError(f"a synthetic id block needs first >= 0 and at least 27 ids; got first={self.first}, "
                             f"size={self.size}")

    @property
    def needle_mark(self): return self.first

    @property
    def value_mark(self): return self.first + 1

    @property
    def query_mark(self): return self.first + 2

    def _third(self, i):
        start, third = self.first + 3, (self.size - 3) // 3
        return start + i * third, start + (i + 1) * third

    @property
    def keys(self): return self._third(0)

    @property
    def values(self): return self._third(1)

    @property
    def filler(self): return self._third(2)


def is_probe_key(a: int, b: int) -> bool:
    """Whether the key pair (a, b) belongs to probes (else to training): a fixed rule, so no probe
    instance can be a training instance."""
    return (a * 31 + b) % PROBE_KEY_MODULUS == 0


def draw_key_pairs(rng, ids: SyntheticIds, count: int, probe: bool) -> np.ndarray:
    """count distinct key pairs (count, 2) from one side of the split."""
    pairs, seen = [], set()
    while len(pairs) < count:
        a, b = (int(x) for x in rng.integers(*ids.keys, size=2))
        if is_probe_key(a, b) == probe and (a, b) not in seen:
            seen.add((a, b)); pairs.append((a, b))
    return np.array(pairs, dtype=np.int64).reshape(count, 2)


def fill(rng, ids: SyntheticIds, length: int, haystack: np.ndarray | None) -> np.ndarray:
    """length filler tokens: a random stretch of the haystack text when given, else random filler ids."""
    if haystack is None:
        return rng.integers(*ids.filler, size=length)
    if haystack.size < length:
        raise ValueError(f"the haystack holds {haystack.size} tokens; a document of {length} needs more")
    start = int(rng.integers(0, haystack.size - length + 1))
    return np.array(haystack[start:start + length], dtype=np.int64)  # a copy: documents are written into it


def copy_document(rng, ids: SyntheticIds, length: int, probe: bool = False, haystack=None):
    """Random spans, then the same spans again in a shuffled order after filler: every token of a
    repeated span but its first is predictable by content alone, at distances spread over the
    document. Returns (tokens, spans) with spans [(first_start, second_start, span_length)]."""
    tokens = fill(rng, ids, length, haystack)
    total = int(rng.integers(length // 4, length // 2 + 1))   # tokens in spans, first occurrences
    count = int(rng.integers(1, max(1, total // 8) + 1))
    lengths = 2 + rng.multinomial(total - 2 * count, [1 / count] * count)  # each span >= 2 tokens, sum = total
    spans = [np.r_[draw_key_pairs(rng, ids, 1, probe)[0], rng.integers(ids.keys[0], ids.values[1], size=n - 2)]
             for n in lengths]
    first = int(rng.integers(0, length - 2 * total + 1))
    gap = int(rng.integers(0, length - 2 * total - first + 1))
    out, position = [], first
    for span in spans:
        out.append(position); tokens[position:position + span.size] = span; position += span.size
    position += gap
    result = []
    for i in rng.permutation(len(spans)):
        tokens[position:position + spans[i].size] = spans[i]
        result.append((out[i], position, spans[i].size)); position += spans[i].size
    return tokens, sorted(result)


def mqar_document(rng, ids: SyntheticIds, length: int, pairs: int, probe: bool = False, haystack=None):
    """Key-value pairs (two-token keys, one-token values) at the start, then every key again at a
    random later place followed by its value. Returns (tokens, answer_positions): the positions of the
    asked-for values, each predictable only by finding its key's first occurrence."""
    if 6 * pairs + 1 > length:
        raise ValueError(f"{pairs} pairs need at least {6 * pairs + 1} tokens; the document has {length}")
    tokens = fill(rng, ids, length, haystack)
    keys = draw_key_pairs(rng, ids, pairs, probe)
    values = rng.integers(*ids.values, size=pairs)
    tokens[:3 * pairs] = np.c_[keys, values].reshape(-1)
    slots = np.sort(rng.choice((length - 3 * pairs) // 3, size=pairs, replace=False)) * 3 + 3 * pairs
    answers = []
    for slot, i in zip(slots, rng.permutation(pairs)):
        tokens[slot:slot + 3] = (*keys[i], values[i]); answers.append(int(slot) + 2)
    return tokens, answers


NEEDLE_LENGTH = 6  # needle_mark k1 k2 value_mark v1 v2
QUERY_LENGTH = 4   # query_mark k1 k2 value_mark, then the two value tokens are the answer


def needle_document(rng, ids: SyntheticIds, length: int, probe: bool = False, haystack=None,
                    distance: int | None = None):
    """A needle (needle_mark k1 k2 value_mark v1 v2) in the haystack, and at the end the question
    (query_mark k1 k2 value_mark) whose answer is v1 v2. distance (tokens from the needle's start to
    the question's start) defaults to uniform over what fits, so that every depth is trained and
    probed alike. Returns (tokens, answer_positions): the two positions of v1 v2 after the question."""
    space = length - QUERY_LENGTH - 2  # the last two tokens are the answer
    if space < NEEDLE_LENGTH:
        raise ValueError(f"a needle document needs at least {NEEDLE_LENGTH + QUERY_LENGTH + 2} tokens; got {length}")
    tokens = fill(rng, ids, length, haystack)
    if distance is None:
        distance = int(rng.integers(NEEDLE_LENGTH, space + 1))
    if not NEEDLE_LENGTH <= distance <= space:
        raise ValueError(f"needle distance {distance} is outside [{NEEDLE_LENGTH}, {space}] for length {length}")
    key = draw_key_pairs(rng, ids, 1, probe)[0]
    value = rng.integers(*ids.values, size=2)
    question = space
    start = question - distance
    tokens[start:start + NEEDLE_LENGTH] = (ids.needle_mark, *key, ids.value_mark, *value)
    tokens[question:question + QUERY_LENGTH + 2] = (ids.query_mark, *key, ids.value_mark, *value)
    return tokens, [question + QUERY_LENGTH, question + QUERY_LENGTH + 1]
