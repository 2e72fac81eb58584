"""Merge methods: a registry of small compositions of `steps`.

Each method is a `Recipe` - which sparsifier (none, magnitude trim, DARE, MagPrune), whether
signs are elected, how deltas are fused (sum, mean, disjoint mean, M3 mixup) and the
scale lambda - built from the user's params after validation. `Method.merge(block)`
runs the recipe on one block of one tensor. docs/merging.md documents every method,
its params and mergekit / reference-code equivalents.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mergeflow.errors import MergeflowError
from mergeflow.merging import rng, steps

REQUIRED = object()
ENGINE_PARAMS = ("dtype", "donor")  # read by the engine, not by a method
OUTPUT_DTYPES = ("float32", "float16", "bfloat16", "float64")  # the engine param dtype
TRIM_SCOPES = ("tensor", "row", "model")
RESCALES = ("inverse", "l1", "none")
COMBINES = ("average", "task_arithmetic", "ties")
DELLA_FAMILY = ("della", "della_norank", "della_layer", "della_noelect", "dare_della", "nodrop_noelect",
                "nodrop", "dare_noelect", "della_randrank", "della_randrank_layer")

# Names people bring from other tools, with what to use instead.
HINTS = {
    "epsilon": "mergeflow takes window_size = 2 x upstream mergekit's epsilon",
    "scaling_coefficient": "use 'lambda'",
    "weight": "use 'weights' (a list in expert order or {expert: weight})",
    "param_value_mask_rate": "use 'mask_rate' (or density = 1 - mask_rate)",
    "normalize": "normalisation is fixed by the method (see docs/merging.md)",
}


# ---------------------------------------------------------------------------------------
# parameter checking
# ---------------------------------------------------------------------------------------


class ParamError(MergeflowError):
    """A bad merge param: `key` names it ('density', 'weights[1]', 'dare.drop_rate', or
    'experts' for the expert list), `detail` says what is wrong."""

    def __init__(self, method: str, key: str, detail: str):
        super().__init__(f"merge method {method!r}: param {key!r}: {detail}")
        self.key, self.detail = key, detail


def _err(method: str, key: str, msg: str) -> ParamError:
    return ParamError(method, key, msg)


def _number(method, key, v, lo=-math.inf, hi=math.inf, lo_open=False, hi_open=False):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise _err(method, key, f"expected a finite number, got {v!r}")
    v = float(v)
    if v < lo or v > hi or (lo_open and v == lo) or (hi_open and v == hi):
        lb, rb = "(" if lo_open else "[", ")" if hi_open else "]"
        raise _err(method, key, f"{v} is outside {lb}{lo}, {hi}{rb}")
    return v


def _choice(method, key, v, options):
    if v not in options:
        raise _err(method, key, f"{v!r} is not one of {', '.join(map(str, options))}")
    return v


def _rescale(method, key, v):
    if v is True:
        return "inverse"
    if v is False or v is None:
        return "none"
    return _choice(method, key, v, RESCALES)


def _weights(method, key, v, experts: list[str]) -> list[float]:
    if v is None:
        return [1.0] * len(experts)
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return [_number(method, key, v)] * len(experts)
    if isinstance(v, list):
        if len(v) != len(experts):
            raise _err(method, key, f"{len(v)} weights for {len(experts)} experts ({', '.join(experts)})")
        return [_number(method, f"{key}[{i}]", x) for i, x in enumerate(v)]
    if isinstance(v, dict):
        unknown = [k for k in v if k not in experts]
        if unknown:
            raise _err(method, key, f"no expert named {unknown[0]!r} (experts: {', '.join(experts)})")
        return [_number(method, f"{key}.{e}", v.get(e, 1.0)) for e in experts]
    raise _err(method, key, f"expected a number, a list or {{expert: weight}}, got {v!r}")


def _take(method: str, params: dict, spec: dict[str, Any]) -> dict:
    """Resolve `params` against `spec` {key: default or REQUIRED}; reject unknown keys."""
    for key in params:
        if key not in spec:
            hint = HINTS.get(key)
            if key == "density" and method in DELLA_FAMILY:
                hint = "DELLA-family methods take drop_rate (= 1 - density)"
            raise _err(method, key, "unknown parameter" + (f" ({hint})" if hint else
                                                             f"; accepted: {', '.join(sorted(spec))}"))
    out = {}
    for key, default in spec.items():
        if key in params:
            out[key] = params[key]
        elif default is REQUIRED:
            raise _err(method, key, "is required")
        else:
            out[key] = default
    return out


def _density(method: str, p: dict) -> float:
    """TIES keep fraction from `density` or `mask_rate` (= 1 - density), not both."""
    if p.get("mask_rate") is not None:
        if p.get("density") is not None:
            raise _err(method, "mask_rate", "give either density or mask_rate (= 1 - density), not both")
        return 1.0 - _number(method, "mask_rate", p["mask_rate"], 0.0, 1.0, hi_open=True)
    if p.get("density") is None:
        raise _err(method, "density", "is required (or mask_rate = 1 - density)")
    return _number(method, "density", p["density"], 0.0, 1.0, lo_open=True)


def _drop(method, key, v):
    return _number(method, key, v, 0.0, 1.0, hi_open=True)


# ---------------------------------------------------------------------------------------
# recipes
# ---------------------------------------------------------------------------------------


@dataclass
class Recipe:
    """What a method does, step by step (see module docstring)."""

    sparsify: str | None = None  # None | "dare" | "magprune"
    drop_rate: float = 0.0
    rescale: str = "none"
    window_size: float = 0.0
    prune_scope: str = "row"  # magprune ranking scope: row | tensor
    prune_score: str = "rank"  # magprune: rank | magnitude | random
    trim_density: float = 1.0  # TIES magnitude trim after sparsify (1 = none)
    trim_scope: str = "tensor"
    elect: bool = False
    fuse: str = "sum"  # sum | mean | disjoint | mixup_sum | mixup_disjoint | average
    lam: float = 1.0
    weights: list[float] = field(default_factory=list)
    mixup: list[float] | None = None
    uses_base: bool = True


@dataclass
class Block:
    """One block of rows of one tensor, as the engine hands it to a method.

    `experts` is [N, rows, cols] float32, the expert weights or (`is_delta`) the task
    vectors, consumed in place; `base` is [rows, cols] float32 or None. `row0` is the
    block's first row in the whole tensor.
    """

    name: str
    base: Any
    experts: Any
    row0: int
    seed: int
    thresholds: list | None = None  # model-scope trim thresholds per expert
    zero_sign: int = 1  # elected sign where the weighted deltas sum to 0 (model scope: majority)
    tables: dict | None = None  # cache of MagPrune keep tables
    is_delta: bool = False  # `experts` already holds task vectors (expert - base)

    @property
    def offset(self) -> int:
        return self.row0 * self.experts.shape[-1]

    def key(self, expert: int, purpose: str):
        return rng.stream_key(self.seed, self.name, expert, purpose)


class Method:
    """A validated method: name, resolved params (for metadata) and its recipe."""

    def __init__(self, name: str, params: dict, recipe: Recipe, resolved: dict):
        self.name = name
        self.params = resolved
        self.recipe = recipe

    # -- properties the engine plans with ---------------------------------------------
    @property
    def uses_base(self) -> bool:
        return self.recipe.uses_base

    @property
    def global_trim(self) -> bool:
        r = self.recipe
        return r.trim_density < 1 and r.trim_scope == "model"

    @property
    def tensor_wide(self) -> bool:
        """True when a tensor cannot be split into row blocks (tensor-level statistics)."""
        r = self.recipe
        return (
            (r.trim_density < 1 and r.trim_scope == "tensor")
            or (r.sparsify is not None and r.rescale == "l1")
            or (r.sparsify == "magprune" and r.prune_scope == "tensor")
        )

    # -- the recipe ---------------------------------------------------------------------
    def sparsified_deltas(self, b: Block):
        """Task vectors of the block after DARE / MagPrune (before any TIES trim)."""
        r = self.recipe
        d = b.experts
        if not b.is_delta:
            d.sub_(b.base)
            b.is_delta = True
        for t in range(d.shape[0]):
            if r.sparsify == "dare":
                steps.bernoulli_drop_(d[t], r.drop_rate, r.rescale, b.key(t, "dare"), b.offset)
            elif r.sparsify == "magprune":
                steps.magprune_(d[t], r.drop_rate, r.window_size, r.rescale, b.key(t, "magprune"),
                                b.offset, r.prune_scope, r.prune_score, b.tables,
                                rank_key=b.key(t, "rank") if r.prune_score == "random" else None)
        return d

    def trimmed_deltas(self, b: Block):
        """Task vectors of the block after DARE / MagPrune and the TIES trim."""
        r = self.recipe
        d = self.sparsified_deltas(b)
        if r.trim_density < 1:
            if r.trim_scope == "model":
                steps.threshold_trim_(d, b.thresholds)
            else:
                steps.magnitude_trim_(d, r.trim_density, r.trim_scope)
        return d

    @property
    def majority_sign(self) -> bool:
        """Model-scope TIES elects MergeLM's model-wide majority sign where deltas cancel."""
        return self.global_trim and self.recipe.fuse in ("disjoint", "mixup_disjoint")

    def sign_balance(self, b: Block) -> int:
        """#(elected +) - #(elected -) over the block, election as in `merge` (consumes it)."""
        d = self.trimmed_deltas(b)
        for t, w in enumerate(self.recipe.weights):
            if w != 1.0:
                d[t].mul_(w)
        return steps.sign_balance(d)

    def merge(self, b: Block):
        r = self.recipe
        if not r.uses_base:  # plain average (M3 or not) of the expert weights
            if r.mixup is not None:
                return steps.weighted_sum(b.experts, r.mixup)
            return steps.weighted_mean(b.experts, r.weights)
        d = self.trimmed_deltas(b)
        if r.fuse == "sum":
            tau = steps.weighted_sum(d, r.weights)
        elif r.fuse == "mean":
            tau = steps.weighted_mean(d, r.weights)
        elif r.fuse == "mixup_sum":
            tau = steps.weighted_sum(d, r.mixup)
        elif r.fuse == "disjoint":
            tau = steps.disjoint_fuse_(d, r.weights, zero_sign=b.zero_sign)
        elif r.fuse == "mixup_disjoint":
            tau = steps.disjoint_fuse_(d, r.weights, fuse_weights=r.mixup, zero_sign=b.zero_sign)
        else:
            raise AssertionError(r.fuse)
        return steps.scale_add(b.base, tau, r.lam)


# ---------------------------------------------------------------------------------------
# registry: name -> builder(params, experts, seed) -> (Recipe, resolved params)
# ---------------------------------------------------------------------------------------

Builder = Callable[[dict, list, int], tuple]
REGISTRY: dict[str, Builder] = {}


def register(name: str):
    def deco(fn):
        REGISTRY[name] = fn
        return fn

    return deco


def _trim_part(m: str, p: dict, default_density=REQUIRED) -> dict:
    """TIES trim params -> recipe fields (density 1 = no trim)."""
    if p.get("density") is None and p.get("mask_rate") is None and default_density is not REQUIRED:
        density = default_density
    else:
        density = _density(m, p)
    return {"trim_density": density, "trim_scope": _choice(m, "trim_scope", p["trim_scope"], TRIM_SCOPES)}


@register("average")
def _average(params, experts, seed):
    p = _take("average", params, {"weights": None})
    w = _weights("average", "weights", p["weights"], experts)
    if abs(sum(w)) < 1e-8:
        raise _err("average", "weights", "weights sum to zero")
    return Recipe(fuse="average", weights=w, uses_base=False), {**p, "weights": w}


@register("task_arithmetic")
def _task_arithmetic(params, experts, seed):
    m = "task_arithmetic"
    p = _take(m, params, {"lambda": 1.0, "weights": None})
    w = _weights(m, "weights", p["weights"], experts)
    lam = _number(m, "lambda", p["lambda"])
    return Recipe(fuse="sum", lam=lam, weights=w), {"lambda": lam, "weights": w}


def _ties_builder(name, elect):
    """TIES: magnitude top-k trim, then sign election and disjoint mean (or, without
    election, the weighted mean of the trimmed deltas: the fork's ties_noelect), times lambda."""

    def build(params, experts, seed):
        m = name
        p = _take(m, params, {"lambda": 1.0, "weights": None, "density": None, "mask_rate": None,
                              "trim_scope": "tensor"})
        w = _weights(m, "weights", p["weights"], experts)
        lam = _number(m, "lambda", p["lambda"])
        trim = _trim_part(m, p)
        resolved = {"lambda": lam, "weights": w, "density": trim["trim_density"], "trim_scope": trim["trim_scope"]}
        return Recipe(elect=elect, fuse="disjoint" if elect else "mean", lam=lam, weights=w, **trim), resolved

    REGISTRY[name] = build


_ties_builder("ties", elect=True)


@register("dare")
def _dare(params, experts, seed):
    m = "dare"
    p = _take(m, params, {"drop_rate": REQUIRED, "rescale": "inverse", "combine": "task_arithmetic",
                          "lambda": 1.0, "weights": None, "density": None, "mask_rate": None,
                          "trim_scope": "tensor"})
    combine = _choice(m, "combine", p["combine"], COMBINES)
    w = _weights(m, "weights", p["weights"], experts)
    lam = _number(m, "lambda", p["lambda"])
    drop = _drop(m, "drop_rate", p["drop_rate"])
    rescale = _rescale(m, "rescale", p["rescale"])
    resolved = {"drop_rate": drop, "rescale": rescale, "combine": combine, "lambda": lam, "weights": w}
    recipe = Recipe(sparsify="dare", drop_rate=drop, rescale=rescale, lam=lam, weights=w)
    if combine == "ties":
        trim = _trim_part(m, p, default_density=1.0)
        resolved.update(density=trim["trim_density"], trim_scope=trim["trim_scope"])
        recipe.trim_density, recipe.trim_scope = trim["trim_density"], trim["trim_scope"]
        recipe.elect, recipe.fuse = True, "disjoint"
    else:
        for key in ("density", "mask_rate"):
            if p[key] is not None:
                raise _err(m, key, "only applies with combine: ties")
        recipe.fuse = "mean" if combine == "average" else "sum"
    return recipe, resolved


def _della_builder(name, sparsify, elect, prune_scope="row", prune_score="rank"):
    def build(params, experts, seed):
        m = name
        spec = {"lambda": 1.1, "weights": None}
        if sparsify is not None:
            spec.update(drop_rate=0.3, rescale=True)
        if sparsify == "magprune":
            spec.update(window_size=0.14)
        p = _take(m, params, spec)
        w = _weights(m, "weights", p["weights"], experts)
        lam = _number(m, "lambda", p["lambda"])
        recipe = Recipe(lam=lam, weights=w, elect=elect, fuse="disjoint" if elect else "mean")
        resolved = {"lambda": lam, "weights": w}
        if sparsify is not None:
            drop = _drop(m, "drop_rate", p["drop_rate"])
            rescale = _rescale(m, "rescale", p["rescale"])
            recipe.sparsify, recipe.drop_rate, recipe.rescale = sparsify, drop, rescale
            resolved.update(drop_rate=drop, rescale=rescale)
        if sparsify == "magprune":
            ws = _number(m, "window_size", p["window_size"], 0.0, 2.0)
            lo, hi = (1 - drop) - ws / 2, (1 - drop) + ws / 2
            if lo <= 0 or hi > 1:
                raise _err(m, "window_size", f"keep probabilities (1 - drop_rate) +/- window_size/2 = "
                                             f"[{lo:.4g}, {hi:.4g}] must lie in (0, 1]")
            recipe.window_size, recipe.prune_scope, recipe.prune_score = ws, prune_scope, prune_score
            resolved.update(window_size=ws)
        return recipe, resolved

    REGISTRY[name] = build


_della_builder("della", "magprune", elect=True)
_della_builder("della_norank", "magprune", elect=True, prune_score="magnitude")
_della_builder("della_layer", "magprune", elect=True, prune_scope="tensor")
_della_builder("della_noelect", "magprune", elect=False)
_della_builder("dare_della", "dare", elect=True)
_della_builder("nodrop_noelect", None, elect=False)
# The DELLA paper's own baselines and ablations (Tables 1, 4 and 6; docs/della.md):
_della_builder("nodrop", None, elect=True)  # Table 1 "TA" (DELLA p = 0): elect + fuse + lambda, no drop
_della_builder("dare_noelect", "dare", elect=False)  # Table 4 "DARE"
_della_builder("della_randrank", "magprune", elect=True, prune_score="random")  # Table 6 random rank, per row
_della_builder("della_randrank_layer", "magprune", elect=True, prune_scope="tensor", prune_score="random")


_ties_builder("ties_noelect", elect=False)  # Table 4 "TIES"


@register("m3")
def _m3(params, experts, seed):
    m = "m3"
    p = _take(m, params, {"alpha": 0.5, "combine": "task_arithmetic", "lambda": 1.0, "dare": None,
                          "density": None, "mask_rate": None, "trim_scope": "tensor"})
    if len(experts) < 2:
        raise _err(m, "experts", f"M3 mixes at least two experts, got {len(experts)}")
    combine = _choice(m, "combine", p["combine"], COMBINES)
    alpha = _number(m, "alpha", p["alpha"])
    lam = _number(m, "lambda", p["lambda"])
    mixup = rng.mixup_weights(seed, alpha, len(experts))
    recipe = Recipe(lam=lam, weights=[1.0] * len(experts), mixup=mixup)
    resolved: dict = {"alpha": alpha, "combine": combine, "lambda": lam, "mixup_weights": mixup}
    if p["dare"] is not None:
        if not isinstance(p["dare"], dict):
            raise _err(m, "dare", f"expected {{drop_rate: P, rescale: inverse|l1|none}}, got {p['dare']!r}")
        dp = _take(m, p["dare"], {"drop_rate": REQUIRED, "rescale": "inverse"})
        recipe.sparsify = "dare"
        recipe.drop_rate = _drop(m, "dare.drop_rate", dp["drop_rate"])
        recipe.rescale = _rescale(m, "dare.rescale", dp["rescale"])
        resolved["dare"] = {"drop_rate": recipe.drop_rate, "rescale": recipe.rescale}
    if combine == "ties":
        trim = _trim_part(m, p)
        recipe.trim_density, recipe.trim_scope = trim["trim_density"], trim["trim_scope"]
        recipe.elect, recipe.fuse = True, "mixup_disjoint"
        resolved.update(density=recipe.trim_density, trim_scope=recipe.trim_scope)
    else:
        for key in ("density", "mask_rate"):
            if p[key] is not None:
                raise _err(m, key, "only applies with combine: ties")
        if combine == "average":
            if p["lambda"] != 1.0:
                raise _err(m, "lambda", "does not apply with combine: average")
            # Without DARE the base is not needed: sum_t m_t theta_t.
            recipe.uses_base = recipe.sparsify is not None
        recipe.fuse = "mixup_sum"
    return recipe, resolved


def check_params(name: str, params: dict | None, experts: list[str], seed: int) -> tuple[Recipe, dict]:
    """Validate method `name`'s params for these experts: (recipe, resolved params), or a
    ParamError naming the key. The one check both the engine (`build`) and the workflow's
    start-up (`mergeflow.config`) run, so a config that starts cannot fail in its merge."""
    if name not in REGISTRY:
        raise MergeflowError(f"unknown merge method {name!r}; choose one of {', '.join(sorted(REGISTRY))}")
    if not experts:
        raise ParamError(name, "experts", "no experts given")
    twice = sorted({e for e in experts if list(experts).count(e) > 1})
    if twice:
        raise ParamError(name, "experts", f"{twice[0]!r} is listed twice")
    params = {k: v for k, v in (params or {}).items() if k not in ENGINE_PARAMS}
    return REGISTRY[name](params, list(experts), seed)


def build(name: str, params: dict | None, experts: list[str], seed: int) -> Method:
    """Validate `params` for method `name` and return the Method."""
    recipe, resolved = check_params(name, params, experts, seed)
    return Method(name, {k: v for k, v in (params or {}).items() if k not in ENGINE_PARAMS}, recipe, resolved)


def method_names() -> list[str]:
    return sorted(REGISTRY)
