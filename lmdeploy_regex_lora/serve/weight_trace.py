"""Where LMDeploy's own loader puts each checkpoint row and column, read by running it on probes.

A LoRA delta is a weight delta, so its rows belong exactly where the base weight's rows go. Rather
than a table per model (renames, packed ``qkv_proj``/``gate_up_proj``, InternLM2's interleaved
``wqkv``, Phi-3's fused ``qkv_proj``, DeepSeek's rope-row order, tensor-parallel cuts), the served
model class's own ``load_weights`` is run on a **skeleton** (the same class built on ``meta``, in the
same tensor-parallel context: see :mod:`.model_map`), fed *probe* tensors whose values name their
own row and column. A :class:`~torch.overrides.TorchFunctionMode` records every write into the
skeleton's parameters and executes none of them; a meta view's offset and strides say which
elements of which parameter were written, and the values say which checkpoint rows and columns
arrived there. The served model is never touched.

Probes are float64 broadcast ``arange`` views (no memory per element): ``row[i, j] = tag + i + 1`` and
``col[i, j] = tag' + j + 1``, the tag (a multiple of 2**25) numbering the probe. :class:`Record` is plain data.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch.overrides import TorchFunctionMode

_SHIFT = 1 << 25  # float64 is exact to 2**53: 2**28 probes of dimensions below 2**25
_EXACT_LIMIT = _SHIFT - 1

Span = tuple[int, int, int]
"""(dest_start, src_start, length): destination index ``dest_start + k`` holds checkpoint index ``src_start + k``."""


def to_spans(dest, src) -> tuple[Span, ...]:
    """Run-length encode parallel index sequences (arrays or tensors) into spans where both advance by one."""
    dest, src = np.asarray(dest, dtype=np.int64), np.asarray(src, dtype=np.int64)
    if dest.size == 0:
        return ()
    run = np.arange(dest.size, dtype=np.int64)
    if np.array_equal(dest - dest[0], run) and np.array_equal(src - src[0], run):  # one run: the common case
        return ((int(dest[0]), int(src[0]), int(dest.size)),)
    brk = np.ones(dest.size, dtype=bool)
    brk[1:] = (np.diff(dest) != 1) | (np.diff(src) != 1)
    starts = np.flatnonzero(brk)
    lengths = np.diff(starts, append=dest.size)
    return tuple(zip(dest[starts].tolist(), src[starts].tolist(), lengths.tolist(), strict=True))


@dataclass
class Write:
    """One copy of (part of) a checkpoint weight into one LMDeploy parameter."""

    module: str  # the LMDeploy module owning the parameter
    param: str  # its attribute ('weight', ...)
    kind: str  # module_kind(): 'lora-linear', 'moe-experts', 'plain-linear', 'embedding', 'other:<Class>'
    lead: tuple[int, ...]  # fixed indices of the other dims (a fused MoE parameter's expert)
    transposed: bool  # checkpoint rows run along the parameter's last dim (a transposing loader)
    rows: tuple[Span, ...]  # destination row <- checkpoint row
    cols: tuple[Span, ...]  # destination column <- checkpoint column


@dataclass
class Entry:
    """What LMDeploy's loader did with one checkpoint weight."""

    name: str  # checkpoint key ('model.layers.0.self_attn.q_proj.weight')
    shape: tuple[int, ...]
    status: str  # 'loaded' | 'skipped' (nothing written) | 'error' (the loader raised) | 'untraceable'
    detail: str = ""
    writes: list[Write] = field(default_factory=list)


@dataclass
class Record:
    entries: dict[str, Entry]  # by checkpoint key


def module_kind(model: torch.nn.Module, module_name: str) -> str:
    """What a parameter's module is, for LoRA: a ``LinearBase`` has a LoRA path, LMDeploy's fused MoE has none."""
    from lmdeploy.pytorch.nn.linear.base import LinearBase

    try:
        from lmdeploy.pytorch.nn.moe.base import FusedMoEBase
    except ImportError:  # older LMDeploy
        FusedMoEBase = ()  # noqa: N806
    mod = model.get_submodule(module_name)
    if isinstance(mod, LinearBase):
        return "lora-linear"
    parts = module_name.split(".")
    for i in range(len(parts), -1, -1):
        if FusedMoEBase and isinstance(model.get_submodule(".".join(parts[:i])), FusedMoEBase):
            return "moe-experts"
    if isinstance(mod, torch.nn.Linear):
        return "plain-linear"
    if isinstance(mod, torch.nn.Embedding) or type(mod).__name__.endswith("Embedding"):
        return "embedding"
    return f"other:{type(mod).__name__}"


def _storage_key(t: torch.Tensor):
    try:
        return t.untyped_storage()._cdata
    except Exception:  # tensor subclasses without storage
        return None


def storages_of(model: torch.nn.Module) -> dict:
    """Storage -> the first parameter name that uses it (tied parameters share one)."""
    out: dict = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        out.setdefault(_storage_key(p), name)
    return out


@dataclass
class _Event:
    key: tuple  # (param, offset, shape, stride) of the destination view
    param: str | None
    dest: torch.Tensor | None  # the 2-D meta destination view; None when the write cannot be read
    src: tuple | None  # (values down column 0, values along row 0, constant along dim 0?, along dim 1?)
    note: str = ""
    fill: bool = False  # a constant (a zeroed padding row): no checkpoint data
    item: int = -1  # the probe the values came from
    pos: int = -1  # the probe being fed at the time


class _CaptureWrites(TorchFunctionMode):
    """Record writes into the skeleton's parameters instead of executing them; keep probes exact on CPU."""

    _CASTS = {"float", "half", "bfloat16", "double"}

    def __init__(self, storages: dict) -> None:
        super().__init__()
        self.storages = storages
        self.events: list[_Event] = []
        self.pos = -1

    def _param_of(self, t) -> str | None:
        return self.storages.get(_storage_key(t)) if isinstance(t, torch.Tensor) else None

    def _bad(self, key: tuple, name: str | None, note: str) -> None:
        self.events.append(_Event(key, name, None, None, note, pos=self.pos))

    def _record(self, dest: torch.Tensor, src, note: str = "") -> None:
        name = self._param_of(dest)
        shape = tuple(dest.shape)
        key = (name, dest.storage_offset(), shape, dest.stride())
        if isinstance(src, (int, float)):
            self.events.append(_Event(key, name, None, None, "constant", fill=True, pos=self.pos))
            return
        if note or not isinstance(src, torch.Tensor) or src.is_meta:
            return self._bad(key, name, note or "the source is not a probe")
        try:
            src = src.expand(shape)
        except RuntimeError as exc:
            return self._bad(key, name, f"shape mismatch {tuple(src.shape)} -> {shape}: {exc}")
        if len(shape) == 1:  # one row or column
            dest, src, shape = dest.unsqueeze(0), src.unsqueeze(0), (1, shape[0])
        if len(shape) != 2:
            return self._bad(key, name, f"{len(shape)}-D destination view")
        if shape[0] == 0 or shape[1] == 0:  # this rank holds none of it (uneven TP split)
            self.events.append(_Event(key, name, dest, (np.zeros(0), np.zeros(0), True, True), pos=self.pos))
            return
        if src.dtype != torch.float64:
            src = src.double()
        # numpy copies of the edges (a view would keep a materialised probe alive)
        col0, row0 = src[:, 0].numpy().copy(), src[0].numpy().copy()
        low, high = min(col0.min(), row0.min()), max(col0.max(), row0.max())
        lo = low // _SHIFT  # every value of one probe lies in [item * 2**25 + 1, (item + 1) * 2**25)
        if low - lo * _SHIFT < 1:  # a constant the loader made up (a zeroed padding row), not checkpoint data
            self.events.append(_Event(key, name, None, None, "constant", fill=True, pos=self.pos))
            return
        if high // _SHIFT != lo:
            return self._bad(key, name, "values from several probes in one copy")
        const0 = _constant_along(src, 0) if (col0 == col0[0]).all() else False
        const1 = _constant_along(src, 1) if (row0 == row0[0]).all() else False
        self.events.append(_Event(key, name, dest, (col0, row0, const0, const1), item=int(lo), pos=self.pos))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        target = args[0] if args else None
        if name == "copy_" and self._param_of(target):
            self._record(target, args[1])
            return target
        if name == "__setitem__" and self._param_of(target):
            try:
                view = target[args[1]]  # basic indexing on meta is a view with offset and strides
                if _storage_key(view) != _storage_key(target):
                    raise TypeError("advanced index")
                self._record(view, args[2])
            except Exception as exc:
                self._record(target, None, f"__setitem__ with a non-view index ({exc})")
            return None
        if name == "index_copy_" and self._param_of(target):
            dim, index, src = args[1:4]
            for k, i in enumerate(index.tolist()):
                self._record(target.select(dim, i), src.select(dim, k))
            return target
        if name == "__set__" and self._param_of(target):
            self._record(target, None, "replaces the parameter's data (param.data = ...)")
            return None
        if name in ("fill_", "zero_") and self._param_of(target):
            self._record(target, 0)
            return target
        if name.endswith("_") and not name.startswith("__") and self._param_of(target):
            self._record(target, None, f"in-place {name} on the parameter")
            return target
        out = kwargs.get("out")
        if out is not None and self._param_of(out):
            self._record(out, None, f"{name}(out=parameter)")
            return out
        # Loaders move the loaded tensor to param.device (meta) and may cast it (bf16 would round the probe
        # values): floating CPU tensors keep device and dtype; others are converted but stay on CPU.
        if name in ("to", "cuda") or name in self._CASTS or (name == "type" and (len(args) > 1 or kwargs)):
            if isinstance(target, torch.Tensor) and target.device.type != "meta":
                if target.is_floating_point() or name == "cuda":
                    return target
                if name == "to":
                    keep = [a for a in args[1:] if isinstance(a, torch.dtype)]
                    dtype = kwargs.get("dtype", keep[0] if keep else None)
                    return func(target, dtype) if dtype is not None else target
        return func(*args, **kwargs)


def _constant_along(t: torch.Tensor, dim: int) -> bool:
    if t.size(dim) <= 1 or t.stride(dim) == 0:
        return True
    return bool(torch.equal(t, t.narrow(dim, 0, 1).expand_as(t)))


def _unravel(param: torch.Tensor, flat: np.ndarray) -> list[np.ndarray]:
    """Storage positions -> index tuples of ``param`` (any non-overlapping strides)."""
    rel = flat - param.storage_offset()
    idx: list = [None] * param.dim()
    for d in sorted(range(param.dim()), key=lambda d: -param.stride(d)):
        st = param.stride(d)
        idx[d] = rel // st if st else np.zeros_like(rel)
        rel = rel - idx[d] * st if st else rel
    return idx


def _decode(ev_r: _Event, ev_c: _Event, param: torch.Tensor, module: str, pname: str, kind: str) -> Write:
    """Turn the row-probe and column-probe copies of one destination view into a :class:`Write`."""
    dest = ev_r.dest
    (r_col0, r_row0, r_c0, r_c1), (c_col0, c_row0, c_c0, c_c1) = ev_r.src, ev_c.src
    if dest.numel() == 0:
        return Write(module, pname, kind, (), False, (), ())
    if r_c1 and c_c0:  # destination axis 0 carries checkpoint rows
        hf_rows, hf_cols, row_axis = r_col0, c_row0, 0
    elif r_c0 and c_c1:  # a transposing loader
        hf_rows, hf_cols, row_axis = r_row0, c_col0, 1
    else:
        raise ValueError("rows and columns are mixed (reshaped across checkpoint rows?)")
    hf_rows = hf_rows - ev_r.item * _SHIFT
    hf_cols = hf_cols - ev_c.item * _SHIFT
    for t in (hf_rows, hf_cols):
        if not (t == np.floor(t)).all() or (t < 1).any():
            raise ValueError("the probe values changed on the way (arithmetic on the weight)")
    off = dest.storage_offset()
    pos_r = off + np.arange(dest.size(row_axis), dtype=np.int64) * dest.stride(row_axis)
    pos_c = off + np.arange(dest.size(1 - row_axis), dtype=np.int64) * dest.stride(1 - row_axis)
    idx_r, idx_c = _unravel(param, pos_r), _unravel(param, pos_c)
    var_r = [d for d in range(param.dim()) if (idx_r[d] != idx_r[d][0]).any()]
    var_c = [d for d in range(param.dim()) if (idx_c[d] != idx_c[d][0]).any()]
    if len(var_r) > 1 or len(var_c) > 1:
        raise ValueError("a destination axis spans several parameter dims")
    col_dim = var_c[0] if var_c else param.dim() - 1
    row_dim = var_r[0] if var_r else (param.dim() - 2 if col_dim != param.dim() - 2 else param.dim() - 1)
    lead = tuple(int(idx_r[d][0]) for d in range(param.dim()) if d not in (row_dim, col_dim))
    return Write(module, pname, kind, lead, row_dim > col_dim, to_spans(idx_r[row_dim], hf_rows - 1),
                 to_spans(idx_c[col_dim], hf_cols - 1))


def _loader_iter(model: torch.nn.Module, items, dummy: list[str]):
    """What ``load_model_weights`` feeds ``model.load_weights``: renamed names, none under dummy modules."""
    from lmdeploy.pytorch.weight_loader.model_weight_loader import ModelWeightLoader

    it = ModelWeightLoader._rename_weights_iterator(items, model)
    return ModelWeightLoader._skip_dummy_iterator(it, dummy) if dummy else it


def _probes(k: int, out_f: int, in_f: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = torch.arange(1, out_f + 1, dtype=torch.float64) + float(2 * k * _SHIFT)
    cols = torch.arange(1, in_f + 1, dtype=torch.float64) + float((2 * k + 1) * _SHIFT)
    return rows.view(out_f, 1).expand(out_f, in_f), cols.view(1, in_f).expand(out_f, in_f)


def _feed(model, mode: _CaptureWrites, items: list, dummy: list[str], one_at_a_time: bool) -> dict[int, Exception]:
    """``model.load_weights`` over ``items`` (name, probe) under ``mode``; returns {item: exception}.

    Row probes (even items), then column probes (odd), so no call sees a name twice (VLM loaders buffer
    their LLM's weights by name). A name that raises is recorded and the pass goes on after it.
    """
    errors: dict[int, Exception] = {}
    with torch.inference_mode(), mode:
        for parity in (0, 1):
            order = list(range(parity, len(items), 2))

            def gen(start: int, stop: int, order=order):
                for j in range(start, stop):
                    mode.pos = order[j]
                    yield items[order[j]]

            pos, step = 0, 1 if one_at_a_time else len(order)
            while pos < len(order):
                stop = min(len(order), pos + step)
                mode.pos = -1
                try:
                    model.load_weights(_loader_iter(model, gen(pos, stop), dummy))
                    pos = stop
                except Exception as exc:
                    errors[mode.pos] = exc
                    pos = order.index(mode.pos) + 1 if mode.pos >= 0 else stop
    return errors


def _retry_in_place(model, mode: _CaptureWrites, storages: dict, errors: dict, names: list[str],
                    shapes: dict, dummy: list[str]) -> None:
    """Loaders that edit the loaded tensor in place (DeepSeek's rope-row permutation) cannot write into a
    broadcast probe: trace those names again, one at a time, with materialised probes."""
    redo_k = sorted({i // 2 for i, exc in errors.items() if "single memory location" in str(exc)})
    if not redo_k:
        return
    items = []
    for k in redo_k:
        items.extend((names[k], p.contiguous()) for p in _probes(k, *shapes[names[k]]))
        errors.pop(2 * k, None), errors.pop(2 * k + 1, None)
    redo = _CaptureWrites(storages)
    for j, exc in _feed(model, redo, items, dummy, one_at_a_time=True).items():
        errors[2 * redo_k[j // 2] + j % 2] = exc
    keep = {2 * k + p for k in redo_k for p in (0, 1)}
    mode.events = [ev for ev in mode.events if ev.item not in keep and ev.pos not in keep]
    for ev in redo.events:  # probe values carry the real item; constants and failures the retry position
        if ev.item < 0 and ev.pos >= 0:
            ev.pos = 2 * redo_k[ev.pos // 2] + ev.pos % 2
        mode.events.append(ev)


def trace_weights(skeleton: torch.nn.Module, shapes: dict[str, tuple[int, int]]) -> Record:
    """Trace the checkpoint weights ``shapes`` (key -> 2-D shape) through ``skeleton.load_weights``.

    ``skeleton`` must be all-``meta`` (writes are never executed, but the loaders run for real) and
    built in the served model's tensor-parallel context.
    """
    params = dict(skeleton.named_parameters(remove_duplicate=False))
    storages = storages_of(skeleton)
    dummy = [f"{n}." for n, m in skeleton.named_modules() if getattr(m, "_is_dummy_mod", False)]
    entries: dict[str, Entry] = {}
    items: list = []
    names: list[str] = []
    for name, shape in shapes.items():
        if max(shape) >= _EXACT_LIMIT:
            entries[name] = Entry(name, shape, "untraceable", "a dimension too large for the probes")
            continue
        entries[name] = Entry(name, shape, "loaded")
        items.extend((name, p) for p in _probes(len(names), *shape))
        names.append(name)
    mode = _CaptureWrites(storages)
    errors = _feed(skeleton, mode, items, dummy, one_at_a_time=False)
    _retry_in_place(skeleton, mode, storages, errors, names, shapes, dummy)
    for i, exc in errors.items():
        entries[names[i // 2]].status, entries[names[i // 2]].detail = "error", f"{type(exc).__name__}: {exc}"
    _attribute(skeleton, mode.events, entries, names, params)
    return Record(entries)


def _attribute(skeleton, events: list[_Event], entries: dict[str, Entry], names: list[str], params: dict) -> None:
    """Sort the writes by probe (their values say which) and decode each name's row and column writes."""
    writer: dict[tuple, int] = {}
    for ev in events:
        if ev.item >= 0:
            writer.setdefault((ev.param, ev.item % 2), ev.item)
    by_item: dict[int, list[_Event]] = {}
    for ev in events:  # constants go to the probe that wrote the same parameter, else to the one being fed
        item = ev.item if ev.item >= 0 else (writer.get((ev.param, ev.pos % 2), ev.pos) if ev.fill else ev.pos)
        by_item.setdefault(item, []).append(ev)
    kinds: dict[str, str] = {}
    for k, name in enumerate(names):
        entry = entries[name]
        if entry.status == "error":
            continue
        ev_r, ev_c = by_item.get(2 * k, []), by_item.get(2 * k + 1, [])
        if len(ev_r) != len(ev_c) or any(a.key != b.key for a, b in zip(ev_r, ev_c, strict=True)):
            entry.status, entry.detail = "untraceable", "its row and column probes were written to different places"
            continue
        for a, b in zip(ev_r, ev_c, strict=True):
            if a.fill and b.fill:
                continue
            if a.dest is None or b.dest is None:
                entry.status, entry.detail = "untraceable", f"{a.param}: {a.note or b.note}"
                break
            module, _, pname = a.param.rpartition(".")
            if module not in kinds:
                kinds[module] = module_kind(skeleton, module)
            try:
                entry.writes.append(_decode(a, b, params[a.param], module, pname, kinds[module]))
            except ValueError as exc:
                entry.status, entry.detail = "untraceable", f"{a.param}: {exc}"
                break
        if entry.status == "loaded" and not entry.writes:
            entry.status = "skipped"


class _CaptureDerived(_CaptureWrites):
    """Record copies between skeleton parameters (post-load hooks), following values computed from them."""

    def __init__(self, storages: dict) -> None:
        super().__init__(storages)
        self.derived: list[tuple[str, str]] = []  # (destination, source)
        self._origin: dict[int, str] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in ("copy_", "__setitem__") and self._param_of(args[0]):
            src = args[1] if name == "copy_" else args[2]
            origin = (self._param_of(src) or self._origin.get(id(src))) if isinstance(src, torch.Tensor) else None
            self.derived.append((self._param_of(args[0]), origin or "?"))
            return args[0] if name == "copy_" else None
        out = func(*args, **kwargs)
        srcs = [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)]
        origin = next((self._param_of(a) or self._origin.get(id(a)) for a in srcs
                       if self._param_of(a) or id(a) in self._origin), None)
        if origin:
            for o in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(o, torch.Tensor):
                    self._origin[id(o)] = origin
        return out


def trace_post_load(skeleton: torch.nn.Module) -> dict[str, list[str]]:
    """Parameters LMDeploy copies into other parameters after loading: {source: [destinations]}.

    Runs the skeleton's ``update_weights`` then ``process_weights_after_loading`` hooks (the order of
    LMDeploy's weight loader), recording parameter-to-parameter copies without executing them. DeepSeek's
    MLA copies ``kv_b_proj.weight`` into its ``kc``/``vc`` weights and never runs ``kv_b_proj``. The hooks
    also bring the skeleton to the served model's post-load state (tied heads).
    """
    storages = storages_of(skeleton)
    derived: dict[str, list[str]] = {}
    for hook_name in ("update_weights", "process_weights_after_loading"):
        for _, mod in skeleton.named_modules():
            hook = getattr(mod, hook_name, None)
            if not callable(hook):
                continue
            mode = _CaptureDerived(storages)
            try:
                with torch.inference_mode(), mode:
                    hook()
            except Exception:  # a hook that cannot run on meta: the skeleton guard compares the shapes
                pass
            for dest, src in mode.derived:
                if src != dest:
                    derived.setdefault(src, []).append(dest)
    return derived
