"""Genomes of an evolutionary merge (:mod:`distmerge.evolve`) and the searches over them.

parameters   a recipe template in which some numbers are genes, ``{evolve: [lo, hi]}`` (a
             scalar) or ``{evolve: [lo, hi], gradient: n}`` (a mergekit gradient list of n
             values over the layers): weights, densities, ``t``, ``lambda``... The genome is
             x ∈ [0, 1]^d, a gene's value lo + x·(hi - lo) rounded to 4 decimals. Searched with
             CMA-ES (the ``cma`` package, bounds [0, 1]), as the paper does.
layers       the paper's data-flow space: a passthrough frankenmerge whose layer path is an
             inclusion indicator array I over T = r·M slots (the M layers of all models in
             order, repeated r times); layer slot t is in the path when I[t] = 1. Searched with
             a genetic algorithm: binary tournaments, uniform crossover, bit-flip mutation (rate
             1/T by default), (μ+λ) survival, and no genome evaluated twice. Why a GA and not
             CMA-ES over a relaxation: the genome is a bit string; CMA-ES's Gaussian steps
             over thresholded reals spend most candidates on paths already seen (many x map to
             one I) and its step-size adaptation has no meaning there, while crossover and bit
             flips move between paths directly. (The paper also evolves a scaling matrix W
             on the hidden states between layers; a passthrough recipe cannot express it.)

A search is ``ask()`` (a generation's genomes), ``tell(scores)`` (higher is better; a failed
candidate is -inf), ``state()`` (for the log). Each is deterministic in the config's seed and
the scores it is told, which is what lets a search resume by replaying its log.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from distmerge.errors import MergeError

if TYPE_CHECKING:
    from distmerge.evolve import EvolveConfig

GENE = "evolve"
CMA_FAILED = 1e30
"""The fitness CMA-ES (which minimises -score) is told for a failed candidate."""


@dataclass(kw_only=True, slots=True)
class Gene:
    """One searched number (or gradient list) of a recipe template."""

    path: tuple
    """Where it sits in the recipe: keys and list indices."""
    lo: float
    hi: float
    size: int = 0
    """0: a scalar; n >= 2: a gradient list of n values."""
    init: float | None = None
    """Starting value (CMA-ES's mean), default the middle of [lo, hi]."""

    @property
    def width(self) -> int:
        return max(1, self.size)


# --------------------------------------------------------------------------- genome -> recipe


def find_genes(node, path: tuple = ()) -> list[Gene]:
    """Every ``{evolve: [lo, hi], gradient: n, init: v}`` in a recipe template, in document order."""
    if isinstance(node, dict) and GENE in node:
        where = ".".join(map(str, path))
        extra = set(node) - {GENE, "gradient", "init"}
        if extra:
            raise MergeError(f"gene at {where}: unknown key(s) {', '.join(sorted(map(str, extra)))}; a gene is {{evolve: [lo, hi]}}, optionally with gradient: N and init: V")
        r = node[GENE]
        if not (isinstance(r, list) and len(r) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in r) and r[0] < r[1]):
            raise MergeError(f"gene at {where}: evolve: {r!r} is not a range; write evolve: [lo, hi] with lo < hi")
        size = node.get("gradient", 0)
        if not (isinstance(size, int) and not isinstance(size, bool) and (size == 0 or size >= 2)):
            raise MergeError(f"gene at {where}: gradient: {size!r}; give the number of values of the gradient list (2 or more)")
        init = node.get("init")
        if init is not None and not (isinstance(init, (int, float)) and r[0] <= init <= r[1]):
            raise MergeError(f"gene at {where}: init: {init!r} is not within [{r[0]}, {r[1]}]")
        return [Gene(path=path, lo=float(r[0]), hi=float(r[1]), size=size, init=None if init is None else float(init))]
    if isinstance(node, dict):
        return [g for k, v in node.items() for g in find_genes(v, path + (k,))]
    if isinstance(node, list):
        return [g for i, v in enumerate(node) for g in find_genes(v, path + (i,))]
    return []


def gene_values(config: EvolveConfig, x: list[float]) -> list:
    """Each gene's value (a number, or a gradient's list) for genome x ∈ [0, 1]^d."""
    values, i = [], 0
    for g in config.genes:
        vs = [round(g.lo + min(1.0, max(0.0, float(v))) * (g.hi - g.lo), 4) for v in x[i : i + g.width]]
        values.append(vs if g.size else vs[0])
        i += g.width
    return values


def genome_recipe(config: EvolveConfig, genome: list) -> dict | None:
    """The mergekit recipe (a dict) of a genome; None for an empty layer path."""
    if config.search == "parameters":
        recipe = copy.deepcopy(config.recipe)
        for g, v in zip(config.genes, gene_values(config, genome)):
            node = recipe
            for k in g.path[:-1]:
                node = node[k]
            node[g.path[-1]] = v
        return recipe
    return layer_recipe(config, genome)


def layer_path(config: EvolveConfig, bits: list[int]) -> list[tuple[int, int]]:
    """The (model index, layer) of each slot whose bit is set: slots run over every model's
    layers in order, ``repeats`` times."""
    slots = [(m, layer) for _ in range(config.repeats) for m, n in enumerate(config.layers) for layer in range(n)]
    return [s for s, b in zip(slots, bits) if b]


def layer_recipe(config: EvolveConfig, bits: list[int]) -> dict | None:
    """A passthrough recipe of the layer path: consecutive layers of one model make one slice."""
    slices: list[list] = []  # [model, start, end]
    for m, layer in layer_path(config, bits):
        if slices and slices[-1][0] == m and slices[-1][2] == layer:
            slices[-1][2] += 1
        else:
            slices.append([m, layer, layer + 1])
    if not slices:
        return None
    recipe = {"merge_method": "passthrough", "slices": [{"sources": [{"model": config.models[m], "layer_range": [a, b]}]} for m, a, b in slices]}
    return recipe | ({"dtype": config.dtype} if config.dtype else {})


# --------------------------------------------------------------------------- searches


class CMASearch:
    """CMA-ES (``cma``) over x ∈ [0, 1]^d; maximises the score."""

    def __init__(self, config: EvolveConfig):
        try:
            import cma
        except ImportError:
            raise MergeError("distmerge evolve with search: parameters needs the cma package: pip install 'distmerge[evolve]'") from None
        x0 = []
        for g in config.genes:
            x0 += [0.5 if g.init is None else (g.init - g.lo) / (g.hi - g.lo)] * g.width
        import numpy as np

        # The samples come from a generator of our own, not numpy's global one (which cma
        # seeds and draws from by default): nothing else in the process can shift them.
        # (cma takes seed 0 as "from the clock": seed + 1 keeps every config seed reproducible.)
        rng = np.random.default_rng(config.seed)
        opts = {"seed": config.seed + 1, "popsize": config.population, "bounds": [0, 1], "verbose": -9,
                "randn": lambda *shape: rng.standard_normal(shape)}  # fmt: skip
        self.es = cma.CMAEvolutionStrategy(x0, config.sigma, opts)
        self._asked = None

    def ask(self) -> list[list[float]]:
        self._asked = self.es.ask()
        return [[float(v) for v in x] for x in self._asked]

    def tell(self, scores: list[float]) -> None:
        self.es.tell(self._asked, [-s if math.isfinite(s) else CMA_FAILED for s in scores])

    def state(self) -> dict:
        return {"mean": [float(v) for v in self.es.mean], "sigma": float(self.es.sigma)}


class LayerGA:
    """A GA over the inclusion bits: binary tournaments, uniform crossover, bit flips, (μ+λ)
    survival; every child differs from every genome asked before (up to 100 tries)."""

    def __init__(self, config: EvolveConfig):
        import numpy as np

        self.rng = np.random.default_rng(config.seed)
        self.config, self.T = config, config.dim
        self.rate = config.mutation or 1.0 / self.T
        self.population: list[tuple[list[int], float]] = []
        self.seen: set[tuple[int, ...]] = set()
        self._asked: list[list[int]] = []

    def _first(self) -> list[list[int]]:
        # each model alone (its own layers, once) first: the search starts from the inputs
        out, start = [], 0
        for n in self.config.layers:
            bits = [0] * self.T
            bits[start : start + n] = [1] * n
            out.append(bits)
            start += n
        return out[: self.config.population]

    def _child(self) -> list[int]:
        def pick():
            a, b = self.rng.integers(len(self.population), size=2)
            return self.population[a if self.population[a][1] >= self.population[b][1] else b][0]

        p, q = pick(), pick()
        mask = self.rng.random(self.T) < 0.5
        child = [p[i] if mask[i] else q[i] for i in range(self.T)]
        flips = self.rng.random(self.T) < self.rate
        return [b ^ int(f) for b, f in zip(child, flips)]

    def ask(self) -> list[list[int]]:
        asked = self._first() if not self.population and not self.seen else []
        for bits in asked:
            self.seen.add(tuple(bits))
        while len(asked) < self.config.population:
            for _ in range(100):
                bits = [int(b) for b in (self.rng.random(self.T) < 0.5)] if not self.population else self._child()
                if tuple(bits) not in self.seen:
                    break
            self.seen.add(tuple(bits))
            asked.append(bits)
        self._asked = asked
        return asked

    def tell(self, scores: list[float]) -> None:
        everyone = self.population + list(zip(self._asked, scores))
        everyone.sort(key=lambda p: -p[1])  # stable: ties keep the older genome first
        self.population = everyone[: self.config.population]

    def state(self) -> dict:
        return {"population_best": [s for _, s in self.population[:3]]}


def make_search(config: EvolveConfig):
    return CMASearch(config) if config.search == "parameters" else LayerGA(config)
