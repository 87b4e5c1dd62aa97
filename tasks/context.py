"""What a step gets from the step command: its run id, the resolved config and its inputs."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from tasks.config import Config, load_config
from tasks.errors import StepError


@dataclass
class StepContext:
    step: str
    run_id: str
    config: Config
    overrides: list[str] = field(default_factory=list)
    inputs: dict[str, str] = field(default_factory=dict)
    config_path: str | None = None

    def config_with(self, extra: dict) -> Config:
        """This run's config (same file, same --set overrides) with more overrides on top, e.g. HPO's choices."""
        return load_config(self.config_path, [*self.overrides, *(f"{k}={json.dumps(v)}" for k, v in extra.items())])

    def require_input(self, key: str) -> str:
        if not self.inputs.get(key):
            raise StepError(f"{self.step}: needs --input {key}=... (got inputs: {sorted(self.inputs)})")
        return self.inputs[key]

    def int_input(self, key: str, default: int | None = None, minimum: int | None = None) -> int | None:
        """An integer input (e.g. --input rows=500); a clear error naming the step and input when it is not one."""
        raw = (self.inputs.get(key) or "").strip()
        if not raw:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise StepError(f"{self.step}: --input {key}={raw!r} is not an integer") from None
        if minimum is not None and value < minimum:
            raise StepError(f"{self.step}: --input {key}={raw!r} must be at least {minimum}")
        return value
