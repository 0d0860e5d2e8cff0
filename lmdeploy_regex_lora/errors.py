"""The plugin's one error type: every refusal names the adapter, the file, the field or module, and the fix.

Three helpers keep that context explicit wherever a refusal or a failure is raised:

* :class:`Blame` binds an adapter and a file once, so each refusal in a reader names only what differs;
* :func:`where` marks what the code inside works on (adapter, file, module), for failures nobody foresaw;
* :func:`stage` turns such a failure into an :class:`AdapterError` that names the stage and the innermost
  :func:`where` context, with :data:`BUG_FIX` and the original exception chained.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

BUG_FIX = ("this is a bug in lmdeploy-regex-lora, not in the adapter; please report it with the adapter_config.json "
           "and the traceback above. Meanwhile LMDEPLOY_REGEX_LORA_ON_ERROR=skip serves the other adapters.")

# C0/C1 control characters (newlines included): a name from a hostile file must not forge log lines.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """``text`` safe for any log or terminal: undecodable bytes (surrogate escapes) and controls as ``\\xNN``.

    File names that are not UTF-8 reach Python as lone surrogates; writing one to a UTF-8 stream raises
    ``UnicodeEncodeError``, so an error about such a file would itself crash the logger.
    """
    raw = text.encode("utf-8", "surrogateescape")
    clean = raw.decode("utf-8", "backslashreplace")
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", clean)


def describe_names(names, limit: int = 4) -> str:
    """``'a', 'b', 'c', 'd' and 3 more``: a few names of a set, sorted, for a message."""
    names = sorted(names)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(repr(n) for n in names[:limit]) + more


class AdapterError(ValueError):
    """An adapter that cannot be served exactly as PEFT computes it.

    Raised before the model is touched (or after rolling back), so a caller that catches it
    still holds the model it had. ``str(err)`` is written for the person who runs the server.
    The attributes keep the raw values; only the message is made printable.
    """

    def __init__(
        self,
        problem: str,
        *,
        adapter: str | None = None,
        file: str | None = None,
        field: str | None = None,
        module: str | None = None,
        fix: str | None = None,
    ) -> None:
        self.problem = problem
        self.adapter = adapter
        self.file = file
        self.field = field
        self.module = module
        self.fix = fix
        super().__init__(self._render())

    def _render(self) -> str:
        where = []
        if self.adapter is not None:
            where.append(f"adapter {self.adapter!r}")
        if self.file is not None:
            where.append(f"file {self.file}")
        if self.field is not None:
            where.append(f"field {self.field!r}")
        if self.module is not None:
            where.append(f"module {self.module!r}")
        text = f"[lmdeploy-regex-lora] {', '.join(where)}: {self.problem}" if where else self.problem
        if self.fix:
            text += f" Fix: {self.fix}"
        return printable(text)

    def __reduce__(self):
        # Keeps the error intact across process boundaries (LMDeploy's spawned engine and Ray
        # workers pickle exceptions back to the caller).
        return (
            _rebuild,
            (self.problem, self.adapter, self.file, self.field, self.module, self.fix),
        )


def _rebuild(problem, adapter, file, field, module, fix) -> AdapterError:
    return AdapterError(problem, adapter=adapter, file=file, field=field, module=module, fix=fix)


class Blame:
    """The adapter and file a reader works on, bound once: ``bad = Blame(name, file)``, then
    ``raise bad("problem.", "fix.", field="r")``."""

    def __init__(self, adapter: str | None = None, file: str | None = None) -> None:
        self.adapter = adapter
        self.file = file

    def __call__(self, problem: str, fix: str | None = None, *, field: str | None = None, module: str | None = None,
                 file: str | None = None) -> AdapterError:
        return AdapterError(problem, adapter=self.adapter, file=file or self.file, field=field, module=module,
                            fix=fix)


def bug(problem: str, *, adapter: str | None = None, file: str | None = None, module: str | None = None
        ) -> AdapterError:
    """A state the plugin itself should never reach (not the adapter's fault)."""
    return AdapterError(problem, adapter=adapter, file=file, module=module, fix=BUG_FIX)


def unexpected(exc: BaseException, stage: str, *, adapter: str | None = None, file: str | None = None,
               module: str | None = None) -> AdapterError:
    """Wrap an exception the plugin did not foresee, keeping where it happened; chain it with ``from exc``."""
    first = str(exc).splitlines()[0] if str(exc) else ""
    return bug(f"{stage} failed unexpectedly ({type(exc).__name__}: {first}).", adapter=adapter, file=file,
               module=module)


_FIELDS = ("adapter", "file", "module")
_ATTR = "_lmdeploy_regex_lora_where"
_where: ContextVar[tuple[dict, ...]] = ContextVar("lmdeploy_regex_lora_where", default=())


@contextmanager
def where(*, adapter: str | None = None, file: str | None = None, module: str | None = None) -> Iterator[None]:
    """Mark what the block works on. The innermost marks an exception leaving it with everything known
    there (inner values win); :func:`stage` reads that mark."""
    fields = {k: v for k, v in (("adapter", adapter), ("file", file), ("module", module)) if v is not None}
    token = _where.set(_where.get() + (fields,))
    try:
        yield
    except Exception as exc:
        if not hasattr(exc, _ATTR):
            known: dict = {}
            for level in _where.get():
                known.update(level)
            try:
                setattr(exc, _ATTR, known)
            except Exception:  # an exception type without a __dict__: the stage still names itself
                pass
        raise
    finally:
        _where.reset(token)


@contextmanager
def stage(name: str) -> Iterator[None]:
    """Re-raise anything but an :class:`AdapterError` as one naming ``name`` and the :func:`where` context."""
    try:
        yield
    except AdapterError:
        raise
    except Exception as exc:
        known = getattr(exc, _ATTR, {})
        raise unexpected(exc, name, **{k: known.get(k) for k in _FIELDS}) from exc
