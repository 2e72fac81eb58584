"""PromptBench-style adversarial prompt attacks (Zhu et al., arXiv 2306.04528).

PromptBench attacks the *prompt* (the task instruction), keeping the data fixed, and builds
its recipes from TextAttack (repository microsoft/promptbench, `promptbench/prompt_attack/
attack.py`, `__init__.py` for the budgets, `transformations.py` for StressTest). TextAttack
pins transformers < 5 (through flair), so the three recipes are re-implemented here:

* DeepWordBug (Gao et al. 2018), character level: words ranked by importance (the drop of
  the objective when the word is replaced by "[UNK]"), then greedily, for each word, the best
  of four seeded one-character edits (neighbour swap, substitution, deletion, insertion) is
  kept if it lowers the objective; the prompt's total Levenshtein distance stays within
  `max_edit_distance` (PromptBench: 30).
* BERTAttack (Li et al. 2020), word level: same greedy search; candidates are the masked
  LM's top-`max_candidates` tokens (PromptBench: 48) at the word's first sub-token of the
  unmasked prompt (the "bert-attack" method), whole alphabetic words only; at most
  `max_words_perturbed` x words are changed (PromptBench: 1.0). A candidate is kept only
  if the sentence-embedding cosine similarity between the original prompt and the candidate
  prompt is >= `min_sentence_cos_sim` (PromptBench: USE, cosine, 0.8, compared against the
  original, no window; TextAttack's own BERTAttackLi2020 recipe uses 0.2). The embedding
  model is configurable (`SentenceEncoder`: mean-pooled last hidden states of a Hub or
  local encoder); a `window` of w words compares only the w words around the substituted
  one, as TextAttack's `text_window_around_index` does.
* StressTest (Naik et al. 2018), sentence level: one of " and true is true ",
  " and false is not true " or " and true is true " x 5 inserted after the prompt's last
  word; the one that lowers the objective most is kept (PromptBench's brute-force search).

Stopwords and the task's label words are never modified (PromptBench's label constraint).
The objective is (accuracy, mean probability of the gold label) on the attack data; the
attacks minimise it. All randomness comes from `seed`.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from mergeflow.errors import MergeflowError
from mergeflow.robustness.settings import ATTACKS  # noqa: F401 (the names live with the settings check)
STRESS_DISTRACTORS = (" and true is true ", " and false is not true ", " and true is true " * 5)
UNK = "[UNK]"
_WORD = re.compile(r"[A-Za-z0-9]+")
_LETTERS = "abcdefghijklmnopqrstuvwxyz"
# A compact English stopword list (TextAttack's default is NLTK-like; these are its core).
STOPWORDS = frozenset(
    ["a", "about", "above", "after", "again", "against", "all", "am", "an", "and", "any", "are", "as", "at", "be", "because", "been", "before", "being", "below", "between", "both", "but", "by", "can", "could", "did", "do", "does", "doing", "down", "during", "each", "few", "for", "from", "further", "had", "has", "have", "having", "he", "her", "here", "hers", "herself", "him", "himself", "his", "how", "i", "if", "in", "into", "is", "it", "its", "itself", "just", "me", "more", "most", "my", "myself", "no", "nor", "not", "now", "of", "off", "on", "once", "only", "or", "other", "our", "ours", "ourselves", "out", "over", "own", "same", "she", "should", "so", "some", "such", "than", "that", "the", "their", "theirs", "them", "themselves", "then", "there", "these", "they", "this", "those", "through", "to", "too", "under", "until", "up", "very", "was", "we", "were", "what", "when", "where", "which", "while", "who", "whom", "why", "will", "with", "would", "you", "your", "yours", "yourself", "yourselves"]
)

Objective = Callable[[str], tuple[float, float]]  # prompt -> (accuracy, mean p(gold)); lower = better attack


@dataclass
class AttackResult:
    attack: str
    prompt: str  # the adversarial prompt
    edits: list[dict] = field(default_factory=list)  # {"index", "from", "to"} per changed word / appended text
    queries: int = 0
    rejected: int = 0  # candidates dropped by a constraint before any victim query


def words(text: str) -> list[tuple[int, int, str]]:
    return [(m.start(), m.end(), m.group()) for m in _WORD.finditer(text)]


def modifiable(text: str, protected: set[str]) -> list[int]:
    """Indices of words an attack may change: not stopwords, not label words."""
    prot = {p.lower() for p in protected}
    return [i for i, (_, _, w) in enumerate(words(text)) if w.lower() not in STOPWORDS and w.lower() not in prot]


def replace_word(text: str, index: int, new: str) -> str:
    start, end, _ = words(text)[index]
    return text[:start] + new + text[end:]


def levenshtein(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


# ----------------------------------------------------------------------------- transformations
def char_edits(word: str, rng: random.Random) -> list[str]:
    """DeepWordBug's four one-character edits of `word`, one random position each."""
    out = []
    if len(word) >= 2:
        i = rng.randrange(len(word) - 1)
        out.append(word[:i] + word[i + 1] + word[i] + word[i + 2 :])  # neighbour swap
    i = rng.randrange(len(word))
    out.append(word[:i] + rng.choice([c for c in _LETTERS if c != word[i].lower()]) + word[i + 1 :])  # substitution
    if len(word) >= 2:
        i = rng.randrange(len(word))
        out.append(word[:i] + word[i + 1 :])  # deletion
    i = rng.randrange(len(word) + 1)
    out.append(word[:i] + rng.choice(_LETTERS) + word[i:])  # insertion
    return [w for w in dict.fromkeys(out) if w != word]


class MaskedLMCandidates:
    """Word substitutes from a masked LM (BERT-Attack's "bert-attack" method)."""

    def __init__(self, mlm_dir, max_candidates: int = 48, device: str = "cpu"):
        import torch
        from transformers import AutoModelForMaskedLM, AutoTokenizer

        self.torch, self.k, self.device = torch, max_candidates, device
        self.tok = AutoTokenizer.from_pretrained(mlm_dir)
        if not self.tok.is_fast:
            raise MergeflowError(f"masked LM {mlm_dir}: needs a fast tokenizer (offset mapping)")
        self.model = AutoModelForMaskedLM.from_pretrained(mlm_dir).to(device).eval()

    def __call__(self, text: str, index: int) -> list[str]:
        start, end, word = words(text)[index]
        enc = self.tok(text, return_offsets_mapping=True, return_tensors="pt", truncation=True)
        offsets = enc.pop("offset_mapping")[0].tolist()
        positions = [p for p, (s, e) in enumerate(offsets) if e > s and s < end and e > start]
        if not positions:
            return []
        with self.torch.no_grad():
            logits = self.model(**{k: v.to(self.device) for k, v in enc.items()}).logits[0, positions[0]]
        special = set(self.tok.all_special_ids)
        out = []
        for tid in self.torch.topk(logits, min(self.k, logits.shape[-1])).indices.tolist():
            piece = self.tok.convert_ids_to_tokens(tid)
            if tid in special or not piece.isalpha():  # "##x" sub-words and symbols are not words
                continue
            if piece.lower() != word.lower() and piece.lower() not in STOPWORDS:
                out.append(piece)
        return out


def text_window(text: str, index: int, window: int | None) -> str:
    """The `window` words around word `index` (TextAttack's `text_window_around_index`:
    (w-1)/2 words each side, shifted inwards at the ends), as the text span they cover;
    the whole text when `window` is None."""
    ws = words(text)
    if window is None or not ws:
        return text
    n, half = len(ws), (window - 1) / 2.0
    if index - half < 0:
        start, end = 0, min(window - 1, n - 1)
    elif index + half >= n:
        start, end = max(0, n - window), n - 1
    else:
        start, end = index - math.ceil(half), index + math.floor(half)
    return text[ws[start][0] : ws[end][1]]


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    na, nb = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(y * y for y in b))
    return dot / (na * nb) if na and nb else 0.0


class SentenceEncoder:
    """Sentence embeddings: mean of the last hidden states over the attention mask (the
    pooling of sentence-transformers models such as all-MiniLM-L6-v2, done with plain
    transformers). Any encoder or masked-LM checkpoint loads (AutoModel drops LM heads)."""

    def __init__(self, model_dir, device: str = "cpu", max_length: int = 256):
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.torch, self.device, self.max_length = torch, device, max_length
        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModel.from_pretrained(model_dir).to(device).eval()

    def __call__(self, texts: list[str]) -> list[list[float]]:
        torch = self.torch
        enc = self.tok(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        enc = {k: v.to(self.device) for k, v in enc.items()}
        with torch.no_grad():
            hidden = self.model(**enc).last_hidden_state.float()
        mask = enc["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return pooled.cpu().tolist()


class SentenceSimilarity:
    """TextAttack's sentence-encoder constraint (metric "cosine", compare_against_original):
    a candidate text passes if cos(encode(original window), encode(candidate window)) >=
    `threshold`, the windows taken around the substituted word."""

    def __init__(self, encoder: Callable[[list[str]], list[list[float]]], threshold: float = 0.8,
                 window: int | None = None):
        if window is not None and window < 1:
            raise MergeflowError(f"sentence window must be >= 1 word or null, got {window}")
        self.encoder, self.threshold, self.window = encoder, threshold, window

    def scores(self, original: str, candidates: list[str], index: int) -> list[float]:
        if not candidates:
            return []
        texts = [text_window(original, index, self.window)] + [text_window(c, index, self.window) for c in candidates]
        ref, *embs = self.encoder(texts)
        return [cosine(ref, e) for e in embs]

    def __call__(self, original: str, candidates: list[str], index: int) -> list[bool]:
        return [s >= self.threshold for s in self.scores(original, candidates, index)]


# ----------------------------------------------------------------------------- search
def _better(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a < b  # lexicographic: fewer correct first, then lower gold probability


def greedy_word_swap(
    attack: str,
    prompt: str,
    objective: Objective,
    candidates: Callable[[str, int, random.Random], list[str]],
    protected: set[str],
    seed: int,
    max_words: int | None = None,
    max_edit_distance: int | None = None,
    constraint: Callable[[str, list[str], int], list[bool]] | None = None,
) -> AttackResult:
    """TextAttack's GreedyWordSwapWIR (wir_method "unk") over the prompt's modifiable words.
    `constraint(original prompt, candidate prompts, word index)` filters candidates before
    they are queried (TextAttack checks constraints on transformations, not on results)."""
    result = AttackResult(attack, prompt)
    current = objective(prompt)
    result.queries += 1
    indices = modifiable(prompt, protected)
    drops = []
    for i in indices:
        score = objective(replace_word(prompt, i, UNK))
        result.queries += 1
        drops.append((score, i))
    order = [i for _, i in sorted(drops)]  # most important (lowest objective without it) first
    text, changed = prompt, 0
    for i in order:
        if max_words is not None and changed >= max_words:
            break
        if current[0] == 0:  # nothing left to flip
            break
        original = words(text)[i][2]
        rng = random.Random(f"{seed}:{attack}:{i}:{original}")
        best = None
        pool = [(cand, replace_word(text, i, cand)) for cand in candidates(text, i, rng)]
        if max_edit_distance is not None:
            pool = [(c, t) for c, t in pool if levenshtein(prompt, t) <= max_edit_distance]
        if constraint is not None and pool:
            keep = constraint(prompt, [t for _, t in pool], i)
            result.rejected += len(pool) - sum(keep)
            pool = [ct for ct, ok in zip(pool, keep) if ok]
        for cand, new_text in pool:
            score = objective(new_text)
            result.queries += 1
            if best is None or _better(score, best[0]):
                best = (score, new_text, cand)
        if best is not None and _better(best[0], current):
            current, text = best[0], best[1]
            result.edits.append({"index": i, "from": original, "to": best[2]})
            changed += 1
    result.prompt = text
    return result


def deepwordbug(prompt: str, objective: Objective, protected: set[str], seed: int,
                max_edit_distance: int = 30) -> AttackResult:
    return greedy_word_swap("deepwordbug", prompt, objective, lambda t, i, rng: char_edits(words(t)[i][2], rng),
                            protected, seed, max_edit_distance=max_edit_distance)


def bertattack(prompt: str, objective: Objective, protected: set[str], seed: int, mlm: MaskedLMCandidates,
               max_words_perturbed: float = 1.0, similarity: SentenceSimilarity | None = None) -> AttackResult:
    n_words = len(words(prompt))
    max_words = max(1, int(max_words_perturbed * n_words))
    return greedy_word_swap("bertattack", prompt, objective, lambda t, i, rng: mlm(t, i),
                            protected, seed, max_words=max_words, constraint=similarity)


def append_after_last_word(prompt: str, distractor: str) -> str:
    """TextAttack's insert_text_after_word_index(last word): 'word' -> 'word' + ' ' + text."""
    ws = words(prompt)
    if not ws:
        raise MergeflowError(f"StressTest: the prompt has no words: {prompt!r}")
    end = ws[-1][1]
    return prompt[:end] + " " + distractor + prompt[end:]


def stresstest(prompt: str, objective: Objective) -> AttackResult:
    result = AttackResult("stresstest", prompt)
    scored = []
    for k, distractor in enumerate(STRESS_DISTRACTORS):
        text = append_after_last_word(prompt, distractor)
        scored.append((objective(text), k, text, distractor))
        result.queries += 1
    _score, k, text, distractor = min(scored)
    result.prompt = text
    result.edits.append({"index": len(words(prompt)) - 1, "from": "", "to": distractor})
    return result
