"""Merge methods: the math for one output tensor, and the registry that names it.

Every method is a plain function::

    merge(base, tensors, **params) -> Tensor

- ``base`` is the base model's tensor, or None when the method takes no base (its
  ``base`` policy is "ignored") or when an optional base was not given.
- ``tensors`` are the other inputs in recipe order. For a method whose base policy is
  "ignored" the base model, if the recipe names one, is just one more input here, at
  the position mergekit gives it (after the listed models).
- shared parameters arrive as scalars; per-input parameters as lists aligned with
  ``tensors``.
- randomized methods also get ``seeds``: one 64-bit key per entry of ``tensors``
  (see ``distmerge.rng``), so the draw depends on (recipe seed, output tensor name,
  input model) and on nothing about where or in which order the tensor is computed.
- methods whose steps run in ``distmerge.kernels`` (``Method.kernel_options``) also get
  ``options``: the run's ``kernels.KernelOptions`` (compiled CPU loops, Triton), passed on
  to every kernel call; called directly, they take the defaults.

Inputs arrive in float32 (the run casts them); the result is cast by the run to the
output dtype. Methods never modify their inputs: they may be read-only memory-mapped
views of the checkpoint files, where an in-place write would crash the process.

**Adding a method** is one new module in this package with a module-level ``METHODS``
tuple of ``Method``s: the registry imports every module here that has one (``_registry``),
in module-name order, and the README table, ``distmerge methods``, recipe validation and
the plan follow from it.
"""

from __future__ import annotations

import importlib
import keyword
import math
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

REQUIRED = object()
"""Default of a parameter that the recipe must set."""

Scope = Literal["shared", "input"]
BasePolicy = Literal["required", "optional", "ignored"]


@dataclass(frozen=True, slots=True)
class Param:
    """One parameter a method accepts, as a recipe spells it."""

    name: str
    """Name in the recipe's ``parameters`` blocks."""
    type: type
    """float, int, bool or str; recipe values are converted to it."""
    default: Any = REQUIRED
    """Value when the recipe does not set it; REQUIRED makes it mandatory."""
    scope: Scope = "shared"
    """"shared": one value per output tensor; "input": one value per input model."""
    check: Callable[[Any], str | None] | None = None
    """Returns a message when a value is out of range (e.g. density outside (0, 1])."""
    doc: str = ""
    """One line for the README and for error messages."""

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    @property
    def arg(self) -> str:
        """The keyword the merge function takes it as (``lambda`` -> ``lambda_``)."""
        return self.name + "_" if keyword.iskeyword(self.name) else self.name


def float32_copies(n_inputs: int, numel: int) -> int:
    """The default working memory of a merge, in bytes: a float32 copy of each of the
    ``n_inputs`` inputs (base included), plus two tensor-sized float32 temporaries."""
    return numel * 4 * (n_inputs + 2)


def elementwise_flops(n_inputs: int, shape: list[int], params: dict) -> int:
    """The default compute of a merge, in floating-point operations: a multiply and an add per
    element of each of the ``n_inputs`` inputs (base included), as a weighted sum does."""
    return 2 * math.prod(shape) * n_inputs


@dataclass(frozen=True, slots=True)
class Method:
    """A merge method: its function, its parameters and what inputs it takes."""

    name: str
    """Registry name, as in mergekit (``merge_method:`` in a recipe)."""
    merge: Callable[..., Any]
    """The function ``merge(base, tensors, **params) -> Tensor``."""
    params: tuple[Param, ...] = ()
    base: BasePolicy = "ignored"
    """"required": needs ``base_model``; "optional": uses it when given; "ignored":
    the base, if any, is an ordinary input."""
    min_inputs: int = 1
    """Least number of entries in ``tensors`` (the non-base inputs)."""
    max_inputs: int | None = None
    randomized: bool = False
    """Draws random numbers: gets ``seeds`` and is reproducible from the recipe seed."""
    elementwise: bool = False
    """Each output element depends only on the same element of the inputs, so the run may
    merge a large tensor in cache-sized chunks (same result, far less memory traffic). The
    run then hands ``merge`` inputs already in the compute dtype as they are stored (bf16,
    say), not widened to float32: ``distmerge.kernels`` widens them inside its loops."""
    chunked: Callable[..., Any] | None = None
    """Optional two-pass form for large tensors on CPU, giving the same bits as ``merge``::

        chunked(read, shape, chunk, **params) -> Iterator[(start, end, merged)] | None

    ``shape`` is the inputs' shape and ``chunk`` the suggested number of elements per chunk;
    ``read(start, end)`` returns the float32 (base, [inputs]) of a flat index range (it may
    be called for several passes over the tensor, each in increasing order); the iterator
    yields the merged flat ranges in order. A method whose statistics run along rows may
    read whole rows at a time; it may also read only some models, or into buffers of its own
    (``TensorInputs.read_range``'s ``models`` and ``out``). None means "not for these
    parameters": the run then calls ``merge``."""
    into: Callable[..., bool] | None = None
    """Optional for an element-wise method: its merge rounded straight into the output, where
    a fused loop can (bf16 on CPU), for a large tensor whose inputs and output are all in the
    compute dtype::

        into(base, tensors, out=..., **params) -> bool

    ``base`` and ``tensors`` are flat ranges of the inputs as stored, ``out`` the same range of
    the output. False means "not done": no loop for these tensors, or a value that is not
    finite (its NaN bits are torch's to give); the run then merges the range with ``merge``
    and rounds and checks it itself. True: ``out`` holds ``merge``'s values rounded as the run
    rounds them, all finite."""
    shares_statistics: bool = False
    """``chunked`` takes ``stats``: a dict that the run shares between the merges of one unit
    of work that read the same inputs (a sweep's variants), for statistics that do not depend
    on the varied parameters (``sparsify.SharedTopK``). The same bits as without it."""
    buffer: bool = False
    """``chunked`` takes ``buffer``: a function that returns a float32 tensor of n elements, the
    run's buffer for whole-tensor statistics (``tensor_merge.Buffer``: its contents are left
    over, and it is valid until the next call; the chunked form is done with it when it ends)."""
    kernel_options: bool = False
    """``merge`` and ``chunked`` take ``options``, a ``distmerge.kernels.KernelOptions`` (how
    the fused steps run), and pass it on to the kernels they call."""
    work_bytes: Callable[[int, int], int] = float32_copies
    """``work_bytes(n_inputs, numel)``: the bytes the merge of one tensor of ``numel`` elements
    from ``n_inputs`` inputs (base included) needs besides its output, for ``distmerge plan``'s
    memory estimate. A method with more scratch (an SVD, a stack of every input) says so here."""
    work_flops: Callable[[int, list[int], dict], int] = elementwise_flops
    """``work_flops(n_inputs, shape, params)``: the floating-point operations of the merge of one
    tensor of ``shape`` from ``n_inputs`` inputs (base included) with its shared ``params``, for
    spreading tensors over ranks by estimated time (``distmerge.plan.tensor_cost``) and for
    ``distmerge plan``. A method whose work grows faster than its inputs (an SVD per matrix, an
    optimiser's steps) says so here; the count is a rough estimate, not a measurement."""
    divides_by_weight_sum: str | None = None
    """The boolean parameter that, when true, makes the method divide by Σᵢ weightᵢ with no
    guard against zero (as mergekit does): the plan refuses weights that sum to zero."""
    summary: str = ""
    """One line for the README and ``distmerge methods``."""
    paper: str = ""
    """Where the equation comes from."""
    param_index: dict[str, Param] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "param_index", {p.name: p for p in self.params})


def in_unit_interval(value: float) -> str | None:
    """Check for densities and similar fractions: 0 < value <= 1."""
    return None if 0 < value <= 1 else f"must be in (0, 1], got {value}"


def non_negative(value: float) -> str | None:
    return None if value >= 0 else f"must be >= 0, got {value}"


def chunk_ranges(numel: int, chunk: int) -> list[tuple[int, int]]:
    """The flat ranges [start, end) of at most ``chunk`` elements that cover ``numel``, in order."""
    return [(start, min(numel, start + chunk)) for start in range(0, numel, chunk)]


def input_count(read) -> int:
    """The number of non-base inputs of a chunked merge (``Method.chunked``): an empty read."""
    return len(read(0, 0)[1])


def fraction(value: float) -> str | None:
    """Check for interpolation factors: 0 <= value <= 1."""
    return None if 0 <= value <= 1 else f"must be in [0, 1] (0 = the base model, 1 = the other), got {value}"


def _registry() -> dict[str, Method]:
    """Every ``Method`` in the ``METHODS`` tuple of a module of this package, by module name."""
    methods: dict[str, Method] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        for method in getattr(module, "METHODS", ()):
            assert method.name not in methods, f"duplicate method {method.name} in {module.__name__}"
            methods[method.name] = method
    return methods


METHODS: dict[str, Method] = _registry()


def get(name: str) -> Method:
    """The method registered as ``name``; KeyError if there is none."""
    return METHODS[name]


def markdown_table() -> str:
    """A Markdown table of every method, in registry order, for the README (and
    ``distmerge methods --markdown``): name, base policy, parameters with their defaults,
    the one-line summary and the reference.

    Parameters are spelled as in a recipe: ``name`` alone is required, ``name=value`` has a
    default (booleans as YAML spells them); "per model" marks those set for each input.
    """
    from urllib.parse import urlparse

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        return repr(v)

    def param(p: Param) -> str:
        if p.required:
            text = f"`{p.name}`"
        elif p.default is None:
            text = f"`{p.name}` (optional)"
        else:
            text = f"`{p.name}={value(p.default)}`"
        return text + (" per model" if p.scope == "input" else "")

    def link(url: str) -> str:
        if not url:
            return ""
        parsed = urlparse(url)
        if parsed.netloc.endswith("arxiv.org") and parsed.path.startswith("/abs/"):
            label = "arXiv:" + parsed.path[len("/abs/") :]
        else:
            label = parsed.netloc.removeprefix("www.")
        return f"[{label}]({url})"

    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = ["| method | base model | parameters (default) | what it does | reference |", "|---|---|---|---|---|"]
    for m in METHODS.values():
        params = ", ".join(param(p) for p in m.params) or "none"
        lines.append(f"| `{m.name}` | {m.base} | {cell(params)} | {cell(m.summary)} | {link(m.paper)} |")
    return "\n".join(lines) + "\n"
