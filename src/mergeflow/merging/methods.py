"""Merge methods: a registry of one small function per method, composing `steps`.

A method is a function `(block, p) -> merged block` registered with `@merge_method`, which
also declares its typed params (`Param`: name, default, range or choices, the names other
tools use for it) and what the engine needs to know: whether it reads the base, how much of
a tensor one call must see (`element` or `row`: any block of rows; `tensor`: the whole
tensor), whether it draws random numbers, and whether it needs model-wide statistics
(the model-scope TIES trim). The params block of the config schema and the CLI's help are
generated from the same specs (`merge_params_schema`, `help_text`). docs/merging.md
documents every method, its params and mergekit / reference-code equivalents.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from mergeflow.errors import MergeflowError
from mergeflow.merging import rng, steps
from mergeflow.merging.steps import Block  # noqa: F401  (methods.Block: what a method gets)

log = logging.getLogger(__name__)

REQUIRED = object()
ENGINE_PARAMS = ("dtype", "donor")  # read by the engine, not by a method
OUTPUT_DTYPES = ("float32", "float16", "bfloat16", "float64")  # the engine param dtype
GRANULARITIES = ("element", "row", "tensor")
# Names people bring from other tools (MergeLM, M3's and DELLA's scripts, mergekit) that no
# method takes, with what to use instead.
HINTS = {
    "normalize": "normalisation is fixed by the method (see docs/merging.md)",
    "weight_mask_rate": "MergeLM's DARE drop rate: use 'drop_rate'",
    "mask_apply_method": "MergeLM's combiner after DARE: use 'combine' (average, task_arithmetic or ties)",
    "param_value_mask_rate": "MergeLM's TIES trim: use 'mask_rate' (= 1 - density)",
    "use_mixup": "M3 is its own method: use method 'm3' (its 'combine' picks the combiner)",
    "lambda_factor": "DELLA's script's lambda_factor: use 'lambda'",
}


# ---------------------------------------------------------------------------------------
# params: one typed spec per name, checked with one-line errors naming the key
# ---------------------------------------------------------------------------------------


class ParamError(MergeflowError):
    """A bad merge param: `key` names it ('density', 'weights[1]', 'dare.drop_rate', or
    'experts' for the expert list), `detail` says what is wrong."""

    def __init__(self, method: str, key: str, detail: str):
        super().__init__(f"merge method {method!r}: param {key!r}: {detail}")
        self.key, self.detail = key, detail


@dataclass(frozen=True)
class Param:
    """One method param. `kind`: number | choice | rescale (inverse | l1 | none, or a
    boolean) | weights (one number, a list in expert order or {expert: weight}) | dare
    ({drop_rate, rescale}). `hints`: other tools' names for it -> advice."""

    name: str
    kind: str = "number"
    default: Any = REQUIRED
    lo: float = -math.inf
    hi: float = math.inf
    lo_open: bool = False
    hi_open: bool = False
    choices: tuple = ()
    help: str = ""
    hints: dict = field(default_factory=dict)

    def schema(self) -> dict:
        """This param's JSON schema (the config's merge_params block)."""
        if self.kind == "number":
            # closed bounds: an open end is left to `check`, whose error is one line naming the key
            s: dict = {"type": "number"}
            if self.lo > -math.inf:
                s["minimum"] = self.lo
            if self.hi < math.inf:
                s["maximum"] = self.hi
            return s
        if self.kind == "choice":
            return {"enum": list(self.choices)}
        if self.kind == "rescale":
            return {"oneOf": [{"type": "boolean"}, {"enum": list(RESCALES)}]}
        if self.kind in ("weights", "mixture"):
            return {"oneOf": [{"type": "number"}, {"type": "array", "items": {"type": "number"}},
                              {"type": "object", "additionalProperties": {"type": "number"}}]}
        if self.kind == "dare":
            return {"type": "object", "additionalProperties": False, "required": ["drop_rate"],
                    "properties": {p.name: p.schema() for p in DARE_PARAMS}}
        raise AssertionError(self.kind)

    def range_text(self) -> str:
        if self.kind == "number" and (self.lo > -math.inf or self.hi < math.inf):
            return f"{'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"
        if self.kind == "choice":
            return "|".join(map(str, self.choices))
        return {"rescale": "inverse|l1|none", "weights": "w | [w, ...] | {expert: w}",
                "mixture": "m (two experts: [m, 1 - m]) | [m, ...] | {expert: m}, summing to 1",
                "dare": "{drop_rate, rescale}"}.get(self.kind, "")

    def check(self, method: str, v, experts: list[str], key: str | None = None):
        """The value in canonical form, or a ParamError naming `key` (default: the name)."""
        key = key or self.name
        if self.kind == "number":
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ParamError(method, key, f"expected a finite number, got {v!r}")
            v = float(v)
            if v < self.lo or v > self.hi or (self.lo_open and v == self.lo) or (self.hi_open and v == self.hi):
                raise ParamError(method, key, f"{v} is outside {self.range_text()}")
            return v
        if self.kind == "choice":
            if v not in self.choices:
                raise ParamError(method, key, f"{v!r} is not one of {', '.join(map(str, self.choices))}")
            return v
        if self.kind == "rescale":
            if v is True:
                return "inverse"
            if v is False or v is None:
                return "none"
            return replace(self, kind="choice", choices=RESCALES).check(method, v, experts, key)
        if self.kind == "weights":
            return _weights(method, key, v, experts)
        if self.kind == "mixture":
            return _mixture(method, key, v, experts)
        if self.kind == "dare":
            if not isinstance(v, dict):
                raise ParamError(method, key, f"expected {{drop_rate: P, rescale: inverse|l1|none}}, got {v!r}")
            return _resolve(method, v, DARE_PARAMS, experts, prefix=f"{key}.")
        raise AssertionError(self.kind)


def _weights(method, key, v, experts: list[str]) -> list[float]:
    num = Param(key)
    if v is None:
        return [1.0] * len(experts)
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return [num.check(method, v, experts)] * len(experts)
    if isinstance(v, list):
        if len(v) != len(experts):
            raise ParamError(method, key, f"{len(v)} weights for {len(experts)} experts ({', '.join(experts)})")
        return [num.check(method, x, experts, f"{key}[{i}]") for i, x in enumerate(v)]
    if isinstance(v, dict):
        unknown = [k for k in v if k not in experts]
        if unknown:
            raise ParamError(method, key, f"no expert named {unknown[0]!r} (experts: {', '.join(experts)})")
        return [num.check(method, v.get(e, 1.0), experts, f"{key}.{e}") for e in experts]
    raise ParamError(method, key, f"expected a number, a list or {{expert: weight}}, got {v!r}")


def _mixture(method, key, v, experts: list[str]) -> list[float]:
    """Mixing ratios over the experts: a list (or {expert: m}) in [0, 1] summing to 1; one
    number m for two experts means [m, 1 - m] (M3's lambda_m)."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        if len(experts) != 2:
            raise ParamError(method, key, f"one number is a ratio for two experts; give {len(experts)} "
                                          f"(a list in expert order or {{expert: m}})")
        m = Param(key, lo=0.0, hi=1.0).check(method, v, experts)
        return [m, 1.0 - m]
    if isinstance(v, dict) and sorted(v) != sorted(experts) and all(k in experts for k in v):
        raise ParamError(method, key, f"no ratio for expert {next(e for e in experts if e not in v)!r}")
    out = _weights(method, key, v, experts)
    for i, m in enumerate(out):
        if not 0.0 <= m <= 1.0:
            raise ParamError(method, f"{key}[{i}]", f"{m} is outside [0, 1]")
    if abs(sum(out) - 1.0) > 1e-6:
        raise ParamError(method, key, f"the ratios sum to {sum(out):.9g}, not 1")
    return out


def _resolve(method: str, given: dict, spec: tuple[Param, ...], experts: list[str], hints: dict | None = None,
             prefix: str = "") -> dict:
    """`given` checked against `spec`: unknown keys (with a hint where another tool's name
    is known), missing required ones and bad values fail naming the key."""
    names = {p.name: p for p in spec}
    for key in given:
        if key not in names:
            hint = {**HINTS, **{h: a for p in spec for h, a in p.hints.items()}, **(hints or {})}.get(key)
            raise ParamError(method, prefix + key, "unknown parameter" + (
                f" ({hint})" if hint else f"; accepted: {', '.join(sorted(names))}"))
    out = {}
    for p in spec:
        v = given.get(p.name, p.default)
        if v is REQUIRED:
            raise ParamError(method, prefix + p.name, "is required")
        # None where the default is None means "not given"; defaults get the canonical form too
        out[p.name] = None if v is None and p.default is None and p.kind != "weights" else \
            p.check(method, v, experts, prefix + p.name)
    return out


RESCALES = ("inverse", "l1", "none")
COMBINES = ("average", "task_arithmetic", "ties")
TRIM_SCOPES = ("tensor", "row", "model")

LAMBDA = Param("lambda", default=1.0, help="scale of the fused task vector",
               hints={"scaling_coefficient": "use 'lambda'", "scaling_factor": "use 'lambda'"})
WEIGHTS = Param("weights", "weights", default=None, help="per-expert weights (default 1 each)",
                hints={"weight": "use 'weights' (a list in expert order or {expert: weight})"})
_DENSITY_HINT = {"param_value_mask_rate": "use 'mask_rate' (or density = 1 - mask_rate)"}
DENSITY = Param("density", default=None, lo=0.0, hi=1.0, lo_open=True,
                help="TIES trim: fraction of each expert's deltas kept by magnitude", hints=_DENSITY_HINT)
MASK_RATE = Param("mask_rate", default=None, lo=0.0, hi=1.0, hi_open=True,
                  help="TIES trim as MergeLM names it: 1 - density", hints=_DENSITY_HINT)
TRIM_SCOPE = Param("trim_scope", "choice", default="tensor", choices=TRIM_SCOPES,
                   help="what the TIES trim ranks over: each tensor, each row, or the whole model (MergeLM)")
DROP_RATE = Param("drop_rate", default=REQUIRED, lo=0.0, hi=1.0, hi_open=True,
                  help="probability p of dropping a delta (DARE, DELLA's mean drop rate)")
RESCALE = Param("rescale", "rescale", default="inverse",
                help="survivors: inverse = divide by the keep probability, l1 = restore the L1 norm, none")
DARE_PARAMS = (DROP_RATE, RESCALE)
COMBINE = Param("combine", "choice", default="task_arithmetic", choices=COMBINES,
                help="how the (sparsified) deltas are fused: weighted mean, sum, or TIES election")
WINDOW = Param("window_size", default=0.14, lo=0.0, hi=2.0,
               help="DELLA: keep probabilities span (1 - p) +/- window_size / 2 by magnitude rank",
               hints={"epsilon": "mergeflow takes window_size = 2 x upstream mergekit's epsilon"})
ALPHA = Param("alpha", default=0.5, help="M3: Dirichlet / Beta concentration of the mixing weights")
DARE = Param("dare", "dare", default=None, help="M3: DARE before mixing, {drop_rate, rescale}")
LAMBDA_M = Param("lambda_m", "mixture", default=None,
                 help="M3: the mixing ratios themselves (e.g. a logged merge's lambda_m) instead of a seeded draw")
T = Param("t", default=REQUIRED, lo=0.0, hi=1.0, help="SLERP: 0 = the first expert, 1 = the second")
TALL_LAMBDA = Param("tall_mask_lambda", "weights", default=REQUIRED,
                    help="Consensus: TALL mask m_t = |delta_t| > lambda_t |tau_MTL - delta_t| (one or per expert)")
K = Param("k", default=2.0, lo=0.0, help="Consensus: keep weights in at least k experts' TALL masks",
          hints={"prun_thre_k": "use 'k'"})
GAMMA = Param("gamma", default=0.01, lo=0.0, hi=1.0,
              help="Breadcrumbs: fraction of each tensor's largest |delta| dropped as outliers")
SELECT_TOPK = Param("select_topk", default=1.0, lo=0.0, hi=1.0, lo_open=True,
                    help="SCE: fraction of each tensor's elements kept, those of largest variance across experts")


# ---------------------------------------------------------------------------------------
# the registry
# ---------------------------------------------------------------------------------------


def _const(value):
    return value if callable(value) else (lambda p: value)


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: its function, params and what it asks of the engine. The
    `uses_base`, `granularity`, `random`, `model_stats`, `tensor_topk` and `elects` entries
    are values or functions of the resolved params."""

    name: str
    fn: Callable
    params: tuple[Param, ...]
    uses_base: Callable[[dict], bool]
    granularity: Callable[[dict], str]
    random: Callable[[dict], bool]
    model_stats: Callable[[dict], bool]  # model-wide trim thresholds (and majority sign) first
    tensor_topk: Callable[[dict], bool]  # exact top-k of each tensor's `pretrim` deltas (TIES trim)
    check: Callable[[str, dict, list, int], dict] | None  # cross-param rules, derived values
    pretrim: Callable | None  # (block, p) -> the deltas a model- or tensor-scope trim ranks
    elects: Callable[[dict], bool]  # sign election (a model-scope trim then needs the majority sign)
    summary: str
    hints: dict


REGISTRY: dict[str, MethodSpec] = {}


def merge_method(name: str, params: tuple[Param, ...] = (), *, uses_base=True, granularity="element",
                 random=False, model_stats=False, tensor_topk=False, check=None, pretrim=None, elects=False,
                 hints: dict | None = None):
    """Register `fn(block, p) -> merged block` as method `name` (see the module docstring)."""

    def deco(fn):
        if name in REGISTRY:
            raise AssertionError(f"merge method {name!r} registered twice")
        REGISTRY[name] = MethodSpec(name, fn, tuple(params), _const(uses_base), _const(granularity),
                                    _const(random), _const(model_stats), _const(tensor_topk), check, pretrim,
                                    _const(elects),
                                    " ".join((fn.__doc__ or "").strip().split("\n\n")[0].split()),
                                    dict(hints or {}))
        return fn

    return deco


def with_defaults(params: tuple[Param, ...], **defaults) -> tuple[Param, ...]:
    """The same params with other defaults (DELLA's lambda 1.1, drop rate 0.3, ...)."""
    return tuple(replace(p, default=defaults[p.name]) if p.name in defaults else p for p in params)


# ---------------------------------------------------------------------------------------
# building blocks the methods share (each a named composition of steps)
# ---------------------------------------------------------------------------------------


def _dare(b: Block, d, drop_rate: float, rescale: str):
    for t in range(d.shape[0]):
        steps.bernoulli_drop_(d[t], drop_rate, rescale, b.key(t, "dare"), b.offset)
    return d


def _magprune(b: Block, d, p: dict, scope: str = "row", score: str = "rank"):
    for t in range(d.shape[0]):
        steps.magprune_(d[t], p["drop_rate"], p["window_size"], p["rescale"], b.key(t, "magprune"), b.offset,
                        scope, score, b.tables, rank_key=b.key(t, "rank") if score == "random" else None)
    return d


def _trim(b: Block, d, p: dict):
    """The TIES magnitude trim at p's density and scope (model: the engine's thresholds;
    tensor, for a tensor merged in blocks: the engine's per-tensor thresholds)."""
    if p["density"] < 1:
        if p["trim_scope"] == "model":
            steps.threshold_trim_(d, b.thresholds)
        elif b.topk is not None:
            steps.streamed_topk_trim_(d, b.topk)
        else:
            steps.magnitude_trim_(d, p["density"], p["trim_scope"])
    return d


def _disjoint(b: Block, d, p: dict, mixup=None):
    return steps.scale_add(b.base, steps.disjoint_fuse_(d, p["weights"], fuse_weights=mixup,
                                                        zero_sign=b.zero_sign), p["lambda"])


def _mean(b: Block, d, p: dict):
    return steps.scale_add(b.base, steps.weighted_mean(d, p["weights"]), p["lambda"])


def _sum(b: Block, d, p: dict, weights=None):
    return steps.scale_add(b.base, steps.weighted_sum(d, weights or p["weights"]), p["lambda"])


def _density(method: str, p: dict, experts, seed, default=REQUIRED) -> dict:
    """TIES keep fraction from `density` or `mask_rate` (= 1 - density), not both."""
    if p["mask_rate"] is not None:
        if p["density"] is not None:
            raise ParamError(method, "mask_rate", "give either density or mask_rate (= 1 - density), not both")
        p["density"] = 1.0 - p["mask_rate"]
    elif p["density"] is None:
        if default is REQUIRED:
            raise ParamError(method, "density", "is required (or mask_rate = 1 - density)")
        p["density"] = default
    del p["mask_rate"]
    return p


def _ties_only(method: str, p: dict) -> None:
    for key in ("density", "mask_rate"):
        if p[key] is not None:
            raise ParamError(method, key, "only applies with combine: ties")


def _trim_granularity(p: dict) -> str:
    """A row-scope trim ranks whole rows; tensor- and model-scope ones compare with
    thresholds the engine computed first (`tensor_topk`, `model_stats`)."""
    return "row" if p.get("density", 1) < 1 and p.get("trim_scope") == "row" else "element"


def _model_trim(p: dict) -> bool:
    return p.get("density", 1) < 1 and p.get("trim_scope") == "model"


def _tensor_trim(p: dict) -> bool:
    return p.get("density", 1) < 1 and p.get("trim_scope") == "tensor"


def _l1(granularity: str, rescale: str) -> str:
    """An L1 rescale needs the whole tensor's norm."""
    return "tensor" if rescale == "l1" else granularity


# ---------------------------------------------------------------------------------------
# the methods
# ---------------------------------------------------------------------------------------


def _nonzero_sum(m: str, p: dict, experts, seed) -> dict:
    if abs(sum(p["weights"])) < 1e-8:
        raise ParamError(m, "weights", "weights sum to zero")
    return p


@merge_method("average", (WEIGHTS,), uses_base=False, check=_nonzero_sum)
def average(b: Block, p: dict):
    """Weighted mean of the expert weights (no base): sum_t w_t theta_t / sum_t w_t."""
    return steps.weighted_mean(b.experts, p["weights"])


@merge_method("task_arithmetic", (LAMBDA, WEIGHTS))
def task_arithmetic(b: Block, p: dict):
    """Task Arithmetic: theta_b + lambda sum_t w_t delta_t."""
    return _sum(b, b.deltas(), p)


TIES_PARAMS = (LAMBDA, WEIGHTS, DENSITY, MASK_RATE, TRIM_SCOPE)


@merge_method("ties", TIES_PARAMS, granularity=_trim_granularity, model_stats=_model_trim,
              tensor_topk=_tensor_trim, elects=True, check=_density, pretrim=lambda b, p: b.deltas())
def ties(b: Block, p: dict):
    """TIES: magnitude trim to `density`, sign election, disjoint mean, times lambda."""
    return _disjoint(b, _trim(b, b.deltas(), p), p)


@merge_method("ties_noelect", TIES_PARAMS, granularity=_trim_granularity, model_stats=_model_trim,
              tensor_topk=_tensor_trim, check=_density, pretrim=lambda b, p: b.deltas())
def ties_noelect(b: Block, p: dict):
    """TIES without election (DELLA Table 4 "TIES"): trim, weighted mean of the trimmed deltas, lambda."""
    return _mean(b, _trim(b, b.deltas(), p), p)


def _dare_check(m: str, p: dict, experts, seed) -> dict:
    if p["combine"] == "ties":
        p = _density(m, p, experts, seed, default=1.0)
        if p["density"] == 1.0:  # a silent difference from the reference scripts otherwise
            log.info("%s with combine ties and density 1.0: TIES elects signs without a trim "
                     "(MergeLM always trims; M3's script uses mask rate 0.5)", m)
        return p
    _ties_only(m, p)
    del p["density"], p["mask_rate"], p["trim_scope"]
    return p


@merge_method("dare", (*DARE_PARAMS, COMBINE, LAMBDA, WEIGHTS, DENSITY, MASK_RATE, TRIM_SCOPE), random=True,
              granularity=lambda p: _l1(_trim_granularity(p) if p["combine"] == "ties" else "element",
                                        p["rescale"]),
              model_stats=_model_trim, tensor_topk=_tensor_trim, elects=lambda p: p["combine"] == "ties",
              check=_dare_check,
              pretrim=lambda b, p: _dare(b, b.deltas(), p["drop_rate"], p["rescale"]))
def dare(b: Block, p: dict):
    """DARE: drop each delta with probability p (rescale survivors), then combine them by
    weighted mean, sum (task arithmetic) or TIES (trim at `density`, elect, disjoint mean)."""
    d = _dare(b, b.deltas(), p["drop_rate"], p["rescale"])
    if p["combine"] == "ties":
        return _disjoint(b, _trim(b, d, p), p)
    return (_mean if p["combine"] == "average" else _sum)(b, d, p)


# DELLA and its paper's baselines and ablations (Tables 1, 4 and 6; docs/della.md).
def _window_check(m: str, p: dict, experts, seed) -> dict:
    lo, hi = (1 - p["drop_rate"]) - p["window_size"] / 2, (1 - p["drop_rate"]) + p["window_size"] / 2
    if lo <= 0 or hi > 1:
        raise ParamError(m, "window_size", f"keep probabilities (1 - drop_rate) +/- window_size/2 = "
                                           f"[{lo:.4g}, {hi:.4g}] must lie in (0, 1]")
    return p


_DELLA_HINTS = {"density": "DELLA-family methods take drop_rate (= 1 - density)"}
NODROP_PARAMS = with_defaults((LAMBDA, WEIGHTS), **{"lambda": 1.1})
DARE_DELLA_PARAMS = with_defaults((LAMBDA, WEIGHTS, DROP_RATE, RESCALE), **{"lambda": 1.1, "drop_rate": 0.3,
                                                                            "rescale": "inverse"})
DELLA_PARAMS = (*DARE_DELLA_PARAMS, WINDOW)


def _della(name: str, *, scope="row", score="rank", elect=True):
    """Register one MagPrune method (DELLA or an ablation)."""
    return merge_method(name, DELLA_PARAMS, random=True, elects=elect, hints=_DELLA_HINTS, check=_window_check,
                        granularity=lambda p: _l1("row" if scope == "row" else "tensor", p["rescale"]))


@_della("della")
def della(b: Block, p: dict):
    """DELLA: MagPrune (keep probability by magnitude rank within each row), elect, disjoint mean, lambda."""
    return _disjoint(b, _magprune(b, b.deltas(), p), p)


@_della("della_norank", score="magnitude")
def della_norank(b: Block, p: dict):
    """DELLA ablation: keep probability from min-max normalised magnitude instead of the rank."""
    return _disjoint(b, _magprune(b, b.deltas(), p, score="magnitude"), p)


@_della("della_layer", scope="tensor")
def della_layer(b: Block, p: dict):
    """DELLA ablation: ranks over the whole tensor instead of each row."""
    return _disjoint(b, _magprune(b, b.deltas(), p, scope="tensor"), p)


@_della("della_noelect", elect=False)
def della_noelect(b: Block, p: dict):
    """DELLA without election: MagPrune, weighted mean, lambda."""
    return _mean(b, _magprune(b, b.deltas(), p), p)


@_della("della_randrank", score="random")
def della_randrank(b: Block, p: dict):
    """DELLA Table 6: the keep schedule over a keyed random permutation of each row, not the magnitude rank."""
    return _disjoint(b, _magprune(b, b.deltas(), p, score="random"), p)


@_della("della_randrank_layer", scope="tensor", score="random")
def della_randrank_layer(b: Block, p: dict):
    """DELLA Table 6: random ranking over the whole tensor."""
    return _disjoint(b, _magprune(b, b.deltas(), p, scope="tensor", score="random"), p)


@merge_method("dare_della", DARE_DELLA_PARAMS, random=True, elects=True, hints=_DELLA_HINTS,
              granularity=lambda p: _l1("element", p["rescale"]))
def dare_della(b: Block, p: dict):
    """DELLA Table 4 "DARE + EF": DARE drop, elect, disjoint mean, lambda."""
    return _disjoint(b, _dare(b, b.deltas(), p["drop_rate"], p["rescale"]), p)


@merge_method("dare_noelect", DARE_DELLA_PARAMS, random=True, hints=_DELLA_HINTS,
              granularity=lambda p: _l1("element", p["rescale"]))
def dare_noelect(b: Block, p: dict):
    """DELLA Table 4 "DARE": DARE drop, weighted mean, lambda."""
    return _mean(b, _dare(b, b.deltas(), p["drop_rate"], p["rescale"]), p)


@merge_method("nodrop", NODROP_PARAMS, elects=True, hints=_DELLA_HINTS)
def nodrop(b: Block, p: dict):
    """DELLA Table 1 "TA" (DELLA at p = 0): elect, disjoint mean, lambda; nothing dropped."""
    return _disjoint(b, b.deltas(), p)


@merge_method("nodrop_noelect", NODROP_PARAMS, hints=_DELLA_HINTS)
def nodrop_noelect(b: Block, p: dict):
    """Weighted mean of the deltas times lambda (DELLA Table 4's plain baseline)."""
    return _mean(b, b.deltas(), p)


def _m3_check(m: str, p: dict, experts, seed) -> dict:
    if len(experts) < 2:
        raise ParamError(m, "experts", f"M3 mixes at least two experts, got {len(experts)}")
    if p["combine"] == "ties":
        _density(m, p, experts, seed)
    else:
        _ties_only(m, p)
        del p["density"], p["mask_rate"], p["trim_scope"]
        if p["combine"] == "average" and p["lambda"] != 1.0:
            raise ParamError(m, "lambda", "does not apply with combine: average")
    out = {k: p[k] for k in ("alpha", "combine", "lambda")}
    if p["lambda_m"] is not None:  # given: used as is and recorded; alpha then plays no part
        out["lambda_m"] = out["mixup_weights"] = p["lambda_m"]
    else:
        out["mixup_weights"] = rng.mixup_weights(seed, p["alpha"], len(experts))
    out.update((k, p[k]) for k in ("dare", "density", "trim_scope") if p.get(k) is not None)
    return out


def _m3_deltas(b: Block, p: dict):
    d = b.deltas()
    return _dare(b, d, p["dare"]["drop_rate"], p["dare"]["rescale"]) if "dare" in p else d


@merge_method("m3", (ALPHA, COMBINE, LAMBDA, DARE, DENSITY, MASK_RATE, TRIM_SCOPE, LAMBDA_M), check=_m3_check,
              uses_base=lambda p: p["combine"] != "average" or "dare" in p,
              random=lambda p: "dare" in p or "lambda_m" not in p,
              granularity=lambda p: _l1(_trim_granularity(p) if p["combine"] == "ties" else "element",
                                        p.get("dare", {}).get("rescale")),
              model_stats=_model_trim, tensor_topk=_tensor_trim, elects=lambda p: p["combine"] == "ties",
              pretrim=_m3_deltas)
def m3(b: Block, p: dict):
    """M3 (Mixup Model Merge): mixing weights m ~ Dir(alpha) (Beta for two experts) replace
    the experts' equal weights: sum_t m_t theta_t (average), theta_b + lambda sum_t m_t delta_t
    (task_arithmetic), or TIES with m mixing the agreeing deltas; DARE first if `dare` is given;
    `lambda_m` gives m instead of the draw."""
    m = p["mixup_weights"]
    if p["combine"] == "average" and "dare" not in p:  # no base needed: sum_t m_t theta_t
        return steps.weighted_sum(b.experts, m)
    d = _m3_deltas(b, p)
    if p["combine"] == "ties":
        return _disjoint(b, _trim(b, d, p), dict(p, weights=[1.0] * len(m)), mixup=m)
    return _sum(b, d, p, weights=m)


def _slerp_check(m: str, p: dict, experts, seed) -> dict:
    if len(experts) != 2:
        raise ParamError(m, "experts", f"SLERP interpolates exactly two experts, got {len(experts)}")
    return p


@merge_method("slerp", (T,), uses_base=False, granularity="tensor", check=_slerp_check)
def slerp(b: Block, p: dict):
    """SLERP between two experts, per tensor (t = 0: the first, 1: the second); linear where
    they are near parallel (|cos| > 0.9995), as mergekit."""
    return steps.slerp(b.experts[0], b.experts[1], p["t"])


# NuSLERP and Multi-SLERP, as mergekit 0.1.5's `nuslerp` and `multislerp`: per tensor.
INTERPOLATE = Param("interpolate", "choice", default="weights", choices=("weights", "task_vectors"),
                    help="NuSLERP / Multi-SLERP: the experts' weights (no base), or their task vectors, "
                         "added to the base (mergekit with a base_model)")
_NUSLERP_HINTS = {
    "t": "nuslerp takes 'weights' (t = w_2 / (w_1 + w_2)); method 'slerp' takes t",
    "nuslerp_flatten": "mergeflow's nuslerp treats each tensor as one vector (mergekit's default, true)",
    "nuslerp_row_wise": "mergeflow's nuslerp treats each tensor as one vector (mergekit's nuslerp_flatten)",
    "normalize_weights": "multislerp always normalises the weights to sum 1 (mergekit's default)",
    "eps": "fixed at mergekit's 1e-8"}


def _to_base(p: dict) -> bool:
    return p["interpolate"] == "task_vectors"


def _nuslerp_check(m: str, p: dict, experts, seed) -> dict:
    if len(experts) != 2:
        raise ParamError(m, "experts", f"NuSLERP interpolates exactly two experts, got {len(experts)}")
    return p


@merge_method("nuslerp", (WEIGHTS, INTERPOLATE), uses_base=_to_base, granularity="tensor", check=_nuslerp_check,
              hints=_NUSLERP_HINTS)
def nuslerp(b: Block, p: dict):
    """NuSLERP: spherical interpolation of two experts (or their task vectors, added to the
    base) at t = w_2 / (w_1 + w_2), each tensor one vector (mergekit `nuslerp`)."""
    w = p["weights"]
    t = 0.5 if abs(sum(w)) < 1e-6 else w[1] / sum(w)
    if _to_base(p):
        d = b.deltas()
        return steps.nuslerp(d[0], d[1], t).add_(b.base)
    return steps.nuslerp(b.experts[0], b.experts[1], t)


def _multislerp_check(m: str, p: dict, experts, seed) -> dict:
    if len(experts) < 2:
        raise ParamError(m, "experts", f"Multi-SLERP interpolates at least two experts, got {len(experts)}")
    return _nonzero_sum(m, p, experts, seed)


@merge_method("multislerp", (WEIGHTS, INTERPOLATE), uses_base=_to_base, granularity="tensor",
              check=_multislerp_check, hints=_NUSLERP_HINTS)
def multislerp(b: Block, p: dict):
    """Multi-SLERP: barycentric interpolation on the hypersphere of the experts (or their task
    vectors, added to the base) with the normalised weights, each tensor one vector (mergekit
    `multislerp`)."""
    x = b.deltas() if _to_base(p) else b.experts
    try:
        out = steps.multislerp(x, p["weights"])
    except steps.InterpolationError as e:
        raise MergeflowError(f"merge method 'multislerp': tensor {b.name!r}: {e}") from None
    return out.add_(b.base) if _to_base(p) else out


# Model Breadcrumbs (Davari & Belilovsky 2023) as mergekit 0.1.5 runs it: per tensor.
BREADCRUMBS_PARAMS = (LAMBDA, WEIGHTS, DENSITY, MASK_RATE, GAMMA)


def _breadcrumbs_granularity(p: dict) -> str:
    return "tensor" if p["density"] < 1 else "element"


@merge_method("breadcrumbs", BREADCRUMBS_PARAMS, granularity=_breadcrumbs_granularity, check=_density)
def breadcrumbs(b: Block, p: dict):
    """Model Breadcrumbs: per tensor drop the `gamma` largest |delta| and keep `density` of
    all by magnitude below them, then theta_b + lambda sum_t w_t delta_t (mergekit `breadcrumbs`)."""
    return _sum(b, steps.outlier_trim_(b.deltas(), p["density"], p["gamma"]), p)


@merge_method("breadcrumbs_ties", BREADCRUMBS_PARAMS, granularity=_breadcrumbs_granularity, check=_density,
              elects=True)
def breadcrumbs_ties(b: Block, p: dict):
    """Breadcrumbs mask, TIES sign election, sum of the agreeing weighted deltas, lambda
    (mergekit `breadcrumbs_ties`, which does not normalise)."""
    d = steps.outlier_trim_(b.deltas(), p["density"], p["gamma"])
    return steps.scale_add(b.base, steps.disjoint_fuse_(d, p["weights"], normalize=False), p["lambda"])


def _stock_check(m: str, p: dict, experts, seed) -> dict:
    if len(experts) < 2:
        raise ParamError(m, "experts", f"Model Stock needs at least two fine-tunes of the base, got {len(experts)}")
    return p


@merge_method("model_stock", (), granularity="tensor", check=_stock_check)
def model_stock(b: Block, p: dict):
    """Model Stock, per tensor: theta_b + t (mean_t delta_t), t = k cos / (1 + (k - 1) cos)
    from the mean pairwise cosine of the k task vectors (mergekit `model_stock`)."""
    d = b.deltas()
    t = steps.model_stock_ratio(d)
    return steps.scale_add(b.base, steps.weighted_mean(d, [1.0] * d.shape[0]), steps.f32(t))


# Consensus merging (Wang et al., ICML 2024, "Localizing Task Information for Improved Model
# Merging and Compression"), as its reference code (nik-dim/tall_masks) runs it.
def _consensus_check(m: str, p: dict, experts, seed) -> dict:
    if p["k"] > len(experts):
        raise ParamError(m, "k", f"{p['k']:g} exceeds the {len(experts)} experts: no weight could be kept")
    bad = [i for i, v in enumerate(p["tall_mask_lambda"]) if v < 0]
    if bad:
        raise ParamError(m, f"tall_mask_lambda[{bad[0]}]", f"{p['tall_mask_lambda'][bad[0]]} is negative")
    return _density(m, p, experts, seed) if "mask_rate" in p else p


@merge_method("consensus_ta", (LAMBDA, WEIGHTS, TALL_LAMBDA, K), check=_consensus_check)
def consensus_ta(b: Block, p: dict):
    """Consensus TA: tau = sum_t w_t delta_t, kept where at least k experts' TALL masks
    |delta_t| > lambda_t |tau - delta_t| hold; theta_b + lambda tau."""
    d = b.deltas()
    tau = steps.weighted_sum(d, p["weights"])
    return steps.scale_add(b.base, steps.tall_consensus_(tau, d, p["tall_mask_lambda"], p["k"]), p["lambda"])


@merge_method("consensus_ties", (LAMBDA, WEIGHTS, DENSITY, MASK_RATE, TRIM_SCOPE, TALL_LAMBDA, K),
              granularity=_trim_granularity, model_stats=_model_trim, tensor_topk=_tensor_trim, elects=True,
              check=_consensus_check, pretrim=lambda b, p: b.deltas())
def consensus_ties(b: Block, p: dict):
    """Consensus TIES: tau = TIES (trim, elect, disjoint sum as the reference's "dis-sum"),
    kept where at least k TALL masks of the untrimmed deltas hold; theta_b + lambda tau."""
    d = b.deltas()
    orig = d.clone()  # the TALL masks compare the untrimmed task vectors
    tau = steps.disjoint_fuse_(_trim(b, d, p), p["weights"], zero_sign=b.zero_sign, normalize=False)
    return steps.scale_add(b.base, steps.tall_consensus_(tau, orig, p["tall_mask_lambda"], p["k"]), p["lambda"])


# The SVD methods: a whole matrix per call; other tensors take the task vectors' mean, as
# both reference implementations do.
def _mean_tau(d):
    return steps.weighted_mean(d, [1.0] * d.shape[0])


@merge_method("tsv_m", (LAMBDA,), granularity="tensor")
def tsv_m(b: Block, p: dict):
    """TSV-M (task singular vectors): per matrix, each task's top 1/T singular triplets,
    orthogonalised together; theta_b + lambda U_o S V_o^T (other tensors: the mean delta)."""
    d = b.deltas()
    return steps.scale_add(b.base, steps.tsv_merge(d) if b.is_matrix else _mean_tau(d), p["lambda"])


@merge_method("iso_c", (LAMBDA,), granularity="tensor")
def iso_c(b: Block, p: dict):
    """Iso-C (isotropic merging): per matrix the task-arithmetic sum with its singular values
    all set to their mean; theta_b + lambda tau (other tensors: the mean delta)."""
    d = b.deltas()
    tau = steps.iso_merge(steps.weighted_sum(d, [1.0] * d.shape[0])) if b.is_matrix else _mean_tau(d)
    return steps.scale_add(b.base, tau, p["lambda"])


COMMON_FRACTION = Param("common_space_fraction", default=0.8, lo=0.0, hi=1.0,
                        help="Iso-CTS: fraction of each matrix's rank given to the common subspace")


@merge_method("iso_cts", (LAMBDA, COMMON_FRACTION), granularity="tensor")
def iso_cts(b: Block, p: dict):
    """Iso-CTS (isotropic merging in common and task-specific subspaces): per matrix the
    common subspace of sum_t delta_t plus each task's top directions outside it, orthogonalised,
    singular values all set to their mean; theta_b + lambda tau (other tensors: the mean delta)."""
    d = b.deltas()
    tau = steps.iso_cts_merge(d, p["common_space_fraction"]) if b.is_matrix else _mean_tau(d)
    return steps.scale_add(b.base, tau, p["lambda"])


# SCE (FuseChat, Wan et al. 2024), as mergekit 0.1.5's `sce`: per tensor.
_SCE_HINTS = {"density": "SCE's selection fraction is 'select_topk' (mergekit's name)",
              "weights": "SCE computes each expert's coefficient from its deltas (mergekit's sce takes no weight)",
              "weight": "SCE computes each expert's coefficient from its deltas (mergekit's sce takes no weight)",
              "int8_mask": "a mergekit memory option; mergeflow's masks need no setting"}


@merge_method("sce", (LAMBDA, SELECT_TOPK), granularity="tensor", hints=_SCE_HINTS)
def sce(b: Block, p: dict):
    """SCE: per tensor select the `select_topk` elements of largest variance across experts,
    coefficients c_t from the mean square of each selected task vector, erase minority
    signs; theta_b + lambda sum_t c_t delta_t [kept] / sum_t c_t [kept] (mergekit `sce`)."""
    return steps.scale_add(b.base, steps.sce_fuse(b.deltas(), p["select_topk"]), p["lambda"])


# PCB-merging (Du et al., NeurIPS 2024), as the authors' PCB_merge, per tensor; no evolutionary search.
PCB_RATIO = Param("pcb_ratio", default=0.1, lo=0.0, hi=1.0, lo_open=True,
                  help="PCB: fraction of each task's balanced scores kept (the rest get scale 0)")
CLAMP_RATIO = Param("clamp_ratio", default=0.0001, lo=0.0, hi=0.5, hi_open=True,
                    help="PCB: fraction of |delta| clamped at each end of each task's tensor (outliers)")
_PCB_HINTS = {"density": "PCB keeps the top 'pcb_ratio' of its balanced scores",
              "min_ratio": "use 'clamp_ratio' (both ends of the reference's outlier clamp)",
              "max_ratio": "use 'clamp_ratio' (both ends of the reference's outlier clamp)",
              "lams": "use 'weights' (the reference's per-task lams)"}


@merge_method("pcb", (LAMBDA, WEIGHTS, PCB_RATIO, CLAMP_RATIO), granularity="tensor", hints=_PCB_HINTS)
def pcb(b: Block, p: dict):
    """PCB-merging: per tensor intra- (exp of N x the squared normalised |delta|) and
    inter-balancing (tanh of delta_t sum_j delta_j), keep the top `pcb_ratio` of the scores
    per task, theta_b + lambda sum_t w_t delta_t s_t / sum_t s_t (the authors' PCB_merge)."""
    return steps.scale_add(b.base, steps.pcb_fuse(b.deltas(), p["pcb_ratio"], p["clamp_ratio"], p["weights"]),
                           p["lambda"])


# ---------------------------------------------------------------------------------------
# building a method; schema and help from the specs
# ---------------------------------------------------------------------------------------


class Method:
    """A method with resolved params: what the engine plans with and `merge(block)`."""

    def __init__(self, spec: MethodSpec, params: dict):
        self.spec, self.name, self.params = spec, spec.name, params
        self.uses_base = bool(spec.uses_base(params))
        self.granularity = spec.granularity(params)
        assert self.granularity in GRANULARITIES, (spec.name, self.granularity)
        self.random = bool(spec.random(params))
        self.global_trim = bool(spec.model_stats(params))
        self.tensor_topk = bool(spec.tensor_topk(params))
        self.elects = bool(spec.elects(params))
        self.majority_sign = self.global_trim and self.elects

    @property
    def tensor_wide(self) -> bool:
        """True when a tensor cannot be split into row blocks."""
        return self.granularity == "tensor"

    @property
    def trim_density(self) -> float:
        return self.params["density"]

    def merge(self, b: Block):
        return self.spec.fn(b, self.params)

    def sparsified_deltas(self, b: Block):
        """The deltas the model-wide trim ranks (after any DARE, before the trim)."""
        return self.spec.pretrim(b, self.params)

    def sign_balance(self, b: Block) -> int:
        """#(elected +) - #(elected -) over the block, election as in `merge` (consumes it)."""
        d = steps.threshold_trim_(self.sparsified_deltas(b), b.thresholds)
        for t, w in enumerate(self.params.get("weights", ())):
            if w != 1.0:
                d[t].mul_(w)
        return steps.sign_balance(d)


def check_params(name: str, params: dict | None, experts: list[str], seed: int) -> dict:
    """Validate method `name`'s params for these experts: the resolved params, or a
    ParamError naming the key. The one check both the engine (`build`) and the workflow's
    start-up (`mergeflow.config`) run, so a config that starts cannot fail in its merge."""
    if name not in REGISTRY:
        raise MergeflowError(f"unknown merge method {name!r}; choose one of {', '.join(sorted(REGISTRY))}")
    if not experts:
        raise ParamError(name, "experts", "no experts given")
    twice = sorted({e for e in experts if list(experts).count(e) > 1})
    if twice:
        raise ParamError(name, "experts", f"{twice[0]!r} is listed twice")
    spec = REGISTRY[name]
    given = {k: v for k, v in (params or {}).items() if k not in ENGINE_PARAMS}
    p = _resolve(name, given, spec.params, list(experts), spec.hints)
    return spec.check(name, p, list(experts), seed) if spec.check else p


def build(name: str, params: dict | None, experts: list[str], seed: int) -> Method:
    """Validate `params` for method `name` and return the Method."""
    return Method(REGISTRY[name] if name in REGISTRY else None, check_params(name, params, experts, seed))


def method_names() -> list[str]:
    return sorted(REGISTRY)


def all_params() -> dict[str, Param]:
    """Every param name of the registry; a name means the same (kind, range) in every method."""
    out: dict[str, Param] = {}
    for spec in REGISTRY.values():
        for p in spec.params:
            if p.name in out and out[p.name].schema() != p.schema():
                raise AssertionError(f"param {p.name!r}: {spec.name} gives it another type or range")
            out.setdefault(p.name, p)
    return out


def merge_params_schema() -> dict:
    """The config schema's `$defs.merge_params` (tests/test_merge_registry.py: equal to the file's)."""
    return {"description": "Hyperparameters under the papers' names, generated from the method registry "
                           "(mergeflow.merging.methods; docs/merging.md lists the mergekit equivalents).",
            "type": "object", "additionalProperties": False,
            "properties": {name: p.schema() for name, p in sorted(all_params().items())}}


def grid_params() -> list[str]:
    """Params a config's `grid` may sweep: the scalar ones."""
    return sorted(n for n, p in all_params().items() if p.kind in ("number", "choice", "rescale"))


def help_text() -> str:
    """`mergeflow merge --help`'s list of methods and their params."""
    lines = ["methods (params: default, range; see docs/merging.md):"]
    for name in method_names():
        spec = REGISTRY[name]
        lines.append(f"  {name}: {spec.summary}")
        for p in spec.params:
            default = "required" if p.default is REQUIRED else "default 1 each" if p.kind == "weights" else \
                "not set" if p.default is None else f"default {p.default!r}"
            rng_ = p.range_text()
            lines.append(f"      {p.name} ({default}{', ' + rng_ if rng_ else ''})")
    return "\n".join(lines)
