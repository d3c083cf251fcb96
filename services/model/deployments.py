"""Model deployments: which OpenAI-compatible endpoints (and keys) serve each model name callers use.

The file (`CHATMESH_MODEL_DEPLOYMENTS_FILE`, YAML) is read and checked once, at start; a bad file stops the
process with every problem named by its entry, e.g.
`models.gpt-4o-mini.deployments[1].keys[0]: environment variable OPENAI_KEY_2 is not set`:

    models:
      gpt-4o-mini:                       # the model name callers use ("*": any model not listed)
        fallback_model: gpt-4o           # optional: another entry, tried when every deployment of this one failed
        deployments:                     # ordered, non-empty; names unique across the file
          - name: openai-a
            base_url: https://api.openai.com/v1
            model: gpt-4o-mini           # upstream name; default: the entry's name (for "*", the caller's)
            keys: [{env: OPENAI_KEY_1}, {file: /run/secrets/openai-2}]   # never a literal key
            price_usd_per_million: [0.15, 0.60]   # optional; default: model_prices_usd_per_million
            weight: 2                    # default 1
            first_token_timeout_seconds: 10       # default: model_first_token_timeout_seconds
    breaker: {window: 20, min_calls: 5, failure_rate: 0.5, open_seconds: 10}

Without the file, every model is served by one deployment, "default", from OPENAI_API_KEY / OPENAI_BASE_URL
(or the bundled simulator), as before deployments existed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from chatmesh.runtime.settings import ConfigurationError, ModelSettings

ANY_MODEL = "*"
DEFAULT_DEPLOYMENT = "default"


class DeploymentsError(ConfigurationError):
    """The deployments file is unusable; the message names every bad entry."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class KeySpec(_Strict):
    """Where a key is read from: an environment variable or a file (its content, stripped)."""

    env: str | None = Field(default=None, min_length=1)
    file: str | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _exactly_one(self) -> KeySpec:
        if (self.env is None) == (self.file is None):
            raise ValueError("a key is either {env: VARIABLE} or {file: PATH}")
        return self


class DeploymentSpec(_Strict):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.:-]+$")
    base_url: str = Field(pattern=r"^https?://\S+$")
    model: str | None = Field(default=None, min_length=1)
    keys: list[KeySpec] = Field(min_length=1)
    price_usd_per_million: tuple[Annotated[float, Field(ge=0)], Annotated[float, Field(ge=0)]] | None = None
    weight: float = Field(default=1.0, gt=0)
    first_token_timeout_seconds: float | None = Field(default=None, gt=0)


class ModelSpec(_Strict):
    fallback_model: str | None = None
    deployments: list[DeploymentSpec] = Field(min_length=1)


class BreakerSpec(_Strict):
    """A deployment's circuit breaker: open when, over its last `window` calls (at least `min_calls`), the
    share of failures is at least `failure_rate`; one probe call after `open_seconds`."""

    window: int = Field(default=20, ge=1)
    min_calls: int = Field(default=5, ge=1)
    failure_rate: float = Field(default=0.5, gt=0, le=1)
    open_seconds: float = Field(default=10.0, gt=0)

    @model_validator(mode="after")
    def _min_calls_fit(self) -> BreakerSpec:
        if self.min_calls > self.window:
            raise ValueError("min_calls must not be above window")
        return self


class DeploymentsFile(_Strict):
    models: dict[str, ModelSpec] = Field(min_length=1)
    breaker: BreakerSpec = BreakerSpec()


@dataclass(frozen=True, slots=True)
class Deployment:
    """One OpenAI-compatible endpoint of a model, with its keys (never logged) and limits."""

    name: str
    base_url: str
    # The model name sent upstream; None: the caller's (a "*" entry without `model`).
    upstream_model: str | None
    keys: tuple[str, ...]
    price_usd_per_million: tuple[float, float] | None
    weight: float
    # None (the default deployment, without a file): no limit but the caller's deadline, as before.
    first_token_timeout_seconds: float | None

    def __repr__(self) -> str:  # never the keys
        return f"Deployment({self.name!r}, {self.base_url!r}, keys={len(self.keys)})"


@dataclass(frozen=True, slots=True)
class ModelRoute:
    """A model name callers use: its deployments, in the file's order, and the model to fall back to."""

    name: str
    deployments: tuple[Deployment, ...]
    fallback_model: str | None


@dataclass(frozen=True, slots=True)
class Deployments:
    """The resolved configuration. `from_file`: whether it came from a deployments file (key retirement and
    circuit breakers apply only then: without one, the single default deployment behaves as before)."""

    models: Mapping[str, ModelRoute]
    breaker: BreakerSpec
    from_file: bool

    def route(self, model: str) -> ModelRoute | None:
        """The entry of `model`, else the "*" entry, else None (the model is not served)."""
        return self.models.get(model) or self.models.get(ANY_MODEL)

    def deployments(self) -> list[Deployment]:
        """Every deployment, once each, in the file's order."""
        return [deployment for route in self.models.values() for deployment in route.deployments]

    def moderation_deployment(self) -> Deployment:
        """Where moderation requests go: the first deployment of the "*" entry, else of the first entry."""
        route = self.models.get(ANY_MODEL) or next(iter(self.models.values()))
        return route.deployments[0]


def default_deployments(settings: ModelSettings) -> Deployments:
    """Without a file: one deployment, "default", for every model, from settings.model_endpoint()."""
    base_url, api_key = settings.model_endpoint()
    deployment = Deployment(
        name=DEFAULT_DEPLOYMENT,
        base_url=base_url,
        upstream_model=None,
        keys=(api_key,),
        price_usd_per_million=None,
        weight=1.0,
        first_token_timeout_seconds=None,
    )
    return Deployments({ANY_MODEL: ModelRoute(ANY_MODEL, (deployment,), None)}, BreakerSpec(), from_file=False)


def load_deployments(settings: ModelSettings, environ: Mapping[str, str] | None = None) -> Deployments:
    """The deployments of `settings.model_deployments_file`, or the default one without it. Raises
    DeploymentsError naming every bad entry."""
    if not settings.model_deployments_file:
        return default_deployments(settings)
    path = Path(settings.model_deployments_file)
    try:
        document = yaml.safe_load(path.read_text())
    except OSError as error:
        raise DeploymentsError(f"{path}: cannot be read ({error.strerror or error})") from None
    except yaml.YAMLError as error:
        raise DeploymentsError(f"{path}: not valid YAML ({error})") from None
    return parse_deployments(document, settings, os.environ if environ is None else environ, source=str(path))


def parse_deployments(
    document: Any, settings: ModelSettings, environ: Mapping[str, str], source: str = "deployments file"
) -> Deployments:
    try:
        spec = DeploymentsFile.model_validate(document)
    except ValidationError as error:
        problems = [f"{_location(problem['loc'])}: {problem['msg']}" for problem in error.errors()]
        raise DeploymentsError(_report(source, problems)) from None

    problems: list[str] = []
    seen: dict[str, str] = {}
    models: dict[str, ModelRoute] = {}
    for model_name, model in spec.models.items():
        deployments = []
        for index, deployment in enumerate(model.deployments):
            where = f"models.{model_name}.deployments[{index}]"
            if deployment.name in seen:
                problems.append(f"{where}.name: {deployment.name!r} is already the name of {seen[deployment.name]}")
            else:
                seen[deployment.name] = where
            keys = []
            for key_index, key in enumerate(deployment.keys):
                value, problem = _read_key(key, environ)
                if problem:
                    problems.append(f"{where}.keys[{key_index}]: {problem}")
                keys.append(value)
            deployments.append(
                Deployment(
                    name=deployment.name,
                    base_url=deployment.base_url.rstrip("/"),
                    upstream_model=deployment.model or (None if model_name == ANY_MODEL else model_name),
                    keys=tuple(keys),
                    price_usd_per_million=deployment.price_usd_per_million,
                    weight=deployment.weight,
                    first_token_timeout_seconds=deployment.first_token_timeout_seconds
                    or settings.model_first_token_timeout_seconds,
                )
            )
        if model.fallback_model is not None and model.fallback_model not in spec.models:
            problems.append(f"models.{model_name}.fallback_model: {model.fallback_model!r} is not a model of the file")
        models[model_name] = ModelRoute(model_name, tuple(deployments), model.fallback_model)
    problems.extend(_fallback_cycles(spec))
    if problems:
        raise DeploymentsError(_report(source, problems))
    return Deployments(models, spec.breaker, from_file=True)


def _read_key(key: KeySpec, environ: Mapping[str, str]) -> tuple[str, str | None]:
    if key.env is not None:
        value = environ.get(key.env, "").strip()
        return value, None if value else f"environment variable {key.env} is not set"
    try:
        value = Path(key.file or "").read_text().strip()
    except OSError as error:
        return "", f"key file {key.file} cannot be read ({error.strerror or error})"
    return value, None if value else f"key file {key.file} is empty"


def _fallback_cycles(spec: DeploymentsFile) -> list[str]:
    problems = []
    for start in spec.models:
        chain = [start]
        current = spec.models[start].fallback_model
        while current is not None and current in spec.models:
            if current == start:
                cycle = " -> ".join([*chain, start])
                problems.append(f"models.{start}.fallback_model: falls back in a cycle ({cycle})")
                break
            if current in chain:  # a cycle that does not pass through `start`: reported from its own members
                break
            chain.append(current)
            current = spec.models[current].fallback_model
    return problems


def _location(loc: tuple[int | str, ...]) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif part in ("function-after[_exactly_one()]", "function-after[_min_calls_fit()]"):
            continue
        else:
            text += f".{part}" if text else str(part)
    return text or "(top level)"


def _report(source: str, problems: list[str]) -> str:
    return f"{source}: " + "; ".join(problems)
