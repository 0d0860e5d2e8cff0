"""One checkpoint linear layer as this TP rank of LMDeploy holds it (a :class:`Site`), derived from a trace.

A site says which LMDeploy module and parameter rows the checkpoint weight's rows land in, which of
the checkpoint's rows and columns arrive there (``rows`` and ``cols``: spans of :mod:`.weight_trace`),
and how LoRA on it can be served. A LoRA delta ``B @ A`` is a weight delta, so this rank's ``lora_B``
is ``B[rows]`` and its ``lora_A`` is ``A[:, cols]``: one gather covers the packed section, InternLM2's
interleaved ``wqkv``, Phi-3's fused ``qkv_proj``, DeepSeek's rope-row order and every TP cut.

No torch at module level: ``merge`` (through :class:`~.model_map.CheckpointMap`) uses :class:`Site` too.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from .weight_trace import Entry

Span = tuple[int, int, int]


class Serving(str, Enum):
    """How a linear layer takes LoRA. A ``str`` enum: plans and JSON keep the plain names."""

    PER_REQUEST = "per-request"  # a LoRA slot on token rows: each sequence's own adapter
    LM_HEAD = "lm-head"  # a slot that maps logits rows to sequences itself (lm_head.RowLoRA)
    NON_TOKEN = "non-token-rows"  # a layer on vision/projector rows (a site's kind, not a way to serve)
    PLAIN_LINEAR = "plain-linear"  # a torch.nn.Linear off the token rows: LMDeploy has no LoRA slot on it
    #: A slot on vision/projector rows: each image's rows use its sequence's adapter (vision.ImageRowLoRA).
    IMAGE_ROWS = "per-request-image"
    #: Only when asked (LMDEPLOY_REGEX_LORA_FOLD_VISION=1, or _FOLD_EXPERTS=1 for routed experts): the delta is
    #: folded into the base weight at load time, so every request sees it (plan.build_folds).
    FOLDED = "folded"
    # Sites that cannot take LoRA per request; the refusal names the kind (plan.UNSERVABLE).
    MOE_EXPERTS = "moe-experts"  # routed experts of LMDeploy's fused MoE
    ABSORBED = "absorbed"  # LMDeploy copies the weight into others after loading and never runs the layer
    NO_LORA_PATH = "no-lora-path"  # a module LMDeploy builds without LoRA slots on token rows
    NOT_LOADED = "not-loaded"  # LMDeploy's loader skips the weight (or raises on it)
    EMBEDDING = "embedding"

    def __str__(self) -> str:
        return self.value


PER_REQUEST, LM_HEAD, NON_TOKEN, PLAIN_LINEAR, IMAGE_ROWS, FOLDED = (
    Serving.PER_REQUEST, Serving.LM_HEAD, Serving.NON_TOKEN, Serving.PLAIN_LINEAR, Serving.IMAGE_ROWS, Serving.FOLDED)


@dataclass(frozen=True)
class Site:
    """One Hugging Face (checkpoint) linear layer as this TP rank of LMDeploy holds it."""

    hf_name: str  # checkpoint module name
    lmdeploy_module: str
    slot: str
    in_features: int  # the checkpoint's full sizes: what the adapter's tensors must have
    out_features: int
    base_slice: tuple[int, int]  # this rank's rows of the LMDeploy parameter; (0, 0) when it holds none
    serving: Serving
    lora_capable: bool = True
    kind: str = "lora-linear"  # weight_trace.module_kind of the destination
    param: str = "weight"
    lead: tuple[int, ...] = ()  # fixed leading index of the parameter (a fused MoE parameter's expert)
    transposed: bool = False  # the parameter holds the checkpoint weight transposed (some MoE layouts)
    rows: tuple[Span, ...] | None = None  # base_slice row -> checkpoint row; None: the identity
    cols: tuple[Span, ...] | None = None  # parameter column -> checkpoint column; None: the identity
    detail: str = ""  # why it cannot be served, in words

    @property
    def empty(self) -> bool:
        """This rank holds none of the layer's rows or columns (an uneven tensor-parallel split)."""
        return self.base_slice[0] == self.base_slice[1] or self.cols == ()


def _expand(spans: tuple[Span, ...]) -> list[int]:
    out: list[int] = []
    for dest, src, n in sorted(spans):
        if dest != len(out):
            raise ValueError("the spans leave a gap")
        out.extend(range(src, src + n))
    return out


def _gather(t: torch.Tensor, dim: int, spans: tuple[Span, ...] | None) -> torch.Tensor:
    if spans is None:
        return t
    if len(spans) == 1 and spans[0][0] == 0 and spans[0][2] == t.shape[dim] and spans[0][1] == 0:
        return t
    if len(spans) == 1 and spans[0][0] == 0:  # one contiguous run: a view
        return t.narrow(dim, spans[0][1], spans[0][2])
    import torch

    return t.index_select(dim, torch.tensor(_expand(spans), dtype=torch.long, device=t.device))


def local_lora(site: Site, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's ``lora_A`` (r, in_local) and ``lora_B`` (rows of base_slice, r) from the adapter's full tensors."""
    return _gather(a, 1, site.cols), _gather(b, 0, site.rows)


def local_weight(site: Site, w: torch.Tensor) -> torch.Tensor:
    """This rank's part of a full checkpoint weight ``w`` (out, in), in base_slice row order."""
    return _gather(_gather(w, 0, site.rows), 1, site.cols)


def served_rows(modules: dict, site: Site) -> torch.Tensor:
    """The view of the served parameter that ``site``'s rows occupy on this rank, as (out, in)."""
    weight = getattr(modules[site.lmdeploy_module], site.param)
    for index in site.lead:
        weight = weight[index]
    if site.transposed:
        weight = weight.t()
    return weight[site.base_slice[0]:site.base_slice[1]]


def derive_site(entry: Entry, param_shapes: dict[str, tuple[int, ...]]) -> Site | str:
    """The site of one traced checkpoint weight; a string says why there is none (LMDeploy skips it, ...)."""
    hf_name = entry.name.removesuffix(".weight")
    out_f, in_f = int(entry.shape[0]), int(entry.shape[1])
    if entry.status != "loaded":
        return f"{entry.status}: {entry.detail}" if entry.detail else entry.status
    groups: dict[tuple, list] = {}
    for w in entry.writes:
        groups.setdefault((w.module, w.param, w.lead), []).append(w)
    if len(groups) > 1:
        where = ", ".join(f"{m}.{p}" for m, p, _ in groups)
        return f"untraceable: split across several LMDeploy parameters ({where})"
    (module, param, lead), writes = next(iter(groups.items()))
    shape = param_shapes[f"{module}.{param}"]
    if len(shape) < 2:
        return f"untraceable: loaded into the {len(shape)}-D parameter {module}.{param}"
    transposed = writes[0].transposed
    n_rows, n_cols = (shape[-1], shape[-2]) if transposed else (shape[-2], shape[-1])
    row_spans = sorted(span for w in writes for span in w.rows)
    cols = tuple(sorted(writes[0].cols))
    if any(tuple(sorted(w.cols)) != cols for w in writes):  # spans are maximal runs: equal maps have equal spans
        return f"untraceable: its parts use different input columns of {module}"
    base = dict(hf_name=hf_name, lmdeploy_module=module, in_features=in_f, out_features=out_f, param=param,
                lead=lead, transposed=transposed, kind=writes[0].kind)
    if not row_spans or not cols:  # this rank holds none of it
        return Site(slot=module.rsplit(".", 1)[-1], base_slice=(0, 0), serving=PER_REQUEST, rows=(), cols=(), **base)
    first = row_spans[0][0]
    if not _contiguous(row_spans, first):
        return f"untraceable: its rows of {module} overlap or are not contiguous"
    last = row_spans[-1][0] + row_spans[-1][2]
    if not _contiguous(cols, 0) or cols[-1][0] + cols[-1][2] != n_cols:
        return f"untraceable: it does not cover the {n_cols} input columns of {module} once each"
    packed = (first, last) != (0, n_rows)  # shares the parameter with other checkpoint weights
    slot = hf_name.rsplit(".", 1)[-1] if packed else module.rsplit(".", 1)[-1]
    if lead:
        slot += "@" + ",".join(map(str, lead))
    rows = _merged(tuple((d - first, s, n) for d, s, n in row_spans))
    return Site(slot=slot, base_slice=(first, last), serving=PER_REQUEST, rows=_identity_or(rows, out_f),
                cols=_identity_or(cols, in_f), **base)


def _merged(spans: tuple[Span, ...]) -> tuple[Span, ...]:
    """Join spans that continue each other (writes of one weight in several pieces), so equal maps are equal."""
    out: list[list[int]] = []
    for dest, src, n in spans:
        if out and out[-1][0] + out[-1][2] == dest and out[-1][1] + out[-1][2] == src:
            out[-1][2] += n
        else:
            out.append([dest, src, n])
    return tuple((d, s, n) for d, s, n in out)


def _contiguous(spans, start: int) -> bool:
    for dest, _, n in spans:
        if dest != start:
            return False
        start += n
    return True


def _identity_or(spans: tuple[Span, ...], full: int) -> tuple[Span, ...] | None:
    """None for the identity over the whole checkpoint dim (the common case: nothing to gather)."""
    return None if spans == ((0, 0, full),) else spans
