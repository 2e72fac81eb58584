"""Pre-merge check: `mergeflow check --base B --expert NAME=DIR ...`, also run at the start
of every merge (its warnings go to the merge log and to the metadata's `check` key; an error
stops the merge before anything is written).

It reads checkpoint headers through the engine's own header reader (`CheckpointReader`: the
same tensor names, shapes and dtypes the merge would plan with), `config.json` and the
tokenizer files; never whole weights, except for the derives-from-base statistics, which
read a bounded sample of rows of every tensor (`--stats sample`, the default and what a
merge runs) or stream every tensor in blocks (`--stats full`). Each finding is (severity,
check, culprit, message); the message names the tensor, token or config key it is about.
Thresholds are `Thresholds` fields (docs/merging.md, "Pre-merge check").
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from mergeflow.checkpoints import ITEMSIZE, VOCAB_POLICIES, CheckpointReader, is_vocab_tensor, model_dir, natural_key
from mergeflow.errors import MergeflowError

log = logging.getLogger(__name__)

SEVERITIES = ("error", "warning", "info")
CHECKS = ("architecture", "tensors", "dtype", "tied", "vocab", "tokenizer", "derivation", "resources")
FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")
# Config keys that fix how tensors of the same shape are read (heads, layers): a difference is an error.
STRUCTURE_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                  "intermediate_size")
# Keys that change what the weights compute but not their shapes: the output takes the donor's.
BEHAVIOUR_KEYS = ("rope_theta", "rope_scaling", "rope_parameters", "max_position_embeddings", "rms_norm_eps",
                  "layer_norm_eps", "hidden_act", "sliding_window", "attention_bias", "mlp_bias",
                  "partial_rotary_factor", "query_pre_attn_scalar", "final_logit_softcapping", "attn_logit_softcapping")
HEAD = re.compile(r"(^|\.)(lm_head|embed_out)\.weight$")
EMBED = re.compile(r"(^|\.)(embed_tokens|wte|embed_in|word_embeddings)\.weight$")
SAMPLE_ELEMENTS = 1 << 16  # per tensor and input in --stats sample
SAMPLE_WINDOWS = 4  # evenly spaced row windows a sampled tensor is read in
FULL_BLOCK_ELEMENTS = 1 << 21  # --stats full: rows read per step (bounded memory)
SHOW = 8  # token strings / tensor names listed in one message
# A merge process before any block (interpreter, torch, engine), rounded up from the peak RSS
# measured in benchmarks/README.md, "Pre-merge check".
PROCESS_BYTES = 256 << 20
CUDA_PROCESS_BYTES = 1280 << 20  # the same on CUDA, which maps its libraries too (same section)
CUDA_CONTEXT_BYTES = 600 << 20  # the CUDA context's own memory, outside torch's allocations


@dataclass
class Thresholds:
    """When the derives-from-base statistics warn (docs/merging.md, "Pre-merge check")."""

    rel_norm_max: float = 0.5  # ||θ_e − θ_b|| / ||θ_b|| above this: the expert may not derive from the base
    rel_norm_ratio: float = 5.0  # ... or this many times the median of the other experts' ...
    rel_norm_floor: float = 0.1  # ... when also above this (fine-tunes are typically below 0.1)
    rel_norm_min: float = 1e-6  # below this the expert equals the base (a zero task vector)
    cos_max: float = 0.99  # two experts' task vectors this parallel: the same model given twice?


@dataclass
class Finding:
    severity: str  # error | warning | info
    check: str  # one of CHECKS
    culprit: str  # what it is about: "tensor 'x'", "token 'y'", "config 'z'", "expert 'e'", "--out"
    message: str  # one line, naming the culprit and the input

    def line(self) -> str:
        return f"{self.severity:<7} {self.check:<12} {self.culprit}: {self.message}"


@dataclass
class Vocab:
    """A tokenizer's vocabulary: id -> token string; `added`: ids of added / special tokens."""

    tokens: dict[int, str]
    added: set[int]
    source: str

    def ids(self) -> dict[str, int]:
        return {t: i for i, t in sorted(self.tokens.items(), reverse=True)}  # (a string twice: its lowest id)


@dataclass
class Report:
    findings: list[Finding] = field(default_factory=list)
    inputs: dict = field(default_factory=dict)
    vocab: dict = field(default_factory=dict)
    derivation: dict = field(default_factory=dict)
    resources: dict = field(default_factory=dict)
    thresholds: dict = field(default_factory=dict)

    def of(self, severity: str) -> list[Finding]:
        return [f for f in self.findings if f.severity == severity]

    @property
    def errors(self) -> list[Finding]:
        return self.of("error")

    @property
    def warnings(self) -> list[Finding]:
        return self.of("warning")

    def lines(self) -> list[str]:
        order = {s: i for i, s in enumerate(SEVERITIES)}
        out = [f.line() for f in sorted(self.findings, key=lambda f: order[f.severity])]
        out.append(f"{len(self.errors)} errors, {len(self.warnings)} warnings, {len(self.of('info'))} notes")
        return out

    def to_dict(self) -> dict:
        return {"ok": not self.errors, "errors": len(self.errors), "warnings": len(self.warnings),
                "findings": [asdict(f) for f in self.findings], "inputs": self.inputs, "vocab": self.vocab,
                "derivation": self.derivation, "resources": self.resources, "thresholds": self.thresholds}

    def metadata(self) -> dict:
        """What a merge records under its metadata's `check` key."""
        d = self.derivation
        return {"warnings": [asdict(f) for f in self.warnings],
                "derivation": {k: d[k] for k in ("mode", "rel_norm", "cosine") if k in d},
                "resources": {k: v for k, v in self.resources.items() if k.endswith("_bytes")}}

    def error_line(self, prefix: str = "") -> str:
        """One line for MergeflowError: the first error (its message names the culprit)."""
        errs = self.errors or self.warnings
        more = len(errs) - 1
        return (prefix + errs[0].message
                + (f" (and {more} more; `mergeflow check` lists every finding)" if more > 0 else ""))


# ---------------------------------------------------------------------------------------
# reading configs and tokenizers
# ---------------------------------------------------------------------------------------


def load_config(path) -> tuple[dict | None, str | None]:
    """(config.json as a dict or None, why it could not be read or None)."""
    f = model_dir(path) / "config.json"
    if not f.exists():
        return None, None
    try:
        cfg = json.loads(f.read_text())
    except (OSError, ValueError) as err:
        return None, f"{f}: cannot read it ({err})"
    return (cfg, None) if isinstance(cfg, dict) else (None, f"{f}: not a JSON object")


def load_vocab(path) -> Vocab | None:
    """The vocabulary of a model directory's tokenizer files (tokenizer.json; else vocab.json
    with added_tokens.json; else tokenizer.model through sentencepiece), with
    tokenizer_config.json's added tokens on top; None without any of them."""
    d = model_dir(path)
    tokens: dict[int, str] = {}
    added: set[int] = set()
    source = None
    try:
        if (d / "tokenizer.json").exists():
            data = json.loads((d / "tokenizer.json").read_text())
            vocab = (data.get("model") or {}).get("vocab")
            if isinstance(vocab, dict):  # BPE, WordPiece, WordLevel
                tokens = {int(i): t for t, i in vocab.items()}
            elif isinstance(vocab, list):  # Unigram: [[piece, score], ...]
                tokens = {i: (e[0] if isinstance(e, list | tuple) else e) for i, e in enumerate(vocab)}
            for a in data.get("added_tokens") or []:
                tokens[int(a["id"])] = a["content"]
                added.add(int(a["id"]))
            source = "tokenizer.json"
        elif (d / "vocab.json").exists():
            tokens = {int(i): t for t, i in json.loads((d / "vocab.json").read_text()).items()}
            source = "vocab.json"
            if (d / "added_tokens.json").exists():
                for t, i in json.loads((d / "added_tokens.json").read_text()).items():
                    tokens[int(i)] = t
                    added.add(int(i))
        elif (d / "tokenizer.model").exists():
            try:
                import sentencepiece
            except ImportError:
                return None
            sp = sentencepiece.SentencePieceProcessor(model_file=str(d / "tokenizer.model"))
            tokens = {i: sp.id_to_piece(i) for i in range(sp.get_piece_size())}
            source = "tokenizer.model"
        if (d / "tokenizer_config.json").exists():
            cfg = json.loads((d / "tokenizer_config.json").read_text())
            for i, entry in (cfg.get("added_tokens_decoder") or {}).items():
                content = entry.get("content") if isinstance(entry, dict) else None
                if content is not None:
                    tokens[int(i)] = content
                    added.add(int(i))
                    source = source or "tokenizer_config.json"
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as err:
        raise MergeflowError(f"{d}: cannot read its tokenizer files ({err})") from err
    return Vocab(tokens, added, source) if source else None


def _listed(items: list[str], n: int = SHOW) -> str:
    head = ", ".join(items[:n])
    return head + (f" and {len(items) - n} more" if len(items) > n else "")


def _tok(t: str) -> str:
    return repr(t)


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


# ---------------------------------------------------------------------------------------
# the checks
# ---------------------------------------------------------------------------------------


@dataclass
class Settings:
    """What the merge would run with (the engine's plan), for the resource estimate."""

    method: str | None = None
    uses_base: bool = True
    tensor_wide: bool | None = None  # None: unknown method, whole tensors assumed
    device_type: str = "cpu"
    device: object = None  # a torch.device on CUDA
    chunk_elements: int | None = None
    read_ahead_bytes: int | None = None
    io_threads: int | None = None
    write_threads: int | None = None
    out_dtype: str | None = None
    donor: str | None = None
    out: str | None = None
    plan: list | None = None  # the engine's [(name, output shape, output dtype)]


class Checker:
    def __init__(self, readers: dict[str, CheckpointReader], experts: list[str], settings: Settings,
                 vocab_policy: str | None = None, thresholds: Thresholds | None = None):
        self.readers = readers
        self.experts = list(experts)
        self.s = settings
        self.policy = vocab_policy
        self.t = thresholds or Thresholds()
        self.has_base = "base" in readers
        self.base_used = self.has_base and settings.uses_base
        # inputs the merge reads, the reference first (the base when it is used), as the engine plans
        self.used = (["base"] if self.base_used else []) + self.experts
        self.ref = self.used[0]
        self.keys = (["base"] if self.has_base else []) + self.experts
        self.report = Report(thresholds=asdict(self.t))
        self.configs: dict[str, dict | None] = {}
        self._vocabs: dict[str, Vocab | None] = {}

    # -- helpers --------------------------------------------------------------------------
    def label(self, key: str) -> str:
        return self.readers[key].label

    def add(self, severity: str, check: str, culprit: str, message: str) -> None:
        self.report.findings.append(Finding(severity, check, culprit, message))

    def sev(self, key: str, severity: str = "error") -> str:
        """An input the merge does not read (an unused base) only warns."""
        return severity if key in self.used else "warning"

    def unused_note(self, key: str) -> str:
        return "" if key in self.used else " (the method does not read the base)"

    def vocab(self, key: str) -> Vocab | None:
        if key not in self._vocabs:
            self._vocabs[key] = load_vocab(self.readers[key].path)
        return self._vocabs[key]

    def donor_for(self, out_rows: int | None, name: str | None) -> str:
        """The engine's donor: `donor` param, else (vocab resized) the first input with the
        output's rows, else the base, else the first expert (`MergeEngine._default_donor`)."""
        if self.s.donor:
            return self.s.donor
        if out_rows is not None and name is not None:
            for key in self.keys:
                if self.readers[key].infos.get(name) and self.readers[key].infos[name].shape[0] == out_rows:
                    return key
        return "base" if self.has_base else self.experts[0]

    # -- run ------------------------------------------------------------------------------
    def run(self, stats: str = "sample", sample_elements: int = SAMPLE_ELEMENTS, defer_stats: bool = False) -> Report:
        """Every check; with `defer_stats` all but the weight statistics, which `run_stats` adds
        later in the same place of the findings (so the report reads as if run at once)."""
        for key in self.keys:
            cfg, err = load_config(self.readers[key].path)
            self.configs[key] = cfg
            if err:
                self.add("warning", "architecture", "config.json", f"{self.label(key)}: {err}")
            self.report.inputs[self.label(key)] = {
                "path": str(self.readers[key].path), "format": self.readers[key].format,
                "tensors": len(self.readers[key].infos), "model_type": (cfg or {}).get("model_type"),
                "dtypes": self._dtype_counts(key)}
        self.check_architecture()
        self.check_tensors()
        self.check_dtypes()
        self.check_tied()
        self.check_vocab()
        self._stats_at = len(self.report.findings)
        if stats != "off" and not defer_stats:
            self.check_derivation(stats, sample_elements)
        self.check_resources()
        return self.report

    def run_stats(self, stats: str = "sample", sample_elements: int = SAMPLE_ELEMENTS) -> Report:
        """The weight statistics a `run(defer_stats=True)` left out."""
        after = self.report.findings[self._stats_at:]
        del self.report.findings[self._stats_at:]
        try:
            self.check_derivation(stats, sample_elements)
        finally:
            self.report.findings.extend(after)
        return self.report

    # -- architecture ---------------------------------------------------------------------
    def check_architecture(self) -> None:
        ref_cfg = self.configs.get(self.ref)
        missing = [self.label(k) for k in self.keys if self.configs.get(k) is None]
        if missing:
            self.add("info", "architecture", "config.json",
                     f"no readable config.json in {_listed(missing)}: architecture keys not compared")
        if ref_cfg is None:
            return
        for key in self.keys:
            cfg = self.configs.get(key)
            if key == self.ref or cfg is None:
                continue
            lab, rlab = self.label(key), self.label(self.ref)
            if cfg.get("model_type") != ref_cfg.get("model_type"):
                self.add(self.sev(key), "architecture", "config 'model_type'",
                         f"config 'model_type': {lab} is {cfg.get('model_type')!r}, {rlab} is "
                         f"{ref_cfg.get('model_type')!r}: different model families do not merge{self.unused_note(key)}")
            if (cfg.get("architectures") or None) != (ref_cfg.get("architectures") or None):
                self.add("warning", "architecture", "config 'architectures'",
                         f"config 'architectures': {lab} has {cfg.get('architectures')}, {rlab} has "
                         f"{ref_cfg.get('architectures')}")
            for k in STRUCTURE_KEYS:
                if k in cfg and k in ref_cfg and cfg[k] != ref_cfg[k]:
                    self.add(self.sev(key), "architecture", f"config {k!r}",
                             f"config {k!r}: {lab} has {cfg[k]!r}, {rlab} has {ref_cfg[k]!r}: the same weights "
                             f"would be read as another architecture{self.unused_note(key)}")
            donor = self.label(self.donor_for(None, None))
            for k in BEHAVIOUR_KEYS:
                if cfg.get(k) != ref_cfg.get(k) and (k in cfg or k in ref_cfg):
                    self.add("warning", "architecture", f"config {k!r}",
                             f"config {k!r}: {lab} has {cfg.get(k)!r}, {rlab} has {ref_cfg.get(k)!r}; the output "
                             f"takes {donor}'s config")

    # -- tensor names, shapes, dtypes -------------------------------------------------------
    def check_tensors(self) -> None:
        ref = self.readers[self.ref]
        ref_names = {n for n in ref.infos if not HEAD.search(n)}  # heads: check_tied
        for key in self.keys:
            r = self.readers[key]
            if key != self.ref:
                names = {n for n in r.infos if not HEAD.search(n)}
                missing = sorted(ref_names - names, key=natural_key)
                if missing:
                    self.add(self.sev(key), "tensors", f"tensor {missing[0]!r}",
                             f"tensor {missing[0]!r} is missing from {r.label} ({r.path})"
                             + (f" and {len(missing) - 1} more" if len(missing) > 1 else "") + self.unused_note(key))
                extra = sorted(names - ref_names, key=natural_key)
                if extra:
                    self.add(self.sev(key), "tensors", f"tensor {extra[0]!r}",
                             f"tensor {extra[0]!r} of {r.label} ({r.path}) is not in {ref.label}"
                             + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "") + self.unused_note(key))
                bad = []
                for name in sorted(names & ref_names, key=natural_key):
                    s, rs = r.infos[name].shape, ref.infos[name].shape
                    vocab_like = is_vocab_tensor(name) and len(s) == 2 == len(rs) and s[1:] == rs[1:]
                    if s != rs and not vocab_like:
                        bad.append(name)
                for name in bad[:3]:
                    self.add(self.sev(key), "tensors", f"tensor {name!r}",
                             f"tensor {name!r}: shape mismatch ({r.label} has {list(r.infos[name].shape)}, "
                             f"{ref.label} has {list(ref.infos[name].shape)}){self.unused_note(key)}")
                if len(bad) > 3:
                    self.add(self.sev(key), "tensors", f"tensor {bad[3]!r}",
                             f"tensor {bad[3]!r} and {len(bad) - 4} more tensors of {r.label} differ in shape "
                             f"from {ref.label}'s{self.unused_note(key)}")
            odd = sorted((n for n, i in r.infos.items() if i.dtype not in FLOAT_DTYPES), key=natural_key)
            if odd:
                self.add(self.sev(key), "dtype", f"tensor {odd[0]!r}",
                         f"tensor {odd[0]!r} of {r.label} has dtype {r.infos[odd[0]].dtype}"
                         + (f" (and {len(odd) - 1} more)" if len(odd) > 1 else "")
                         + f"; only float16/bfloat16/float32/float64 tensors can be merged{self.unused_note(key)}")
            empty = sorted((n for n, i in r.infos.items() if 0 in i.shape), key=natural_key)
            if empty:
                self.add(self.sev(key), "tensors", f"tensor {empty[0]!r}",
                         f"tensor {empty[0]!r} of {r.label} is empty (shape {list(r.infos[empty[0]].shape)})"
                         f"{self.unused_note(key)}")

    def _dtype_counts(self, key: str) -> dict[str, int]:
        out: dict[str, int] = {}
        for info in self.readers[key].infos.values():
            out[info.dtype] = out.get(info.dtype, 0) + 1
        return dict(sorted(out.items()))

    def check_dtypes(self) -> None:
        ref = self.readers[self.ref]
        out = self.s.out_dtype or f"each tensor in {ref.label}'s dtype"
        for key in self.keys:
            r = self.readers[key]
            counts = self._dtype_counts(key)
            floats = [d for d in counts if d in FLOAT_DTYPES]
            if len(floats) > 1:
                ex = {d: next(n for n in sorted(r.infos, key=natural_key) if r.infos[n].dtype == d) for d in floats}
                self.add("info", "dtype", f"tensor {ex[floats[-1]]!r}",
                         f"{r.label} mixes dtypes: " + ", ".join(f"{d} ({counts[d]} tensors, e.g. {ex[d]!r})"
                                                                 for d in floats))
            if key == self.ref:
                continue
            differ = [n for n in sorted(r.infos, key=natural_key)
                      if n in ref.infos and r.infos[n].dtype != ref.infos[n].dtype]
            if differ:
                n = differ[0]
                self.add("warning", "dtype", f"tensor {n!r}",
                         f"tensor {n!r} is {r.infos[n].dtype} in {r.label} but {ref.infos[n].dtype} in {ref.label}"
                         + (f" (and {len(differ) - 1} more tensors)" if len(differ) > 1 else "")
                         + f": inputs of mixed dtypes; the merge computes in float32 and writes {out}")

    # -- tied embeddings --------------------------------------------------------------------
    def _tied(self, key: str) -> dict:
        names = self.readers[key].infos
        embed = next((n for n in sorted(names) if EMBED.search(n)), None)
        head = next((n for n in sorted(names) if HEAD.search(n)), None)
        cfg_tie = (self.configs.get(key) or {}).get("tie_word_embeddings")
        tied = (embed is not None and head is None) or cfg_tie is True
        return {"embed": embed, "head": head, "config_tie_word_embeddings": cfg_tie, "tied": tied}

    def check_tied(self) -> None:
        ties = {k: self._tied(k) for k in self.keys}
        for k, t in ties.items():
            self.report.inputs[self.label(k)]["tied_embeddings"] = t["tied"]
        ref = ties[self.ref]
        rlab = self.label(self.ref)
        for key in self.keys:
            if key == self.ref:
                continue
            t, lab = ties[key], self.label(key)
            if (t["head"] is None) != (ref["head"] is None):
                head = t["head"] or ref["head"]
                tied_lab, untied_lab = (lab, rlab) if t["head"] is None else (rlab, lab)
                embed = t["embed"] or ref["embed"] or "the embedding"
                self.add(self.sev(key), "tied", f"tensor {head!r}",
                         f"tensor {head!r}: {tied_lab} ties its output head to {embed!r} (it has no {head!r}), "
                         f"{untied_lab} has its own; every input needs the same tensors (untie the tied one: save "
                         f"a copy of {embed!r} as {head!r} and set tie_word_embeddings false){self.unused_note(key)}")
            elif t["tied"] != ref["tied"]:
                culprit = t["head"] or t["embed"] or "tie_word_embeddings"
                donor = self.label(self.donor_for(None, None))
                self.add("warning", "tied", f"tensor {culprit!r}",
                         f"tensor {culprit!r}: {lab} {'ties' if t['tied'] else 'does not tie'} its embeddings "
                         f"(config tie_word_embeddings={t['config_tie_word_embeddings']!r}), {rlab} "
                         f"{'does' if ref['tied'] else 'does not'}; the output takes {donor}'s config, which decides "
                         f"whether the merged head is used")

    # -- vocabulary -------------------------------------------------------------------------
    def check_vocab(self) -> None:
        groups: dict[tuple, list[str]] = {}
        ref = self.readers[self.ref]
        for name in sorted(ref.infos, key=natural_key):
            if not is_vocab_tensor(name) or not all(name in self.readers[k].infos for k in self.used):
                continue
            shapes = {k: self.readers[k].infos[name].shape for k in self.used}
            if len(set(shapes.values())) == 1:
                continue
            if not all(len(s) == 2 and s[1:] == shapes[self.ref][1:] for s in shapes.values()):
                continue  # a shape mismatch (check_tensors)
            groups.setdefault(tuple((k, s[0]) for k, s in shapes.items()), []).append(name)
        self.check_tokenizers()
        for rows_key, names in groups.items():
            self._vocab_group(names, dict(rows_key))
        if not groups:
            self._shipped_tokenizer()

    def check_tokenizers(self) -> None:
        vocabs = {k: self.vocab(k) for k in self.keys}
        for k, v in vocabs.items():
            self.report.inputs[self.label(k)]["tokenizer"] = (
                None if v is None else {"source": v.source, "tokens": len(v.tokens), "added": len(v.added)})
        have = [k for k in self.keys if vocabs[k] is not None]
        if have and len(have) < len(self.keys):
            self.add("info", "tokenizer", "tokenizer files",
                     f"no tokenizer files in {_listed([self.label(k) for k in self.keys if vocabs[k] is None])}: "
                     f"their tokens are not compared")
        ref = vocabs.get(self.ref)
        if ref is None or self.policy == "union":  # union maps rows by token string
            return
        for key in self.used:
            v = vocabs[key]
            if key == self.ref or v is None:
                continue
            differ = sorted(i for i in set(v.tokens) & set(ref.tokens) if v.tokens[i] != ref.tokens[i])
            if differ:
                i = differ[0]
                examples = [f"{i}: {v.tokens[i]!r} vs {ref.tokens[i]!r}" for i in differ[:SHOW]]
                self.add("warning", "tokenizer", f"token {v.tokens[i]!r}",
                         f"token {v.tokens[i]!r} is id {i} in {self.label(key)} but that id is {ref.tokens[i]!r} in "
                         f"{self.label(self.ref)} ({len(differ)} ids differ: {_listed(examples)}): their embedding "
                         f"rows are merged as if they were one token")

    def _vocab_group(self, names: list[str], rows: dict[str, int]) -> None:
        name = names[0]
        also = f" (and {_listed([repr(n) for n in names[1:]])})" if len(names) > 1 else ""
        detail = ", ".join(f"{self.label(k)} {n}" for k, n in rows.items())
        outcomes = {p: self._policy_outcome(p, name, rows) for p in VOCAB_POLICIES}
        self.report.vocab.setdefault("groups", []).append(
            {"tensors": names, "rows": {self.label(k): n for k, n in rows.items()}, "policy": self.policy,
             "policies": outcomes})
        if self.policy is None:
            summary = "; ".join(f"{p}: {o['summary']}" for p, o in outcomes.items())
            self.add("error", "vocab", f"tensor {name!r}",
                     f"tensor {name!r}{also}: vocabulary size mismatch (rows: {detail}); choose a vocabulary policy "
                     f"(--vocab-policy {'|'.join(VOCAB_POLICIES)}): {summary}")
        for p, o in outcomes.items():
            chosen = p == self.policy
            if o.get("fails"):
                self.add("error" if chosen else "info", "vocab", f"tensor {name!r}",
                         f"tensor {name!r}: vocab policy {p!r} cannot be used: {o['fails']}")
                continue
            for lab, item in o["inputs"].items():
                if item["tokens_lost"]:
                    toks = [_tok(t) for t in item["tokens_lost"]]
                    self.add("warning" if chosen else "info", "vocab", f"token {item['tokens_lost'][0]!r}",
                             f"vocab policy {p!r} loses tokens {_listed(toks)} of {lab}" + (
                                 f" (it cuts {name!r}{also} from {item['rows']} to {o['rows']} rows)"
                                 if item["rows_dropped"] else f" (the output ships {o['donor']}'s tokenizer)"))
                elif item["rows_dropped"]:  # unknown rows dropped by the chosen policy: a warning
                    self.add("warning" if chosen and not item["tokens_known"] else "info", "vocab", f"tensor {name!r}",
                             f"vocab policy {p!r} drops rows {o['rows']}..{item['rows'] - 1} of {name!r}{also} of "
                             f"{lab}" + (" (no tokens there: padding rows)" if item["tokens_known"]
                                         else " (no tokenizer files: which tokens they hold is unknown)"))
                if item.get("rows_filled"):
                    self.add("info", "vocab", f"tensor {name!r}",
                             f"vocab policy {p!r} maps rows of {name!r}{also} by token string; {lab} lacks "
                             f"{item['rows_filled']} of the merged tokenizer's tokens, whose rows are filled (the "
                             f"base's row or mean: a zero task vector; without a base the other experts' mean)")
                if item["rows_padded"]:
                    self.add("info", "vocab", f"tensor {name!r}",
                             f"vocab policy {p!r} pads {name!r}{also} of {lab} from {item['rows']} to {o['rows']} rows "
                             f"with the mean of its rows")
                if item["rows_remapped"] and o["donor"] != self.label(self.ref):  # (vs the reference: tokenizer)
                    self.add("warning" if chosen else "info", "vocab", f"token {item['remapped_example'][0]!r}",
                             f"vocab policy {p!r}: {item['rows_remapped']} rows of {lab} hold other tokens than the "
                             f"shipped tokenizer's ({o['donor']}) at the same ids, e.g. "
                             f"{item['remapped_example'][0]!r} at id {item['remapped_example'][1]} is read as "
                             f"{item['remapped_example'][2]!r}")

    def _policy_outcome(self, policy: str, name: str, rows: dict[str, int]) -> dict:
        """What `policy` does to each input's rows and tokens (a dict; `fails`: why it cannot run)."""
        ref_rows = rows[self.ref]
        vocabs = {k: self.vocab(k) for k in self.keys}
        if policy == "truncate":
            short = [k for k in rows if rows[k] < ref_rows]
            if short:
                return {"fails": f"{self.label(short[0])} has fewer rows ({rows[short[0]]}) than "
                                 f"{self.label(self.ref)} ({ref_rows}); truncate cannot grow it",
                        "summary": "cannot run (an input has fewer rows than the reference)"}
            out_rows = ref_rows
        elif policy == "pad_mean":
            out_rows = max(rows.values())
        elif policy == "union":  # mergeflow.merging.vocab: the reference's tokens, then the experts' new ones
            lacking = next((k for k in self.used if vocabs[k] is None), None)
            if lacking is not None:
                return {"fails": f"it maps rows by token string and {self.label(lacking)} has no tokenizer files",
                        "summary": "cannot run without every input's tokenizer files"}
            ref_v = vocabs[self.ref]
            known = set(ref_v.tokens.values())
            new: list[str] = []
            for k in self.used:
                for i in sorted(vocabs[k].tokens):
                    t = vocabs[k].tokens[i]
                    if t not in known:
                        known.add(t)
                        new.append(t)
            out_rows = max(ref_rows, max(ref_v.tokens, default=-1) + 1 + len(new))
            inputs = {}
            for k in rows:
                strings = set(vocabs[k].tokens.values())
                inputs[self.label(k)] = {"rows": rows[k], "rows_dropped": 0, "rows_padded": 0, "tokens_lost": [],
                                         "tokens_known": True, "rows_remapped": 0,
                                         "rows_filled": sum(1 for t in known if t not in strings)}
            return {"rows": out_rows, "donor": "the merged tokenizer", "tokens_added": new,
                    "summary": f"{out_rows} rows, every token kept (adds {_listed([_tok(t) for t in new])})"
                               if new else f"{out_rows} rows, every token kept", "inputs": inputs}
        else:  # a policy this check does not know yet
            return {"fails": f"the pre-merge check does not know vocab policy {policy!r}",
                    "summary": "not described by this check"}
        donor = self.donor_for(out_rows, name)
        dv = vocabs.get(donor)
        dstrings = set(dv.tokens.values()) if dv else None
        inputs = {}
        for key, n in rows.items():
            v = vocabs.get(key)
            dropped, padded = max(0, n - out_rows), max(0, out_rows - n)
            lost: list[str] = []
            remapped, example = 0, None
            if v is not None:
                if dropped:  # tokens in the cut rows
                    lost += [v.tokens[i] for i in sorted(v.tokens) if out_rows <= i < n]
                if dstrings is not None and key != donor:  # tokens the shipped tokenizer lacks
                    lost += [v.tokens[i] for i in sorted(v.tokens) if i < out_rows and v.tokens[i] not in dstrings]
                if dv is not None and key != donor:
                    differ = sorted(i for i in v.tokens if i < min(n, out_rows) and i in dv.tokens
                                    and dv.tokens[i] != v.tokens[i])
                    remapped = len(differ)
                    if differ:
                        example = (v.tokens[differ[0]], differ[0], dv.tokens[differ[0]])
            inputs[self.label(key)] = {"rows": n, "rows_dropped": dropped, "rows_padded": padded,
                                       "tokens_lost": list(dict.fromkeys(lost)), "tokens_known": v is not None,
                                       "rows_remapped": remapped, "remapped_example": example}
        n_lost = sum(len(i["tokens_lost"]) for i in inputs.values())
        n_drop = sum(i["rows_dropped"] for i in inputs.values())
        n_pad = sum(1 for i in inputs.values() if i["rows_padded"])
        summary = (f"{out_rows} rows" + (f", drops {n_drop} rows" if n_drop else "")
                   + (f", pads {n_pad} inputs with mean rows" if n_pad else "")
                   + (f", loses {n_lost} tokens" if n_lost else "") + f", ships {self.label(donor)}'s tokenizer")
        return {"rows": out_rows, "donor": self.label(donor), "summary": summary, "inputs": inputs}

    def _shipped_tokenizer(self) -> None:
        """Rows agree: the donor's tokenizer is shipped as is; tokens only the others have are lost."""
        if self.policy == "union":
            return
        donor = self.donor_for(None, None)
        dv = self.vocab(donor)
        if dv is None:
            return
        dstrings = set(dv.tokens.values())
        for key in self.used:
            v = self.vocab(key)
            if key == donor or v is None:
                continue
            lost = [v.tokens[i] for i in sorted(v.tokens) if v.tokens[i] not in dstrings]
            if lost:
                self.add("warning", "vocab", f"token {lost[0]!r}",
                         f"tokens {_listed([_tok(t) for t in lost])} of {self.label(key)} are not in "
                         f"{self.label(donor)}'s tokenizer, which the output ships: they are lost"
                         + (" (--vocab-policy union keeps them)" if "union" in VOCAB_POLICIES else ""))

    # -- derives from the base --------------------------------------------------------------
    def check_derivation(self, mode: str, sample_elements: int) -> None:
        if not self.has_base:
            self.add("info", "derivation", "--base", "no base: whether the experts derive from one is not checked")
            return
        # A pickled checkpoint gets a reader of its own: partial reads through the engine's would
        # leave its per-shard bookkeeping (unmap once every tensor was read) out of step.
        own = {k: CheckpointReader(r.path, r.label) for k, r in self.readers.items() if r.format == "bin"}
        saved = self.readers
        self.readers = {**self.readers, **own}
        import torch

        threads = torch.get_num_threads()
        if mode == "sample":  # small windows: waking torch's thread pool for each costs more than the sums
            torch.set_num_threads(1)
        try:
            self._derivation(mode, sample_elements)
        finally:
            torch.set_num_threads(threads)
            self.readers = saved
            for r in own.values():
                r.close()

    def _derivation(self, mode: str, sample_elements: int) -> None:
        import torch

        base = self.readers["base"]
        n = len(self.experts)
        names = []
        for name in sorted(base.infos, key=natural_key):
            infos = [self.readers[k].infos.get(name) for k in self.keys]
            if any(i is None or i.dtype not in FLOAT_DTYPES or 0 in i.shape for i in infos):
                continue
            shapes = [i.shape for i in infos]
            if all(s == shapes[0] for s in shapes) or (
                    is_vocab_tensor(name) and all(len(s) == 2 and s[1:] == shapes[0][1:] for s in shapes)):
                names.append(name)
        keys = ["base", *self.experts]
        d2 = [0.0] * n
        b2 = 0.0
        gram = torch.zeros((n, n), dtype=torch.float64)
        per_tensor: list[list[tuple[float, str]]] = [[] for _ in range(n)]
        read = total = 0
        for name in names:
            rows = min(self.readers[k].infos[name].shape[0] if self.readers[k].infos[name].shape else 1
                       for k in self.keys)
            shape = base.infos[name].shape
            cols = 1
            for s in shape[1:]:
                cols *= s
            windows = _windows(rows, cols, mode, sample_elements) if len(shape) >= 1 else [None]
            sizes = [(b - a) * cols for a, b in windows] if windows != [None] else [1]
            got = sum(sizes)
            weight = rows * cols / got  # a sampled tensor stands for all its elements
            # every window of every input in one float64 buffer: a few operations per tensor (per-window
            # ones cost more than the arithmetic: benchmarks/README.md, "Run 4: the pre-merge check's cost")
            t_d2, t_b2 = [0.0] * n, 0.0
            for chunk in _batches(windows, sizes, FULL_BLOCK_ELEMENTS):
                buf = torch.empty((n + 1, sum(m for _, m in chunk)), dtype=torch.float64)
                for k, key in enumerate(keys):
                    off = 0
                    for w, m in chunk:
                        buf[k, off:off + m].copy_(self.readers[key].read(name, rows=w).reshape(-1))
                        off += m
                b = buf[0]
                dl = buf[1:].sub_(b)
                sq = (dl * dl).sum(1).tolist()
                sb = float((b * b).sum())
                # NaN/Inf in an input makes its sums NaN/Inf (squares of bf16/float32 values cannot
                # overflow float64): only then look for the culprit, base first
                if not all(map(math.isfinite, [*sq, sb])):
                    for key in keys:
                        if any(not bool(torch.isfinite(self.readers[key].read(name, rows=w)).all()) for w, _ in chunk):
                            self._not_finite(name, key)
                            return
                gram.add_(dl @ dl.T, alpha=weight)
                for i in range(n):
                    t_d2[i] += sq[i]
                t_b2 += sb
            for i in range(n):
                d2[i] += weight * t_d2[i]
                if t_b2 > 0:
                    per_tensor[i].append((math.sqrt(t_d2[i] / t_b2), name))
            b2 += weight * t_b2
            read += got
            total += rows * cols
        if not names or b2 <= 0:
            self.add("info", "derivation", "--base", "no tensor to compare with the base")
            return
        rel = {e: math.sqrt(d2[i] / b2) for i, e in enumerate(self.experts)}
        cos = {}
        for i, a in enumerate(self.experts):
            cos[a] = {}
            for j, c in enumerate(self.experts):
                den = math.sqrt(float(gram[i, i]) * float(gram[j, j]))
                cos[a][c] = float(gram[i, j]) / den if den > 0 else None
        top = {e: sorted(per_tensor[i], reverse=True)[:5] for i, e in enumerate(self.experts)}
        sampled = read < total
        how = (f"sampled: {read} of {total} elements ({100 * read / total:.2g} %), up to {sample_elements} per tensor "
               f"in {SAMPLE_WINDOWS} row windows, each tensor weighted by its size" if sampled
               else "every element")
        self.report.derivation = {
            "mode": "sample" if sampled else "full", "how": how, "tensors": len(names), "elements_read": read,
            "elements": total, "rel_norm": rel, "cosine": cos,
            "largest": {e: [{"tensor": t, "rel_norm": r} for r, t in top[e]] for e in self.experts}}
        for i, e in enumerate(self.experts):
            lab = self.label(e)
            worst = top[e][0] if top[e] else (0.0, names[0])
            r = rel[e]
            others = sorted(rel[o] for o in self.experts if o != e and rel[o] >= self.t.rel_norm_min)  # (not empty)
            median = others[len(others) // 2] if len(others) % 2 else (
                (others[len(others) // 2 - 1] + others[len(others) // 2]) / 2 if others else None)
            culprit = f"tensor {worst[1]!r}"
            text = (f"{lab}: relative task-vector norm ||θ_e − θ_b|| / ||θ_b|| = {r:.3g} ({how}); largest in tensor "
                    f"{worst[1]!r} ({worst[0]:.3g})")
            if r < self.t.rel_norm_min:
                self.add("warning", "derivation", f"expert {e!r}",
                         f"{lab} equals the base (relative task-vector norm {r:.3g} < {self.t.rel_norm_min:g}, {how}): "
                         f"an empty task vector")
            elif r > self.t.rel_norm_max:
                self.add("warning", "derivation", culprit,
                         f"{text}: above {self.t.rel_norm_max:g} (fine-tunes are typically below 0.1): it may not "
                         f"derive from the base")
            elif median and r > self.t.rel_norm_ratio * median and r > self.t.rel_norm_floor:
                self.add("warning", "derivation", culprit,
                         f"{text}: {r / median:.3g} times the other experts' median ({median:.3g}), above "
                         f"{self.t.rel_norm_ratio:g}x: it may not derive from the same base")
            else:
                self.add("info", "derivation", culprit, text)
            for j in range(i + 1, n):
                c = cos[e][self.experts[j]]
                if c is not None and c > self.t.cos_max:
                    self.add("warning", "derivation", f"expert {self.experts[j]!r}",
                             f"{lab} and {self.label(self.experts[j])} have almost the same task vector (cosine "
                             f"{c:.4f} > {self.t.cos_max:g}, {how}): the same model given twice?")

    def _not_finite(self, name: str, key: str) -> None:
        r = self.readers[key]
        self.add(self.sev(key), "derivation", f"tensor {name!r}",
                 f"tensor {name!r} of {r.label} ({r.path}) contains NaN or Inf")

    # -- resources --------------------------------------------------------------------------
    def check_resources(self) -> None:
        est = self.estimate()
        self.report.resources = est
        how = est["how"]
        if self.s.out is not None:
            target = Path(os.path.abspath(self.s.out)).parent
            while not target.exists():
                target = target.parent
            free = shutil.disk_usage(target).free
            est["disk_free_bytes"] = free
            if est["disk_bytes"] > free:
                self.add("error", "resources", "--out",
                         f"--out {self.s.out}: no space left for the merge output: it needs {_gib(est['disk_bytes'])}, "
                         f"{target} has {_gib(free)} free")
            else:
                self.add("info", "resources", "--out",
                         f"--out {self.s.out}: the output needs {_gib(est['disk_bytes'])} of {_gib(free)} free")
        else:
            self.add("info", "resources", "--out", f"the output needs {_gib(est['disk_bytes'])} of disk (no --out: "
                                                   f"free space not checked)")
        host = available_host_memory()
        est["host_available_bytes"] = host
        worst = est["largest_block"]
        self._memory("host", est["host_bytes"], host, worst, f"{how}; largest block in tensor {worst!r}", "available")
        if est.get("gpu_bytes") is not None:
            gpu = available_gpu_memory(self.s.device)
            est["gpu_available_bytes"] = gpu
            self._memory("GPU", est["gpu_bytes"], gpu, worst, f"largest tensor {worst!r}", f"free on {self.s.device}")

    def _memory(self, kind: str, need: int, have: int | None, tensor: str, why: str, where: str) -> None:
        """A warning where `need` bytes of `kind` memory exceed what is `have` (None: unknown), else a note."""
        if have is not None and need > have:
            self.add("warning", "resources", f"tensor {tensor!r}",
                     f"the merge may need {_gib(need)} of {kind} memory ({why}), {_gib(have)} {where}")
        else:
            self.add("info", "resources", f"tensor {tensor!r}", f"{kind} memory: about {_gib(need)} needed ({why})"
                     + (f", {_gib(have)} {where}" if have is not None else ""))

    def estimate(self) -> dict:
        """Disk, host and GPU memory of the merge, from tensor sizes and the engine's plan."""
        from mergeflow.merging.engine import DEFAULT_CHUNK_ELEMENTS, MAX_ELEMENTS, SLAB_BYTES, thread_counts

        cuda = self.s.device_type == "cuda"
        chunk = self.s.chunk_elements or (MAX_ELEMENTS if cuda else DEFAULT_CHUNK_ELEMENTS)
        ahead = self.s.read_ahead_bytes or ((4 << 30) if cuda else (256 << 20))
        io, write = thread_counts(self.s.device_type)
        io, write = self.s.io_threads or io, self.s.write_threads or write
        whole = True if self.s.tensor_wide is None else self.s.tensor_wide
        return estimate_resources(self._plan_rows(), len(self.experts), self.base_used, cuda, chunk, ahead, whole,
                                  io, write, SLAB_BYTES)

    def _plan_rows(self) -> list[tuple[str, int, int, int, bool]]:
        """(name, output elements, bytes per element of the inputs read, output itemsize,
        vocab-resized) per tensor of the reference."""
        ref = self.readers[self.ref]
        planned = {name: (shape, dtype) for name, shape, dtype in self.s.plan or ()}
        out = []
        for name in sorted(ref.infos, key=natural_key):
            infos = [self.readers[k].infos.get(name) for k in self.used]
            if any(i is None or i.dtype not in ITEMSIZE for i in infos):
                continue
            shapes = {i.shape for i in infos}
            if name in planned:  # the engine's plan: the exact output
                numel = math.prod(planned[name][0])
                out_item = ITEMSIZE[planned[name][1]]
            else:
                numel = max(i.numel for i in infos)
                out_item = ITEMSIZE.get(self.s.out_dtype or ref.infos[name].dtype, 4)
            in_bytes = sum(ITEMSIZE[i.dtype] for i in infos)
            out.append((name, numel, in_bytes, out_item, len(shapes) > 1))
        return out


def estimate_resources(tensors: list[tuple[str, int, int, int, bool]], n_experts: int, base_used: bool, cuda: bool,
                       chunk: int, read_ahead: int, tensor_wide: bool, io_threads: int, write_threads: int,
                       slab_bytes: int) -> dict:
    """Disk, host and GPU bytes of a merge whose tensors are (name, elements, input bytes per
    element summed over the inputs read, output itemsize, vocab-resized).

    A block (a whole tensor, or on the CPU rows of about `chunk` elements for a row-local
    method) holds per element: the raw inputs, the float32 stack of the task vectors and the
    float32 base, the output, and about one float32 temporary per expert for the method's
    masks and ranks. On top: the engine's read-ahead (raw input bytes, bounded by
    `read_ahead`; GPU memory on CUDA), the blocks queued for the writers (CPU), the pinned
    slabs (CUDA) and the process itself (PROCESS_BYTES; CUDA_PROCESS_BYTES on CUDA)."""
    if not tensors:
        return {"disk_bytes": 0, "host_bytes": PROCESS_BYTES, "gpu_bytes": None, "largest_block": None,
                "how": "no tensors"}
    disk = sum(numel * out for _, numel, _, out, _ in tensors)
    raw_total = sum(numel * inb for _, numel, inb, _, _ in tensors)

    def block(numel: int, fit: bool) -> int:
        whole = cuda or tensor_wide or fit or numel <= chunk
        return numel if whole else chunk

    per_elem = {name: inb + 4 * (n_experts + int(base_used)) + out + 4 * n_experts for name, _, inb, out, _ in tensors}
    name, numel, inb, out, fit = max(tensors, key=lambda t: block(t[1], t[4]) * per_elem[t[0]])
    e = block(numel, fit)
    working = e * per_elem[name]
    ahead = max(min(read_ahead, raw_total), e * inb)
    if cuda:
        host = CUDA_PROCESS_BYTES + (2 * io_threads + 2 * write_threads) * slab_bytes
        gpu = CUDA_CONTEXT_BYTES + working + ahead
        how = (f"whole tensors on the GPU: the largest ({name!r}, {numel} elements) x {per_elem[name]} bytes per "
               f"element, plus up to {_gib(ahead)} read ahead, the CUDA context and pinned staging slabs")
    else:
        queued = min(4 * io_threads, len(tensors)) * e * out
        host = PROCESS_BYTES + working + ahead + queued
        gpu = None
        how = (f"an estimate: blocks of {e} elements ({'whole tensors' if e == numel else 'row blocks'}) x "
               f"{per_elem[name]} bytes per element, plus up to {_gib(ahead)} read ahead and "
               f"{_gib(PROCESS_BYTES)} for the process")
    return {"disk_bytes": disk, "host_bytes": host, "gpu_bytes": gpu, "largest_block": name,
            "largest_block_elements": e, "bytes_per_element": per_elem[name], "read_ahead_bytes": ahead, "how": how}


def _batches(windows: list, sizes: list[int], limit: int):
    """Consecutive (window, elements) groups of at most `limit` elements (one window at least)."""
    group: list = []
    total = 0
    for w, m in zip(windows, sizes):
        if group and total + m > limit:
            yield group
            group, total = [], 0
        group.append((w, m))
        total += m
    if group:
        yield group


def _windows(rows: int, cols: int, mode: str, sample_elements: int) -> list[tuple[int, int]]:
    """Row ranges to read: every row in blocks (full), or up to `sample_elements` elements in
    SAMPLE_WINDOWS evenly spaced windows (sample; deterministic, no draws)."""
    if mode == "full" or rows * cols <= sample_elements:
        step = max(1, FULL_BLOCK_ELEMENTS // max(1, cols))
        return [(a, min(rows, a + step)) for a in range(0, rows, step)]
    k = max(1, sample_elements // max(1, cols))  # rows in the sample
    w = min(SAMPLE_WINDOWS, k)
    size = max(1, k // w)
    starts = sorted({round(i * (rows - size) / max(1, w - 1)) for i in range(w)})
    return [(a, a + size) for a in starts]


def available_host_memory() -> int | None:
    """MemAvailable, or less under a cgroup (v2 or v1) memory limit."""
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    for limit_f, usage_f in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                             ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                              "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = Path(limit_f).read_text().strip()
            if limit != "max" and int(limit) < (1 << 60):
                left = int(limit) - int(Path(usage_f).read_text().strip())
                avail = left if avail is None else min(avail, left)
            break
        except (OSError, ValueError):
            continue
    return avail


def available_gpu_memory(device) -> int | None:
    try:
        import torch

        return int(torch.cuda.mem_get_info(device)[0])
    except Exception:  # no CUDA, no driver: nothing to compare with
        return None


# ---------------------------------------------------------------------------------------
# entry points: the engine's start, and the CLI
# ---------------------------------------------------------------------------------------


def for_engine(engine, background: bool = False) -> PendingCheck:
    """The check of a merge about to run (after its plan). An error is raised as a one-line
    MergeflowError before anything is written; warnings are logged once the check is done.

    `background`: only the checks that read no weights run now; the weight statistics run in a
    thread beside the merge (a GPU merge: they would otherwise cost it about 0.5 s,
    benchmarks/README.md), and `PendingCheck.wait()` must succeed before the output is committed.
    """
    s = Settings(method=engine.method.name, uses_base=engine.method.uses_base, tensor_wide=engine.method.tensor_wide,
                 device_type=engine.device.type, device=engine.device, chunk_elements=engine.chunk_elements,
                 read_ahead_bytes=engine.read_ahead_bytes, io_threads=engine.io_threads,
                 write_threads=engine.write_threads, out_dtype=engine.params.get("dtype"),
                 donor=engine.params.get("donor") if engine.params.get("donor") in engine.readers else None,
                 out=str(engine.out), plan=engine.plan)  # (an unknown donor: the engine's own error, later)
    checker = Checker(engine.readers, engine.expert_names, s, engine.vocab_policy)
    report = checker.run("sample", defer_stats=background)
    if report.errors:  # (alone: the CLI's error is one line)
        raise MergeflowError(report.error_line("pre-merge check: "))
    return PendingCheck(checker, background)


class PendingCheck:
    """A merge's pre-merge check, maybe still computing its weight statistics in a thread."""

    def __init__(self, checker: Checker, background: bool):
        self.report = checker.report
        self.seconds = 0.0  # the background part's own time
        self._error: BaseException | None = None
        self._thread = None
        if background:
            self._thread = threading.Thread(target=self._stats, args=(checker,), name="mergeflow-check", daemon=True)
            self._thread.start()
        else:
            self._conclude()

    def _stats(self, checker: Checker) -> None:
        t = time.time()
        try:
            checker.run_stats("sample")
        except BaseException as err:  # (raised again by wait(), in the merge's thread)
            self._error = err
        self.seconds = time.time() - t

    def _conclude(self) -> None:
        if self.report.errors:
            raise MergeflowError(self.report.error_line("pre-merge check: "))
        for f in self.report.warnings:
            log.warning("pre-merge check: %s", f.line())

    def wait(self) -> Report:
        """The whole report; its error, if any, as the one-line MergeflowError."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            if self._error is not None:
                raise self._error
            self._conclude()
        return self.report

    def error(self) -> BaseException | None:
        """After a failed merge: wait, and return the check's own error (it names the input), if any."""
        try:
            self.wait()
        except BaseException as err:
            return err
        return None


def check_inputs(base: str | None, experts: dict[str, str], *, method: str | None = None, params: dict | None = None,
                 seed: int = 42, vocab_policy: str | None = None, device: str = "auto", out: str | None = None,
                 stats: str = "sample", sample_elements: int = SAMPLE_ELEMENTS,
                 thresholds: Thresholds | None = None) -> Report:
    """`mergeflow check`: the same check a merge runs, from paths (method optional)."""
    from mergeflow.merging import methods

    params = dict(params or {})
    uses_base, tensor_wide = True, None
    if method is not None:
        m = methods.build(method, params, list(experts), seed)
        uses_base, tensor_wide = m.uses_base, m.tensor_wide
        if uses_base and base is None:
            raise MergeflowError(f"merge method {method!r} needs a base model (--base)")
    device_type, dev = _device(device)
    donor = params.get("donor")
    if donor is not None and donor != "base" and donor not in experts:
        raise MergeflowError(f"param 'donor': {donor!r} is neither 'base' nor an expert ({', '.join(experts)})")
    s = Settings(method=method, uses_base=uses_base, tensor_wide=tensor_wide, device_type=device_type, device=dev,
                 out_dtype=params.get("dtype"), donor=donor, out=out)
    readers: dict[str, CheckpointReader] = {}
    try:
        if base is not None:
            readers["base"] = CheckpointReader(base, "base")
        for name, path in experts.items():
            readers[name] = CheckpointReader(path, f"expert {name!r}")
        report = Checker(readers, list(experts), s, vocab_policy, thresholds).run(stats, sample_elements)
    finally:
        for r in readers.values():
            r.close()
    report.resources.setdefault("method", method)
    return report


def _device(device: str):
    if device == "cpu":
        return "cpu", None
    if device not in ("auto", "cuda") and not str(device).startswith("cuda:"):
        raise MergeflowError(f"--device {device!r}: expected auto, cpu or cuda")
    import torch

    if torch.cuda.is_available():
        return "cuda", torch.device("cuda" if device == "auto" else device)
    if device != "auto":
        raise MergeflowError(f"--device {device!r} requested but CUDA is not available")
    return "cpu", None


THRESHOLD_HELP = {
    "rel_norm_max": "warn when an expert's ||θ_e − θ_b|| / ||θ_b|| exceeds this (default %(default)s; "
                    "fine-tunes are typically < 0.1, an expert of another base ~1 or more)",
    "rel_norm_ratio": "warn when it exceeds this many times the other experts' median (default %(default)s) ...",
    "rel_norm_floor": "... and also this (default %(default)s)",
    "rel_norm_min": "warn when it is below this: the expert equals the base (default %(default)s)",
    "cos_max": "warn when two experts' task vectors have a cosine above this (default %(default)s)",
}


def add_parser(subparsers) -> None:
    from mergeflow.merging.cli import _expert

    p = subparsers.add_parser(
        "check", help="pre-merge check of a base and experts (architecture, tensors, vocabulary, dtypes, tied "
                      "embeddings, derivation from the base, memory and disk)",
        description="Check merge inputs from their headers, configs and tokenizer files (and a sample of rows for "
                    "the derives-from-base statistics); every merge runs the same check. Exit status 2 on an error "
                    "(with --strict also on a warning). See docs/merging.md.")
    p.add_argument("--base", help="base (pre-trained) model directory")
    p.add_argument("--expert", action="extend", nargs="+", type=_expert, required=True, metavar="NAME=DIR",
                   help="expert models, as for `mergeflow merge`")
    p.add_argument("--method", default=None, help="the merge method (whether the base is read; memory estimate); "
                                                  "default: whole tensors and the base read")
    p.add_argument("--params", default="{}", help="method params as for `mergeflow merge` (engine keys dtype, donor)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--vocab-policy", choices=VOCAB_POLICIES, default=None,
                   help="the policy the merge would use (each policy's outcome is reported either way)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (GPU memory is checked on CUDA)")
    p.add_argument("--out", default=None, help="the merge's output directory: its filesystem's free space is checked")
    p.add_argument("--stats", choices=("sample", "full", "off"), default="sample",
                   help="derives-from-base statistics: a sample of rows of every tensor (default), every element "
                        "(streamed in blocks), or none")
    p.add_argument("--sample-elements", type=int, default=SAMPLE_ELEMENTS,
                   help="elements read per tensor and input with --stats sample (default %(default)s)")
    defaults = Thresholds()
    for f in fields(Thresholds):
        p.add_argument(f"--{f.name.replace('_', '-')}", type=float, default=getattr(defaults, f.name),
                       help=THRESHOLD_HELP[f.name])
    p.add_argument("--json", metavar="FILE", default=None, help="also write the report as JSON")
    p.add_argument("--strict", action="store_true", help="exit 2 on a warning too")
    p.set_defaults(func=run)


def run(args) -> int:
    from mergeflow.merging.cli import _params

    experts: dict[str, str] = {}
    for name, path in args.expert:
        if name in experts or name == "base":
            raise MergeflowError(f"--expert {name}={path}: the name {name!r} is "
                                 + ("reserved" if name == "base" else "given twice"))
        experts[name] = path
    if args.sample_elements < 1:
        raise MergeflowError(f"--sample-elements {args.sample_elements}: expected at least 1")
    thresholds = Thresholds(**{f.name: getattr(args, f.name) for f in fields(Thresholds)})
    report = check_inputs(args.base, experts, method=args.method, params=_params(args.params), seed=args.seed,
                          vocab_policy=args.vocab_policy, device=args.device, out=args.out, stats=args.stats,
                          sample_elements=args.sample_elements, thresholds=thresholds)
    for line in report.lines():
        print(line)
    if args.json:
        from mergeflow.atomic import write_text

        write_text(args.json, json.dumps(report.to_dict(), indent=2, default=str) + "\n")
    if report.errors or (args.strict and report.warnings):
        raise MergeflowError(report.error_line())
    return 0
