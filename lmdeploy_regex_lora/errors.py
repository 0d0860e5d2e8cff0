"""The plugin's one error type: every refusal names the adapter, the file, the field or module, and the fix."""

from __future__ import annotations


class AdapterError(ValueError):
    """An adapter that cannot be served exactly as PEFT computes it.

    Raised before the model is touched (or after rolling back), so a caller that catches it
    still holds the model it had. ``str(err)`` is written for the person who runs the server.
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
        return text

    def __reduce__(self):
        # Keeps the error intact across process boundaries (LMDeploy's spawned engine and Ray
        # workers pickle exceptions back to the caller).
        return (
            _rebuild,
            (self.problem, self.adapter, self.file, self.field, self.module, self.fix),
        )


def _rebuild(problem, adapter, file, field, module, fix) -> AdapterError:
    return AdapterError(problem, adapter=adapter, file=file, field=field, module=module, fix=fix)
