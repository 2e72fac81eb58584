"""Vocabulary policy `union`: keep every expert's added tokens, map embedding rows by token string.

The output vocabulary is the reference tokenizer's (the base's; without a base in the merge,
the first expert's) followed by every token an expert added that the reference lacks, in
expert order as given and, within an expert, in its token id order; each token string once.
The merged tokenizer is the reference's, loaded with `AutoTokenizer`, plus those tokens added
with `add_tokens` / `add_special_tokens` (their `AddedToken` settings and special-ness kept),
and ships in the output directory; `config.json`'s `vocab_size` is the output row count.

Every embedding / output-head tensor (`checkpoints.VOCAB_TENSOR`; lm_head only where the
checkpoint holds one, so a tied model's single tensor is mapped once) is rebuilt row by row:
output row i of token s takes, from every input, that input's row for s, found through the
input's own tokenizer (an expert may number its added tokens differently). An input that
lacks s gets a filled row:
- methods that use the base: the base's row for s, or, where the base lacks s too, the mean
  of all base rows (float64, as `pad_mean` pads) -- so an expert lacking s contributes a
  zero task vector there: it was never trained on s, and a zero delta makes it neither vote
  nor dilute (task arithmetic with lambda 1 and one owner returns the owner's row exactly);
- methods without a base (average, slerp, m3 with `combine: average`): the unweighted mean
  (float64) of the rows of the experts that have s, so an average merges what exists.
Rows that hold no token in the output (a checkpoint padded past its tokenizer) keep the row
of the same index in every input where that row holds no token either (filled otherwise);
the output has max(reference rows, merged tokenizer size) rows. When all vocabularies and
row counts agree the mapping is the identity and nothing is resized (same bytes as without
a policy).
"""

from __future__ import annotations

import inspect
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from mergeflow.checkpoints import CONFIG_FILES, is_vocab_tensor, model_dir, vocab_rows
from mergeflow.errors import MergeflowError

log = logging.getLogger(__name__)

# Any of these next to the weights means a tokenizer is there to load.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
POLICY = "vocab policy 'union'"


def load_tokenizer(path: str | Path, label: str):
    """The tokenizer next to the checkpoint at `path`, or a one-line error naming `label`."""
    d = model_dir(path)
    if not any((d / f).is_file() for f in TOKENIZER_FILES):
        raise MergeflowError(f"{POLICY}: {label} ({d}) has no tokenizer file ({', '.join(TOKENIZER_FILES)}); "
                             f"union maps embedding rows by token string, so every input needs its tokenizer")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(d), local_files_only=True)
    except Exception as err:  # transformers raises many kinds; the user needs the file, not the type
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise MergeflowError(f"{POLICY}: cannot load the tokenizer of {label} ({d}): {first}") from None


def _copy(added):
    from tokenizers import AddedToken

    return AddedToken(added.content, single_word=added.single_word, lstrip=added.lstrip, rstrip=added.rstrip,
                      normalized=added.normalized, special=added.special)


def _add_special(tok, tokens: list) -> None:
    """Add special tokens to the tokenizer's extra special tokens, keeping the existing ones
    (transformers 5 names the switch replace_extra_..., 4.x replace_additional_...)."""
    params = inspect.signature(tok.add_special_tokens).parameters
    key = next((k for k in ("replace_extra_special_tokens", "replace_additional_special_tokens") if k in params), None)
    tok.add_special_tokens({"additional_special_tokens": tokens}, **({key: False} if key else {}))


@dataclass
class VocabUnion:
    """The union plan: output vocabulary, merged tokenizer files, per-tensor row sources."""

    labels: list[str]  # the inputs whose weights are read, in engine order
    reference: str
    experts: list[str]
    uses_base: bool
    input_labels: dict[str, str]  # label -> reader label for messages ("expert 'a'")
    vocabs: dict[str, dict[str, int]]  # label -> token string -> id in that input
    merged_vocab: dict[str, int]
    added: list[dict]  # {"token", "id", "special", "experts"} in output order
    files: dict[str, str]  # tokenizer files of the merged tokenizer (name -> text)
    sources: dict[str, dict] = field(default_factory=dict)  # tensor -> label -> LongTensor (-1: fill)
    filled: dict[str, dict[str, int]] = field(default_factory=dict)  # tensor -> label -> rows filled
    _pair_cache: dict = field(default_factory=dict, repr=False)

    @property
    def n_tokens(self) -> int:
        return max(self.merged_vocab.values()) + 1

    def _pairs(self, label: str):
        """(output ids, this input's ids) of the tokens the input has, matched by string; its token ids."""
        import numpy as np
        import torch

        if "" not in self._pair_cache:  # the output ids, in merged_vocab's order
            self._pair_cache[""] = np.fromiter(self.merged_vocab.values(), dtype=np.int64, count=len(self.merged_vocab))
        if label not in self._pair_cache:
            vocab = self.vocabs[label]
            out_ids = self._pair_cache[""]
            in_ids = np.fromiter((vocab.get(s, -1) for s in self.merged_vocab), dtype=np.int64, count=out_ids.size)
            has = in_ids >= 0
            self._pair_cache[label] = (torch.from_numpy(out_ids[has]), torch.from_numpy(in_ids[has]),
                                       torch.from_numpy(np.fromiter(vocab.values(), dtype=np.int64, count=len(vocab))))
        return self._pair_cache[label]

    def rows_for(self, name: str, shapes: dict[str, tuple[int, ...]]) -> int | None:
        """Rows of output tensor `name` (None: unchanged), after planning its row sources."""
        ref = shapes[self.reference]
        if not is_vocab_tensor(name) or any(len(s) != 2 or s[1:] != ref[1:] for s in shapes.values()):
            return vocab_rows(name, shapes, None, self.reference)  # None if equal, else the shape error
        import torch

        rows = max(ref[0], self.n_tokens)
        out_token = torch.zeros(rows, dtype=torch.bool)
        self._pairs(self.reference)
        out_token[torch.from_numpy(self._pair_cache[""])] = True
        r = torch.arange(rows)
        identity = all(s[0] == rows for s in shapes.values())
        sources, filled = {}, {}
        for label in self.labels:
            n = shapes[label][0]
            out_ids, in_ids, token_ids = self._pairs(label)
            if in_ids.numel() and int(in_ids.max()) >= n:
                j = int(in_ids.max())
                s = next(t for t, i in self.vocabs[label].items() if i == j)
                raise MergeflowError(f"{POLICY}: token {s!r} has id {j} in the tokenizer of "
                                     f"{self.input_labels[label]}, but its tensor {name!r} has only {n} rows")
            in_token = torch.zeros(max(n, rows), dtype=torch.bool)
            in_token[token_ids] = True
            idx = torch.full((rows,), -1, dtype=torch.long)
            # a row with no token in the output: the same index, where that row holds no token either
            pad = ~out_token & (r < n) & ~in_token[:rows]
            idx[pad] = r[pad]
            idx[out_ids] = in_ids
            identity = identity and torch.equal(idx, r)
            sources[label] = idx
            filled[label] = int((idx < 0).sum())
        if identity:
            return None
        self.sources[name], self.filled[name] = sources, filled
        return rows

    def assemble(self, name: str, raw: dict):
        """{label: float32 [rows_in, cols]} -> {label: float32 [rows_out, cols]} by token string.

        Rows are gathered and filled by index (exact copies); only the few filled rows are computed."""
        import torch

        src = self.sources[name]
        out, miss = {}, {}
        for label, t in raw.items():
            idx = src[label].to(t.device)
            out[label] = t.index_select(0, idx.clamp(min=0))  # rows at -1 are filled below
            miss[label] = (idx < 0).nonzero().squeeze(1)
        if self.uses_base:
            base, m = out["base"], miss["base"]
            if m.numel():  # the mean on the CPU: a CUDA reduction orders it otherwise (as pad_mean)
                mean = raw["base"].cpu().mean(dim=0, keepdim=True, dtype=torch.float64).to(torch.float32)
                base.index_copy_(0, m, mean.to(base.device).expand(m.numel(), -1))
            for label in self.experts:
                m = miss[label]
                if m.numel():  # a zero task vector where the expert lacks the token
                    out[label].index_copy_(0, m, base.index_select(0, m))
            return out
        need = torch.unique(torch.cat([miss[label] for label in self.experts]))  # rows some expert lacks
        if not need.numel():
            return out
        total, count = None, None
        for label in self.experts:  # fixed order, float64: the same sum on every device
            have = ~torch.isin(need, miss[label])
            t = torch.where(have[:, None], out[label].index_select(0, need).double(), 0.0)
            total = t if total is None else total + t
            count = have.double() if count is None else count + have.double()
        if bool((count == 0).any()):  # cannot happen: every output token comes from some input
            raise MergeflowError(f"{POLICY}: tensor {name!r}: row {int(need[count == 0][0])} has no source")
        fill = (total / count[:, None]).to(torch.float32)
        for label in self.experts:
            m = miss[label]
            if m.numel():  # the mean of the experts that have the token
                out[label].index_copy_(0, m, fill[torch.searchsorted(need, m)])
        return out

    def metadata(self) -> dict:
        return {"reference": self.reference, "tokens": len(self.merged_vocab), "added": self.added,
                "filled_rows": self.filled}


def plan_union(readers: dict, labels: list[str], reference: str, experts: list[str],
               uses_base: bool) -> VocabUnion:
    """Load every input's tokenizer, check them, and build the merged tokenizer.

    `readers`: label -> CheckpointReader; `labels`: the inputs whose weights are read
    (the base first when the method uses it); `reference`: the label whose vocabulary comes
    first (labels[0]).
    """
    names = {label: readers[label].label for label in labels}
    paths = {label: readers[label].path for label in labels}
    toks = {label: load_tokenizer(paths[label], names[label]) for label in labels}
    vocabs = {label: dict(tok.get_vocab()) for label, tok in toks.items()}
    added_of = {label: {a.content: a for a in tok.added_tokens_decoder.values()} for label, tok in toks.items()}
    # The same added token must be special everywhere or nowhere: a merged tokenizer can hold it once.
    seen: dict[str, tuple[str, bool]] = {}
    for label in labels:
        for s, a in added_of[label].items():
            if s in seen and seen[s][1] != bool(a.special):
                first, special = seen[s]
                raise MergeflowError(
                    f"{POLICY}: token {s!r} is {'special' if special else 'not special'} in {names[first]} "
                    f"but {'special' if a.special else 'not special'} in {names[label]}; the merged tokenizer "
                    f"can hold it only one way")
            seen.setdefault(s, (label, bool(a.special)))
    ref_vocab = vocabs[reference]
    order: dict[str, dict] = {}
    for label in experts:
        if label == reference:
            continue
        for s, i in sorted(vocabs[label].items(), key=lambda kv: kv[1]):
            if s in ref_vocab:
                continue
            if s in order:
                order[s]["experts"].append(label)
                continue
            a = added_of[label].get(s)
            if a is None:
                raise MergeflowError(
                    f"{POLICY}: token {s!r} (id {i}) of {names[label]} is in its tokenizer model's own vocabulary, "
                    f"not an added token, and {names[reference]} lacks it: the tokenizers differ beyond added "
                    f"tokens, which union cannot merge (use --vocab-policy truncate or pad_mean)")
            order[s] = {"token": s, "special": bool(a.special), "experts": [label], "_added": a}
    merged = load_tokenizer(paths[reference], names[reference])  # a fresh copy to extend
    run: list = []
    entries = list(order.values())
    for k, entry in enumerate(entries):  # in order: runs of equal special-ness per call
        run.append(_copy(entry["_added"]))
        if k == len(entries) - 1 or entries[k + 1]["special"] != entry["special"]:
            if entry["special"]:
                _add_special(merged, run)
            else:
                merged.add_tokens(run)
            run = []
    merged_vocab = dict(merged.get_vocab())
    for s, i in ref_vocab.items():
        if merged_vocab.get(s) != i:  # adding tokens must not renumber the reference's vocabulary
            raise MergeflowError(f"{POLICY}: token {s!r} of {names[reference]} moved from id {i} to "
                                 f"{merged_vocab.get(s)} in the merged tokenizer")
    added = []
    for s, entry in order.items():
        if s not in merged_vocab:
            raise MergeflowError(f"{POLICY}: token {s!r} of {names[entry['experts'][0]]} could not be added "
                                 f"to the tokenizer of {names[reference]}")
        added.append({"token": s, "id": merged_vocab[s], "special": entry["special"], "experts": entry["experts"]})
    ids = [a["id"] for a in added]
    if len(set(ids)) != len(ids) or set(ids) & set(ref_vocab.values()):
        raise MergeflowError(f"{POLICY}: the merged tokenizer gave two tokens one id ({ids})")
    files = {}
    with tempfile.TemporaryDirectory(prefix="mergeflow-vocab-") as tmp:
        merged.save_pretrained(tmp)
        for f in sorted(Path(tmp).iterdir()):
            if f.name not in CONFIG_FILES or f.name in ("config.json", "generation_config.json"):
                log.warning("%s: the merged tokenizer also wrote %s, which the output does not ship", POLICY, f.name)
                continue
            try:
                files[f.name] = f.read_text(encoding="utf-8")
            except UnicodeDecodeError:  # a binary tokenizer.model: the reference's, copied with the donor's files
                continue
    if added:
        log.info("%s: %d tokens added to %s's vocabulary of %d: %s", POLICY, len(added), names[reference],
                 len(ref_vocab), ", ".join(repr(a["token"]) for a in added[:10]) + (" ..." if len(added) > 10 else ""))
    return VocabUnion(list(labels), reference, list(experts), uses_base, names, vocabs, merged_vocab, added, files)
