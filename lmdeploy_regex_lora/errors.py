"""The plugin's one error type: every refusal names the adapter, the file, the field or module, and the fix."""

from __future__ import annotations

import re

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


def unexpected(exc: BaseException, stage: str, *, adapter: str | None = None, file: str | None = None,
               module: str | None = None) -> AdapterError:
    """Wrap an exception the plugin did not foresee, keeping where it happened; chain it with ``from exc``."""
    first = str(exc).splitlines()[0] if str(exc) else ""
    return AdapterError(f"{stage} failed unexpectedly ({type(exc).__name__}: {first}).", adapter=adapter, file=file,
                        module=module, fix=BUG_FIX)
